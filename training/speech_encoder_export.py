"""Export a local HuggingFace wav2vec2 model to ONNX: the paper-faithful ca-mser embedding (SPEC §2).

The server runs the exported file with ONNX Runtime (``app.analysis.speech_encoder.SpeechEncoder``), so
serving needs neither torch nor transformers. The graph reads ``input_values`` (batch, samples) of
16-kHz audio -- already zero-mean/unit-variance normalised when the feature extractor says
``do_normalize``; ``SpeechEncoder`` does that -- and returns ``last_hidden_state`` (batch, frames,
hidden), 49 frames per second (149 per 3-s segment). Batch and sample axes are dynamic. Weights stay
float32; a parity check against torch runs at export time and the export fails above ``--tolerance``.

The output directory holds ``model.onnx``, ``config.json`` and ``preprocessor_config.json`` (copied,
or written with the feature extractor's defaults when the source has none). Point the server at it
with ``EMOTION_SPEECH_ENCODER=DIR`` and training with ``python -m training ... --speech-encoder DIR``.

Usage: ``python -m training.speech_encoder_export --model-dir LOCAL_WAV2VEC2_DIR --out DIR``
(nothing is downloaded: ``LOCAL_WAV2VEC2_DIR`` is a ``save_pretrained`` directory, e.g. wav2vec2-base).
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
PARITY_TOLERANCE = 1e-3  # max |ORT - torch| / max(1, max |torch|) over the hidden states


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_values):
        return self.model(input_values=input_values).last_hidden_state


def preprocessor_config(model_dir: Path) -> dict:
    """The source's ``preprocessor_config.json``, or the wav2vec2 feature extractor's defaults."""
    path = Path(model_dir) / "preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    sr = int(cfg.get("sampling_rate", SAMPLE_RATE))
    if sr != SAMPLE_RATE:
        raise ValueError(
            f"{model_dir}: the encoder expects {sr}-Hz audio; the pipeline gives {SAMPLE_RATE} Hz"
        )
    return {
        "feature_extractor_type": cfg.get("feature_extractor_type", "Wav2Vec2FeatureExtractor"),
        "sampling_rate": sr,
        "do_normalize": bool(cfg.get("do_normalize", True)),  # the feature extractor's default
        "padding_value": float(cfg.get("padding_value", 0.0)),
        "feature_size": int(cfg.get("feature_size", 1)),
    }


def load_model(model_dir: Path):
    """The base wav2vec2 model (the encoder of a ``...ForCTC``/``...ForPreTraining`` checkpoint too)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    return model.eval()


def parity(model, onnx_path: Path, seconds=(3.0, 1.3), batch: int = 2, seed: int = 0) -> float:
    """Max |ORT - torch| / max(1, max |torch|) on normalised noise of a few lengths (batch > 1 and
    another length than the traced one prove that both axes are dynamic)."""
    import onnxruntime as ort

    model.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for s in seconds:
        x = rng.standard_normal((batch, int(s * SAMPLE_RATE))).astype(np.float32)
        with torch.no_grad():
            expected = model(input_values=torch.from_numpy(x)).last_hidden_state.numpy()
        got = session.run(["last_hidden_state"], {"input_values": x})[0]
        if got.shape != expected.shape or not np.isfinite(got).all():
            raise RuntimeError(
                f"ONNX output {got.shape} (finite: {np.isfinite(got).all()}) vs torch {expected.shape}"
            )
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(got - expected).max()) / scale)
    return worst


def export(model_dir: Path, out_dir: Path, tolerance: float = PARITY_TOLERANCE) -> tuple[Path, float]:
    """Write ``out_dir/model.onnx`` (+ configs); return its path and the parity max difference."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    prep = preprocessor_config(model_dir)
    model = load_model(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    example = torch.zeros(1, int(3.0 * SAMPLE_RATE))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter, on purpose
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(
            # eval() on the wrapper too: the legacy exporter traces in the top module's mode, and a
            # training-mode trace bakes SpecAugment's random time mask into the graph
            _Encoder(model).eval(),
            (example,),
            str(target),
            input_names=["input_values"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_values": {0: "batch", 1: "samples"},
                "last_hidden_state": {0: "batch", 1: "frames"},
            },
            opset_version=17,
            dynamo=False,
        )
    diff = parity(model, target)
    if not diff < tolerance:
        target.unlink()
        raise RuntimeError(f"ONNX Runtime differs from torch by {diff:.2e} (>= {tolerance}); export removed")
    shutil.copy(model_dir / "config.json", out_dir / "config.json")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(prep, indent=1))
    return target, diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="local HuggingFace wav2vec2 directory")
    ap.add_argument("--out", type=Path, required=True, help="output directory (model.onnx + configs)")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=PARITY_TOLERANCE,
        help=f"parity limit (default: {PARITY_TOLERANCE})",
    )
    args = ap.parse_args(argv)
    path, diff = export(args.model_dir, args.out, args.tolerance)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, parity: relative max |ORT - torch| {diff:.2e})")


if __name__ == "__main__":
    main()
