"""``POST /v1/predict`` (and the identical ``POST /predict``): a whole audio file in, transcript and
emotion out; ``GET /v1/models``: what is loaded.

Options come as query parameters or as multipart form fields (a query parameter wins when both
are given): ``models`` (comma-separated ids; default all; the top level is always their weighted
ensemble, and ``ensemble`` in the list is accepted and adds nothing), ``channels`` (mix|separate),
``words`` (bool: each segment's words; absent otherwise), ``segmentation`` (utterance|whole),
``roles`` (comma-separated names of the channels, index = channel, e.g. ``agent,customer`` with
``channels=separate``: each segment's ``role``), ``session_id`` (store each segment in that session
and return the ``seq``s).

The response is result shape v2 (``app.schemas``); ``/predict`` is an alias of ``/v1/predict`` with
the same (v2) response: one shape, not two. ``run_analysis`` is the whole path, shared with the
OpenAI-compatible route (``app.api.openai_compat``).

Order of checks, cheapest first: API key, readiness, admission (estimated queueing wait, then the
upload-bytes budget), upload size, options, model ids, the decoded-samples budget by the declared
header (WAV/FLAC), decoding and audio limits, the budget by the decoded size, then the work
(``app.inference.admission``; refusals are 503 + Retry-After). Thread-safety: stateless handlers; blocking work (decode, VAD,
ASR) runs in the service's worker pool, never on the event loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.analysis import decoding
from app.analysis.audio import AudioLimits
from app.api.auth import principal_of
from app.api.sessions import SessionNotFoundError, may_use_session, owner_kwargs
from app.api.upload import Upload, read_upload
from app.errors import InvalidOptionError, NotReadyError, StoreUnavailableError
from app.inference import admission as admission_control
from app.schemas import ErrorBody, PredictResponse, UtteranceResult
from app.service import new_request_key
from app.store import SessionNotFound

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # same rule as the streaming protocol
ROLE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # a role names a channel: agent, customer, ...

router = APIRouter(tags=["predict"])


OptionsT = TypeVar("OptionsT", bound=BaseModel)


class PredictOptions(BaseModel):
    """Validated options of a predict request (from the query string and/or form fields)."""

    model_config = ConfigDict(extra="ignore")

    models: list[str] | None = None
    channels: Literal["mix", "separate"] = "mix"
    words: bool = False
    segmentation: Literal["utterance", "whole"] = "utterance"
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    roles: list[str] | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value or None

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value):
        if isinstance(value, str):
            # empty entries are kept (and refused below): dropping one would shift the channels
            value = [part.strip() for part in value.split(",")] if value.strip() else []
        return value or None

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, value: list[str] | None) -> list[str] | None:
        for i, role in enumerate(value or []):
            if not ROLE_PATTERN.fullmatch(role):
                raise ValueError(
                    f"role {i} ({role!r}) must be 1-32 letters, digits, '.', '_' or '-' (one name per channel)"
                )
        return value


def check_roles(roles: list[str] | None, channels: int) -> None:
    """``roles`` name channels (index = channel): more names than analysed channels is an error."""
    if roles and len(roles) > channels:
        hint = " (use channels=separate to analyse each channel of a stereo call)" if channels == 1 else ""
        raise InvalidOptionError(
            f"roles: {len(roles)} role(s) given for {channels} analysed channel(s){hint}"
        )


def parse_options(cls: type[OptionsT], query: dict[str, object], fields: dict[str, str]) -> OptionsT:
    """Options from multipart form ``fields`` and the ``query`` (which wins), validated as ``cls``."""
    merged: dict[str, object] = {k: v for k, v in fields.items() if k in cls.model_fields}
    merged.update({k: v for k, v in query.items() if v is not None})
    try:
        return cls.model_validate(merged)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidOptionError(msg) from None


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed request, unknown model, missing file"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    413: {
        "model": ErrorBody,
        "description": "upload or audio too long (`upload_too_large`, `audio_too_long`)",
    },
    415: {"model": ErrorBody, "description": "not decodable as audio, or a wrong Content-Type"},
    422: {"model": ErrorBody, "description": "bad audio (`empty_audio`, `no_speech`, ...) or a bad option"},
    503: {"model": ErrorBody, "description": "loading or overloaded; see Retry-After"},
    504: {"model": ErrorBody, "description": "not served before the request deadline"},
}


def upload_body(**extra_fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an audio upload with the predict options as form fields (a
    multipart ``file`` or a raw ``audio/*`` body), plus the route's ``extra_fields``."""
    text = {"type": "string"}
    fields: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG, MP3, M4A, ..."},
        "models": text,
        "channels": {"type": "string", "enum": ["mix", "separate"]},
        "words": {"type": "boolean"},
        "segmentation": {"type": "string", "enum": ["utterance", "whole"]},
        "roles": text,
        "session_id": text,
        **extra_fields,
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": fields}
                },
                "audio/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


