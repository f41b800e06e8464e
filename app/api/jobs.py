"""Asynchronous jobs for long files: ``/v1/jobs``.

* ``POST /v1/jobs``: the audio as multipart field ``file`` (or a raw ``audio/*`` body) and the
  options of ``/v1/predict`` (``models``, ``channels``, ``words``, ``segmentation``, ``session_id``),
  plus ``roles`` (comma-separated, one per channel) and ``webhook`` (the *name* of a configured
  target, ``EMOTION_WEBHOOKS``: ``job.done`` / ``job.failed`` are posted there). The upload is
  checked like a predict upload, decoded once in the isolated decoder pool (bad audio gets the
  same precise 4xx as predict; up to ``job_max_duration_s`` of audio instead of
  ``max_audio_seconds``), written to the jobs directory, and queued: ``202`` with the job and
  ``Location: /v1/jobs/{id}``. At most ``job_max_queued`` jobs are queued or running: beyond, 503
  ``job_queue_full`` with Retry-After. No speech is reported by the job (``failed``,
  ``no_speech``), since finding it takes the analysis.
* ``GET /v1/jobs/{id}``: status ``queued|running|done|failed``, ``progress`` (utterances stored /
  utterances in the file), ``segments_done``, ``error`` ``{error, detail}``, ``result`` (summary),
  ``session_id`` (the results: ``GET /v1/sessions/{session_id}/results``), ISO-8601 times and
  the webhook ``deliveries``.
* ``GET /v1/jobs?status=&limit=``: newest first.
* ``DELETE /v1/jobs/{id}``: cancels a queued or running job (200, the job, now ``failed`` with
  ``cancelled``; results already stored stay in the session); forgets a finished one (204).

Tenants as for sessions (``app.api.auth``): a key sees only its tenant's jobs (others are 404
``job_not_found``), admin keys see all; a job's session is created for the job's tenant.

Thread-safety: stateless handlers over ``app.state.jobs``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path as FsPath
from typing import Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from app.analysis import decoding
from app.api.auth import principal_of
from app.api.predict import SESSION_ID_PATTERN, PredictOptions, parse_options, upload_body
from app.api.sessions import may_use_session
from app.api.upload import read_upload
from app.errors import NotReadyError, OverloadedError, ServiceError, StoreUnavailableError
from app.inference import admission as admission_control
from app.jobs.runner import job_limits
from app.jobs.store import QUEUED, Job
from app.jobs.targets import JOB_EVENTS
from app.jobs.webhooks import UnknownWebhookError
from app.schemas import ErrorBody
from app.service import new_request_key

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ROLE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
QUEUE_FULL_RETRY_S = 10.0


class JobNotFoundError(ServiceError):
    status = 404
    code = "job_not_found"


class JobsUnavailableError(ServiceError):
    status = 503
    code = "jobs_unavailable"
    retry_after = 5.0


class JobQueueFullError(OverloadedError):
    code = "job_queue_full"


class JobOptions(PredictOptions):
    """Predict's options plus ``roles`` and the ``webhook`` target name."""

    roles: list[str] | None = None
    webhook: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value or None

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, value):
        import re

        for role in value or []:
            if not re.fullmatch(ROLE_PATTERN, role):
                raise ValueError(f"a role must match {ROLE_PATTERN}")
        return value


class DeliveryOut(BaseModel):
    id: str = Field(description="also sent as X-Emotion-Delivery (the receiver's idempotency key)")
    event: str
    target: str = Field(description="configured target name")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None = Field(description="HTTP status of the last attempt (null: no answer)")
    last_error: str | None
    next_attempt_at: str | None = Field(description="ISO-8601 UTC, while pending")
    created_at: str
    delivered_at: str | None


class JobFile(BaseModel):
    filename: str | None
    bytes: int
    duration_s: float
    channels: int = Field(description="channels analysed (1 with channels=mix)")


class JobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float = Field(
        ge=0, le=1, description="utterances stored / utterances in the file (0 until cut)"
    )
    segments_done: int
    segments_total: int | None = Field(description="utterances in the file, once it has been cut")
    session_id: str = Field(description="where the results go: GET /v1/sessions/{session_id}/results")
    error: ErrorBody | None = Field(description="why it failed (`cancelled`, `no_speech`, ...)")
    result: dict[str, Any] | None = Field(
        description="when done: segments, duration_s, speech_s, emotion {label, probabilities} "
        "(duration-weighted), first_seq, last_seq"
    )
    options: dict[str, Any]
    webhook: str | None
    file: JobFile
    tenant: str | None
    runs: int = Field(description="times a worker started it (more than 1 after a restart)")
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    deliveries: list[DeliveryOut] = Field(default_factory=list)


class JobList(BaseModel):
    jobs: list[JobOut]


JobId = Path(pattern=JOB_ID_PATTERN, description="job id")
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "unknown job id"}}


def _jobs(request: Request):
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise JobsUnavailableError("jobs are not available on this server (see the server log)")
    return jobs


async def _out(jobs, job: Job) -> JobOut:
    deliveries = await jobs.store.deliveries_of(job.id)
    return JobOut(**job.public(), deliveries=[d.public() for d in deliveries])


async def _visible(request: Request, job_id: str) -> tuple[Any, Job]:
    jobs = _jobs(request)
    job = await jobs.store.get(job_id)
    if job is None or not principal_of(request).can_see(job.tenant):
        raise JobNotFoundError(f"no job {job_id!r}")
    return jobs, job


def _write(path: FsPath, data: bytes) -> None:
    """Write durably under a temporary name, then rename: a crash leaves no half file behind."""
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_POST_ERRORS: dict[int | str, dict[str, Any]] = {
    202: {"description": "queued; `Location` is the job's URL"},
    400: {"model": ErrorBody, "description": "malformed request, unknown model, missing file"},
    404: {"model": ErrorBody, "description": "`session_id` of another tenant"},
    413: {"model": ErrorBody, "description": "`upload_too_large`, `audio_too_long` (job_max_duration_s)"},
    415: {"model": ErrorBody, "description": "not decodable as audio, or a wrong Content-Type"},
    422: {
        "model": ErrorBody,
        "description": "bad audio (`empty_audio`, ...), a bad option, or `unknown_webhook`",
    },
    503: {"model": ErrorBody, "description": "`job_queue_full`, `not_ready`, budgets; see Retry-After"},
}
_BODY = upload_body(webhook={"type": "string"})


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses=_POST_ERRORS,
    openapi_extra=_BODY,
    summary="Queue a long file for analysis",
)
async def create_job(
    request: Request,
    models: str | None = Query(None, description="comma-separated model ids and/or `ensemble`"),
    channels: Literal["mix", "separate"] | None = Query(None),
    words: bool | None = Query(None, description="recorded with the job; stored results always keep words"),
    segmentation: Literal["utterance", "whole"] | None = Query(None),
    session_id: str | None = Query(
        None, pattern=SESSION_ID_PATTERN, description="store the results in this session (default job-<id>)"
    ),
    roles: str | None = Query(None, description="comma-separated role per channel, e.g. agent,customer"),
    webhook: str | None = Query(None, description="name of a configured webhook target (EMOTION_WEBHOOKS)"),
) -> Response:
    app = request.app
    settings, service = app.state.settings, app.state.service
    jobs = _jobs(request)
    if not service.ready:
        raise NotReadyError("the models are still loading", retry_after=settings.retry_after_s)
    if getattr(app.state, "store", None) is None:
        raise StoreUnavailableError("jobs store their results in sessions: no session store")
    if await jobs.store.active_count() >= settings.job_max_queued:  # before reading a byte
        raise JobQueueFullError(
            f"{settings.job_max_queued} jobs are queued or running; retry later", QUEUE_FULL_RETRY_S
        )
    admission = admission_control.of_app(app)
    uploaded, decoded = admission.upload.reserve(), admission.decoded.reserve()
    try:
        query = {
            "models": models,
            "channels": channels,
            "words": words,
            "segmentation": segmentation,
            "session_id": session_id,
            "roles": roles,
            "webhook": webhook,
        }
        job = await _accept(request, jobs, query, uploaded, decoded)
    finally:
        uploaded.release()
        decoded.release()
    out = await _out(jobs, job)
    return JSONResponse(
        out.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
    )


