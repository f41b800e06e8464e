"""Per-session adaptation (``app.analysis.adaptation``) measured on the speaker-independent CV folds.

``python -m training adapt --model M``: for every fold of the existing protocol, the model is trained
as ``evaluate``/``baseline`` train it (no adaptation at train time). Then every held-out utterance
``u`` of speaker ``s`` is predicted after ``k`` earlier utterances of the same speaker: ``repeats``
seeded random histories of ``k`` OTHER utterances of ``s`` (the same clips under the same test
condition, as one call would be), whose raw frame means give the shift of ``u``'s encoder frames
(``history_shift``). The shifted model inputs are recomputed with the server's own
``app.analysis.inputs.model_inputs(..., encoder_shift=...)``. History kinds:

* ``any``: any other utterances of the speaker (a caller whose emotions vary as RAVDESS's do);
* ``same``: only utterances with ``u``'s label (a caller who stays in one emotion); when fewer than
  ``k`` exist, drawn with replacement (counted in the report);
* ``other``: only utterances with another label (the contrast).

``mu_pop`` of a fold is computed from the fold's own training and inner-validation speakers' clean
clips, as ``adaptation-stats`` computes the shipped one from all training clips. ``tau`` is fixed
(``--tau``) or chosen per fold from ``--taus`` on the fold's inner-validation speakers (``any``
histories, clean, ``k`` pooled) by a model that never trained on them; test speakers never choose it.

``python -m training adaptation-stats``: ``models/adaptation.json`` (``PopulationStats``) from the
clean clips of the feature cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from app.analysis.adaptation import DEFAULT_TAU, FILE_NAME, PopulationStats, frame_mean, history_shift
from app.analysis.inputs import model_inputs
from training import metrics as M

log = logging.getLogger(__name__)

KINDS = ("any", "same", "other")
SENSITIVITY_KINDS = ("any", "same")  # --tau-sensitivity: the gain and the harm, per tau
ENCODER_DERIVED = ("encoder", "enc_patches", "enc_seg")  # the inputs computed from Whisper frames
RAW = ("encoder", "encoder_mask")


# ------------------------------------------------------------------------------------ arguments


def add_adapt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adaptation")
    g.add_argument("--model", required=True, help="baseline, or a model id (cmt-awc, ca-mser, adf, 3m-ser)")
    g.add_argument("--variant", help="as for evaluate")
    g.add_argument("--acoustic", choices=("paper", "whisper"), help="as for evaluate")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--ks", default="1,3,7", help="history lengths (k = 0 is always reported)")
    g.add_argument("--repeats", type=int, default=5, help="random histories per utterance and k")
    g.add_argument("--tau", type=float, help="fixed shrinkage strength (utterances); default: fitted")
    g.add_argument(
        "--taus",
        default="1,3,10",
        help="grid tau is fitted on, per fold, without --tau; --tau-sensitivity scores all of it (default: 1,3,10)",
    )
    g.add_argument(
        "--tau-sensitivity",
        action="store_true",
        help="also score the test speakers with every tau of the grid (any and same histories; reported, "
        "never used to choose tau)",
    )


def add_population_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tau", type=float, default=DEFAULT_TAU, help=f"shrinkage strength (default: {DEFAULT_TAU})"
    )
    p.add_argument(
        "--write", default=f"models/{FILE_NAME}", help=f"output file (default: models/{FILE_NAME})"
    )
    p.add_argument("--note", default="", help="provenance of tau (or anything else), kept in the file")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


# ------------------------------------------------------------------------------- shifted inputs


def raw_frames(sample) -> np.ndarray:
    """The utterance's Whisper encoder frames exactly as the analysis held them (real rows only)."""
    return sample.inputs["encoder"][sample.inputs["encoder_mask"] > 0]


