"""wav2vec2 frames per 3-s segment: ca-mser's paper-faithful high-level embedding (SPEC §2).

By default ca-mser reads Whisper encoder frames captured from the ASR pass (384-d, 50 per second).
With ``EMOTION_SPEECH_ENCODER=DIR`` (serving) or ``--speech-encoder DIR`` (training), ``DIR`` being
the output of ``python -m training.speech_encoder_export`` (``model.onnx`` + ``config.json`` +
``preprocessor_config.json``), the ``enc_seg`` input holds wav2vec2 frames instead, computed as in
the paper: the utterance is cut into 3-s segments, the last one zero-padded, and wav2vec2 runs on
each segment (149 frames of 20 ms per 3 s). When the feature extractor config says
``do_normalize``, each segment is normalised to zero mean and unit variance over its real samples
before the zero padding (what ``Wav2Vec2FeatureExtractor`` does with an attention mask). Each
segment's frames are padded to 150 (``app.analysis.inputs.SEGMENT_ENC_FRAMES``), and the frames that
start after the end of the audio are zeroed, so that, as with Whisper frames, all-zero frames mark
padding for the model.

Runs on ONNX Runtime only (no torch at serve time).

Thread-safety: ``SpeechEncoder.segment_frames`` may be called from several threads at once: the
ONNX Runtime session is thread-safe and the object holds no other mutable state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.analysis import pretrained

SAMPLE_RATE = 16000
HOP = 320  # samples per wav2vec2 frame (product of the feature encoder's conv strides): 20 ms
SEGMENT_S = 3.0
SEGMENT_FRAMES = 150  # = app.analysis.inputs.SEGMENT_ENC_FRAMES (149 wav2vec2 frames + 1 of padding)


class SpeechEncoder:
    def __init__(
        self, model_dir: str | Path, providers: Sequence[str] | None = None, threads: int = 0
    ) -> None:
        import onnxruntime as ort

        path = Path(model_dir)
        if not (path / "model.onnx").is_file():
            raise FileNotFoundError(
                f"speech encoder directory {path} needs model.onnx "
                "(make it with: python -m training.speech_encoder_export --model-dir WAV2VEC2_DIR --out DIR)"
            )
        prep_path = path / "preprocessor_config.json"
        prep = json.loads(prep_path.read_text()) if prep_path.is_file() else {}
        if int(prep.get("sampling_rate", SAMPLE_RATE)) != SAMPLE_RATE:
            raise ValueError(
                f"{path}: the speech encoder expects {prep['sampling_rate']}-Hz audio, not 16 kHz"
            )
        self.do_normalize = bool(prep.get("do_normalize", True))  # Wav2Vec2FeatureExtractor's default
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(path / "model.onnx"), opts, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name
        self.dim = self._dim(path)
        self.model_dir = path
        self.identity = self.identity_of(path)

    @staticmethod
    def identity_of(model_dir: str | Path) -> str:
        """``<dir name>:<hash of model.onnx and preprocessor_config.json>`` (see ``app.analysis.pretrained``)."""
        path = Path(model_dir).resolve()
        if not (path / "model.onnx").is_file():
            raise FileNotFoundError(f"speech encoder directory {path} has no model.onnx")
        files = [path / "model.onnx"] + sorted(path.glob("*.onnx.data"))
        if (path / "preprocessor_config.json").is_file():
            files.append(path / "preprocessor_config.json")
        return pretrained.identity(path.name, files)

    def _dim(self, path: Path) -> int:
        last = self.session.get_outputs()[0].shape[-1]
        if isinstance(last, int):
            return last
        config = path / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["hidden_size"])
        return int(
            self.session.run(None, {self.input_name: np.zeros((1, SAMPLE_RATE), np.float32)})[0].shape[-1]
        )

    def _prepare(self, piece: np.ndarray) -> np.ndarray:
        if not self.do_normalize:
            return piece
        x = piece.astype(np.float64)
        return ((x - x.mean()) / math.sqrt(x.var() + 1e-7)).astype(np.float32)

    def segment_frames(
        self, audio: np.ndarray, segment_s: float = SEGMENT_S, frames: int = SEGMENT_FRAMES
    ) -> np.ndarray:
        """16-kHz mono float32 audio -> (S, frames, dim) float32, S = ceil(duration / segment_s) >= 1."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        seg = int(round(segment_s * SAMPLE_RATE))
        n_seg = max(1, math.ceil(len(audio) / seg))
        batch = np.zeros((n_seg, seg), np.float32)
        real = []
        for i in range(n_seg):
            piece = audio[i * seg : (i + 1) * seg]
            real.append(len(piece))
            if len(piece):
                batch[i, : len(piece)] = self._prepare(piece)
        hidden = self.session.run(None, {self.input_name: batch})[0]
        out = np.zeros((n_seg, frames, hidden.shape[-1]), np.float32)
        for i, n in enumerate(real):
            keep = min(frames, hidden.shape[1], max(1, math.ceil(n / HOP)))
            out[i, :keep] = hidden[i, :keep]
        return out
