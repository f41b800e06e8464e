"""The inference engine: ONNX Runtime sessions, their batchers, the scheduler lanes, loading and warm-up.

One ``ModelRunner`` (one ONNX Runtime session) per model id, each behind a ``DynamicBatcher``;
two scheduler lanes (``app.inference.scheduler``) for the blocking work: the **ASR lane** batches
utterances across requests and streams (``Analyzer.transcribe_batch`` then ``finish_batch``) with
priorities stream finals > REST > partials and per-client fairness, and the **CPU lane** runs the
other blocking calls (decode, VAD) under the same rules, one at a time.

CPU budget (the point of ``ThreadPlan``): ASR dominates the cost of a request, so on CPU it gets
the cores: ``asr_workers`` lane threads (default 1: batching replaces parallel single-utterance
workers) with ``cores // asr_workers`` CTranslate2 threads each; the models share
``inference_workers`` threads (default 1) whose ONNX Runtime sessions use ``cores // 4`` intra-op
threads (at least 1) with spinning disabled, so an idle model session does not burn the cores ASR
is using. Explicit settings (``asr_cpu_threads``, ``intra_op_threads``) override the plan.

Execution provider: CUDA when ``device`` is ``auto`` or ``cuda`` and a probe session really runs on
it (``get_available_providers()`` lists CUDA whenever the GPU build is installed, even without a
GPU or CUDA libraries), else CPU. Each session logs the providers it actually got.

Thread-safety: ``Engine`` is created in any thread but ``start``/``stop``/``infer``/``analyze``/
``transcribe``/``run_cpu`` belong to the asyncio loop that called ``start`` (its batchers are asyncio
objects; the lanes themselves are thread-safe). ``ModelRunner.run`` is thread-safe (ONNX Runtime
sessions allow concurrent ``run``), and is called from the inference executor threads. The ASR
lane's batch function runs on the lane's threads and calls the Analyzer, which must be thread-safe
when ``asr_workers > 1``. ``ModelCard`` is immutable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.analysis.inputs import collate, inputs_for, model_inputs
from app.errors import InferenceError, NotReadyError, ServiceError
from app.inference.batching import DynamicBatcher
from app.inference.ensemble import apply_temperature, card_temperature, load_weights
from app.inference.scheduler import Call, Failed, Lane, LaneLimits, Priority, cpu_lane, resolve_max_batch

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class ModelLoadError(ServiceError):
    """A model file or card is missing, inconsistent, or does not load."""

    status = 500
    code = "model_load_failed"


# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """The parts of ``models/<id>.json`` the server uses (the file holds more: training, metrics...)."""

    id: str
    variant: str
    classes: tuple[str, ...]
    inputs: tuple[str, ...]
    sha256: str
    feature_config_digest: str
    onnx_path: Path
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, model_dir: Path, model_id: str) -> ModelCard:
        card_path = Path(model_dir) / f"{model_id}.json"
        if not card_path.is_file():
            raise ModelLoadError(f"model {model_id}: no card at {card_path}")
        try:
            raw = json.loads(card_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {model_id}: unreadable card {card_path}: {exc}") from exc
        if raw.get("id", model_id) != model_id:
            raise ModelLoadError(f"model {model_id}: card {card_path} describes {raw.get('id')!r}")
        classes = tuple(str(c) for c in raw.get("classes") or ())
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ModelLoadError(f"model {model_id}: card needs two or more distinct classes, got {classes}")
        inputs = tuple(i["name"] if isinstance(i, dict) else str(i) for i in raw.get("inputs") or ())
        digest = raw.get("feature_config_digest") or (raw.get("feature_config") or {}).get("digest", "")
        onnx_path = Path(model_dir) / (raw.get("onnx") or f"{model_id}.onnx")
        if not onnx_path.is_file():
            raise ModelLoadError(f"model {model_id}: no ONNX file at {onnx_path}")
        return cls(
            id=model_id,
            variant=str(raw.get("variant", "")),
            classes=classes,
            inputs=inputs,
            sha256=str(raw.get("sha256", "")),
            feature_config_digest=str(digest),
            onnx_path=onnx_path,
            raw=raw,
        )


def _parts_note(feature_config: dict | None) -> str:
    """`` (speech_encoder=..., text_model=...)`` for the non-default parts a feature config names."""
    from app.analysis.analyzer import FeatureConfig

    default = FeatureConfig().__dict__
    keys = ("asr_model", "text_model", "speech_encoder", "word_vectors")
    parts = {k: (feature_config or {}).get(k, default[k]) for k in keys}
    named = ", ".join(f"{k}={v}" for k, v in parts.items() if v != default[k])
    return f" ({named})" if named else " (default parts)" if feature_config else ""


def analysis_inputs(analysis, analyzer) -> dict[str, np.ndarray]:
    """The model inputs of an analysis: those the ASR lane computed (off the event loop), or all of
    them for an analysis made elsewhere (test doubles)."""
    if getattr(analysis, "inputs", None) is not None:
        return analysis.inputs
    return model_inputs(analysis, max_words=analyzer.config.max_words)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Threads and providers
# --------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    asr_workers: int
    asr_threads: int
    inference_workers: int
    ort_intra_threads: int

    @classmethod
    def from_settings(cls, settings, cores: int | None = None) -> ThreadPlan:
        cores = cores or available_cores()
        asr_workers = max(1, settings.asr_workers)
        return cls(
            cores=cores,
            asr_workers=asr_workers,
            asr_threads=settings.asr_cpu_threads or max(1, cores // asr_workers),
            inference_workers=max(1, settings.inference_workers),
            ort_intra_threads=settings.intra_op_threads or max(1, cores // 4),
        )


def choose_providers(device: str) -> list[str]:
    """ONNX Runtime providers to request for ``device`` (auto | cpu | cuda).

    ``get_available_providers()`` lists CUDA whenever the GPU build is installed, even without a GPU
    or CUDA libraries; whether CUDA really works is only known once a session is created, so the
    engine checks ``session.get_providers()`` afterwards (see ``Engine._load``).
    """
    import onnxruntime as ort

    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return [CPU]
    if CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    if device == "cuda":
        raise ModelLoadError("device=cuda but this ONNX Runtime build has no CUDA provider")
    return [CPU]


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


class ModelRunner:
    """One ONNX Runtime session; ``run`` takes per-utterance input dicts and returns probabilities.

    Only the inputs the graph declares (``session.get_inputs()``) are collated and fed; the rest of
    the vocabulary of ``app.analysis.inputs`` is ignored. Probabilities come back in ``classes`` order.
    Thread-safety: ``run`` may be called from several threads at once.
    """

    def __init__(
        self, card: ModelCard, providers: Sequence[str], intra_op_threads: int, classes: Sequence[str]
    ):
        import onnxruntime as ort

        self.card = card
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle intra-op threads spin by default, stealing CPU from ASR running beside them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(card.onnx_path), opts, providers=list(providers))
        except Exception as exc:
            raise ModelLoadError(
                f"model {card.id}: ONNX Runtime cannot load {card.onnx_path}: {exc}"
            ) from exc
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        self.inputs = [(i.name, _ORT_DTYPES.get(i.type, np.float32)) for i in self.session.get_inputs()]
        self.input_names = [name for name, _ in self.inputs]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[0]
        if card.inputs and set(card.inputs) != set(self.input_names):
            raise ModelLoadError(
                f"model {card.id}: card inputs {sorted(card.inputs)} != graph inputs {sorted(self.input_names)}"
            )
        # Align this model's class order to the service's (all models must share one class set).
        if set(card.classes) != set(classes):
            raise ModelLoadError(f"model {card.id}: classes {card.classes} differ from {tuple(classes)}")
        self.order = np.array([card.classes.index(c) for c in classes])
        # temperature fitted out-of-fold (card "calibration"; 1.0 = uncalibrated)
        self.temperature = card_temperature(card.raw, f"model {card.id}")
        log.info(
            "model %s (%s): providers %s (requested %s), inputs %s",
            card.id,
            card.variant or "default",
            self.providers,
            list(providers),
            self.input_names,
        )

    def run(self, samples: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        try:
            batch = collate(samples, self.input_names)
        except KeyError as exc:
            raise InferenceError(
                f"model {self.card.id} needs input {exc} that the pipeline does not provide"
            ) from exc
        feed: dict[str, np.ndarray] = {
            name: batch[name].astype(dtype, copy=False) for name, dtype in self.inputs
        }
        try:
            (probs,) = self.session.run([self.output_name], feed)
        except Exception as exc:
            raise InferenceError(f"model {self.card.id} failed: {exc}") from exc
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (len(samples), len(self.order)):
            raise InferenceError(
                f"model {self.card.id}: output shape {probs.shape}, expected {(len(samples), len(self.order))}"
            )
        if not np.isfinite(probs).all():
            raise InferenceError(f"model {self.card.id} returned non-finite probabilities")
        probs = np.clip(probs[:, self.order], 0.0, None)
        sums = probs.sum(axis=1, keepdims=True)
        if (sums <= 0).any():
            raise InferenceError(f"model {self.card.id} returned all-zero probabilities")
        # exact normalisation (float32 softmax sums drift by ~1e-7), then the card's temperature
        return list(apply_temperature(probs / sums, self.temperature))


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def warmup_audio(seconds: float = 1.0) -> np.ndarray:
    """Deterministic, speech-like enough input for warm-up: a 200-Hz harmonic tone plus noise."""
    t = np.arange(int(16000 * seconds)) / 16000.0
    tone = sum(np.sin(2 * np.pi * 200 * k * t) / k for k in range(1, 6))
    noise = np.random.default_rng(0).standard_normal(len(t))
    return (0.1 * tone + 0.01 * noise).astype(np.float32)


class Engine:
    """Loads the models and the Analyzer, runs warm-up, and serves ``analyze`` / ``infer``."""

    def __init__(self, settings, analyzer=None) -> None:
        self.settings = settings
        self.plan = ThreadPlan.from_settings(settings)
        self.analyzer = analyzer
        self.cards: dict[str, ModelCard] = {}
        self.model_dir = Path(settings.model_dir)  # the ASR model's subdirectory once loaded
        self.ensemble_weights: dict[str, float] | None = None  # None = plain mean (app.inference.ensemble)
        self.runners: dict[str, ModelRunner] = {}
        self.input_names: tuple[str, ...] = ()  # the inputs the loaded models declare (+ masks)
        self.batchers: dict[str, DynamicBatcher] = {}
        self.classes: tuple[str, ...] = ()
        self.asr_lane: Lane | None = None
        self.cpu_lane: Lane | None = None
        self.providers: list[str] = [CPU]
        self._executor: ThreadPoolExecutor | None = None
        self.ready = False
        self.state = "created"  # created | loading | ready | failed | stopped
        self.error: str | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load everything, warm up, and mark ready. Idempotent; raises on failure (state 'failed')."""
        async with self._lock:
            if self.ready:
                return
            self.state, self.error = "loading", None
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._load)
                s = self.settings
                self._start_lanes()
                self._executor = ThreadPoolExecutor(
                    self.plan.inference_workers, thread_name_prefix="inference"
                )
                for mid, runner in self.runners.items():
                    batcher = DynamicBatcher(
                        mid,
                        runner.run,
                        max_batch_size=s.max_batch_size,
                        max_wait_s=s.max_batch_wait_ms / 1000.0,
                        max_queue=s.max_queue,
                        default_timeout_s=s.request_timeout_s,
                        executor=self._executor,
                        retry_after_s=s.retry_after_s,
                    )
                    batcher.start()
                    self.batchers[mid] = batcher
                if s.warmup:
                    await self.warmup()
            except Exception as exc:
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("engine start-up failed")
                await self._teardown()
                raise
            self.ready, self.state = True, "ready"
            metrics.READY.set(1)
            log.info("engine ready in %.1f s (models: %s)", time.perf_counter() - t0, ", ".join(self.runners))

    def _load(self) -> None:
        import onnxruntime as ort

        s = self.settings
        log.info("ONNX Runtime %s, available providers: %s", ort.__version__, ort.get_available_providers())
        log.info("thread plan: %s", self.plan)
        if not s.models:
            raise ModelLoadError("no models configured (EMOTION_MODELS is empty)")
        from app.analysis.analyzer import AnalyzerSpec
        from app.analysis.asr_models import emotion_models_dir

        asr = AnalyzerSpec.from_settings(s).asr_name()
        self.model_dir = emotion_models_dir(s.model_dir, asr)
        log.info("ASR model %s; emotion models from %s", asr, self.model_dir)
        cards = {mid: ModelCard.load(self.model_dir, mid) for mid in s.models}
        if self.analyzer is None:
            self.analyzer = self._build_analyzer()
        digest = self.analyzer.config.digest()
        for card in cards.values():
            if not s.verify_models:
                break
            trained_asr = (card.raw.get("feature_config") or {}).get("asr_model")
            if trained_asr and trained_asr != self.analyzer.config.asr_model:
                raise ModelLoadError(
                    f"model {card.id} in {self.model_dir} was trained on the features of ASR model "
                    f"{trained_asr!r}, but the server runs ASR model {self.analyzer.config.asr_model!r} "
                    f"(EMOTION_ASR_MODEL={s.asr_model or '(default)'}): set EMOTION_ASR_MODEL={trained_asr} "
                    "or point EMOTION_MODEL_DIR at models trained on this ASR model (models/<name>/ for "
                    "the named ones)"
                )
            if card.sha256 and sha256_file(card.onnx_path) != card.sha256:
                raise ModelLoadError(
                    f"model {card.id}: {card.onnx_path} does not match the sha256 in its card"
                )
            if card.feature_config_digest and card.feature_config_digest != digest:
                raise ModelLoadError(
                    f"model {card.id} was trained on features {card.feature_config_digest}"
                    f"{_parts_note(card.raw.get('feature_config'))}, the server computes {digest}"
                    f"{_parts_note(self.analyzer.config.to_dict())}: configure the server as the model "
                    "was trained (EMOTION_ASR_MODEL, EMOTION_TEXT_MODEL, EMOTION_SPEECH_ENCODER, "
                    "EMOTION_GLOVE_PATH), or retrain it"
                )
        self.providers = choose_providers(s.device)
        self.classes = next(iter(cards.values())).classes
        runners: dict[str, ModelRunner] = {}
        for mid, card in cards.items():
            quiet = CUDA in self.providers and s.device == "auto" and not runners
            if quiet:  # a CUDA provider that cannot load logs an ERROR per session; we explain it once below
                ort.set_default_logger_severity(4)
            try:
                runner = ModelRunner(card, self.providers, self.plan.ort_intra_threads, self.classes)
            finally:
                if quiet:
                    ort.set_default_logger_severity(2)
            if CUDA in self.providers and runner.provider != CUDA:
                if s.device == "cuda":
                    raise ModelLoadError(
                        f"device=cuda but model {mid} could not run on CUDA (CUDA/cuDNN libraries or GPU missing)"
                    )
                log.warning(
                    "CUDA is listed by ONNX Runtime but unusable here (no GPU or CUDA/cuDNN libraries): using CPU"
                )
                self.providers = [CPU]
            runners[mid] = runner
            metrics.MODEL_INFO.labels(model=mid, variant=card.variant, provider=runner.provider).set(1)
        self.cards, self.runners = cards, runners
        # the ASR lane computes exactly the inputs the loaded models declare, off the event loop
        self.input_names = inputs_for(n for r in runners.values() for n in r.input_names)
        self.ensemble_weights = load_weights(self.model_dir, {m: c.sha256 for m, c in cards.items()})
        log.info("ensemble: %s", self.ensemble_weights or "plain mean")

    def _start_lanes(self) -> None:
        s = self.settings
        limits = LaneLimits(
            max_queue=s.asr_max_queue,
            final_reserve=s.asr_final_reserve,
            partial_low_water=s.asr_partial_low_water,
            retry_after_s=s.retry_after_s,
            default_timeout_s=s.request_timeout_s,
        )
        recognizer = getattr(self.analyzer, "recognizer", None)
        cuda = CUDA in self.providers or getattr(recognizer, "device", "cpu") == "cuda"
        self.asr_lane = Lane(
            "asr",
            self._asr_batch,
            workers=self.plan.asr_workers,
            max_batch=resolve_max_batch(s.asr_max_batch, cuda),
            max_wait_s=s.asr_max_wait_ms / 1000.0,
            limits=limits,
            batch_size_metric=metrics.ASR_BATCH_SIZE,
        )
        self.cpu_lane = cpu_lane("cpu", workers=s.cpu_workers, limits=limits)
        log.info("ASR lane: %d worker(s), batches of <= %d", self.asr_lane.workers, self.asr_lane.max_batch)

    def _build_analyzer(self):
        from app.analysis.analyzer import Analyzer

        return Analyzer.from_settings(
            self.settings, asr_threads=self.plan.asr_threads, asr_workers=self.plan.asr_workers
        )

    async def warmup(self) -> None:
        """One dummy utterance through ASR and every model (first-run allocations, lazy inits)."""
        t0 = time.perf_counter()
        analysis = await self.analyze(warmup_audio(), key="warmup")
        inputs = analysis_inputs(analysis, self.analyzer)
        for mid, batcher in self.batchers.items():
            probs = await batcher.submit(inputs)
            log.info("warm-up %s: %s", mid, np.round(probs, 3).tolist())
        # Silero VAD loads lazily: load it now rather than on the first request.
        from app.analysis.segmenter import split_utterances

        await self.run_cpu("warmup", split_utterances, warmup_audio())
        log.info("warm-up done in %.2f s", time.perf_counter() - t0)

    async def stop(self) -> None:
        async with self._lock:
            await self._teardown()
            self.state = "stopped"

    async def _teardown(self) -> None:
        self.ready = False
        metrics.READY.set(0)
        for batcher in self.batchers.values():
            await batcher.stop()
        self.batchers = {}
        for lane in (self.asr_lane, self.cpu_lane):
            if lane is not None:
                await asyncio.to_thread(lane.shutdown)
        self.asr_lane = self.cpu_lane = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- work --------------------------------------------------------------------------------

    def _require(self, lane: Lane | None) -> Lane:
        if lane is None:
            raise NotReadyError("the models are still loading", retry_after=self.settings.retry_after_s)
        return lane

    async def run_cpu(
        self,
        key: Hashable | None,
        fn,
        *args: Any,
        priority: Priority = Priority.REST,
        timeout_s: float | None = None,
    ) -> Any:
        """Run blocking CPU work (decode, VAD) in the fair CPU lane."""
        return await self._require(self.cpu_lane).run(key, Call(fn, args), priority, timeout_s)

    async def analyze(
        self,
        audio: np.ndarray,
        key: Hashable | None = None,
        priority: Priority = Priority.REST,
        timeout_s: float | None = None,
        encoder_shift: np.ndarray | None = None,
    ):
        """``Analysis`` of one utterance (ASR + text + acoustic features), batched in the ASR lane.
        ``encoder_shift``: added to the encoder frames before the model inputs are computed
        (per-session adaptation); ``analysis.transcript.encoder_frames`` stay as recognised."""
        request = AsrRequest(
            np.ascontiguousarray(audio, dtype=np.float32), full=True, encoder_shift=encoder_shift
        )
        analysis = await self._require(self.asr_lane).run(key, request, priority, timeout_s)
        metrics.ASR_SECONDS.observe(analysis.timing_ms.get("asr", 0.0) / 1000.0)
        feature_ms = sum(analysis.timing_ms.get(k, 0.0) for k in ("text", "features", "speech_encoder"))
        metrics.FEATURE_SECONDS.observe(feature_ms / 1000.0)
        return analysis

    async def transcribe(
        self,
        audio: np.ndarray,
        key: Hashable | None = None,
        priority: Priority = Priority.PARTIAL,
        timeout_s: float | None = None,
    ):
        """ASR only (``app.analysis.asr.Transcript``), batched with everything else in the ASR lane."""
        request = AsrRequest(np.ascontiguousarray(audio, dtype=np.float32), full=False)
        return await self._require(self.asr_lane).run(key, request, priority, timeout_s)

    def _asr_batch(self, requests: list[AsrRequest]) -> list[Any]:
        """The ASR lane's batch function (lane thread): every job's ASR in one ``transcribe_batch``
        call, then ``finish_batch`` for the jobs that want a full ``Analysis``."""
        analyzer = self.analyzer
        if not hasattr(analyzer, "transcribe_batch"):
            return [_one_by_one(analyzer, r) for r in requests]
        audios = [r.audio for r in requests]
        # transcribe-only jobs are streaming partials: their words need no alignment
        results: list[Any] = list(analyzer.transcribe_batch(audios, [r.full for r in requests]))
        full = [i for i, r in enumerate(requests) if r.full]
        if full:
            analyses = analyzer.finish_batch([audios[i] for i in full], [results[i] for i in full])
            max_words = analyzer.config.max_words
            for i, analysis in zip(full, analyses, strict=True):
                t0 = time.perf_counter()
                shift = requests[i].encoder_shift
                analysis.inputs = model_inputs(analysis, self.input_names, max_words, shift)
                analysis.timing_ms["features"] = (time.perf_counter() - t0) * 1000.0
                results[i] = analysis
        return results

    async def infer(
        self, model_id: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None
    ) -> np.ndarray:
        """Probabilities (in ``self.classes`` order) of one model for one utterance, via its batcher."""
        batcher = self.batchers.get(model_id)
        if batcher is None:
            raise NotReadyError(f"model {model_id} is not loaded", retry_after=self.settings.retry_after_s)
        return await batcher.submit(inputs, timeout_s=timeout_s)


@dataclass(frozen=True)
class AsrRequest:
    """An ASR-lane payload: 16-kHz mono float32 audio; ``full`` = an ``Analysis``, else a ``Transcript``."""

    audio: np.ndarray
    full: bool
    encoder_shift: np.ndarray | None = None  # (E,) added to the encoder frames (app.analysis.adaptation)


def _one_by_one(analyzer, request: AsrRequest) -> Any:
    """For an analyzer without the batch stages: the single-utterance calls, failing one job alone."""
    try:
        if request.full:
            return analyzer.analyze(request.audio)
        return analyzer.recognizer.transcribe(request.audio)
    except Exception as exc:
        return Failed(exc)
