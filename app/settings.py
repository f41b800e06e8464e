"""Service settings, read from environment variables prefixed ``EMOTION_`` (pydantic-settings).

Example: ``EMOTION_PORT=9000 EMOTION_DEVICE=cuda emotion-server serve``. A ``.env`` file in the working
directory is read too (the environment wins); unknown ``EMOTION_*`` names are warned about at start-up.
Every setting has a safe default: the server binds to loopback, accepts no API key (open), and
uses the models shipped in ``models/``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.jobs.targets import WebhookTarget, check_names
from app.store.alerts import AlertRule, check_unique

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    # A `.env` file in the working directory is read when present (environment variables win).
    model_config = SettingsConfigDict(
        env_prefix="EMOTION_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    # Lists read from the environment as JSON (`["a","b"]`) or comma-separated (`a,b`).
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys, each `key` (its own tenant) or `tenant:key`, or a JSON object "
        '{"tenant": "key" | ["key", ...]}; empty (and no admin key) = open /v1 routes',
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer keys that see and delete every tenant's sessions"
    )
    # In-memory token buckets, per server process (app/api/auth.py); 0 = no limit.
    auth_fail_burst: int = Field(10, ge=0, description="wrong API keys per client address before 429")
    auth_fail_per_min: float = Field(10.0, ge=0, description="refill of the wrong-key allowance, per minute")
    key_rate_per_s: float = Field(50.0, ge=0, description="requests per second per valid API key (sustained)")
    key_rate_burst: int = Field(500, ge=0, description="burst of requests per valid API key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- models --------------------------------------------------------------------------
    model_dir: Path = Field(
        REPO_ROOT / "models",
        description="emotion models root: tiny.en's models here, base's in base/ (app.analysis.asr_models)",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cmt-awc", "ca-mser", "adf", "3m-ser"]
    )
    device: str = Field("auto", description="auto | cpu | cuda (ONNX Runtime and faster-whisper)")
    intra_op_threads: int = Field(0, description="ONNX Runtime intra-op threads per session; 0 = auto")

    # --- ASR (faster-whisper) ------------------------------------------------------------
    asr_model: str = Field(
        "",
        description="tiny.en | base (app/analysis/asr_models.py) | a faster-whisper directory; empty = the "
        "default (tiny.en on CPU and CUDA: app/analysis/asr_models.py); emotion models come from EMOTION_MODEL_DIR/<name>",
    )
    asr_compute_type: str = Field("default", description="CTranslate2 compute type (int8, float16, ...)")
    asr_beam_size: int = 1
    asr_language: str | None = "en"
    asr_cpu_threads: int = Field(0, description="CTranslate2 intra-op threads; 0 = number of cores")
    asr_encoder_window: Literal["", "fitted", "full"] = Field(
        "",
        description="fitted (utterance rounded up to 5 s, >= 10 s) | full (Whisper's 30 s); empty = the ASR "
        "model's own (tiny.en fitted, base full: app/analysis/asr_models.py)",
    )

    # --- what an utterance is (app/analysis/segmenter.py): REST, streaming and training alike ---
    utterance_threshold: float = Field(0.5, description="Silero speech probability that starts speech")
    utterance_end_silence_ms: int = Field(500, description="silence that ends an utterance")
    utterance_min_speech_ms: int = Field(200, description="shorter speech bursts are ignored")
    utterance_pre_pad_ms: int = Field(200, description="audio kept before the detected speech start")
    utterance_post_pad_ms: int = Field(150, description="audio kept after the detected speech end")
    utterance_max_s: float = Field(15.0, description="longer speech is cut into utterances of this length")

    # --- documentation files served by the web UI (a non-editable install has no repo beside it) ---
    docs_dir: Path = Field(REPO_ROOT / "docs", description="docs/*.md directory; the image sets /srv/docs")

    # --- text encoder -------------------------------------------------------------------
    text_model: str = Field("", description="ONNX text encoder directory; empty = bundled all-MiniLM-L6-v2")

    # --- paper-faithful pretrained parts (SPEC §2); they change the feature digest ---------
    speech_encoder: str = Field(
        "",
        description="wav2vec2 ONNX directory (python -m training.speech_encoder_export) for ca-mser; "
        "empty = Whisper encoder frames",
    )
    glove_path: str = Field(
        "", description="GloVe text file for adf's word vectors; empty = the text encoder's input embeddings"
    )

    # --- batching -------------------------------------------------------------------------
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 120.0

    # --- inference service (engine, CPU budget, utterance splitting) ------------------------
    inference_workers: int = Field(1, description="threads running model batches, shared by all models")
    warmup: bool = Field(True, description="one dummy request through ASR and every model before ready")
    verify_models: bool = Field(
        True, description="check each model's sha256 and feature digest against its card"
    )
    retry_after_s: int = Field(1, description="Retry-After seconds sent with 503 (queue full, not ready)")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text | json (one JSON object per line, with request_id and session_id)"
    )

    # --- scheduler (app/inference/scheduler.py: the ASR and CPU lanes) ------------------------
    # One ASR worker using every core for CTranslate2 is the CPU baseline: batching across requests
    # and streams replaces parallel single-utterance workers.
    asr_workers: int = Field(1, description="ASR lane worker threads (batches in flight at once)")
    asr_max_batch: int = Field(0, description="utterances per ASR batch; 0 = auto (8 on CPU, 32 on CUDA)")
    asr_max_wait_ms: float = Field(
        10.0, description="longest wait for a fuller ASR batch after the oldest job"
    )
    asr_max_queue: int = Field(
        256, description="final + REST jobs waiting in a lane; beyond it -> 503 (finals get the last slots)"
    )
    asr_final_reserve: int = Field(32, description="queue slots only stream finals may take")
    asr_partial_low_water: int = Field(
        4, description="partial/interim passes are admitted only while fewer jobs wait, and shed beyond it"
    )
    asr_partial_timeout_s: float = Field(
        3.0, description="a partial/interim pass not done by then is dropped"
    )
    cpu_workers: int = Field(1, description="CPU lane threads: decoding and VAD of uploads")
    stream_ingest_workers: int = Field(
        2, description="threads decoding, resampling and VAD-ing stream frames off the event loop"
    )

    # --- input limits ---------------------------------------------------------------------
    max_upload_bytes: int = 50 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_channels: int = 2
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000
    upload_budget_mb: float = Field(
        256.0,
        ge=0,
        description="upload bytes being read at once, all requests together; beyond -> 503 (0 = off)",
    )
    decoded_budget_mb: float = Field(
        1024.0,
        ge=0,
        description="decoded samples in flight (header-declared frames x channels x 4 before decoding, the "
        "actual array after); beyond -> 503; one input larger than it runs alone (0 = off)",
    )
    admission_max_wait_s: float = Field(
        60.0,
        ge=0,
        description="/v1/predict is shed (503) when its estimated queueing wait exceeds this (capped at "
        "request_timeout_s; 0 = off)",
    )
    admission_initial_cost: float = Field(
        0.25, gt=0, description="assumed seconds of work per audio second until measured (EWMA)"
    )
    decode_workers: int = Field(2, ge=1, description="isolated decoder processes for uploads")
    decode_memory_mb: int = Field(
        3072, ge=0, description="address-space limit of each decoder process (MB; 0 = none, else >= 512)"
    )

    # --- streaming and sessions -----------------------------------------------------------
    store: str = Field("sqlite", description="sqlite | redis")
    sqlite_path: Path = REPO_ROOT / "var" / "sessions.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_max_frame_bytes: int = 64 * 1024
    stream_idle_timeout_s: float = 30.0
    stream_interim_every_s: float = 0.0
    stream_max_backlog_s: float = Field(
        30.0, description="audio awaiting analysis per stream; beyond it the server stops reading the socket"
    )
    stream_max_message_bytes: int = Field(64 * 1024, description="largest JSON (text) message from a client")
    stream_max_streams: int = Field(64, description="concurrent WebSocket streams per process (1013 beyond)")
    stream_send_timeout_s: float = Field(
        10.0, ge=0, description="a send to a client not reading for this long closes the stream (0 = off)"
    )
    stream_partial_every_s: float = Field(
        1.0, description="partial ASR pass every N s of new speech; 0 = off"
    )
    stream_speculative_final: bool = Field(
        True, description="start an utterance's analysis once post_pad of silence is seen, when idle"
    )
    stream_realtime_slack_s: float = Field(2.0, description="audio ahead of wall time before a warning")
    store_ended_ttl_s: float = Field(7 * 86400.0, description="ended sessions are forgotten after this")
    rest_session_idle_s: float = Field(
        900.0,
        ge=0,
        description="a REST session (/v1/predict?session_id=) ends after this without results; 0 = never",
    )
    stream_stale_s: float = Field(
        90.0, ge=0, description="a stream session without heartbeat this long is ended (server_restart)"
    )
    store_sweep_every_s: float = Field(60.0, ge=0, description="how often the idle/stale sweep runs; 0 = off")
    stream_lease_ttl_s: float = Field(
        10.0,
        gt=0,
        description="a live stream's lease on its session (one stream per session across replicas), renewed "
        "every third of it; a replica that died frees its streams' sessions for a resume after this",
    )
    store_max_metadata_bytes: int = Field(
        16 * 1024, ge=0, description="stored session metadata (merged JSON); beyond -> 413 / WS close 1009"
    )
    redis_prefix: str = "emotion:"
    redis_max_connections: int = Field(
        100, ge=1, description="Redis connections for commands (a busy pool makes callers wait, up to 10 s)"
    )
    redis_max_long_polls: int = Field(
        256, ge=1, description="Redis connections reserved for long polls (XREAD BLOCK); beyond -> 503"
    )
    sessions_max_wait_s: float = Field(
        60.0, description="cap on the long-poll wait of /v1/sessions/{id}/results"
    )

    # --- dashboard: alerts and server-sent events (app/store/alerts.py, app/store/events.py) ----
    alert_rules: Annotated[list[AlertRule], NoDecode] = Field(
        default_factory=list,
        description='JSON list, e.g. [{"name":"angry_customer","role":"customer","label":"angry",'
        '"min_score":0.6,"consecutive":2}]: evaluated on every stored result; alerts are stored and sent',
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="`: keep-alive` comment on an idle event stream")
    sse_queue_size: int = Field(
        256, ge=1, description="events buffered per SSE client; a client that falls further behind is closed"
    )
    sse_send_timeout_s: float = Field(
        10.0, gt=0, description="an SSE client that does not read for this long is disconnected"
    )
    sse_max_clients: int = Field(1000, ge=1, description="event streams and session waits per process (503)")
    events_history: int = Field(
        1000, ge=10, description="recent events kept for /v1/events resumption (Redis stream MAXLEN ~)"
    )

    # --- HTTP server limits (app/api/limits.py: uvicorn/h11 options and the body-read deadline) -----
    http_max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="largest request line + headers; beyond -> 431 and close"
    )
    http_header_timeout_s: float = Field(
        10.0, ge=0, description="request headers must be complete this long after they start; else 408"
    )
    body_read_timeout_s: float = Field(
        120.0, ge=0, description="a request body must arrive within this of its first read, else 408; 0 = off"
    )
    http_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    http_limit_concurrency: int = Field(
        1000, ge=0, description="open connections + requests beyond which uvicorn answers 503 (0 = none)"
    )

    # --- jobs and webhooks (app/jobs, app/api/jobs.py) ------------------------------------------
    jobs_dir: Path | None = Field(
        None, description="job records (jobs.db) and uploaded job audio; empty = <sqlite_path dir>/jobs"
    )
    job_workers: int = Field(1, ge=0, description="jobs analysed at once; 0 = accept and queue, run none")
    job_max_queued: int = Field(16, ge=1, description="queued + running jobs; beyond -> 503 + Retry-After")
    job_max_duration_s: float = Field(3600.0, gt=0, description="longest audio a job may hold (413 beyond)")
    job_max_in_flight: int = Field(
        0, ge=0, description="utterances of one job queued for ASR at once; 0 = one ASR batch (as predict)"
    )
    job_max_runs: int = Field(
        3, ge=1, description="starts of one job (server restarts mid-job included) before it fails"
    )
    job_ttl_s: float = Field(
        7 * 86400.0, gt=0, description="finished jobs and deliveries are forgotten after"
    )
    webhooks: dict[str, WebhookTarget] = Field(
        default_factory=dict,
        description='JSON {"name": {"url", "secret", "events": [job.done, job.failed, session.ended], '
        '"tenants": null | [...]}}: the only receivers; requests name one',
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="one delivery attempt (connect + response)")
    webhook_max_attempts: int = Field(8, ge=1, description="attempts before a delivery is failed")
    webhook_backoff_s: float = Field(2.0, gt=0, description="delay after the first failed attempt; doubles")
    webhook_backoff_max_s: float = Field(900.0, gt=0, description="cap on the delay between attempts")
    webhook_concurrency: int = Field(4, ge=1, description="deliveries in flight at once")

    @field_validator("webhooks", mode="after")
    @classmethod
    def _webhook_names(cls, value):
        return check_names(value)

    @field_validator("api_keys", "admin_keys", "cors_origins", "models", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                value = json.loads(text)
            else:
                return [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, dict):  # {"tenant": "key" | ["key", ...]} -> ["tenant:key", ...]
            return [
                f"{tenant}:{key}"
                for tenant, keys in value.items()
                for key in ([keys] if isinstance(keys, str) else keys)
            ]
        return value

    @field_validator("alert_rules", mode="before")
    @classmethod
    def _json_rules(cls, value):
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else []
        return value

    @field_validator("alert_rules")
    @classmethod
    def _unique_rules(cls, value: list[AlertRule]) -> list[AlertRule]:
        return check_unique(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