async def _accept(request: Request, jobs, query, uploaded, decoded) -> Job:
    app = request.app
    settings, service, store = app.state.settings, app.state.service, app.state.store
    upload = await read_upload(request, settings.max_upload_bytes, uploaded)
    opts = parse_options(JobOptions, query, upload.fields)
    service.resolve_models(opts.models)  # unknown ids fail before any decoding
    principal = principal_of(request)
    if opts.webhook:  # a configured name this caller may use, taking job events
        errors = []
        for event in JOB_EVENTS:
            try:
                jobs.webhooks.target_for(opts.webhook, event, principal.tenant, principal.admin)
                break
            except UnknownWebhookError as exc:
                errors.append(exc)
        else:
            raise errors[0]
    if opts.session_id:  # another tenant's session: 404 before any work
        await may_use_session(store, opts.session_id, principal)

    declared = admission_control.sniff(upload.data)
    if declared is not None:
        decoded.resize(declared.decoded_bytes)
    decoder = decoding.pool_for(settings)
    audio = await service.engine.run_cpu(
        new_request_key(), decoder.decode, upload.data, opts.channels, job_limits(settings)
    )
    decoded.resize(audio.samples.nbytes)
    duration_s, n_channels, decoded_bytes = (
        audio.duration_s,
        int(audio.samples.shape[0]),
        audio.samples.nbytes,
    )
    del audio  # validated; the runner decodes the stored file again when the job runs

    job_id = uuid.uuid4().hex
    path = jobs.store.audio_dir / f"{job_id}.upload"
    await asyncio.to_thread(_write, path, upload.data)
    now = time.time()
    job = Job(
        id=job_id,
        status=QUEUED,
        session_id=opts.session_id or f"job-{job_id}",
        session_owned=not opts.session_id,
        created_at=now,
        updated_at=now,
        tenant=principal.tenant,
        options=opts.model_dump(exclude={"session_id", "webhook"}),
        webhook=opts.webhook,
        audio_path=str(path),
        filename=(upload.filename or None) and upload.filename[:256],
        audio_bytes=len(upload.data),
        duration_s=duration_s,
        channels=n_channels,
        decoded_bytes=decoded_bytes,
    )
    upload.data = b""
    if not await jobs.store.create(job, settings.job_max_queued):
        path.unlink(missing_ok=True)
        raise JobQueueFullError(
            f"{settings.job_max_queued} jobs are queued or running; retry later", QUEUE_FULL_RETRY_S
        )
    jobs.runner.wake()
    return job


@router.get("", response_model=JobList, summary="Jobs, newest first")
async def list_jobs(
    request: Request,
    status: Literal["queued", "running", "done", "failed"] | None = Query(None),
    limit: int = Query(50, ge=1, le=1000),
) -> JobList:
    jobs = _jobs(request)
    found = await jobs.store.list_jobs(tenant=principal_of(request).scope, status=status, limit=limit)
    return JobList(jobs=[await _out(jobs, j) for j in found])


@router.get("/{job_id}", response_model=JobOut, responses=_NOT_FOUND, summary="One job, with its progress")
async def get_job(request: Request, job_id: str = JobId) -> JobOut:
    jobs, job = await _visible(request, job_id)
    return await _out(jobs, job)


@router.delete(
    "/{job_id}",
    response_model=JobOut,
    responses={**_NOT_FOUND, 204: {"description": "a finished job was forgotten"}},
    summary="Cancel a job (or forget a finished one)",
)
async def delete_job(request: Request, job_id: str = JobId) -> Response:
    jobs, job = await _visible(request, job_id)
    if job.finished:
        await jobs.store.delete(job_id)
        return Response(status_code=204)
    after = await jobs.runner.cancel(job_id)
    if after is None:  # forgotten meanwhile
        raise JobNotFoundError(f"no job {job_id!r}")
    out = await _out(jobs, after)
    return JSONResponse(out.model_dump(mode="json"))