def shifted_inputs(sample, frames: np.ndarray, shift: np.ndarray, names: Sequence[str]) -> dict:
    """``sample.inputs`` with ``names`` (encoder-derived) recomputed from ``frames + shift`` through
    the server's ``model_inputs``; only the audio LENGTH matters to them (segment and patch counts)."""
    n_audio = int(round(sample.duration_s * 16000))
    analysis = SimpleNamespace(
        audio=np.zeros(n_audio, np.float32),
        transcript=SimpleNamespace(encoder_frames=frames),
        speech_frames=None,
        acoustic=None,
    )
    return {**sample.inputs, **model_inputs(analysis, names, encoder_shift=shift)}


def check_recompute(samples: Sequence, names: Sequence[str], n: int = 8) -> None:
    """With a zero shift the recomputed inputs must equal the cached ones, or the shift path is not
    the path the models were trained on."""
    for s in list(samples)[:n]:
        frames = raw_frames(s)
        again = shifted_inputs(s, frames, np.zeros(frames.shape[1], np.float32), names)
        for name in names:
            if not np.array_equal(again[name], s.inputs[name]):
                raise SystemExit(
                    f"recomputed {name} of {s.path} differs from the cache: not the trained path"
                )


# ------------------------------------------------------------------------------------ histories


def draw(rng: np.random.Generator, pool: Sequence[int], k: int) -> tuple[list[int], bool]:
    """``k`` of ``pool`` without replacement when it has ``k``, else with (second value True)."""
    if not pool:
        return [], False
    if len(pool) >= k:
        return [int(pool[i]) for i in rng.choice(len(pool), size=k, replace=False)], False
    return [int(pool[i]) for i in rng.choice(len(pool), size=k, replace=True)], True


def histories(
    samples: Sequence, units: Sequence[int], ks: Sequence[int], repeats: int, seed: int, kinds=KINDS
) -> dict[tuple[str, int], list[tuple[int, list[int]]]]:
    """(kind, k) -> [(utterance, history)]: per utterance ``repeats`` histories of ``k`` other
    utterances of its speaker. Seeded per utterance (its index), so every model and condition sees
    the same histories."""
    by_speaker: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_speaker.setdefault(s.speaker, []).append(i)
    out: dict[tuple[str, int], list[tuple[int, list[int]]]] = {}
    for kind_i, kind in enumerate(kinds):
        for k in ks:
            rows = []
            for u in units:
                others = [j for j in by_speaker[samples[u].speaker] if j != u]
                if kind == "same":
                    others = [j for j in others if samples[j].label == samples[u].label]
                elif kind == "other":
                    others = [j for j in others if samples[j].label != samples[u].label]
                rng = np.random.default_rng([seed, 7919, u, k, kind_i])
                for _ in range(repeats):
                    hist, _ = draw(rng, others, k)
                    if hist:
                        rows.append((u, hist))
            out[(kind, k)] = rows
    return out


def with_replacement(samples: Sequence, units: Sequence[int], k: int) -> int:
    """How many of ``units`` have fewer than ``k`` same-label other utterances (drawn with replacement)."""
    count = 0
    for u in units:
        pool = [
            j
            for j, s in enumerate(samples)
            if j != u and s.speaker == samples[u].speaker and s.label == samples[u].label
        ]
        count += len(pool) < k
    return count


# ---------------------------------------------------------------------------------- predictors


Predict = Callable[[Sequence], np.ndarray]


def predict_rows(
    predict: Predict,
    samples: Sequence,
    frames: Sequence[np.ndarray],
    means: np.ndarray,
    rows: Sequence[tuple[int, list[int]]],
    mu_pop: np.ndarray,
    tau: float,
    names: Sequence[str],
    chunk: int = 256,
) -> np.ndarray:
    """Probabilities of each (utterance, history) row, the utterance shifted by its history's stats."""
    out = []
    for lo in range(0, len(rows), chunk):
        batch = []
        for u, hist in rows[lo : lo + chunk]:
            shift = history_shift(means[hist], mu_pop, tau) if hist else np.zeros(len(mu_pop), np.float32)
            inputs = shifted_inputs(samples[u], frames[u], shift, names)
            batch.append(dataclasses.replace(samples[u], inputs=inputs))
        out.append(predict(batch))
    return np.concatenate(out) if out else np.zeros((0, 0))