_BODY = upload_body()


async def predict(
    request: Request,
    models: str | None = Query(
        None,
        description="comma-separated model ids; default all. `emotion` is always their weighted ensemble "
        "and `per_model` holds each of them; `ensemble` is accepted (1.x) and adds nothing",
    ),
    channels: Literal["mix", "separate"] | None = Query(
        None, description="mix (default) or separate (stereo calls)"
    ),
    words: bool | None = Query(
        None, description="include each segment's words with timings and confidences (absent otherwise)"
    ),
    segmentation: Literal["utterance", "whole"] | None = Query(
        None,
        description="utterance (default): one segment per utterance, cut as streaming and training cut "
        "them; whole: each channel as one segment (equal parts of <= 30 s)",
    ),
    session_id: str | None = Query(
        None, pattern=SESSION_ID_PATTERN, description="store the segments in this session"
    ),
    roles: str | None = Query(
        None,
        description="comma-separated names of the channels, index = channel (e.g. `agent,customer` with "
        "`channels=separate`): each segment's `role`; at most one per analysed channel",
    ),
) -> PredictResponse:
    query: dict[str, object] = {
        "models": models,
        "channels": channels,
        "words": words,
        "segmentation": segmentation,
        "session_id": session_id,
        "roles": roles,
    }
    response, _ = await run_analysis(
        request, lambda upload: parse_options(PredictOptions, query, upload.fields)
    )
    return response


async def run_analysis(
    request: Request, parse: Callable[[Upload], PredictOptions]
) -> tuple[PredictResponse, list[UtteranceResult]]:
    """The whole predict path for one upload: readiness, admission, upload, ``parse`` (the request's
    options from the upload's form fields; may raise), decoding, analysis, and storing in
    ``session_id``. Returns the response and the per-utterance results in time order."""
    app = request.app
    settings, service = app.state.settings, app.state.service
    if not service.ready:
        raise NotReadyError("the models are still loading", retry_after=settings.retry_after_s)
    admission = admission_control.of_app(app)
    ticket = admission.work.admit()  # 503 when the work already queued would make this one wait too long
    uploaded, decoded = admission.upload.reserve(), admission.decoded.reserve()
    try:
        return await _predict(request, settings, service, ticket, uploaded, decoded, parse)
    finally:
        ticket.done()  # a cost sample once the audio was decoded (the work ran, whatever came of it)
        uploaded.release()
        decoded.release()


