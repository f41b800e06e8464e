"""The job worker: runs queued jobs through ``EmotionService``, at most ``job_workers`` at once.

A job is analysed exactly as ``/v1/predict`` analyses a file: the stored upload is decoded in the
isolated decoder pool, each channel is cut into utterances by the service's own cut
(``EmotionService.utterance_spans``: the utterance policy, or ``whole``), and every utterance goes through
``analyze_utterance`` in the shared, fair ASR lane (one fair-queue identity per job, REST
priority, at most ``job_max_in_flight`` utterances queued at once, so a long job cannot crowd out
requests and streams). Each result is appended to the job's session *in time order* as soon as it
and every earlier one are done, tagged ``source: "job"`` and ``job_id``; ``segments_done`` /
``segments_total`` (the progress) is updated after each append. A transient refusal of the ASR
lane (queue full, deadline) makes the job wait and retry that utterance, never fail.

Resuming (after a restart or shutdown): a job left ``running`` is queued again and re-run from the
start of its audio, but the utterances whose results its session already holds (same ``job_id``,
same start time and channel) are skipped, so nothing is analysed or stored twice. The cut is
deterministic (same audio, same utterance settings). A job started more than ``job_max_runs`` times
(e.g. a file that takes the server down every time) fails with ``interrupted``.

When a job ends (``done``, or ``failed`` with ``{error, detail}``; a cancelled job is ``failed``
with ``cancelled``) its record and its webhook delivery are written in one transaction, its
uploaded audio is deleted, and a session the server named (``job-<id>``) is ended (reason
``job_done`` / ``job_failed``); a session the client named stays open like any REST session.

Thread-safety: one ``JobRunner`` per app, on the app's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from typing import Any

from app.analysis import decoding
from app.analysis.audio import SAMPLE_RATE, AudioLimits
from app.errors import DeadlineExceededError, NoSpeechError, OverloadedError, status_and_code
from app.inference.admission import Reservation
from app.jobs.store import DONE, FAILED, QUEUED, Delivery, Job, JobStore
from app.jobs.webhooks import WebhookDispatcher
from app.schemas import Emotion
from app.service import EmotionService
from app.store import SessionNotFound

log = logging.getLogger(__name__)

CANCELLED = {"error": "cancelled", "detail": "the job was cancelled (DELETE /v1/jobs/{id})"}
PRUNE_EVERY_S = 600.0
RETRY_MAX_S = 10.0  # longest wait before retrying an utterance the ASR lane refused
RETRY_LIMIT = 60  # refusals of one utterance in a row before the job fails


class _CancelledByClient(Exception):
    pass


class JobError(Exception):
    """A job-level failure with an API error code (``app.errors`` convention)."""

    def __init__(self, code: str, detail: str, status: int = 422):
        super().__init__(detail)
        self.code, self.status = code, status


def job_limits(settings) -> AudioLimits:
    """A job's file may be longer than a predict upload (``job_max_duration_s``)."""
    return AudioLimits.from_settings(settings, settings.job_max_duration_s)


def _error_of(exc: BaseException) -> dict[str, str]:
    mapped = status_and_code(exc)
    if mapped is None:
        log.error("job failed: %r", exc, exc_info=exc)
        return {"error": "internal_error", "detail": "internal server error (logged)"}
    return {"error": mapped[1], "detail": str(exc) or mapped[1]}


