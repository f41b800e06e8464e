"""Start and stop the job machinery with the app (``app.main``'s lifespan calls these two).

``start_jobs(app)`` opens the job store (``<jobs_dir>/jobs.db``, default: ``jobs/`` next to the
session SQLite file), queues again the jobs a previous process left ``running``, removes uploaded
audio no unfinished job refers to, and starts the webhook dispatcher (pending deliveries resume)
and the job runner (which waits for the models); with webhook targets, ended sessions (from the
event bus, ``app.state.events``) become ``session.ended`` deliveries. The result is ``app.state.jobs`` (a ``Jobs``), or
None when there is no session store or the job store cannot be opened: then ``/v1/jobs``
answers 503 ``jobs_unavailable`` and the rest of the server runs on. ``stop_jobs(app)`` stops the
runner first (running jobs go back to ``queued``), then the dispatcher, then closes the store; call
it before the service stops.

Thread-safety: call both from the app's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from app.jobs.runner import JobRunner
from app.jobs.store import JobStore
from app.jobs.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


def jobs_dir(settings) -> Path:
    return Path(settings.jobs_dir) if settings.jobs_dir else Path(settings.sqlite_path).parent / "jobs"


@dataclass
class Jobs:
    store: JobStore
    webhooks: WebhookDispatcher
    runner: JobRunner

    async def stop(self) -> None:
        await self.runner.stop()
        await self.webhooks.stop()
        await self.store.close()


async def _remove_orphans(store: JobStore) -> None:
    """Audio written by a request that died before its job was recorded (or of forgotten jobs)."""
    keep = await store.referenced_audio()

    def sweep() -> int:
        n = 0
        for path in store.audio_dir.iterdir():
            if str(path) not in keep and path.is_file():
                path.unlink(missing_ok=True)
                n += 1
        return n

    removed = await asyncio.to_thread(sweep)
    if removed:
        log.info("removed %d uploaded job file(s) no job refers to", removed)


async def start_jobs(app) -> Jobs | None:
    settings = app.state.settings
    if getattr(app.state, "store", None) is None:  # results go to sessions: no store, no jobs
        log.info("jobs are unavailable: no session store")
        return None
    store = JobStore(jobs_dir(settings))
    try:
        await store.open()
        requeued = await store.requeue_running()
        await _remove_orphans(store)
    except Exception as exc:
        log.error("jobs are unavailable: cannot open %s (%r)", store.path, exc)
        await store.close()
        return None
    if requeued:
        log.info("%d job(s) left running by a previous server are queued again", requeued)
    webhooks = WebhookDispatcher(settings, store)
    await webhooks.start()
    events = getattr(app.state, "events", None)
    if events is not None and webhooks.targets:
        events.add_listener(session_ended_webhooks(webhooks))
    runner = JobRunner(app.state, store, webhooks)
    runner.start()
    return Jobs(store, webhooks, runner)


def session_ended_webhooks(webhooks: WebhookDispatcher):
    """An event-bus listener: every ``ended`` session becomes a ``session.ended`` delivery to each
    target that takes that event and allows the session's tenant. The bus calls listeners on the
    replica that published the event only, so each end is delivered once across replicas."""

    async def on_event(event) -> None:
        if event.type == "ended":
            await webhooks.enqueue_event("session.ended", {"session": event.data}, tenant=event.tenant)

    return on_event


async def stop_jobs(app) -> None:
    jobs = getattr(app.state, "jobs", None)
    app.state.jobs = None
    if jobs is not None:
        await jobs.stop()
