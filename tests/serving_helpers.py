"""Helpers for the serving tests: dummy ONNX models with cards, settings, a shared Analyzer.

The dummy models read the same named inputs as the real ones (``app.analysis.inputs.INPUTS``, which
gives each input's rank), reduce each to its mean, mix the means with fixed random weights and
return ``probabilities`` (batch, 4) by softmax: cheap, deterministic, and sensitive to every input
they declare.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from app.analysis.inputs import INPUTS

FIXTURES = Path(__file__).parent / "fixtures"
ANGRY = FIXTURES / "angry_kids.flac"  # RAVDESS actor 01, angry, "Kids are talking by the door"
HAPPY = FIXTURES / "happy_dogs.flac"  # RAVDESS actor 02, happy, "Dogs are sitting by the door"
STEREO = FIXTURES / "stereo_call.wav"  # left: actor 03 (sad, kids), right: actor 04 (neutral, dogs)

CLASSES = ("neutral", "happy", "sad", "angry")
# input names each dummy model declares: the default variants' inputs (3m-ser reads both patch kinds so
# that the VGGish path is served too); ranks come from the registry
DUMMY_MODEL_NAMES = {
    "cmt-awc": ("frames33", "frames33_cm", "frames33_mask", "words", "words_cm", "words_mask"),
    "ca-mser": ("mfcc_seg", "spec_seg", "enc_seg", "seg_mask"),
    "adf": ("waveform", "waveform_mask", "words_static", "words_mask"),
    "3m-ser": ("enc_patches", "logmel_patches", "patch_mask", "words", "words_mask"),
}
MODEL_INPUTS = {mid: {n: INPUTS[n].rank for n in names} for mid, names in DUMMY_MODEL_NAMES.items()}
ALL_MODELS = tuple(MODEL_INPUTS)


def dummy_model_bytes(inputs: dict[str, int], n_classes: int = 4, seed: int = 0) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, graph_inputs, means = [], [], []
    for name, rank in inputs.items():
        shape = ["batch"] + [f"{name}_d{i}" for i in range(1, rank)]
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        nodes.append(
            helper.make_node("ReduceMean", [name], [f"{name}_m"], axes=list(range(1, rank)), keepdims=1)
        )
        nodes.append(helper.make_node("Reshape", [f"{name}_m", "col"], [f"{name}_c"]))
        means.append(f"{name}_c")
    nodes.append(helper.make_node("Concat", means, ["z"], axis=1))
    nodes.append(helper.make_node("MatMul", ["z", "W"], ["zw"]))
    nodes.append(helper.make_node("Add", ["zw", "b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    init = [
        numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
        numpy_helper.from_array(rng.normal(0, 0.5, (len(inputs), n_classes)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.5, n_classes).astype(np.float32), "b"),
    ]
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes])
    graph = helper.make_graph(nodes, "dummy", graph_inputs, [out], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    buf = io.BytesIO()
    onnx.save(model, buf)
    return buf.getvalue()


def write_dummy_models(
    model_dir: Path, ids=ALL_MODELS, classes=CLASSES, digest: str | None = None, inputs: dict | None = None
) -> Path:
    """``<id>.onnx`` + ``<id>.json`` for each id; the cards carry the real sha256 and feature digest."""
    from app.analysis.analyzer import FeatureConfig

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for seed, mid in enumerate(ids):
        spec = (inputs or MODEL_INPUTS)[mid]
        blob = dummy_model_bytes(spec, len(classes), seed=seed)
        (model_dir / f"{mid}.onnx").write_bytes(blob)
        card = {
            "id": mid,
            "variant": "dummy",
            "classes": list(classes),
            "inputs": [{"name": n, "shape": ["batch"], "dtype": "float32"} for n in spec],
            "feature_config_digest": digest if digest is not None else FeatureConfig().digest(),
            "onnx": f"{mid}.onnx",
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        (model_dir / f"{mid}.json").write_text(json.dumps(card))
    return model_dir


def make_settings(tmp: Path, **overrides):
    from app.settings import Settings

    values = dict(
        model_dir=write_dummy_models(Path(tmp) / "models"),
        models=list(ALL_MODELS),
        sqlite_path=Path(tmp) / "sessions.db",
        device="cpu",
        api_keys=[],
        max_batch_wait_ms=2.0,
    )
    values.update(overrides)
    return Settings(**values)


@functools.lru_cache(maxsize=1)
def shared_analyzer():
    """One real Analyzer (bundled tiny.en + MiniLM), built as the server builds it, for every
    serving test in the process."""
    from app.analysis.analyzer import AnalyzerSpec

    return AnalyzerSpec(device="cpu", cpu_threads=2).build()


def make_service(tmp: Path, **overrides):
    from app.service import EmotionService

    return EmotionService(make_settings(tmp, **overrides), analyzer=shared_analyzer())


def wait_ready(client, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        if "failed" in r.text:
            raise RuntimeError(f"service failed to start: {r.text}")
        time.sleep(0.05)
    raise TimeoutError("service not ready")


def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()