def summarise(results: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """The job's ``result``: counts, the session's seq range, and the duration-weighted mean emotion
    probabilities of its utterances (the same weighting as ``/v1/predict``'s top-level emotion)."""
    sums: dict[str, float] = {}
    speech = 0.0
    for r in results:
        d = max(0.0, float(r.get("end", 0.0)) - float(r.get("start", 0.0)))
        speech += d
        probs = (r.get("emotion") or {}).get("probabilities") or {}
        for label, p in probs.items():
            sums[label] = sums.get(label, 0.0) + d * float(p)
    total = sum(sums.values())
    mean = {k: round(v / total, 6) for k, v in sorted(sums.items())} if total > 0 else {}
    seqs = [int(r["seq"]) for r in results if "seq" in r]
    return {
        "segments": len(results),
        "duration_s": round(duration_s, 3),
        "speech_s": round(speech, 3),
        # The v2 Emotion shape (label, score, ranking, probabilities), without per-model detail.
        "emotion": Emotion.of(mean).model_dump() if mean else None,
        "first_seq": min(seqs) if seqs else None,
        "last_seq": max(seqs) if seqs else None,
    }


class JobRunner:
    """Claims queued jobs and runs them; ``cancel`` stops one; ``stop`` re-queues the running ones."""

    def __init__(self, app_state, jobs: JobStore, webhooks: WebhookDispatcher):
        self.state = app_state  # settings, service, store (sessions), admission, start_error
        self.settings = app_state.settings
        self.jobs = jobs
        self.webhooks = webhooks
        self._task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._cancel_ids: set[str] = set()
        self._wake = asyncio.Event()
        self._last_prune = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    async def stop(self) -> None:
        """Stop the loop and the running jobs; each goes back to ``queued`` (resumed on restart)."""
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    @property
    def service(self) -> EmotionService:
        return self.state.service

    @property
    def running(self) -> list[str]:
        return list(self._running)

    async def _wait_ready(self) -> bool:
        service = self.state.service
        while not service.ready:
            if getattr(self.state, "start_error", None):
                log.error("jobs will not run: the service failed to start")
                return False
            await asyncio.sleep(0.2)
        return True

    async def _loop(self) -> None:
        runs = self.settings.job_workers > 0 and await self._wait_ready()
        if not runs:
            log.info("the job runner is off (job_workers=0 or no service): jobs stay queued")
        else:
            for job in await self.jobs.cancelled_queued():  # cancellations a restart cut off
                await self._finish(job, FAILED, error=CANCELLED)
        while True:
            self._wake.clear()
            try:
                if runs:
                    await self._claim()
                await self._prune()
            except Exception as exc:  # the job store failed: keep the runner alive, retry later
                log.warning("job runner: %r", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=60.0)

    async def _claim(self) -> None:
        while len(self._running) < self.settings.job_workers:
            job = await self.jobs.claim_next()
            if job is None:
                return
            if job.runs > self.settings.job_max_runs:
                await self._finish(
                    job,
                    FAILED,
                    error={
                        "error": "interrupted",
                        "detail": f"the job was interrupted {job.runs - 1} times (server restarts); given up",
                    },
                )
                continue
            log.info(
                "job %s: run %d (%d of %d segments stored before)",
                job.id,
                job.runs,
                job.segments_done,
                job.segments_total or 0,
            )
            self._running[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        removed = await self.jobs.prune(self.settings.job_ttl_s)
        if removed:
            log.info("forgot %d finished job(s) older than %.0f s", removed, self.settings.job_ttl_s)

    # --- cancelling --------------------------------------------------------------------------

    async def cancel(self, job_id: str, wait_s: float = 10.0) -> Job | None:
        """Cancel an unfinished job (queued: at once; running: its task, then it is ``failed`` with
        ``cancelled``; results already stored stay). Returns the job as it is afterwards."""
        self._cancel_ids.add(job_id)
        job = await self.jobs.request_cancel(job_id)
        if job is None or job.finished:
            self._cancel_ids.discard(job_id)
            return job
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=wait_s)
        elif job.status == QUEUED:  # claim_next skips it from now on: finish it here
            self._cancel_ids.discard(job_id)
            await self._finish(job, FAILED, error=CANCELLED)
        # else: claimed a moment ago; its task sees ``_cancel_ids`` when it starts
        return await self.jobs.get(job_id)

    def _check_cancel(self, job: Job) -> None:
        if job.id in self._cancel_ids:
            raise _CancelledByClient()

    # --- one job -----------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        try:
            self._check_cancel(job)
            result = await self._analyse(job)
            self._check_cancel(job)
            await self._finish(job, DONE, result=result)
        except asyncio.CancelledError:
            if job.id in self._cancel_ids:
                await self._finish(job, FAILED, error=CANCELLED)  # cancelled by the client: done here
            else:  # shutdown: resume on the next start
                await asyncio.shield(self.jobs.requeue(job.id))
                raise
        except _CancelledByClient:
            await self._finish(job, FAILED, error=CANCELLED)
        except Exception as exc:
            await self._finish(job, FAILED, error=_error_of(exc))
        finally:
            self._running.pop(job.id, None)
            self._cancel_ids.discard(job.id)
            self.wake()

    async def _open_session(self, job: Job) -> None:
        store = self.state.store
        if store is None:
            raise JobError("store_unavailable", "sessions are not available on this server", 503)
        owner: dict = {} if job.tenant is None else {"tenant": job.tenant}
        if job.options.get("roles"):  # the session keeps them (summaries, alert rules)
            owner["roles"] = list(job.options["roles"])
        try:  # create it, or re-open it (a REST session may have been ended as idle meanwhile)
            await store.open_session(job.session_id, metadata={"job_id": job.id}, source="rest", **owner)
        except SessionNotFound:
            raise JobError("session_not_found", f"no session {job.session_id!r}", 404) from None

    async def _stored(self, job: Job) -> list[dict[str, Any]]:
        """This job's results already in its session (from an earlier run), in seq order."""
        store, after = self.state.store, 0
        out: list[dict[str, Any]] = []
        while True:
            page = await store.results(job.session_id, after=after, limit=1000)
            if not page:
                return out
            out += [r for r in page if r.get("job_id") == job.id]
            after = int(page[-1]["seq"])

    async def _reserve(self, n: int) -> Reservation | None:
        """Hold ``n`` bytes of the decoded-audio budget while the job's audio is in memory; wait
        (rather than fail) while requests hold it."""
        admission = getattr(self.state, "admission", None)
        if admission is None:
            return None
        budget = admission.decoded
        while not budget.try_take(n):
            await asyncio.sleep(1.0)
        reservation = Reservation(budget)
        reservation.size = max(0, int(n)) if budget.enabled else 0
        return reservation

    async def _analyse(self, job: Job) -> dict[str, Any]:
        s, service = self.settings, self.service
        await self._open_session(job)
        opts = job.options
        channels = opts.get("channels", "mix")
        key = f"job-{job.id}"  # the job's one identity in the fair queues (decode, VAD, ASR)
        reservation = await self._reserve(job.decoded_bytes)
        try:
            if not job.audio_path or not os.path.exists(job.audio_path):
                raise JobError(
                    "audio_missing", "the job's uploaded audio is gone from the server's disk", 500
                )
            decoder = decoding.pool_for(s)
            audio = await service.engine.run_cpu(key, decoder.decode, job.audio_path, channels, job_limits(s))
            tracks = (
                [audio.samples[c] for c in range(audio.samples.shape[0])]
                if channels == "separate"
                else [audio.mono]
            )
            del audio
            cuts = await asyncio.gather(
                *(
                    service.engine.run_cpu(
                        key, service.utterance_spans, t, opts.get("segmentation", "utterance")
                    )
                    for t in tracks
                )
            )
            items = sorted(
                ((round(r.start / SAMPLE_RATE, 3), c, r) for c, spans in enumerate(cuts) for r in spans),
                key=lambda it: (it[0], it[1]),
            )
            if not items:
                raise NoSpeechError("no speech was detected in the audio")
            earlier = await self._stored(job)
            seen = {(round(float(r["start"]), 3), int(r.get("channel", 0))) for r in earlier}
            todo = [it for it in items if (it[0], it[1]) not in seen]
            done = len(items) - len(todo)
            await self.jobs.progress(job.id, done, total=len(items))
            appended = await self._analyse_in_order(job, key, tracks, todo, done)
        finally:
            if reservation is not None:
                reservation.release()
        return summarise(earlier + appended, job.duration_s)

    async def _analyse_in_order(self, job: Job, key: str, tracks, todo, done: int) -> list[dict[str, Any]]:
        """Analyse ``todo`` with a bounded window in flight; append the results in time order."""
        s, service = self.settings, self.service
        opts = job.options
        roles: list[str] = opts.get("roles") or []
        lane = service.engine.asr_lane
        window = s.job_max_in_flight or (lane.max_batch * lane.workers if lane is not None else 2)
        models = opts.get("models")

        async def one(c: int, span) -> Any:
            for attempt in range(RETRY_LIMIT):
                try:
                    return await service.analyze_utterance(
                        tracks[c][span.start : span.end],
                        models,
                        channel=c,
                        offset_s=span.start / SAMPLE_RATE,
                        key=key,
                        source="job",
                    )
                except (OverloadedError, DeadlineExceededError) as exc:  # busy: wait, do not fail
                    if attempt == RETRY_LIMIT - 1:
                        raise
                    await asyncio.sleep(min(RETRY_MAX_S, max(0.5, getattr(exc, "retry_after", 1.0) or 1.0)))
            raise AssertionError("unreachable")

        appended: list[dict[str, Any]] = []
        pending: collections.deque[asyncio.Task] = collections.deque()
        try:
            for _, c, span in todo:
                pending.append(asyncio.create_task(one(c, span)))
                if len(pending) >= window:
                    appended.append(await self._append(job, await pending.popleft(), roles))
                    done += 1
                    await self.jobs.progress(job.id, done)
                    self._check_cancel(job)
            while pending:
                appended.append(await self._append(job, await pending.popleft(), roles))
                done += 1
                await self.jobs.progress(job.id, done)
                self._check_cancel(job)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return appended

    async def _append(self, job: Job, u, roles: list[str]) -> dict[str, Any]:
        role = roles[u.channel] if u.channel < len(roles) else None
        record = u.to_store(source="job", job_id=job.id, role=role)
        try:
            seq = await self.state.store.append_result(job.session_id, record)
        except SessionNotFound:
            raise JobError("session_not_found", f"session {job.session_id!r} was deleted", 404) from None
        return {**record, "seq": seq}

    # --- the end -----------------------------------------------------------------------------

    def _deliveries(self, event: str):
        def build(job: Job) -> list[Delivery]:
            if not job.webhook:
                return []
            target = self.webhooks.targets.get(job.webhook)
            if target is None or not target.takes(event):
                log.warning(
                    "job %s: webhook %r no longer configured for %s; not sent", job.id, job.webhook, event
                )
                return []
            return [self.webhooks.new_delivery(job.webhook, event, {"job": job.public()}, job_id=job.id)]

        return build

    async def _finish(
        self, job: Job, status: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> None:
        event = "job.done" if status == DONE else "job.failed"
        finished = await asyncio.shield(
            self.jobs.finish(job.id, status, self._deliveries(event), result, error)
        )
        if finished is None:
            return  # it had already finished
        log.info("job %s %s%s", job.id, status, f" ({error['error']})" if error else "")
        self.webhooks.wake()
        if job.audio_path:
            with contextlib.suppress(OSError):
                os.unlink(job.audio_path)
        store = self.state.store
        if job.session_owned and store is not None:
            try:
                if await store.get_session(job.session_id) is not None:
                    await store.close_session(job.session_id, reason=f"job_{status}")
            except Exception as exc:
                log.warning("job %s: could not end its session: %r", job.id, exc)
