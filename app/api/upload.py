"""Reading an uploaded audio file under a byte limit, before anything is decoded.

Accepted bodies: ``multipart/form-data`` with the audio in field ``file`` (other fields are
options), or the raw bytes with ``Content-Type: audio/*`` (or ``application/octet-stream``).
The limit is enforced twice: a declared ``Content-Length`` above it is refused before reading a
byte, and the bytes are counted while they stream in (chunked uploads declare no length), so an
oversized upload is never read whole. An optional ``Reservation`` in the upload-bytes budget
(``app.inference.admission``) is sized to the declared length before reading, or grown chunk by
chunk (``MemoryBudgetError``, 503, when the budget is spent).

Thread-safety: stateless coroutines.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from app.errors import BadRequestError, MissingFileError, UnsupportedMediaTypeError, UploadTooLargeError
from app.inference.admission import Reservation

RAW_TYPES = ("application/octet-stream",)
MAX_FORM_FIELDS = 32


@dataclass
class Upload:
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)  # every value of each text field, in order


def _too_large(limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"the upload exceeds the limit of {limit} bytes")


def check_content_length(request: Request, limit: int) -> int | None:
    """The declared body length (None when not declared); raises when it is over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        length = int(declared)
    except ValueError:
        raise BadRequestError(f"invalid Content-Length {declared!r}") from None
    if length > limit:
        raise _too_large(limit)
    return length


async def _limited(
    request: Request, limit: int, reservation: Reservation | None = None
) -> AsyncGenerator[bytes, None]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        if reservation is not None:
            reservation.grow(len(chunk))
        yield chunk


async def read_upload(request: Request, limit: int, reservation: Reservation | None = None) -> Upload:
    length = check_content_length(request, limit)
    if reservation is not None and length is not None:
        reservation.resize(length)  # refused before a byte is read
        reservation = None  # already counted
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        parser = MultiPartParser(
            request.headers,
            _limited(request, limit, reservation),
            max_files=1,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=64 * 1024,
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise BadRequestError(f"malformed multipart body: {exc.message}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise MissingFileError("multipart body without a `file` part holding the audio")
            data = await upload.read()
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            lists: dict[str, list[str]] = {}
            for k, v in form.multi_items():
                if isinstance(v, str):
                    lists.setdefault(k, []).append(v)
            return Upload(data, upload.filename, upload.content_type, fields, lists)
        finally:
            await form.close()
    if media.startswith("audio/") or media in RAW_TYPES:
        chunks = [chunk async for chunk in _limited(request, limit, reservation)]
        return Upload(b"".join(chunks), None, media)
    if not media:
        body = [chunk async for chunk in _limited(request, limit, reservation)]
        if not any(body):
            raise MissingFileError(
                "no audio: send multipart/form-data with a `file` part, or the raw bytes with Content-Type audio/*"
            )
        raise UnsupportedMediaTypeError(
            "a raw body needs Content-Type audio/* (or use multipart field `file`)"
        )
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Type {media!r}: use multipart/form-data (field `file`) or audio/*"
    )
