"""The orchestration that REST, the CLI and streaming share: audio in, transcript + emotion out.

``EmotionService.analyze_utterance`` runs one utterance (<= 30 s, 16 kHz mono) through
the engine's batching ASR lane (``app.inference.scheduler``), then through the batcher of every requested model, and
returns an ``UtteranceResult`` (transcript, words with absolute times, per-model and mean
probabilities, timings). ``predict`` handles a whole input: it splits each channel into utterances
with ``app.analysis.segmenter`` (the same cut streaming and training use), analyses each one (all of them concurrently, scheduled
fairly against other requests), and combines them: the whole-input emotion is the mean of the
segments' probabilities weighted by segment duration.

Model selection (``models``): ``None`` or empty = every loaded model; otherwise the listed model
ids. The top-level ``label``/``score``/``ranking``/``probabilities`` are always the ensemble of the
requested models (``app.inference.ensemble``: the weighted mean of ``models/ensemble.json``,
re-normalised over the subset; the single model's own probabilities when only one is requested),
and ``per_model`` holds one entry per requested model, never an ``ensemble`` entry (result shape
v2). ``ensemble`` is still accepted in the list for 1.x clients: it adds nothing (the top level is
the ensemble), and a list of only ``ensemble`` means every model.

Text sentiment (``app.analysis.sentiment``, VADER) is computed per utterance next to the voice
emotion; the whole input's is the mean of its segments'. A typical utterance costs well under a
millisecond, so it is scored on the loop; a long one (``INLINE_MAX_CHARS``) in a thread.

Thread-safety: an ``EmotionService`` belongs to the asyncio loop that ``start``s it (like its
``Engine``); its coroutines may run concurrently on that loop. Blocking work runs in the engine's
thread pools, never on the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from app import metrics
from app.analysis import sentiment
from app.analysis.adaptation import FILE_NAME as ADAPTATION_FILE
from app.analysis.adaptation import PopulationStats, frame_mean
from app.analysis.asr import MAX_SAMPLES
from app.analysis.audio import SAMPLE_RATE, Audio, ChannelMode
from app.analysis.segmenter import Span, UtterancePolicy, split_utterances
from app.errors import NoSpeechError, NotReadyError, ServiceError, UnknownModelError
from app.inference.engine import Engine, analysis_inputs
from app.inference.ensemble import combine
from app.inference.scheduler import Priority
from app.schemas import (
    AsrDecoding,
    Emotion,
    ModelEmotion,
    ModelInfo,
    PredictResponse,
    TextSentiment,
    Timing,
    UtteranceResult,
    WordOut,
    role_of,
)

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"


class AdaptationUnavailable(ServiceError):
    """A stream asked for per-session adaptation, but the models have no usable population stats."""

    status = 400
    code = "adaptation_unavailable"


@dataclass(frozen=True)
class AdaptedResult:
    """An adapted utterance's result and its raw encoder-frame mean (the session's next statistic)."""

    result: UtteranceResult
    frame_mean: np.ndarray | None  # None: no encoder frames (the utterance adds nothing)


_request_ids = itertools.count()


def new_request_key() -> str:
    """A fresh client identity for the fair ASR pool (one per REST request)."""
    return f"req-{next(_request_ids)}"


def _ms() -> float:
    return time.perf_counter() * 1000.0


def _label(classes: Sequence[str], probs: np.ndarray) -> str:
    return classes[int(np.argmax(probs))]


def _probs_dict(classes: Sequence[str], probs: np.ndarray) -> dict[str, float]:
    return {c: float(p) for c, p in zip(classes, probs, strict=True)}


def _normalise(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    return probs / probs.sum()


def make_emotion(
    classes: Sequence[str],
    per_model: dict[str, np.ndarray],
    weights: dict[str, float] | None = None,
) -> Emotion:
    """Emotion from per-model probability vectors (all in ``classes`` order): each model in
    ``per_model``, and at the top level their mean weighted by ``weights``
    (``app.inference.ensemble``; None = plain mean)."""
    mean = _normalise(combine(per_model, weights))
    entries = {mid: ModelEmotion.of(_probs_dict(classes, p)) for mid, p in per_model.items()}
    return Emotion.of(_probs_dict(classes, mean), entries)


def weighted_emotion(
    classes: Sequence[str], emotions: Sequence[Emotion], weights: Sequence[float]
) -> Emotion:
    """Duration-weighted mean of several segments' emotions (same models in each)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))

    def mean_of(vectors: Iterable[dict[str, float]]) -> np.ndarray:
        arr = np.array([[v[c] for c in classes] for v in vectors])
        return _normalise((arr * w[:, None]).sum(axis=0))

    top = mean_of(e.probabilities for e in emotions)
    per_model = {
        mid: ModelEmotion.of(_probs_dict(classes, mean_of(e.per_model[mid].probabilities for e in emotions)))
        for mid in emotions[0].per_model
    }
    return Emotion.of(_probs_dict(classes, top), per_model)


