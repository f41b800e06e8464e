"""Liveness and readiness (open routes, no API key).

``GET /healthz``: 200 while the process serves HTTP. ``GET /readyz``: 200 once every model is
loaded and warmed up, 503 (``not_ready``, with Retry-After) while loading or after a failed start.
Thread-safety: stateless handlers reading ``app.state``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.errors import error_json
from app.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every model loaded and warmed up",
    responses={503: {"model": ErrorBody, "description": "still loading, or start-up failed"}},
)
async def readyz(request: Request):
    service = request.app.state.service
    if service.ready:
        return {
            "status": "ready",
            "models": service.model_ids,
            "classes": list(service.classes),
            "providers": service.engine.providers,
        }
    detail = f"state: {service.state}" + (f"; {service.error}" if service.error else "")
    retry = str(max(1, int(request.app.state.settings.retry_after_s)))
    # a normal state while starting, not a client-facing error: not counted in emotion_errors_total
    return error_json(503, "not_ready", detail, {"Retry-After": retry}, count=False)
