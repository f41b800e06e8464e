"""Streaming client: ``emotion-server stream FILE [--realtime | --fast] --url URL ...``.

Sends a file (or the microphone, ``--mic``, with the optional ``sounddevice`` package) to
``WS /v1/stream`` as 20-ms ``pcm_s16le`` frames at the file's own sample rate and channel count, then
``stop``, and prints every server message as one JSON line until ``end``. ``--realtime`` (default)
paces frames like a live source; ``--fast`` sends as fast as the server reads (it then gets a
``client_too_fast`` warning and TCP back-pressure).

Programmatic use (tests, ``bench/stream_bench.py``)::

    run = await stream_audio(samples, rate, url, realtime=True)
    finals = [m for m in run.messages if m["type"] == "final"]

Thread-safety: each call opens its own connection; run many concurrently on one loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"


@dataclass
class StreamRun:
    """What one streaming call saw."""

    messages: list[dict] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.monotonic() per message
    close_code: int | None = None
    close_reason: str = ""
    audio_s: float = 0.0
    started_at: float = 0.0
    stop_sent_at: float | None = None

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples (n, channels) float32, rate) at the file's own rate; FFmpeg formats at 16 kHz."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data, int(rate)
    except Exception:
        from app.analysis.audio import decode

        audio = decode(path, channels="separate")
        return audio.samples.T.copy(), 16000


def to_pcm16(x: np.ndarray) -> bytes:
    """Float samples -> 16-bit PCM with the scale soundfile and the server use (x 32768, clipped),
    so samples read from a 16-bit file reach the server unchanged."""
    return np.clip(np.round(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


async def stream_audio(
    samples: np.ndarray,
    rate: int,
    url: str = DEFAULT_URL,
    *,
    realtime: bool = True,
    frame_ms: float = 20.0,
    models: list[str] | None = None,
    session_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    partials: bool = True,
    roles: list[str] | None = None,
    words: bool = False,
    api_key: str | None = None,
    on_message: Callable[[dict], None] | None = None,
    stop: bool = True,
    disconnect_after_s: float | None = None,
    timeout_s: float = 300.0,
) -> StreamRun:
    """Stream ``samples`` ((n,) or (n, channels) float32 at ``rate``) and collect the replies.

    ``disconnect_after_s``: drop the connection (no ``stop``) after that much audio was sent (tests
    of the disconnect path). Returns when the server closes the socket or after ``timeout_s``.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    x = samples if samples.ndim == 2 else samples[:, None]
    channels = x.shape[1]
    step = max(1, int(rate * frame_ms / 1000.0))
    run = StreamRun()
    start = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "channels": channels}
    if models:
        start["models"] = models
    if session_id:
        start["session_id"] = session_id
    if metadata:
        start["metadata"] = metadata
    if not partials:
        start["partials"] = False
    if roles:
        start["roles"] = roles
    if words:
        start["words"] = True

    async with connect(
        url, additional_headers=_headers(api_key), ping_timeout=None, max_size=2**22, open_timeout=30
    ) as ws:
        ready = asyncio.get_running_loop().create_future()

        async def receive() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    run.messages.append(msg)
                    run.received_at.append(time.monotonic())
                    if on_message is not None:
                        on_message(msg)
                    if msg.get("type") in ("ready", "error") and not ready.done():
                        ready.set_result(msg)
            except ConnectionClosed:
                pass
            finally:
                if not ready.done():
                    ready.set_result(None)

        async def send() -> None:
            await ws.send(json.dumps(start))
            got = await ready
            if got is None or got.get("type") != "ready":
                return
            run.started_at = t0 = time.monotonic()
            for a in range(0, len(x), step):
                chunk = x[a : a + step]
                if realtime:
                    # Absolute schedule: frame i leaves when its audio would have been captured.
                    delay = t0 + (a + len(chunk)) / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(to_pcm16(chunk.reshape(-1)))
                run.audio_s = (a + len(chunk)) / rate
                if disconnect_after_s is not None and run.audio_s >= disconnect_after_s:
                    await ws.close()
                    return
            if stop:
                run.stop_sent_at = time.monotonic()
                await ws.send(json.dumps({"type": "stop"}))

        receiver = asyncio.create_task(receive())
        try:
            await asyncio.wait_for(asyncio.gather(send(), receiver), timeout_s)
        except ConnectionClosed:
            await receiver
        finally:
            receiver.cancel()
        run.close_code = ws.close_code
        run.close_reason = ws.close_reason or ""
    return run


