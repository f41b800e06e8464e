"""ONNX export of a trained model, parity check against torch, and the model card.

The ONNX graph takes the model's named raw inputs (``app.analysis.inputs`` vocabulary, batch-first,
zero-padded, float32) and returns ``probabilities`` (batch, classes) after a softmax. Batch and
every sequence axis are dynamic. The card ``models/<id>.json`` records what a server needs to feed
the graph and what a reader needs to judge it (data, licence, protocol, metrics).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.analysis.analyzer import FeatureConfig
from app.analysis.inputs import INPUTS, collate
from training.cache import Sample
from training.data import DATASET_LICENCES
from training.models import config_dict
from training.models.layers import input_names_of
from training.trainer import variant_of

OPSET = 17
PARITY_TOLERANCE = 1e-4


class WithSoftmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = input_names_of(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(*inputs), dim=-1)


def sequence_axis(name: str) -> str:
    """The symbolic name of an input's first per-utterance axis (``app.analysis.inputs.INPUTS``);
    inputs sharing it always have equal lengths."""
    return INPUTS[name].sequence


def dynamic_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Batch and sequence axes of every input are dynamic; feature axes are fixed by the weights."""
    axes = {n: {0: "batch", 1: sequence_axis(n)} for n in names}
    axes["probabilities"] = {0: "batch"}
    return axes


def input_specs(names: Sequence[str], sample: Sample) -> list[dict]:
    """[{name, shape (symbolic batch and sequence axes, fixed feature axes), dtype}]."""
    specs = []
    for n in names:
        fixed = list(sample.inputs[n].shape[1:])
        specs.append({"name": n, "shape": ["batch", sequence_axis(n), *fixed], "dtype": str(INPUTS[n].dtype)})
    return specs


def _tensors(
    samples: Sequence[Sample], names: Sequence[str]
) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor, ...]]:
    arrays = collate([s.inputs for s in samples], names)
    return arrays, tuple(torch.from_numpy(arrays[n]) for n in names)


def export_onnx(model: nn.Module, samples: Sequence[Sample], path: str | Path) -> Path:
    """Export ``softmax(model)`` with the legacy (TorchScript) exporter, traced on a padded batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = WithSoftmax(model.cpu().eval()).eval()
    names = wrapped.input_names
    _, example = _tensors(samples[:2], names)
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes about shape-dependent Python code: the parity check below is the real test
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter, on purpose
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")
        torch.onnx.export(
            wrapped,
            example,
            str(path),
            input_names=list(names),
            output_names=["probabilities"],
            dynamic_axes=dynamic_axes(names),
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def parity(model: nn.Module, onnx_path: str | Path, samples: Sequence[Sample]) -> dict:
    """Max |ORT - torch| on each sample alone (batch 1) and on all of them as one padded batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapped = WithSoftmax(model.cpu().eval()).eval()
    names = wrapped.input_names
    cases = [[s] for s in samples] + [list(samples)]
    diffs = []
    for case in cases:
        arrays, tensors = _tensors(case, names)
        with torch.no_grad():
            expected = wrapped(*tensors).numpy()
        got = session.run(["probabilities"], {n: arrays[n] for n in names})[0]
        if not np.isfinite(got).all():
            raise RuntimeError(f"ONNX Runtime returned non-finite probabilities for a batch of {len(case)}")
        diffs.append(float(np.abs(got - expected).max()))
    return {"max_abs_diff": max(diffs), "cases": [len(c) for c in cases], "per_case": diffs}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parity_samples(samples: Sequence[Sample], n: int = 4) -> list[Sample]:
    """A few clips of distinct lengths (longest and shortest first) so that padding is exercised."""
    by_len = sorted(samples, key=lambda s: (s.duration_s, s.path))
    picks = [by_len[-1], by_len[0]] + [by_len[len(by_len) * k // (n - 1)] for k in range(1, n - 1)]
    seen, out = set(), []
    for s in picks:
        if s.path not in seen:
            seen.add(s.path)
            out.append(s)
    return out


def export_model(
    model_id: str,
    model: nn.Module,
    config,
    classes: Sequence[str],
    samples: Sequence[Sample],
    out_dir: str | Path = "models",
    dataset: dict | None = None,
    cv_report: dict | None = None,
    training: dict | None = None,
    tolerance: float = PARITY_TOLERANCE,
    feature_config: FeatureConfig | None = None,
) -> dict:
    """Write ``<out_dir>/<id>.onnx`` and ``<out_dir>/<id>.json``; raise if parity fails.

    ``feature_config``: the config the samples were computed with (default: the default config);
    its digest goes to the card, and the server refuses the model unless it computes the same."""
    out_dir = Path(out_dir)
    onnx_path = export_onnx(model, parity_samples(samples), out_dir / f"{model_id}.onnx")
    check = parity(model, onnx_path, parity_samples(samples))
    if check["max_abs_diff"] >= tolerance:
        raise RuntimeError(
            f"{model_id}: ONNX Runtime differs from torch by {check['max_abs_diff']:.2e} (>= {tolerance})"
        )
    names = input_names_of(model)
    fc = feature_config or FeatureConfig()
    kind = (dataset or {}).get("kind", "")
    card = {
        "id": model_id,
        "variant": variant_of(config),
        "config": config_dict(config),
        "classes": list(classes),
        "inputs": input_specs(names, samples[0]),
        "outputs": [{"name": "probabilities", "shape": ["batch", len(classes)], "dtype": "float32"}],
        "feature_config": fc.to_dict(),
        "feature_config_digest": fc.digest(),
        "training_data": {**(dataset or {}), **DATASET_LICENCES.get(kind, {})},
        "training": training or {},
        "protocol": (cv_report or {}).get("protocol", {}),
        "cv_metrics": _cv_metrics(cv_report),
        "parity": {
            "max_abs_diff": check["max_abs_diff"],
            "tolerance": tolerance,
            "batch_sizes": check["cases"],
        },
        "onnx": onnx_path.name,
        "opset": OPSET,
        "sha256": sha256_file(onnx_path),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    (out_dir / f"{model_id}.json").write_text(json.dumps(card, indent=1))
    return card


def _cv_metrics(report: dict | None) -> dict:
    if not report:
        return {}
    m = report["metrics"]
    keep = ("n", "accuracy", "balanced_accuracy", "per_class_recall", "confusion_matrix")
    out = {k: m[k] for k in keep if k in m}
    out.update({k: v for k, v in m.items() if k.startswith("fold_")})
    out["run_report"] = report.get("_path", "")
    return out
