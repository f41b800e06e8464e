"""``POST /v1/predict`` (and the identical ``POST /predict``): a whole audio file in, transcript and
emotion out; ``GET /v1/models``: what is loaded.

Options come as query parameters or as multipart form fields (a query parameter wins when both
are given): ``models`` (comma-separated ids; default all + ensemble), ``channels`` (mix|separate),
``words`` (bool), ``segmentation`` (utterance|whole), ``session_id`` (store each segment in that session and return the ``seq``s).

Order of checks, cheapest first: API key, readiness, admission (estimated queueing wait, then the
upload-bytes budget), upload size, options, model ids, the decoded-samples budget by the declared
header (WAV/FLAC), decoding and audio limits, the budget by the decoded size, then the work
(``app.inference.admission``; refusals are 503 + Retry-After). Thread-safety: stateless handlers; blocking work (decode, VAD,
ASR) runs in the service's worker pool, never on the event loop.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.analysis import decoding
from app.analysis.audio import AudioLimits
from app.api.auth import principal_of
from app.api.sessions import SessionNotFoundError, may_use_session, owner_kwargs
from app.api.upload import read_upload
from app.errors import InvalidOptionError, NotReadyError, StoreUnavailableError
from app.inference import admission as admission_control
from app.schemas import ErrorBody, PredictResponse
from app.service import new_request_key
from app.store import SessionNotFound

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"  # same rule as the streaming protocol

router = APIRouter(tags=["predict"])


class PredictOptions(BaseModel):
    """Validated options of a predict request (from the query string and/or form fields)."""

    model_config = ConfigDict(extra="ignore")

    models: list[str] | None = None
    channels: Literal["mix", "separate"] = "mix"
    words: bool = False
    segmentation: Literal["utterance", "whole"] = "utterance"
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value or None


def _options(query: dict[str, object], fields: dict[str, str]) -> PredictOptions:
    merged: dict[str, object] = {k: v for k, v in fields.items() if k in PredictOptions.model_fields}
    merged.update({k: v for k, v in query.items() if v is not None})
    try:
        return PredictOptions.model_validate(merged)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidOptionError(msg) from None


def _limits(settings) -> AudioLimits:
    return AudioLimits(
        max_seconds=settings.max_audio_seconds,
        max_channels=settings.max_channels,
        min_sample_rate=settings.min_sample_rate,
        max_sample_rate=settings.max_sample_rate,
    )


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
_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "WAV, FLAC, OGG, MP3, M4A, ...",
                        },
                        "models": {"type": "string"},
                        "channels": {"type": "string", "enum": ["mix", "separate"]},
                        "words": {"type": "boolean"},
                        "segmentation": {"type": "string", "enum": ["utterance", "whole"]},
                        "session_id": {"type": "string"},
                    },
                }
            },
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def predict(
    request: Request,
    models: str | None = Query(
        None, description="comma-separated model ids and/or `ensemble`; default all + ensemble"
    ),
    channels: Literal["mix", "separate"] | None = Query(
        None, description="mix (default) or separate (stereo calls)"
    ),
    words: bool | None = Query(None, description="include word timings and confidences"),
    segmentation: Literal["utterance", "whole"] | None = Query(
        None,
        description="utterance (default): one segment per utterance, cut as streaming and training cut "
        "them; whole: each channel as one segment (equal parts of <= 30 s)",
    ),
    session_id: str | None = Query(
        None, pattern=SESSION_ID_PATTERN, description="store the segments in this session"
    ),
) -> PredictResponse:
    app = request.app
    settings, service = app.state.settings, app.state.service
    if not service.ready:
        raise NotReadyError("the models are still loading", retry_after=settings.retry_after_s)
    admission = admission_control.of_app(app)
    ticket = admission.work.admit()  # 503 when the work already queued would make this one wait too long
    uploaded, decoded = admission.upload.reserve(), admission.decoded.reserve()
    try:
        return await _predict(
            request,
            settings,
            service,
            ticket,
            uploaded,
            decoded,
            models,
            channels,
            words,
            segmentation,
            session_id,
        )
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
    models: str | None,
    channels: Literal["mix", "separate"] | None,
    words: bool | None,
    segmentation: Literal["utterance", "whole"] | None,
    session_id: str | None,
) -> PredictResponse:
    app = request.app
    upload = await read_upload(request, settings.max_upload_bytes, uploaded)
    opts = _options(
        {
            "models": models,
            "channels": channels,
            "words": words,
            "segmentation": segmentation,
            "session_id": session_id,
        },
        upload.fields,
    )
    service.resolve_models(opts.models)  # unknown ids fail before any decoding
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
    audio = await service.engine.run_cpu(key, decoder.decode, upload.data, opts.channels, _limits(settings))
    decode_ms = (time.perf_counter() - t0) * 1000.0
    upload.data = b""  # the bytes are no longer needed: out of the upload budget
    uploaded.release()
    decoded.resize(audio.samples.nbytes)  # the actual decoded size from now on
    ticket.set_audio(audio.duration_s)
    response, results = await service.predict_detailed(
        audio,
        opts.models,
        opts.channels,
        opts.words,
        opts.segmentation,
        source="rest",
        decode_ms=decode_ms,
        key=key,
    )
    if opts.session_id and store is not None:  # a session id without a store was refused above
        view = await may_use_session(store, opts.session_id, principal)
        if view is None or view.get("state") == "ended":  # create, or re-open an idle-ended one
            try:
                await store.open_session(opts.session_id, source="rest", **owner_kwargs(principal))
            except SessionNotFound:  # another tenant created it meanwhile
                raise SessionNotFoundError(f"no session {opts.session_id!r}") from None
        response.session_id = opts.session_id
        response.seq = [
            await store.append_result(opts.session_id, u.to_store(source="rest")) for u in results
        ]
    return response


_DESCRIPTION = (
    "Upload audio as multipart field `file` or as the raw body with `Content-Type: audio/*`. Speech is split "
    "into utterances per channel (Silero VAD; 500 ms of silence ends one, at most 15 s; the same cut as "
    "streaming), or kept whole with `segmentation=whole`; each gets a transcript and per-model emotion "
    "probabilities; `emotion` is their duration-weighted mean. Errors are `{error, detail}`."
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
    )