def summary(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    pred = probs.argmax(1)
    out = M.summarize(y, pred, classes)
    counts = np.bincount(pred, minlength=len(classes)) / max(1, len(pred))
    out["predicted_share"] = {c: round(float(v), 4) for c, v in zip(classes, counts, strict=True)}
    out["mean_probability"] = {c: round(float(v), 4) for c, v in zip(classes, probs.mean(0), strict=True)}
    return out


# -------------------------------------------------------------------------------------- the run


class _Fold:
    """One fold's trained model, as ``baseline``/``evaluate`` would train it."""

    def __init__(self, predict_test: Predict, predict_val: Predict):
        self.predict_test, self.predict_val = predict_test, predict_val


def _baseline_folds(samples, conditions, train_conditions, folds, n, seed) -> Callable[[Any], _Fold]:
    from training.baseline import _proba, fit_fold, pooled_encoder

    x = pooled_encoder(samples)
    cx = {c: pooled_encoder(conditions[c]) for c in train_conditions}
    y = np.array([s.label for s in samples])

    def make(f) -> _Fold:
        fitted = fit_fold(x, y, cx, f, n, seed, train_conditions)
        return _Fold(
            lambda batch: _proba(fitted.final, pooled_encoder(batch), n),
            lambda batch: _proba(fitted.train_only, pooled_encoder(batch), n),
        )

    return make


def _neural_folds(model_id, samples, conditions, train_conditions, n, settings, overrides):
    from training.trainer import fit, predict_proba

    def make(f) -> _Fold:
        train = [samples[i] for i in f.train]
        val = [samples[i] for i in f.val]
        for name in train_conditions:  # as cross_validate: the training speakers' clips under each
            train += [conditions[name][i] for i in f.train]
            val += [conditions[name][i] for i in f.val]
        result = fit(model_id, n, train, val, settings, overrides)
        log.info(
            "%s fold %d: best epoch %d, %.0f s", model_id, f.index + 1, result.best_epoch, result.seconds
        )

        def predict(batch):
            return predict_proba(result.model, batch, settings.batch_size)

        return _Fold(predict, predict)  # val speakers only chose the epoch, never trained it

    return make


def _no_analysis():
    raise SystemExit("cache miss: this command only reads the feature cache (fill it with `cache` first)")


def run(ctx, args, overrides: dict | None, settings, dims: Callable | None = None) -> dict:
    """The ``adapt`` command; ``overrides``/``settings`` None = the logistic-regression baseline."""
    from training.trainer import model_input_names, run_dir, set_threads

    ctx.analyzer = _no_analysis  # measures on cached features only: never runs ASR into the cache
    t0 = time.perf_counter()
    model_id = args.model
    n = len(ctx.classes)
    ks = [int(v) for v in args.ks.split(",") if v.strip()]
    grid = _floats(args.taus)  # fitted on (no --tau) and scored by --tau-sensitivity
    taus = [args.tau] if args.tau is not None else grid
    baseline = overrides is None
    if baseline:
        names: tuple[str, ...] = ()
        set_threads(args.threads)
    else:
        names = model_input_names(model_id, n, overrides or {})
    wanted = tuple(dict.fromkeys([*names, *RAW]))
    samples = ctx.samples(wanted)
    if not baseline and dims is not None:
        overrides = dims(samples)
        names = model_input_names(model_id, n, overrides or {})
    shifted = [
        m
        for m in ("encoder", *names)
        if m in ENCODER_DERIVED and not (m == "enc_seg" and ctx.config.speech_encoder)
    ]
    shifted = list(dict.fromkeys(shifted))
    conditions, train_conditions = ctx.condition_samples(wanted)
    test_conditions = [c.strip() for c in args.test_conditions.split(",") if c.strip()]
    cond_samples = {"clean": samples, **conditions}
    check_recompute(samples, shifted)
    frames = {c: [raw_frames(s) for s in ss] for c, ss in cond_samples.items()}
    means = {c: np.stack([frame_mean(f) for f in fr]) for c, fr in frames.items()}
    y = np.array([s.label for s in samples])
    folds = ctx.folds()
    if baseline:
        make = _baseline_folds(samples, conditions, train_conditions, folds, n, args.seed)
    else:
        make = _neural_folds(model_id, samples, conditions, train_conditions, n, settings, overrides)

    # (condition, kind, k) -> list of (labels, probs) per fold; k = 0 under kind "none"
    pooled: dict[tuple[str, str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    sensitivity: dict[tuple[str, float, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    units: dict[tuple[str, str, int], list[np.ndarray]] = {}  # the utterance of every row
    fold_rows = []
    for f in folds:
        tf = time.perf_counter()
        fold = make(f)
        known = list(f.train) + list(f.val)
        mu_pop = means["clean"][known].mean(axis=0)
        # tau: chosen on the inner-validation speakers (any histories, clean, k pooled)
        if len(taus) > 1 and f.val:
            hv = histories(samples, list(f.val), ks, args.repeats, args.seed, kinds=("any",))
            scores = {}
            for tau in taus:
                ys, preds = [], []
                for k in ks:
                    rows = hv[("any", k)]
                    p = predict_rows(
                        fold.predict_val, samples, frames["clean"], means["clean"], rows, mu_pop, tau, shifted
                    )
                    ys.append(y[[u for u, _ in rows]])
                    preds.append(p.argmax(1))
                scores[tau] = M.balanced_accuracy(np.concatenate(ys), np.concatenate(preds), n)
            tau = max(taus, key=lambda t: (scores[t], -abs(t - DEFAULT_TAU)))
        else:
            tau, scores = taus[0], {}
        test = list(f.test)
        ht = histories(samples, test, ks, args.repeats, args.seed)
        for cond in test_conditions:
            ss, fr, mm = cond_samples[cond], frames[cond], means[cond]
            p0 = predict_rows(fold.predict_test, ss, fr, mm, [(u, []) for u in test], mu_pop, tau, shifted)
            pooled.setdefault((cond, "none", 0), []).append((y[test], p0))
            units.setdefault((cond, "none", 0), []).append(np.array(test))
            for (kind, k), rows in ht.items():
                p = predict_rows(fold.predict_test, ss, fr, mm, rows, mu_pop, tau, shifted)
                pooled.setdefault((cond, kind, k), []).append((y[[u for u, _ in rows]], p))
                units.setdefault((cond, kind, k), []).append(np.array([u for u, _ in rows]))
            if args.tau_sensitivity:
                for t in grid:
                    for kind, k in [(kind, k) for kind in SENSITIVITY_KINDS for k in ks]:
                        rows = ht[(kind, k)]
                        p = predict_rows(fold.predict_test, ss, fr, mm, rows, mu_pop, t, shifted)
                        sensitivity.setdefault((cond, t, f"{kind}/{k}"), []).append(
                            (y[[u for u, _ in rows]], p)
                        )
        fold_rows.append(
            {
                "fold": f.index,
                "test_speakers": list(f.test_speakers),
                "val_speakers": list(f.val_speakers),
                "tau": tau,
                "tau_scores_val": {str(t): round(v, 4) for t, v in scores.items()},
                "seconds": round(time.perf_counter() - tf, 1),
            }
        )
        log.info(
            "adapt %s fold %d: tau %g (val %s), %.0f s",
            model_id,
            f.index + 1,
            tau,
            scores,
            time.perf_counter() - tf,
        )

    def merged(parts):
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])

    results: dict[str, dict[str, dict[str, dict]]] = {}
    rows_out: dict[str, np.ndarray] = {}  # every row's probabilities, for combining models later
    for (cond, kind, k), parts in sorted(pooled.items()):
        yy, pp = merged(parts)
        results.setdefault(cond, {}).setdefault(kind, {})[str(k)] = {
            "n": len(yy),
            **summary(yy, pp, ctx.classes),
        }
        key = f"{cond}/{kind}/{k}"
        rows_out.update(
            {f"{key}/labels": yy, f"{key}/probs": pp, f"{key}/units": np.concatenate(units[(cond, kind, k)])}
        )
    sens: dict[str, dict[str, dict[str, float]]] = {}
    for (cond, t, col), parts in sorted(sensitivity.items()):  # col: "kind/k"
        yy, pp = merged(parts)
        sens.setdefault(cond, {}).setdefault(str(t), {})[col] = M.balanced_accuracy(yy, pp.argmax(1), n)
    test_all = [u for f in folds for u in f.test]
    variant = "logreg-encoder" if baseline else _variant(model_id, n, overrides or {})
    report = {
        "command": "adapt",
        "model": model_id,
        "variant": variant,
        "overrides": overrides or {},
        "train_settings": settings.to_dict() if settings is not None else {"seed": args.seed},
        "train_conditions": ["clean", *train_conditions],
        "test_conditions": test_conditions,
        "classes": list(ctx.classes),
        "feature_config_digest": ctx.config.digest(),
        "protocol": {"name": args.protocol, "n_folds": len(folds), "seed": args.seed},
        "adaptation": {
            "equation": "x' = x - (sum_i m_i + tau mu_pop)/(n + tau) + mu_pop, m_i = frame means of k earlier utterances",
            "shifted_inputs": shifted,
            "mu_pop": "mean of per-utterance encoder-frame means of the fold's training + inner-validation speakers (clean)",
            "ks": ks,
            "repeats": args.repeats,
            "tau": args.tau
            if args.tau is not None
            else {"grid": taus, "fitted_on": "inner-validation speakers, any histories, clean, k pooled"},
            "same_label_with_replacement": {str(k): with_replacement(samples, test_all, k) for k in ks},
        },
        "folds": fold_rows,
        "results": results,
        "tau_sensitivity": sens,
        "seconds": round(time.perf_counter() - t0, 1),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    out = run_dir(args.out, "adapt", f"{model_id}-{variant}")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    np.savez_compressed(out / "rows.npz", **rows_out)  # type: ignore[arg-type]
    table = markdown(report)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"-> {out}")
    report["_path"] = str(out / "report.json")
    return report


def _variant(model_id: str, n: int, overrides: dict) -> str:
    from training.models import build_model
    from training.trainer import variant_of

    _, cfg = build_model(model_id, n, {}, **overrides)
    return variant_of(cfg)


def markdown(report: dict) -> str:
    """Balanced accuracy by condition, history kind and k; then per-class recall of ``same``."""
    ks = report["adaptation"]["ks"]

    def fmt(tau) -> str:  # one tau per fold, or one per member of a combined run
        return "/".join(f"{t:g}" for t in tau) if isinstance(tau, list) else f"{tau:g}"

    head = "| model | condition | history | k=0 | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [
        f"{report['model']} {report['variant']} (train {'+'.join(report['train_conditions'])}); tau per fold: "
        + ", ".join(fmt(f["tau"]) for f in report["folds"]),
        "",
        head,
        "|---" * (4 + len(ks)) + "|",
    ]
    for cond, kinds in report["results"].items():
        base = kinds["none"]["0"]["balanced_accuracy"]
        for kind in KINDS:
            cells = [f"{kinds[kind][str(k)]['balanced_accuracy']:.4f}" for k in ks]
            lines.append(f"| {report['model']} | {cond} | {kind} | {base:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class recall, `same` histories (k=0 first):", ""]
    classes = report["classes"]
    lines += [
        "| condition | k | " + " | ".join(classes) + " | predicted neutral share |",
        "|---" * (3 + len(classes)) + "|",
    ]
    for cond, kinds in report["results"].items():
        for label, block in [("0", kinds["none"]["0"])] + [(str(k), kinds["same"][str(k)]) for k in ks]:
            rec = block["per_class_recall"]
            rec = rec if isinstance(rec, dict) else dict(zip(classes, rec, strict=True))
            lines.append(
                f"| {cond} | {label} | "
                + " | ".join(f"{float(rec[c]):.3f}" for c in classes)
                + f" | {block['predicted_share'][classes[0]]:.3f} |"
            )
    if report.get("tau_sensitivity"):
        cols = [f"{kind}/{k}" for kind in SENSITIVITY_KINDS for k in ks]
        lines += ["", "Tau sensitivity on the test speakers (never used to choose tau):", ""]
        lines += ["| condition | tau | " + " | ".join(cols) + " |", "|---" * (2 + len(cols)) + "|"]
        for cond, by_tau in report["tau_sensitivity"].items():
            for t, by_k in by_tau.items():
                lines.append(f"| {cond} | {t} | " + " | ".join(f"{by_k[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- population stats


def write_population(ctx, args) -> PopulationStats:
    """``adaptation.json`` from the clean clips of every training speaker in the cache."""
    ctx.analyzer = _no_analysis
    samples = ctx.samples(RAW)
    means = np.stack([frame_mean(raw_frames(s)) for s in samples])
    stats = PopulationStats.from_means(
        means,
        tau=args.tau,
        asr_model=ctx.config.asr_model,
        feature_config_digest=ctx.config.digest(),
        source={
            "data": str(args.data),
            "labels": args.labels,
            "utterances": len(samples),
            "speakers": len({s.speaker for s in samples}),
            "condition": "clean",
            "command": "python -m training adaptation-stats",
            **({"note": args.note} if args.note else {}),
        },
    )
    path = stats.save(args.write)
    print(f"wrote {path}: {stats.dim}-d mean of {stats.n} utterances, tau {stats.tau:g}")
    return stats


# ------------------------------------------------------------------------------ ensemble of runs


def combine_runs(runs: Sequence[str | Path], out_root: str | Path = "runs") -> dict:
    """The mean of several ``adapt`` runs' row probabilities (same folds, seeds and histories: the
    rows are the same utterances in the same order, which is checked), scored like one run. A plain
    mean of uncalibrated members: the shipped ensemble's calibration is not reapplied."""
    from training.trainer import run_dir

    reports = [json.loads((Path(r) / "report.json").read_text()) for r in runs]
    rows = [np.load(Path(r) / "rows.npz") for r in runs]
    first = reports[0]
    for r, z in zip(reports[1:], rows[1:], strict=True):
        if (
            r["adaptation"]["ks"] != first["adaptation"]["ks"]
            or r["adaptation"]["repeats"] != first["adaptation"]["repeats"]
        ):
            raise SystemExit(f"{r['model']}: other k or repeats than {first['model']}")
        for key in rows[0].files:
            if key.endswith("/units") and not np.array_equal(z[key], rows[0][key]):
                raise SystemExit(f"{r['model']}: rows {key} differ from {first['model']}'s")
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for key in rows[0].files:
        if not key.endswith("/probs"):
            continue
        cond, kind, k = key.split("/")[:3]
        probs = np.mean([z[key] for z in rows], axis=0)
        labels = rows[0][key.replace("/probs", "/labels")]
        results.setdefault(cond, {}).setdefault(kind, {})[k] = {
            "n": len(labels),
            **summary(labels, probs, first["classes"]),
        }
    members = "+".join(r["model"] for r in reports)
    report = {
        **{
            k: first[k]
            for k in ("classes", "protocol", "adaptation", "test_conditions", "feature_config_digest")
        },
        "command": "adapt (combined)",
        "model": "ensemble",
        "variant": f"mean-{members}",
        "train_conditions": first["train_conditions"],
        "members": [
            {"model": r["model"], "variant": r["variant"], "run": str(p)}
            for r, p in zip(reports, runs, strict=True)
        ],
        "folds": [
            {"fold": f["fold"], "tau": [r["folds"][i]["tau"] for r in reports]}
            for i, f in enumerate(first["folds"])
        ],
        "results": results,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    out = run_dir(out_root, "adapt", f"ensemble-mean-{members}")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m training.adaptation",
        description="combine the rows of several `python -m training adapt` runs (mean of probabilities)",
    )
    parser.add_argument("runs", nargs="+", help="adapt run directories (report.json + rows.npz)")
    parser.add_argument("--out", default="runs")
    a = parser.parse_args()
    combine_runs(a.runs, a.out)
    sys.exit(0)
