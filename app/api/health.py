"""Liveness and readiness (open routes, no API key).

``GET /healthz``: 200 while the process serves HTTP and has not *failed* to start (still loading
is healthy); 503 ``start_failed`` once start-up failed, so an orchestrator restarts the process.

``GET /readyz``: 200 when every check passes, else 503 with Retry-After and a body naming each
check (``{"error", "detail", "checks": {name: "ok" | reason}}``):

* ``models``: every model loaded and warmed up (``error`` ``not_ready`` when this one fails);
* ``store``: the session store answers a cheap ping within 2 s (``store_unavailable``);
* ``load``: the ASR lane's FINAL + REST queue is below the limit beyond which REST requests are
  refused (``overloaded``).

503s here are normal states, not client-facing errors: neither logged nor counted as errors.
Thread-safety: stateless handlers reading ``app.state``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from app.api.errors import error_json
from app.schemas import ErrorBody

router = APIRouter(tags=["health"])

STORE_PING_TIMEOUT_S = 2.0


class NotReadyBody(ErrorBody):
    checks: dict[str, str] = Field(description='each readiness check: "ok" or why it failed')


def start_failure(request: Request) -> str | None:
    """Why start-up failed, or None (not failed: starting, ready or stopped)."""
    error = getattr(request.app.state, "start_error", None)
    if error:
        return error
    service = request.app.state.service
    if getattr(service, "state", None) == "failed":
        return getattr(service, "error", None) or "start-up failed"
    return None


@router.get(
    "/healthz",
    summary="Liveness: 503 once start-up has failed (restart me)",
    responses={503: {"model": ErrorBody, "description": "start-up failed"}},
)
async def healthz(request: Request):
    failure = start_failure(request)
    if failure is not None:
        return error_json(503, "start_failed", f"start-up failed: {failure}", count=False)
    return {"status": "ok"}


async def _check_store(request: Request) -> str:
    store = getattr(request.app.state, "store", None)
    ping = getattr(store, "ping", None)
    if ping is None:  # no store (sessions off), or one without a health check
        return "ok"
    try:
        await asyncio.wait_for(ping(), STORE_PING_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"no answer within {STORE_PING_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _check_load(request: Request) -> str:
    from app.inference.scheduler import Priority

    lane = getattr(getattr(request.app.state.service, "engine", None), "asr_lane", None)
    if lane is None:
        return "ok"
    waiting = lane.waiting(Priority.FINAL) + lane.waiting(Priority.REST)
    limit = lane.limits.rest_limit
    return "ok" if waiting < limit else f"ASR lane: {waiting} jobs waiting (limit {limit})"


@router.get(
    "/readyz",
    summary="Readiness: every model loaded and warmed up",
    responses={
        503: {"model": NotReadyBody, "description": "loading, start-up failed, store down or overloaded"}
    },
)
async def readyz(request: Request):
    service = request.app.state.service
    checks: dict[str, str] = {}
    if service.ready:
        checks["models"] = "ok"
    else:
        checks["models"] = f"state: {service.state}" + (f"; {service.error}" if service.error else "")
    checks["store"] = await _check_store(request)
    checks["load"] = _check_load(request) if service.ready else "ok"
    failed = [name for name, outcome in checks.items() if outcome != "ok"]
    if not failed:
        return {
            "status": "ready",
            "models": service.model_ids,
            "classes": list(service.classes),
            "providers": service.engine.providers,
            "checks": checks,
        }
    code = {"models": "not_ready", "store": "store_unavailable", "load": "overloaded"}[failed[0]]
    detail = "; ".join(f"{name}: {checks[name]}" for name in failed)
    retry = str(max(1, int(request.app.state.settings.retry_after_s)))
    # a normal state (starting, shedding load), not a client-facing error: not counted, not logged
    body = {"error": code, "detail": detail, "checks": checks}
    return JSONResponse(body, status_code=503, headers={"Retry-After": retry})
