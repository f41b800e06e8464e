"""Prometheus metrics of the service, on a registry of its own (served at ``GET /metrics``).

A private registry keeps the exposition to what this service defines (no default process
collectors double-registered when tests build several apps in one process). All metric objects
are module-level singletons: import and use them anywhere, e.g. the streaming code does
``STREAMS_IN_FLIGHT.inc()`` when a WebSocket stream starts and ``.dec()`` when it ends, and
``AUDIO_SECONDS.labels(source="stream").inc(seconds)`` for audio it analysed.

Thread-safety: prometheus_client metrics are thread-safe (internal locks); use from any thread.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
# The standard process (memory, CPU, fds), Python GC and platform collectors, once, on our registry
# (the default registry's own instances: registering them here does not create new ones).
for _collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
    REGISTRY.register(_collector)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "emotion_http_requests_total",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "emotion_http_request_duration_seconds",
    "HTTP request latency by route template, method and status",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge("emotion_requests_in_flight", "HTTP requests being served", registry=REGISTRY)
STREAMS_IN_FLIGHT = Gauge(
    "emotion_streams_in_flight",
    "WebSocket streams open (maintained by the streaming code)",
    registry=REGISTRY,
)
ERRORS = Counter(
    "emotion_errors_total", "Errors answered to clients, by error code", ["type"], registry=REGISTRY
)

QUEUE_WAIT = Histogram(
    "emotion_queue_wait_seconds",
    "Time from enqueue to start of work, per queue (a model id, or asr)",
    ["queue"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "emotion_queue_depth", "Jobs waiting per queue (a model id, or asr)", ["queue"], registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "emotion_batch_size",
    "Utterances per model batch",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "emotion_inference_seconds",
    "ONNX Runtime time per batch, per model (collation included)",
    ["model"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
ASR_BATCH_SIZE = Histogram(
    "emotion_asr_batch_size",
    "Utterances per ASR lane batch (one transcribe_batch call), all priorities together",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    registry=REGISTRY,
)
LANE_QUEUE_DEPTH = Gauge(
    "emotion_lane_queue_depth",
    "Jobs waiting in a scheduler lane (asr | cpu), per priority (final | rest | partial)",
    ["lane", "priority"],
    registry=REGISTRY,
)
LANE_QUEUE_WAIT = Histogram(
    "emotion_lane_queue_wait_seconds",
    "Time from enqueue to the start of the batch, per scheduler lane and priority",
    ["lane", "priority"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
LANE_REFUSED = Counter(
    "emotion_lane_refused_total",
    "Jobs a scheduler lane did not run: queue_full (refused), shed (partials), deadline (expired queued)",
    ["lane", "priority", "reason"],
    registry=REGISTRY,
)
ASR_SECONDS = Histogram(
    "emotion_asr_seconds",
    "Per-utterance faster-whisper transcription time (the analysis timing_ms asr entry)",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
FEATURE_SECONDS = Histogram(
    "emotion_feature_seconds",
    "Per-utterance text-encoder plus acoustic-feature time",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "emotion_audio_seconds_total",
    "Seconds of audio processed, by source (rest|stream|cli)",
    ["source"],
    registry=REGISTRY,
)
UTTERANCES = Counter(
    "emotion_utterances_total", "Utterances analysed, by source", ["source"], registry=REGISTRY
)
ADMISSION_SHED = Counter(
    "emotion_admission_shed_total",
    "Requests or streams refused by admission control (503 / 1013): estimated_wait, upload_budget, "
    "decoded_budget, streams",
    ["reason"],
    registry=REGISTRY,
)
ADMISSION_ESTIMATED_WAIT = Gauge(
    "emotion_admission_estimated_wait_seconds",
    "Estimated wait of a /v1/predict request at its last admission (queued audio s x measured cost)",
    registry=REGISTRY,
)
BUDGET_BYTES_IN_USE = Gauge(
    "emotion_budget_bytes_in_use",
    "Bytes reserved in an admission budget (upload | decoded)",
    ["budget"],
    registry=REGISTRY,
)
STREAM_FINAL_LATENCY = Histogram(
    "emotion_stream_final_latency_seconds",
    "Stream finals: time from the arrival of an utterance's last speech audio to sending its final",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
READY = Gauge("emotion_ready", "1 once every model is loaded and warmed up", registry=REGISTRY)
MODEL_INFO = Gauge(
    "emotion_model_info",
    "Loaded models (value 1), with variant and execution provider",
    ["model", "variant", "provider"],
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text exposition."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