async def stream_file(path: str | Path, url: str = DEFAULT_URL, **kwargs) -> StreamRun:
    samples, rate = load_audio(path)
    return await stream_audio(samples, rate, url, **kwargs)


async def stream_mic(
    url: str, *, rate: int = 16000, channels: int = 1, frame_ms: float = 20.0, **kwargs
) -> StreamRun:
    """Stream the default input device until Ctrl-C (needs the optional ``sounddevice`` package)."""
    try:
        import sounddevice as sd
    except ImportError as exc:  # optional dependency
        raise SystemExit("--mic needs the sounddevice package (pip install sounddevice)") from exc
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    run = StreamRun()
    on_message = kwargs.pop("on_message", None)
    api_key = kwargs.pop("api_key", None)
    start = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "channels": channels}
    for k in ("models", "session_id", "metadata", "roles", "words"):
        if kwargs.get(k):
            start[k] = kwargs[k]

    def callback(indata, frames, t, status) -> None:  # audio thread: hand over to the loop
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    async with connect(url, additional_headers=_headers(api_key), ping_timeout=None) as ws:
        await ws.send(json.dumps(start))

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                run.messages.append(msg)
                if on_message:
                    on_message(msg)

        receiver = asyncio.create_task(receive())
        block = int(rate * frame_ms / 1000)
        with sd.RawInputStream(
            samplerate=rate, channels=channels, dtype="int16", blocksize=block, callback=callback
        ):
            try:
                while True:
                    await ws.send(await queue.get())
            except (KeyboardInterrupt, asyncio.CancelledError):
                pass
        await ws.send(json.dumps({"type": "stop"}))
        await receiver
    return run


def _has_sound_device() -> bool:
    try:
        import sounddevice as sd

        return bool(sd.query_devices(kind="input"))
    except Exception:
        return False


# --- command line -------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stream",
        help="stream a file (or the microphone) to WS /v1/stream; one JSON line per server message",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("file", nargs="?", help="audio file (WAV, FLAC, ...); omit with --mic")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime", dest="realtime", action="store_true", default=True, help="live pace (default)"
    )
    pace.add_argument("--fast", dest="realtime", action="store_false", help="as fast as the server reads")
    p.add_argument("--url", default=DEFAULT_URL, help=f"stream endpoint (default {DEFAULT_URL})")
    p.add_argument("--models", default="", help="comma-separated model ids (default: the server's set)")
    p.add_argument("--session-id", default=None, help="session to create or continue")
    p.add_argument("--metadata", default=None, help="JSON object stored with the session")
    p.add_argument("--api-key", default=None, help="API key (default: $EMOTION_API_KEY)")
    p.add_argument("--frame-ms", type=float, default=20.0, help="audio per binary frame (default 20)")
    p.add_argument("--no-partials", action="store_true", help="ask for finals only")
    p.add_argument("--roles", default="", help="role per channel, e.g. agent,customer")
    p.add_argument("--words", action="store_true", help="finals with word timings and confidences")
    p.add_argument("--mic", action="store_true", help="stream the default input device (needs sounddevice)")
    p.set_defaults(func=cmd_stream)
    return p


def cmd_stream(args: argparse.Namespace) -> int:
    import os

    def emit(msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    kwargs: dict[str, Any] = dict(
        models=[m.strip() for m in args.models.split(",") if m.strip()] or None,
        session_id=args.session_id,
        metadata=json.loads(args.metadata) if args.metadata else None,
        roles=[r.strip() for r in args.roles.split(",") if r.strip()] or None,
        words=args.words,
        api_key=args.api_key or os.environ.get("EMOTION_API_KEY"),
        on_message=emit,
    )
    try:
        if args.mic:
            if not _has_sound_device():
                print("no sound input device (or sounddevice is not installed)", file=sys.stderr)
                return 2
            run = asyncio.run(stream_mic(args.url, frame_ms=args.frame_ms, **kwargs))
        else:
            if not args.file:
                print("stream: give a FILE or --mic", file=sys.stderr)
                return 2
            run = asyncio.run(
                stream_file(
                    args.file,
                    args.url,
                    realtime=args.realtime,
                    frame_ms=args.frame_ms,
                    partials=not args.no_partials,
                    **kwargs,
                )
            )
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"stream: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    ok = run.close_code in (1000, None) and not run.of_type("error")
    return 0 if ok else 1
