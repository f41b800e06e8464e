"""Typed service errors. Each carries an HTTP ``status`` and a machine-readable ``code``.

The API maps any exception whose class defines an integer ``status`` and a string ``code`` (the
``AudioError`` family, these classes, and the same convention in other packages) to
``{"error": code, "detail": str(exc)}`` with that status, so a failure is reported precisely
wherever it is raised. ``retry_after`` (seconds), when set, becomes a ``Retry-After`` header.

Thread-safety: plain exception classes, immutable after construction.
"""

from __future__ import annotations

from app.analysis.audio import AudioError


class ServiceError(Exception):
    """Base class of the service's own (non-audio) errors."""

    status = 500
    code = "internal_error"
    retry_after: float | None = None


class NoSpeechError(AudioError):
    """Voice activity detection found no speech in any channel."""

    status = 422
    code = "no_speech"
    duration_s: float | None = None  # the input's length, when known (the OpenAI route answers empty text)


class BadRequestError(ServiceError):
    status = 400
    code = "bad_request"


class UnknownModelError(BadRequestError):
    code = "unknown_model"


class MissingFileError(BadRequestError):
    code = "missing_file"


class InvalidOptionError(ServiceError):
    """A request option (query parameter or form field) has a bad value; same code as FastAPI's validation."""

    status = 422
    code = "invalid_request"


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    code = "unsupported_media_type"


class UploadTooLargeError(ServiceError):
    status = 413
    code = "upload_too_large"


class UnauthorizedError(ServiceError):
    status = 401
    code = "unauthorized"


class ForbiddenOriginError(ServiceError):
    """A browser request (``Origin`` header) from an origin not in ``EMOTION_CORS_ORIGINS``."""

    status = 403
    code = "origin_not_allowed"


class RateLimitedError(ServiceError):
    """Too many failed authentications from one address, or too many requests with one key (429)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(ServiceError):
    """A bounded queue is full: the client should retry later (503 + Retry-After)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str = "the server is busy; retry later", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(OverloadedError):
    """A model batcher's or the ASR pool's bounded queue is full."""

    code = "queue_full"


class NotReadyError(OverloadedError):
    code = "not_ready"


class MemoryBudgetError(OverloadedError):
    """Admitting this request would exceed a memory budget (upload bytes or decoded samples in flight)."""

    code = "memory_budget"


class DecoderBusyError(OverloadedError):
    """Every isolated audio decoder process stayed busy for the pool's whole wait (503 + Retry-After)."""

    code = "decoder_busy"


class DecoderUnavailableError(ServiceError):
    """The isolated audio decoder processes cannot start (a server fault, not the upload's)."""

    status = 503
    code = "decoder_unavailable"
    retry_after = 5.0


class DeadlineExceededError(ServiceError):
    """The request could not be served before its deadline (queueing included)."""

    status = 504
    code = "deadline_exceeded"


class StoreUnavailableError(ServiceError):
    status = 503
    code = "store_unavailable"


class InferenceError(ServiceError):
    """A model returned something unusable (wrong shape, non-finite probabilities)."""

    status = 500
    code = "inference_error"


def status_and_code(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) for exceptions following the convention above, else None."""
    status, code = getattr(exc, "status", None), getattr(exc, "code", None)
    if isinstance(status, int) and 400 <= status <= 599 and isinstance(code, str) and code:
        return status, code
    return None
