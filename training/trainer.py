"""Train one model on a split, cross-validate it, and write run reports.

``fit`` trains on a training split with class-balanced cross-entropy, picks the best epoch by the
inner-validation ``balanced_accuracy`` (early stopping after ``patience`` epochs without
improvement) and returns the model in that state. ``cross_validate`` runs ``fit`` on every fold of
a protocol and collects out-of-fold probabilities; ``write_report`` stores the JSON report and the
confusion-matrix PNG under ``runs/<model>-<variant>-<timestamp>/``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.analysis.analyzer import FeatureConfig
from app.analysis.inputs import INPUTS, collate
from training import metrics as M
from training.augment import AugmentConfig, augment_batch
from training.cache import Sample
from training.models import REGISTRY, build_model, config_dict
from training.models.layers import SeedEnsemble, input_names_of
from training.protocols import Fold

log = logging.getLogger(__name__)

# inputs standardised with training-split statistics (last axis): the registry's continuous inputs
CONTINUOUS_INPUTS = tuple(n for n, spec in INPUTS.items() if spec.continuous)


# ------------------------------------------------------------------------------------- settings


@dataclass
class TrainSettings:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 30
    patience: int = 8
    optimizer: str = "adam"  # "adam" (L2 weight decay) or "adamw" (decoupled)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available, else CPU
    threads: int = 0  # torch CPU threads; 0 = the cores this process may use
    augment: bool = False  # feature noise, time masking and waveform noise (``training.augment``)
    members: int = 1  # trainings with seeds seed, seed+1, ... averaged into one model (SeedEnsemble)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_defaults(model_id: str) -> dict:
    """The model module's ``TRAIN_DEFAULTS`` (lr, weight_decay, batch_size, epochs, patience, ...)."""
    module = importlib.import_module(REGISTRY[model_id][0]) if model_id in REGISTRY else None
    return dict(getattr(module, "TRAIN_DEFAULTS", {}) or {})


def make_settings(model_id: str, **overrides) -> TrainSettings:
    """Model ``TRAIN_DEFAULTS`` first, then non-None ``overrides``; unknown keys are ignored (logged)."""
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {}
    for source in (train_defaults(model_id), {k: v for k, v in overrides.items() if v is not None}):
        for k, v in source.items():
            if k in known:
                values[k] = v
            else:
                log.info("ignoring unknown training setting %s=%r", k, v)
    return TrainSettings(**values)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def set_threads(threads: int = 0) -> int:
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def variant_of(cfg) -> str:
    """A short variant name built from the fields that select a paper variant (cmt-awc ``variant``
    and ``acoustic``, adf ``fusion``/``modality``, ca-mser ``co_attention``/``features``, 3m-ser
    ``layer_norm``/``audio``), plus any non-default ``preset``."""
    if cfg is None:
        return "default"
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    parts = []
    if hasattr(cfg, "variant"):
        parts.append(str(cfg.variant))
    if getattr(cfg, "acoustic", "frames33") not in ("frames33", "waveform"):  # pretrained frames
        parts.append(str(cfg.acoustic))
    if hasattr(cfg, "fusion"):
        parts.append(str(cfg.fusion))
    if getattr(cfg, "modality", "both") != "both":
        parts.append(str(cfg.modality))
    if hasattr(cfg, "co_attention"):
        parts.append("co-attention" if cfg.co_attention else "concat")
    if hasattr(cfg, "features") and tuple(cfg.features) != tuple(defaults.get("features", ())):
        parts.append("+".join(cfg.features))
    if hasattr(cfg, "layer_norm"):
        parts.append("layernorm" if cfg.layer_norm else "no-layernorm")
    if getattr(cfg, "audio", "encoder") != "encoder":
        parts.append(str(cfg.audio))
    if getattr(cfg, "preset", "default") != "default":
        parts.append(str(cfg.preset))
    return "-".join(parts) or "default"


def model_input_names(model_id: str, n_classes: int, overrides: dict) -> tuple[str, ...]:
    """Input names of a configuration (builds a throwaway model without statistics)."""
    model, _ = build_model(model_id, n_classes, {}, **overrides)
    return tuple(model.input_names)


# ------------------------------------------------------------------------------------ statistics