async def score_text(text: str, language: str | None = None) -> TextSentiment | None:
    """``sentiment.text_sentiment`` from a coroutine: inline for a typical utterance (well under a
    millisecond), in a thread for a long text so the event loop is not held."""
    if len(text) <= sentiment.INLINE_MAX_CHARS:
        return sentiment.text_sentiment(text, language)
    return await asyncio.to_thread(sentiment.text_sentiment, text, language)


def split_even(span: Span, max_samples: int) -> list[Span]:
    """Cut a span longer than ``max_samples`` into equal parts (``whole`` mode over 30 s)."""
    parts = max(1, -(-(span.end - span.start) // max_samples))
    bounds = np.linspace(span.start, span.end, parts + 1).astype(int)
    return [Span(int(a), int(b), span.reason) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


Segmentation = Literal["utterance", "whole"]


class EmotionService:
    """Facade over the ``Engine``: model selection, utterance analysis, whole-input prediction."""

    def __init__(self, settings=None, engine: Engine | None = None, analyzer=None):
        from app.settings import get_settings

        self.settings = settings or get_settings()
        self.policy = UtterancePolicy.from_settings(self.settings)
        self.engine = engine or Engine(self.settings, analyzer=analyzer)
        self._population: PopulationStats | None = None  # adaptation.json, read on first use

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.engine.start()
        await asyncio.to_thread(sentiment.warm_up)  # VADER's lexicon (~20 ms), not on the first utterance

    async def stop(self) -> None:
        await self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    @property
    def state(self) -> str:
        return self.engine.state

    @property
    def error(self) -> str | None:
        return self.engine.error

    @property
    def model_ids(self) -> list[str]:
        return list(self.engine.runners)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.engine.classes

    def model_infos(self, model_ids: Iterable[str] | None = None) -> list[ModelInfo]:
        ids = self.model_ids if model_ids is None else list(model_ids)
        cards = self.engine.cards
        return [ModelInfo(id=m, variant=cards[m].variant, sha256=cards[m].sha256) for m in ids]

    def resolve_models(self, models: Sequence[str] | None) -> tuple[list[str], bool]:
        """(model ids to run, whether ``ensemble`` was named or implied); raises ``UnknownModelError``.

        The flag is kept for 1.x callers: since 2.0 the ensemble is always the top level and never
        a ``per_model`` entry, so nothing depends on it."""
        if not self.ready:
            raise NotReadyError("the models are still loading", retry_after=self.settings.retry_after_s)
        requested = [m.strip() for m in (models or []) if m and m.strip()]
        if not requested:
            return self.model_ids, True
        unknown = [m for m in requested if m != ENSEMBLE and m not in self.engine.runners]
        if unknown:
            raise UnknownModelError(
                f"unknown model(s) {', '.join(sorted(set(unknown)))}; available: {', '.join(self.model_ids + [ENSEMBLE])}"
            )
        ids = list(dict.fromkeys(m for m in requested if m != ENSEMBLE))  # de-duplicated, in order
        return (ids or self.model_ids), ENSEMBLE in requested

    # --- one utterance -------------------------------------------------------------------------

    async def analyze_utterance(
        self,
        audio16k: np.ndarray,
        models: Sequence[str] | None = None,
        channel: int = 0,
        offset_s: float = 0.0,
        *,
        key: Hashable | None = None,
        source: str = "stream",
        timeout_s: float | None = None,
        count_audio: bool = True,
        priority: Priority = Priority.REST,
        role: str | None = None,
    ) -> UtteranceResult:
        """Transcript + emotion of one utterance (16-kHz mono float32, <= ``max_utterance_s``).

        ``key`` groups jobs for fair ASR scheduling (e.g. one per stream); ``role`` names the
        channel (``roles=``, index = channel); ``priority`` is the ASR lane class (REST for /v1/predict, FINAL for a stream's utterance results, PARTIAL for
        interims); ``source`` labels the audio-seconds metric. Raises ``UnknownModelError``,
        ``QueueFull``, ``DeadlineExceededError``.
        """
        result, _ = await self._analyze_utterance(
            audio16k,
            models,
            channel,
            offset_s,
            key=key,
            source=source,
            timeout_s=timeout_s,
            count_audio=count_audio,
            priority=priority,
            role=role,
        )
        return result

    async def analyze_adapted(
        self, audio16k: np.ndarray, models: Sequence[str] | None, shift: np.ndarray, **kwargs
    ) -> AdaptedResult:
        """``analyze_utterance`` with ``shift`` added to the encoder frames before the models'
        inputs are computed (per-session adaptation, ``app.analysis.adaptation``), plus the
        utterance's raw (unshifted) encoder-frame mean for the session's running statistics."""
        result, analysis = await self._analyze_utterance(audio16k, models, encoder_shift=shift, **kwargs)
        frames = analysis.transcript.encoder_frames
        return AdaptedResult(result, frame_mean(frames) if len(frames) else None)

    def adaptation_population(self) -> PopulationStats:
        """The population statistics of the loaded models (``adaptation.json`` beside them), read
        once; raises ``AdaptationUnavailable`` when the file is missing, malformed or made for
        another ASR model's frames."""
        if self._population is not None:
            return self._population
        path = Path(self.engine.model_dir) / ADAPTATION_FILE
        try:
            population = PopulationStats.load(path)
        except FileNotFoundError:
            raise AdaptationUnavailable(
                f"per-session adaptation needs population statistics at {path}, which the models "
                "do not ship (python -m training adaptation-stats writes them)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdaptationUnavailable(f"unusable population statistics {path}: {exc}") from None
        served = getattr(getattr(self.engine.analyzer, "config", None), "asr_model", "")
        if population.asr_model and served and population.asr_model != served:
            raise AdaptationUnavailable(
                f"{path} describes the encoder frames of ASR model {population.asr_model!r}, the "
                f"server runs {served!r}"
            )
        self._population = population
        return population

    async def _analyze_utterance(
        self,
        audio16k: np.ndarray,
        models: Sequence[str] | None = None,
        channel: int = 0,
        offset_s: float = 0.0,
        *,
        key: Hashable | None = None,
        source: str = "stream",
        timeout_s: float | None = None,
        count_audio: bool = True,
        priority: Priority = Priority.REST,
        role: str | None = None,
        encoder_shift: np.ndarray | None = None,
    ):
        ids, _ = self.resolve_models(models)
        audio16k = np.ascontiguousarray(audio16k, dtype=np.float32).reshape(-1)
        duration = len(audio16k) / SAMPLE_RATE
        shift = {} if encoder_shift is None else {"encoder_shift": encoder_shift}
        analysis = await self.engine.analyze(
            audio16k, key=key, priority=priority, timeout_s=timeout_s, **shift
        )
        t0 = _ms()
        inputs = analysis_inputs(analysis, self.engine.analyzer)
        probs = await asyncio.gather(*(self.engine.infer(mid, inputs, timeout_s=timeout_s) for mid in ids))
        inference_ms = _ms() - t0
        if count_audio:  # predict() counts its whole input instead
            metrics.AUDIO_SECONDS.labels(source=source).inc(duration)
        metrics.UTTERANCES.labels(source=source).inc()

        words, last = [], 0.0
        for w in analysis.transcript.words:
            # Whisper may place a word slightly outside the clip or out of order: clamp, keep monotonic.
            start = min(max(w.start, last), duration)
            end = min(max(w.end, start), duration)
            last = start
            words.append(
                WordOut(
                    word=w.word,
                    start=round(offset_s + start, 3),
                    end=round(offset_s + end, 3),
                    confidence=w.confidence,
                )
            )
        timing = analysis.timing_ms
        transcript = analysis.transcript
        result = UtteranceResult(
            channel=channel,
            role=role,
            start=round(offset_s, 3),
            end=round(offset_s + duration, 3),
            text=transcript.text,
            language=transcript.language,
            words=words,
            emotion=make_emotion(
                self.classes, dict(zip(ids, probs, strict=True)), self.engine.ensemble_weights
            ),
            text_sentiment=await score_text(transcript.text, transcript.language),
            decoding=AsrDecoding(
                tokens=list(transcript.tokens),
                avg_logprob=transcript.avg_logprob,
                no_speech_prob=transcript.no_speech_prob,
            ),
            timing_ms=Timing(
                asr=timing.get("asr", 0.0),
                features=timing.get("text", 0.0) + timing.get("features", 0.0),
                inference=inference_ms,
                total=sum(timing.values()) + inference_ms,
            ),
        )
        return result, analysis

    async def transcribe(
        self,
        audio16k: np.ndarray,
        key: Hashable | None = None,
        timeout_s: float | None = None,
        priority: Priority = Priority.PARTIAL,
    ):
        """ASR only (streaming partials), batched in the ASR lane at ``priority`` (PARTIAL: shed
        first under load): returns an ``app.analysis.asr.Transcript``."""
        return await self.engine.transcribe(
            np.asarray(audio16k, np.float32).reshape(-1), key=key, priority=priority, timeout_s=timeout_s
        )

    # --- a whole input -------------------------------------------------------------------------

    def utterance_spans(self, samples: np.ndarray, segmentation: Segmentation) -> list[Span]:
        """``utterance``: the utterances of ``app.analysis.segmenter`` (the cut streaming and
        training use); ``whole``: the channel as one utterance (equal parts of <= 30 s), if it
        holds any speech."""
        spans = split_utterances(samples, self.policy)
        if segmentation == "utterance" or not spans:
            return spans
        return split_even(Span(0, len(samples), "whole"), MAX_SAMPLES)

    async def predict(
        self,
        audio: Audio,
        models: Sequence[str] | None = None,
        channels: ChannelMode = "mix",
        include_words: bool = False,
        segmentation: Segmentation = "utterance",
        *,
        source: str = "rest",
        decode_ms: float = 0.0,
        key: Hashable | None = None,
        roles: Sequence[str] | None = None,
    ) -> PredictResponse:
        """Split ``audio`` into utterances per channel, analyse them, and combine the results.

        ``roles`` names the channels (index = channel; a channel beyond the list has no role).
        Raises ``NoSpeechError`` when no channel contains speech (a silent channel in ``separate``
        mode simply contributes no segment).
        """
        response, _ = await self.predict_detailed(
            audio,
            models,
            channels,
            include_words,
            segmentation,
            source=source,
            decode_ms=decode_ms,
            key=key,
            roles=roles,
        )
        return response

    async def predict_detailed(
        self,
        audio: Audio,
        models: Sequence[str] | None = None,
        channels: ChannelMode = "mix",
        include_words: bool = False,
        segmentation: Segmentation = "utterance",
        *,
        source: str = "rest",
        decode_ms: float = 0.0,
        key: Hashable | None = None,
        roles: Sequence[str] | None = None,
    ) -> tuple[PredictResponse, list[UtteranceResult]]:
        """``predict`` plus the per-utterance results, in time order (the REST route stores them).

        ``key`` (default: a new one) is this request's identity in the fair ASR pool.
        """
        t0 = _ms()
        ids, _ = self.resolve_models(models)
        role_names = list(roles) if roles else None
        if channels == "separate":
            tracks = [audio.samples[c] for c in range(audio.samples.shape[0])]
        else:
            tracks = [audio.mono]
        key = key if key is not None else new_request_key()

        tv = _ms()
        per_channel = await asyncio.gather(
            *(self.engine.run_cpu(key, self.utterance_spans, t, segmentation) for t in tracks)
        )
        vad_ms = _ms() - tv
        jobs = [(c, r) for c, regions in enumerate(per_channel) for r in regions]
        metrics.AUDIO_SECONDS.labels(source=source).inc(audio.duration_s)
        if not jobs:
            no_speech = NoSpeechError("no speech was detected in the audio")
            no_speech.duration_s = audio.duration_s
            raise no_speech

        # A long input may hold hundreds of utterances: keep one ASR batch of them queued at a time
        # (fair against other requests), so one request cannot fill the bounded ASR queue.
        lane = self.engine.asr_lane
        in_flight = asyncio.Semaphore(lane.max_batch * lane.workers if lane is not None else 2)

        async def one(c: int, r: Span) -> UtteranceResult:
            async with in_flight:
                return await self.analyze_utterance(
                    tracks[c][r.start : r.end],
                    ids,
                    channel=c,
                    role=role_of(role_names, c),
                    offset_s=r.start / SAMPLE_RATE,
                    key=key,
                    source=source,
                    count_audio=False,
                )

        results: list[UtteranceResult] = list(await asyncio.gather(*(one(c, r) for c, r in jobs)))
        results.sort(key=lambda u: (u.start, u.channel))
        emotion = weighted_emotion(
            self.classes, [u.emotion for u in results], [u.duration_s for u in results]
        )
        timing = Timing(  # stages summed over segments (they overlap in time); VAD counts as asr
            decode=decode_ms,
            asr=vad_ms + sum(u.timing_ms.asr for u in results),
            features=sum(u.timing_ms.features for u in results),
            inference=sum(u.timing_ms.inference for u in results),
            total=decode_ms + (_ms() - t0),
        )
        return PredictResponse(
            duration_s=round(audio.duration_s, 3),
            transcript=" ".join(u.text for u in results if u.text).strip(),
            language=results[0].language or (self.settings.asr_language or ""),
            segments=[u.to_segment(include_words) for u in results],
            emotion=emotion,
            text_sentiment=sentiment.mean_sentiment(u.text_sentiment for u in results),
            models=self.model_infos(ids),
            timing_ms=timing,
        ), results
