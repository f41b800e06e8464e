"""The FastAPI application: ``create_app(settings=None, service=None)``.

Start-up (lifespan): open the session store (when ``app.store`` provides ``open_store``), then load
the models and warm them up *in the background*, so ``/healthz`` answers at once and ``/readyz``
turns 200 when everything is ready (503 before, or after a failed start, with the reason). A failed
start also turns ``/healthz`` to 503 (``app.state.start_error``), so an orchestrator restarts us.
Shutdown stops the engine and closes the store.

Routes: ``/healthz``, ``/readyz``, ``/metrics`` (open); ``/v1/predict``, ``/predict``, ``/v1/models``
and the streaming/session routers when their modules exist (API key when configured).
OpenAPI docs at ``/docs``. ``app.state`` holds ``settings``, ``service`` and ``store``.

Thread-safety: one app per event loop; the service passed in must not have been started on
another loop (its batchers are asyncio objects): the lifespan starts it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from app.api import errors as api_errors
from app.api import events as api_events
from app.api import health, jobs, limits, predict, sessions, stream
from app.api import metrics as api_metrics
from app.api import web as web_ui
from app.api.api_info import DESCRIPTION, VERSION
from app.api.auth import RateLimits, install_log_redaction, require_api_key, require_api_key_or_query
from app.api.openai_compat import router as openai_router
from app.inference.admission import Admission
from app.jobs.lifecycle import start_jobs, stop_jobs
from app.observability import RequestIdMiddleware, warn_unknown_env_vars
from app.service import EmotionService
from app.settings import Settings, get_settings
from app.store import open_store
from app.store.events import open_bus
from app.store.publishing import with_events

log = logging.getLogger(__name__)

_UNSET = object()


async def _start_service(app: FastAPI, service: EmotionService) -> None:
    try:
        await service.start()
    except Exception as exc:  # logged by the engine; /healthz and /readyz report it (503)
        app.state.start_error = f"{type(exc).__name__}: {exc}"
        log.error("the service failed to start (%s); /healthz and /readyz answer 503", exc)


async def _recover_sessions(store, settings: Settings) -> None:
    """End the stream sessions a previous process left active (crash, kill -9): ``server_restart``."""
    recover = getattr(store, "recover", None)
    if recover is None:
        return
    try:
        ended = await recover(stream_stale_s=settings.stream_stale_s)
    except Exception as exc:  # the store may come up later; /readyz reports it
        log.warning("could not end the sessions left by a previous server: %s", exc)
        return
    if ended:
        log.info("ended %d stream session(s) left active by a previous server (server_restart)", ended)


async def _sweep_sessions(store, settings: Settings) -> None:
    """Every ``store_sweep_every_s``: end idle REST sessions and streams of dead servers."""
    sweep = getattr(store, "sweep", None)
    every = settings.store_sweep_every_s
    if sweep is None or every <= 0:
        return
    while True:
        await asyncio.sleep(every)
        try:
            await sweep(rest_idle_s=settings.rest_session_idle_s, stream_stale_s=settings.stream_stale_s)
        except Exception as exc:
            log.warning("session sweep failed: %s", exc)


def create_app(
    settings: Settings | None = None, service: EmotionService | None = None, store=_UNSET
) -> FastAPI:
    """Build the app. ``store`` (tests): a SessionStore to use instead of opening one; None = none."""
    settings = settings or get_settings()
    service = service or EmotionService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        opened = store is _UNSET
        warn_unknown_env_vars()  # EMOTION_* typos (environment and .env), with the closest setting name
        app.state.store = open_store(settings) if opened else store
        # events (SSE, webhooks): the store publishes on a bus of its kind (app.store.events)
        app.state.events = open_bus(settings, app.state.store) if app.state.store is not None else None
        app.state.store = with_events(app.state.store, app.state.events)
        # before recovery, so sessions a crashed server left active get their session.ended webhooks
        app.state.jobs = await start_jobs(app)  # queued and cut-off jobs resume; pending webhooks too
        await _recover_sessions(app.state.store, settings)
        sweeper = asyncio.create_task(_sweep_sessions(app.state.store, settings), name="session-sweep")
        app.state.start_task = asyncio.create_task(_start_service(app, service), name="service-start")
        try:
            yield
        finally:
            task = app.state.start_task
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await stop_jobs(app)  # before the service: running jobs go back to queued
            await service.stop()
            if app.state.events is not None:
                await app.state.events.close()
            if opened and app.state.store is not None:
                await app.state.store.close()

    # FastAPIOffline serves Swagger UI and ReDoc from the package's own files: /docs works offline.
    app = FastAPIOffline(
        title="Speech emotion recognition",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,  # /redoc: app.api.web serves it without the one CDN file fastapi-offline's fetches
        responses=api_errors.VALIDATION_RESPONSES,  # every route: our {error, detail}, not FastAPI's 422
    )
    app.state.settings = settings
    app.state.service = service
    app.state.store = None if store is _UNSET else store
    app.state.events = None  # the event bus, opened with the store (lifespan)
    app.state.start_error = None  # set when start-up fails: /healthz turns 503
    app.state.jobs = None  # app.jobs.lifecycle.Jobs while running
    app.state.rate_limits = RateLimits()  # auth-failure and per-key token buckets (this process)
    app.state.admission = Admission.from_settings(settings)  # stream slots, memory budgets, queued work
    install_log_redaction()  # ?api_key=... never reaches uvicorn's access log in clear

    api_errors.install(app)
    # outside ErrorMiddleware, which turns the BodyReadTimeout raised in the app's receive into 408 JSON
    app.add_middleware(limits.BodyDeadlineMiddleware, timeout_s=settings.body_read_timeout_s)
    app.add_middleware(api_metrics.MetricsMiddleware)  # outside ErrorMiddleware: sees final statuses
    # outermost: every log line of a request or stream carries its id; echoed as X-Request-ID
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )

    app.include_router(health.router)
    app.include_router(api_metrics.router)
    secured = [Depends(require_api_key)]
    app.include_router(predict.router, dependencies=secured, responses=api_errors.AUTH_RESPONSES)
    app.include_router(stream.router, dependencies=secured)
    app.include_router(sessions.router, dependencies=secured, responses=api_errors.AUTH_RESPONSES)
    app.include_router(openai_router, dependencies=secured)  # errors in OpenAI's shape
    app.include_router(jobs.router, dependencies=secured, responses=api_errors.AUTH_RESPONSES)
    app.include_router(web_ui.router)  # web UI (/, /ui/...): open pages; their API calls carry the key
    app.include_router(  # EventSource cannot send headers: ?api_key= too
        api_events.router,
        dependencies=[Depends(require_api_key_or_query)],
        responses=api_errors.AUTH_RESPONSES,
    )
    return app
