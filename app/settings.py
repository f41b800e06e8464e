"""Service settings, read from environment variables prefixed ``EMOTION_`` (pydantic-settings).

Example: ``EMOTION_PORT=9000 EMOTION_ASR_DEVICE=cuda emotion-server serve``.
Every setting has a safe default: the server binds to loopback, accepts no API key (open), and
uses the models shipped in ``models/``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_", env_file=None, extra="ignore")

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty = open /v1 routes")
    cors_origins: list[str] = Field(default_factory=list)

    # --- models --------------------------------------------------------------------------
    model_dir: Path = REPO_ROOT / "models"
    models: list[str] = Field(default_factory=lambda: ["cmt-awc", "ca-mser", "adf", "3m-ser"])
    device: str = Field("auto", description="auto | cpu | cuda (ONNX Runtime and faster-whisper)")
    intra_op_threads: int = Field(0, description="ONNX Runtime intra-op threads per session; 0 = auto")

    # --- ASR (faster-whisper) ------------------------------------------------------------
    asr_model: str = Field("", description="faster-whisper model directory; empty = bundled tiny.en")
    asr_compute_type: str = Field("default", description="CTranslate2 compute type (int8, float16, ...)")
    asr_beam_size: int = 1
    asr_language: str | None = "en"
    asr_cpu_threads: int = Field(0, description="CTranslate2 intra-op threads; 0 = number of cores")
    asr_workers: int = Field(1, description="transcriptions that may run at once")

    # --- text encoder -------------------------------------------------------------------
    text_model: str = Field("", description="ONNX text encoder directory; empty = bundled all-MiniLM-L6-v2")

    # --- batching -------------------------------------------------------------------------
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 120.0

    # --- input limits ---------------------------------------------------------------------
    max_upload_bytes: int = 50 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_channels: int = 2
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000

    # --- streaming and sessions -----------------------------------------------------------
    store: str = Field("sqlite", description="sqlite | redis")
    sqlite_path: Path = REPO_ROOT / "var" / "sessions.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_max_frame_bytes: int = 64 * 1024
    stream_idle_timeout_s: float = 30.0
    stream_max_utterance_s: float = 15.0
    stream_interim_every_s: float = 0.0
    stream_max_backlog_s: float = 30.0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