async def _predict(
    request: Request,
    settings,
    service,
    ticket: admission_control.Ticket,
    uploaded: admission_control.Reservation,
    decoded: admission_control.Reservation,
    parse: Callable[[Upload], PredictOptions],
) -> tuple[PredictResponse, list[UtteranceResult]]:
    app = request.app
    upload = await read_upload(request, settings.max_upload_bytes, uploaded)
    opts = parse(upload)
    service.resolve_models(opts.models)  # unknown ids fail before any decoding
    check_roles(opts.roles, 1 if opts.channels == "mix" else settings.max_channels)
    store = getattr(app.state, "store", None)
    if opts.session_id and store is None:
        raise StoreUnavailableError("sessions are not available on this server (no session store)")
    principal = principal_of(request)
    if opts.session_id and store is not None:  # another tenant's session: 404 before any work
        await may_use_session(store, opts.session_id, principal)

    declared = admission_control.sniff(upload.data)
    if declared is not None:  # refuse before a decoder materialises it
        decoded.resize(declared.decoded_bytes)
        ticket.set_audio(declared.duration_s, decoded=False)
    key = new_request_key()  # decode, VAD and ASR of this request share one fair-queue identity
    t0 = time.perf_counter()
    decoder = decoding.pool_for(settings)  # isolated worker processes: a crafted file cannot crash us
    ticket.start()
    audio = await service.engine.run_cpu(
        key,
        decoder.decode,
        upload.data,
        opts.channels,
        AudioLimits.from_settings(settings, settings.max_audio_seconds),
    )
    decode_ms = (time.perf_counter() - t0) * 1000.0
    upload.data = b""  # the bytes are no longer needed: out of the upload budget
    uploaded.release()
    decoded.resize(audio.samples.nbytes)  # the actual decoded size from now on
    ticket.set_audio(audio.duration_s)
    if opts.channels == "separate":
        check_roles(opts.roles, audio.samples.shape[0])
    response, results = await service.predict_detailed(
        audio,
        opts.models,
        opts.channels,
        opts.words,
        opts.segmentation,
        source="rest",
        decode_ms=decode_ms,
        key=key,
        roles=opts.roles,
    )
    if opts.session_id and store is not None:  # a session id without a store was refused above
        view = await may_use_session(store, opts.session_id, principal)
        roles = {"roles": opts.roles} if opts.roles else {}  # the session keeps them (summaries, alerts)
        renamed = bool(roles) and view is not None and view.get("roles") != opts.roles
        if view is None or view.get("state") == "ended" or renamed:  # create, or re-open an idle-ended one
            try:
                await store.open_session(opts.session_id, source="rest", **owner_kwargs(principal), **roles)
            except SessionNotFound:  # another tenant created it meanwhile
                raise SessionNotFoundError(f"no session {opts.session_id!r}") from None
        response.session_id = opts.session_id
        response.seq = [
            await store.append_result(opts.session_id, u.to_store(source="rest")) for u in results
        ]
    return response, results


_DESCRIPTION = (
    "Upload audio as multipart field `file` or as the raw body with `Content-Type: audio/*`. Speech is split "
    "into utterances per channel (Silero VAD; 500 ms of silence ends one, at most 15 s; the same cut as "
    "streaming), or kept whole with `segmentation=whole`. Each segment gets a transcript, the VOICE "
    "`emotion` (label, score, ranking, probabilities of the weighted ensemble, and `per_model`) and the "
    "TEXT sentiment of its words (`text_sentiment`, VADER); `role` names its channel (`roles=`); `words` "
    "only with `words=true`. The top-level `emotion` is the segments' duration-weighted mean and "
    "`text_sentiment` the mean of theirs. Errors are `{error, detail}`."
)


def _add_predict_route(path: str, summary: str) -> None:
    router.add_api_route(
        path,
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_BODY,
        summary=summary,
        description=_DESCRIPTION,
        include_in_schema=True,
    )


_add_predict_route("/v1/predict", "Transcript and emotion of an audio file")
_add_predict_route("/predict", "Alias of /v1/predict")


class ModelsResponse(BaseModel):
    models: list[dict]
    classes: list[str]
    ensemble: str = "ensemble"
    asr_model: str = Field("", description="tiny.en, base, or a local model's '<dir>:<hash>'")
    asr_encoder_window: str = ""
    model_dir: str = Field("", description="where the emotion models were loaded from")


@router.get("/v1/models", response_model=ModelsResponse, summary="Loaded models and classes")
async def list_models(request: Request) -> ModelsResponse:
    service = request.app.state.service
    if not service.ready:
        raise NotReadyError(
            "the models are still loading", retry_after=request.app.state.settings.retry_after_s
        )
    return ModelsResponse(
        models=[
            {
                "id": c.id,
                "variant": c.variant,
                "sha256": c.sha256,
                "inputs": list(c.inputs),
                "provider": service.engine.runners[m].provider,
            }
            for m, c in service.engine.cards.items()
        ],
        classes=list(service.classes),
        asr_model=service.engine.analyzer.config.asr_model,
        asr_encoder_window=service.engine.analyzer.config.asr_encoder_window,
        model_dir=str(service.engine.model_dir),
    )