def _valid_rows(name: str, sample: Sample) -> np.ndarray:
    """(rows, D) of real (non-padding) values of one continuous input of one clip.

    The registry says where padding is: inputs cut into 3-s segments (``real_rows``) end in a
    zero-padded segment that their segment mask cannot tell apart, so their real rows are counted
    from the duration; other inputs keep the rows their mask marks."""
    spec = INPUTS[name]
    x = sample.inputs[name]
    rows = x.reshape(-1, x.shape[-1])
    if spec.real_rows is not None:
        return rows[: min(len(rows), spec.real_rows(sample.duration_s))]
    mask = sample.inputs.get(spec.mask) if spec.mask else None
    if mask is not None and x.ndim == 2 and len(mask) == len(x):
        return x[mask > 0]
    return rows


def compute_stats(
    samples: Sequence[Sample], names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-input (mean, std) over the last axis, on real steps only, for the continuous inputs."""
    stats = {}
    for name in names:
        if name not in CONTINUOUS_INPUTS:
            continue
        total = sq = None
        count = 0
        for s in samples:
            rows = _valid_rows(name, s).astype(np.float64)
            if total is None:
                total, sq = np.zeros(rows.shape[1]), np.zeros(rows.shape[1])
            total += rows.sum(axis=0)
            sq += np.square(rows).sum(axis=0)
            count += len(rows)
        if not count:
            continue
        assert total is not None and sq is not None  # count > 0: the first sample set them
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - np.square(mean), 0.0))
        stats[name] = (mean.astype(np.float32), std.astype(np.float32))
    return stats


# -------------------------------------------------------------------------------------- training


@dataclass
class FitResult:
    model: nn.Module
    config: object
    stats: dict
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def batches(samples: Sequence[Sample], names: Sequence[str], size: int, device, order=None, transform=None):
    """Yield (tensors in ``names`` order, labels) batches built with ``app.analysis.inputs.collate``;
    ``transform`` (e.g. augmentation) maps the collated arrays before they become tensors."""
    order = np.arange(len(samples)) if order is None else order
    for lo in range(0, len(order), size):
        chunk = [samples[i] for i in order[lo : lo + size]]
        arrays = collate([s.inputs for s in chunk], names)
        if transform is not None:
            arrays = transform(arrays)
        tensors = [torch.from_numpy(arrays[n]).to(device) for n in names]
        labels = torch.tensor([s.label for s in chunk], dtype=torch.long, device=device)
        yield tensors, labels


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """``n / (classes_present * n_c)``: each present class weighs the same in the loss."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


@torch.no_grad()
def predict_proba(
    model: nn.Module, samples: Sequence[Sample], batch_size: int = 32, device=None
) -> np.ndarray:
    device = device or next(model.parameters()).device
    model.eval()
    names = input_names_of(model)
    out = [
        torch.softmax(model(*x), dim=-1).cpu().numpy() for x, _ in batches(samples, names, batch_size, device)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r} (adam, adamw)")


def fit(
    model_id: str,
    n_classes: int,
    train: Sequence[Sample],
    val: Sequence[Sample],
    settings: TrainSettings,
    overrides: dict | None = None,
    epochs: int | None = None,
) -> FitResult:
    """Train on ``train`` (see ``fit_one``); with ``settings.members`` > 1, train that many copies
    with consecutive seeds, each selecting its own best epoch, and return their ``SeedEnsemble``."""
    if settings.members <= 1:
        return fit_one(model_id, n_classes, train, val, settings, overrides, epochs)
    t0 = time.perf_counter()
    runs = [
        fit_one(
            model_id,
            n_classes,
            train,
            val,
            dataclasses.replace(settings, seed=settings.seed + k, members=1),
            overrides,
            epochs,
        )
        for k in range(settings.members)
    ]
    model = SeedEnsemble([r.model for r in runs]).eval()
    best = int(np.median([r.best_epoch for r in runs]))
    history = [{"member": k, **h} for k, r in enumerate(runs) for h in r.history]
    return FitResult(
        model,
        runs[0].config,
        runs[0].stats,
        best,
        max(r.epochs_run for r in runs),
        history,
        time.perf_counter() - t0,
    )


def fit_one(
    model_id: str,
    n_classes: int,
    train: Sequence[Sample],
    val: Sequence[Sample],
    settings: TrainSettings,
    overrides: dict | None = None,
    epochs: int | None = None,
) -> FitResult:
    """Train on ``train``. With ``val``: keep the epoch with the best validation balanced accuracy
    (ties: lower validation loss) and stop after ``patience`` epochs without improvement. Without
    ``val``: train exactly ``epochs`` (default ``settings.epochs``) epochs and keep the last state."""
    t0 = time.perf_counter()
    seed_everything(settings.seed)
    set_threads(settings.threads)
    device = resolve_device(settings.device)
    overrides = overrides or {}
    names = model_input_names(model_id, n_classes, overrides)
    stats = compute_stats(train, names)
    seed_everything(settings.seed)  # same initial weights whatever happened above
    model, cfg = build_model(model_id, n_classes, stats, **overrides)
    model.to(device)
    names = tuple(model.input_names)
    opt = _optimizer(model, settings)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights([s.label for s in train], n_classes).to(device))
    n_epochs = epochs or settings.epochs
    rng = np.random.default_rng(settings.seed)
    best_key, best_state, best_epoch, history = None, None, n_epochs, []
    y_val = [s.label for s in val]
    transform = None
    if settings.augment:
        aug_rng, aug_cfg = np.random.default_rng(settings.seed + 1), AugmentConfig()
        transform = lambda arrays: augment_batch(arrays, stats, aug_cfg, aug_rng)  # noqa: E731
    for epoch in range(1, n_epochs + 1):
        model.train()
        total, seen = 0.0, 0
        order = rng.permutation(len(train))
        for x, y in batches(train, names, settings.batch_size, device, order, transform):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(*x), y)
            loss.backward()
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            total += loss.item() * len(y)
            seen += len(y)
        record = {"epoch": epoch, "train_loss": total / max(seen, 1)}
        if val:
            probs = predict_proba(model, val, settings.batch_size, device)
            pred = probs.argmax(1)
            val_loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y_val)), y_val], 1e-12))))
            record.update(
                val_loss=val_loss,
                val_accuracy=M.accuracy(y_val, pred),
                val_balanced_accuracy=M.balanced_accuracy(y_val, pred, n_classes),
            )
            key = (record["val_balanced_accuracy"], -val_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch = key, epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        log.debug("%s epoch %d %s", model_id, epoch, {k: round(v, 4) for k, v in record.items()})
        if val and epoch - best_epoch >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    model.eval()
    return FitResult(model, cfg, stats, best_epoch, len(history), history, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- reporting


def run_dir(out_root: str | Path, model: str, variant: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out_root) / f"{model}-{variant}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(out_root) / f"{model}-{variant}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def oof_block(
    samples: Sequence[Sample], probs: np.ndarray, fold_of: np.ndarray, classes: Sequence[str]
) -> dict:
    """Out-of-fold probabilities keyed by clip path (7 significant digits: small probabilities keep
    their logarithm, which calibration reads)."""
    return {
        s.path: {
            "label": classes[s.label],
            "speaker": s.speaker,
            "fold": int(fold_of[i]),
            "probabilities": [float(f"{float(p):.7g}") for p in probs[i]],
        }
        for i, s in enumerate(samples)
    }


def evaluate_oof(
    samples: Sequence[Sample], probs: np.ndarray, folds: Sequence[Fold], classes: Sequence[str]
) -> tuple[dict, list[dict]]:
    """Overall metrics on pooled out-of-fold predictions, plus per-fold metrics."""
    from training.calibration import ece

    y = np.array([s.label for s in samples])
    pred = probs.argmax(1)
    overall = M.summarize(y, pred, classes)
    overall["ece"] = ece(probs, y)  # uncalibrated (training/calibration.py: 15 bins, top label)
    per_fold = []
    for f in folds:
        idx = np.array(f.test, np.int64)
        per_fold.append({**f.describe(), **M.summarize(y[idx], pred[idx], classes)})
    for key in ("accuracy", "balanced_accuracy"):
        vals = [pf[key] for pf in per_fold]
        overall[f"fold_mean_{key}"] = float(np.mean(vals))
        overall[f"fold_std_{key}"] = float(np.std(vals))
    return overall, per_fold


def write_report(report: dict, out_dir: Path, classes: Sequence[str]) -> Path:
    """``report.json`` and ``confusion.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "_path"}, indent=1))
    report["_path"] = str(path)
    m = report["metrics"]
    title = (
        f"{report['model']} {report['variant']} | {report['protocol']['name']}\n"
        f"accuracy {m['accuracy']:.3f}  balanced_accuracy {m['balanced_accuracy']:.3f}"
    )
    M.save_confusion_png(m["confusion_matrix"], classes, out_dir / "confusion.png", title)
    return path


def protocol_block(name: str, folds: Sequence[Fold], seed: int, **extra) -> dict:
    return {
        "name": name,
        "n_folds": len(folds),
        "seed": seed,
        "held_out": [
            {"fold": f.index, "test_speakers": list(f.test_speakers), "val_speakers": list(f.val_speakers)}
            for f in folds
        ],
        **extra,
    }


@dataclass
class CVResult:
    report: dict
    report_path: Path
    probabilities: np.ndarray
    best_epochs: list[int]

    @property
    def suggested_epochs(self) -> int:
        return int(np.median(self.best_epochs)) if self.best_epochs else 1


def cross_validate(
    model_id: str,
    samples: Sequence[Sample],
    classes: Sequence[str],
    folds: Sequence[Fold],
    settings: TrainSettings,
    overrides: dict | None = None,
    protocol: str = "speaker-kfold",
    dataset: dict | None = None,
    out_root: str | Path = "runs",
    conditions: dict[str, Sequence[Sample]] | None = None,
    train_conditions: Sequence[str] = (),
) -> CVResult:
    """Fit every fold, predict its test speakers, and write the run report.

    ``conditions``: other versions of the same clips (same order), e.g. ``{"call": ...}``
    (``training.conditions``): every fold's model also predicts its test speakers' clips under each,
    reported under ``conditions`` in the report. ``train_conditions``: those of them whose TRAINING
    and inner-validation speakers' clips join the clean ones in training (augmentation); a test
    speaker's clips never do."""
    overrides = overrides or {}
    conditions = dict(conditions or {})
    for name, other in conditions.items():
        if [s.path for s in other] != [s.path for s in samples]:
            raise ValueError(f"condition {name!r} holds other clips than the clean samples")
    missing = [c for c in train_conditions if c not in conditions]
    if missing:
        raise ValueError(f"train conditions {missing} have no samples")
    n_classes = len(classes)
    probs = np.zeros((len(samples), n_classes))
    cond_probs = {name: np.zeros((len(samples), n_classes)) for name in conditions}
    fold_of = np.full(len(samples), -1)
    fits, t0 = [], time.perf_counter()
    cfg = None
    for f in folds:
        train = [samples[i] for i in f.train]
        val = [samples[i] for i in f.val]
        test = [samples[i] for i in f.test]
        for name in train_conditions:
            train += [conditions[name][i] for i in f.train]
            val += [conditions[name][i] for i in f.val]
        result = fit(model_id, n_classes, train, val, settings, overrides)
        cfg = result.config
        probs[list(f.test)] = predict_proba(result.model, test, settings.batch_size)
        for name, other in conditions.items():
            cond_probs[name][list(f.test)] = predict_proba(
                result.model, [other[i] for i in f.test], settings.batch_size
            )
        fold_of[list(f.test)] = f.index
        fits.append(result)
        log.info(
            "%s fold %d/%d: best epoch %d, %.0f s",
            model_id,
            f.index + 1,
            len(folds),
            result.best_epoch,
            result.seconds,
        )
    overall, per_fold = evaluate_oof(samples, probs, folds, classes)
    for pf, r in zip(per_fold, fits, strict=True):
        pf.update(
            best_epoch=r.best_epoch,
            epochs_run=r.epochs_run,
            train_seconds=round(r.seconds, 2),
            history=r.history,
        )
    variant = variant_of(cfg)
    report = {
        "model": model_id,
        "variant": variant,
        "config": config_dict(cfg),
        "overrides": overrides,
        "train_settings": settings.to_dict(),
        "classes": list(classes),
        "dataset": dataset or {},
        "feature_config": FeatureConfig().to_dict(),
        "feature_config_digest": FeatureConfig().digest(),
        "protocol": protocol_block(protocol, folds, settings.seed),
        "metrics": overall,
        "folds": per_fold,
        "best_epochs": [r.best_epoch for r in fits],
        "train_seconds": round(time.perf_counter() - t0, 2),
        "device": str(resolve_device(settings.device)),
        "torch": torch.__version__,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "oof": oof_block(samples, probs, fold_of, classes),
    }
    add_conditions(report, samples, cond_probs, folds, classes, train_conditions)
    out = run_dir(out_root, model_id, variant)
    path = write_report(report, out, classes)
    best = [r.best_epoch for r in fits]
    return CVResult(report, path, probs, best)


def add_conditions(
    report: dict,
    samples: Sequence[Sample],
    cond_probs: dict[str, np.ndarray],
    folds: Sequence[Fold],
    classes: Sequence[str],
    train_conditions: Sequence[str] = (),
) -> None:
    """``report["conditions"][name]`` = metrics and out-of-fold probabilities of each test condition
    (the clean ones stay in ``metrics``/``oof``); ``report["train_conditions"]``."""
    fold_of = np.full(len(samples), -1)
    for f in folds:
        fold_of[list(f.test)] = f.index
    report["train_conditions"] = ["clean", *train_conditions]
    report["conditions"] = {}
    for name, p in cond_probs.items():
        overall, per_fold = evaluate_oof(samples, p, folds, classes)
        report["conditions"][name] = {
            "metrics": overall,
            "folds": [{k: pf[k] for k in ("index", "accuracy", "balanced_accuracy")} for pf in per_fold],
            "oof": oof_block(samples, p, fold_of, classes),
        }


def dataset_block(
    kind: str, location: str | Path, label_set: str, samples: Sequence[Sample], classes
) -> dict:
    counts = np.bincount([s.label for s in samples], minlength=len(classes))
    return {
        "kind": kind,
        "location": str(location),
        "labels": label_set,
        "n_clips": len(samples),
        "n_speakers": len({s.speaker for s in samples}),
        "class_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
    }


def train_final(
    model_id: str,
    samples: Sequence[Sample],
    n_classes: int,
    settings: TrainSettings,
    overrides: dict | None = None,
    epochs: int | None = None,
    n_val: int = 2,
) -> tuple[FitResult, dict]:
    """The shipped model: trained on every speaker for a chosen number of epochs.

    The epoch count is ``epochs`` when given (e.g. the median best epoch of the cross-validation
    folds, each chosen on its inner-validation speakers); otherwise ``n_val`` training speakers
    are held out to find the best epoch first. Returns the fit and a description for the card."""
    from training.protocols import final_split

    how: dict[str, object] = {"epochs_from": "given", "val_speakers": []}
    if epochs is None:
        split = final_split([s.clip for s in samples], settings.seed, n_val)
        probe = fit(
            model_id,
            n_classes,
            [samples[i] for i in split.train],
            [samples[i] for i in split.val],
            settings,
            overrides,
        )
        epochs = probe.best_epoch
        how = {
            "epochs_from": "inner validation split",
            "val_speakers": list(split.val_speakers),
            "val_balanced_accuracy": (
                probe.history[probe.best_epoch - 1].get("val_balanced_accuracy")
                if settings.members <= 1
                else None
            ),
        }
    result = fit(model_id, n_classes, list(samples), [], settings, overrides, epochs=epochs)
    how.update(epochs=epochs, n_clips=len(samples), n_speakers=len({s.speaker for s in samples}))
    return result, how


def simplex_grid(n: int, steps: int = 10) -> np.ndarray:
    """Every weight vector of ``n`` non-negative multiples of 1/steps that sum to 1."""
    import itertools

    rows = [w for w in itertools.product(range(steps + 1), repeat=n) if sum(w) == steps]
    return np.array(rows, np.float64) / steps


def best_weights(probs: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Weights (members,) on the simplex grid maximising the balanced accuracy of the weighted mean
    of ``probs`` (members, clips, classes); ties go to the weights closest to the plain mean."""
    grid = simplex_grid(len(probs))
    mixed = np.einsum("gm,mnc->gnc", grid, probs).argmax(-1)
    scores = np.array([M.balanced_accuracy(y, p, n_classes) for p in mixed])
    distance = np.abs(grid - 1.0 / len(probs)).sum(1)
    return grid[np.lexsort((distance, -scores))[0]]


def ensemble_reports(
    reports: Sequence[dict],
    out_root: str | Path = "runs",
    name: str = "ensemble",
    combine: str = "mean",
) -> CVResult:
    """Combine the out-of-fold probabilities of several run reports (same clips, classes, folds).

    ``combine="mean"``: the plain mean. ``combine="weighted"``: a weighted mean whose weights are
    chosen, for each test fold, on the OTHER folds' out-of-fold predictions (leave-one-fold-out),
    so a fold's labels never choose its own weights; the weights to ship are then chosen on all
    folds and stored in the report (``config.weights``)."""
    if combine not in ("mean", "weighted"):
        raise ValueError("combine must be 'mean' or 'weighted'")
    if len(reports) < 2:
        raise ValueError("an ensemble needs at least two run reports")
    classes = reports[0]["classes"]
    paths = sorted(reports[0]["oof"])
    for r in reports[1:]:
        if r["classes"] != classes or sorted(r["oof"]) != paths:
            raise ValueError(
                f"report {r['model']}/{r['variant']} covers other clips or classes than {reports[0]['model']}"
            )
    member_probs = np.array([[r["oof"][p]["probabilities"] for p in paths] for r in reports])
    first = reports[0]["oof"]
    y = np.array([classes.index(first[p]["label"]) for p in paths])
    fold_of = np.array([first[p]["fold"] for p in paths])
    weights = np.full(len(reports), 1.0 / len(reports))
    fold_weights = {}
    if combine == "mean":
        probs = member_probs.mean(axis=0)
    else:
        probs = np.zeros(member_probs.shape[1:])
        for f in sorted(set(fold_of.tolist())):
            out = fold_of != f
            w = best_weights(member_probs[:, out], y[out], len(classes))
            probs[~out] = np.einsum("m,mnc->nc", w, member_probs[:, ~out])
            fold_weights[int(f)] = [round(float(v), 3) for v in w]
        weights = best_weights(member_probs, y, len(classes))
    pred = probs.argmax(1)
    overall = M.summarize(y, pred, classes)
    per_fold = []
    for f in sorted(set(fold_of.tolist())):
        ix = fold_of == f
        speakers = sorted({first[p]["speaker"] for p, keep in zip(paths, ix, strict=True) if keep})
        per_fold.append({"index": f, "test_speakers": speakers, **M.summarize(y[ix], pred[ix], classes)})
    for key in ("accuracy", "balanced_accuracy"):
        vals = [pf[key] for pf in per_fold]
        overall[f"fold_mean_{key}"], overall[f"fold_std_{key}"] = float(np.mean(vals)), float(np.std(vals))
    members = [{"model": r["model"], "variant": r["variant"], "run": r.get("_path", "")} for r in reports]
    for m, w in zip(members, weights, strict=True):
        m["weight"] = round(float(w), 3)
    how = (
        "mean of probabilities"
        if combine == "mean"
        else "weighted mean of probabilities; each test fold's weights chosen on the other folds"
    )
    report = {
        "model": name,
        "variant": f"{combine}-" + "+".join(r["model"] for r in reports),
        "config": {
            "combination": how,
            "members": members,
            "weights": [m["weight"] for m in members],
            "fold_weights": fold_weights,
        },
        "overrides": {},
        "train_settings": {},
        "classes": classes,
        "dataset": reports[0].get("dataset", {}),
        "feature_config": reports[0].get("feature_config", {}),
        "feature_config_digest": reports[0].get("feature_config_digest", ""),
        "protocol": reports[0]["protocol"],
        "metrics": overall,
        "folds": per_fold,
        "best_epochs": [],
        "train_seconds": round(sum(r.get("train_seconds", 0.0) for r in reports), 2),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "oof": {
            p: {**first[p], "probabilities": [round(float(v), 6) for v in probs[i]]}
            for i, p in enumerate(paths)
        },
    }
    path = write_report(report, run_dir(out_root, name, combine), classes)
    return CVResult(report, path, probs, [])


def load_report(path: str | Path) -> dict:
    """A run report; ``path`` may be the run directory or its report.json."""
    path = Path(path)
    path = path / "report.json" if path.is_dir() else path
    report = json.loads(path.read_text())
    report["_path"] = str(path)
    return report
