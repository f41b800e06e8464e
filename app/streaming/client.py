"""Streaming client: ``emotion-server stream FILE [--realtime | --fast] --url URL ...``.

Sends a file (or the microphone, ``--mic``, with the optional ``sounddevice`` package) to
``WS /v1/stream`` as 20-ms ``pcm_s16le`` frames at the file's own sample rate and channel count, then
``stop``, and prints every server message until ``end``: one JSON line each (``--format json``, the
default off a terminal) or readable text (``--format text``, ``app.cli.output.StreamPrinter``).
``--realtime`` (default) paces frames like a live source; ``--fast`` sends as fast as the server
reads (it then gets a ``client_too_fast`` warning and TCP back-pressure).

A lost connection (the server or its replica died, the proxy dropped it) is reconnected with
backoff and the session resumed where its stored results end (``stream_audio(reconnect=True)``,
the CLI's default for files; ``--no-reconnect`` turns it off). ``--mic`` does not reconnect: the
microphone path has no buffer to resend from, and a dropped microphone stream ends.

Programmatic use (tests, ``bench/stream_bench.py``)::

    run = await stream_audio(samples, rate, url, realtime=True)
    finals = [m for m in run.messages if m["type"] == "final"]

Thread-safety: each call opens its own connection; run many concurrently on one loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"
MIC_EXTRA_HINT = "pip install 'emotion-server[mic]'"


@dataclass
class Reconnect:
    """One recovery from a lost connection: from the failure to the next ``ready``."""

    after_code: int | None  # close code that ended the connection (None: the connect itself failed)
    failed_at: float  # time.monotonic()
    ready_at: float | None = None
    attempts: int = 0  # connection attempts until the ``ready`` (refusals such as 4009 included)
    resume_offset_s: float | None = None  # where the server placed the resumed audio
    resent_s: float = 0.0  # audio sent again: from the resume point to what had been sent before

    @property
    def gap_s(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.failed_at


@dataclass
class StreamRun:
    """What one streaming call saw (over every connection, when it reconnected)."""

    messages: list[dict] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.monotonic() per message
    close_code: int | None = None  # of the last connection
    close_reason: str = ""
    audio_s: float = 0.0  # furthest audio position sent (s from the start of the samples)
    started_at: float = 0.0
    stop_sent_at: float | None = None
    session_id: str | None = None
    connections: int = 0  # connections that got a ``ready``
    reconnects: list[Reconnect] = field(default_factory=list)
    missed_seqs: list[int] = field(default_factory=list)  # stored by a lost connection, never received
    last_connection_at: int = 0  # index in ``messages`` of the last connection's first message

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def ended(self) -> bool:
        """The server sent ``end`` (every final of the stream was delivered)."""
        return any(m.get("type") == "end" for m in self.messages)

    def last_connection(self) -> list[dict]:
        return self.messages[self.last_connection_at :]


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


# Close codes after which a resumed connection may succeed: going away, no close frame (the server
# or its replica died, or the proxy dropped the connection), service restart, try again later, bad
# gateway. 4009 (session_busy) is retried only when resuming: the lease of the lost connection is
# still running out. Everything else is the client's or the server's definitive answer.
RETRY_CLOSE_CODES = frozenset({1001, 1006, 1012, 1013, 1014})
SESSION_BUSY = 4009
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0


@dataclass
class _Progress:
    """What survives from one connection of a stream to the next."""

    session_id: str | None
    base_s: float | None = None  # session time of samples[0] (the first connection's resume offset)
    position: int = 0  # next sample index to send
    sent_to: int = 0  # furthest sample index sent on any connection
    acked_seq: int = 0  # largest ``seq`` of a final received
    ended: bool = False
    t0: float | None = None  # pacing origin: the first ``ready``


@dataclass
class _Outcome:
    ready: bool = False
    done: bool = False  # end received, or the client closed on purpose
    code: int | None = None
    connect_error: BaseException | None = None
    retry_after_s: float | None = None


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
    adapt: bool = False,
    api_key: str | None = None,
    on_message: Callable[[dict], None] | None = None,
    stop: bool = True,
    disconnect_after_s: float | None = None,
    timeout_s: float = 300.0,
    reconnect: bool = False,
    reconnect_for_s: float = 60.0,
    on_reconnect: Callable[[Reconnect, float], None] | None = None,
) -> StreamRun:
    """Stream ``samples`` ((n,) or (n, channels) float32 at ``rate``) and collect the replies.

    ``disconnect_after_s``: drop the connection (no ``stop``) after that much audio was sent (tests
    of the disconnect path). Returns when the server closes the socket or after ``timeout_s``.

    ``reconnect``: after an abnormal close (``RETRY_CLOSE_CODES``, or a failed connect) connect
    again with exponential backoff (0.25 s doubling to 4 s, with jitter; at most ``retry_after_s``
    of a 4009) for up to ``reconnect_for_s`` from the failure, continue the same session and
    resend the audio from the server's ``resume_offset_s`` on (the audio after the last stored
    result: nothing acknowledged is analysed twice, nothing unacknowledged is lost). Pacing keeps
    the first connection's schedule, so resent audio goes out as fast as the server reads until
    the stream is back on time, like a buffered live source. ``on_reconnect(record, delay_s)`` is
    called before each wait.
    """
    x = samples if samples.ndim == 2 else samples[:, None]
    step = max(1, int(rate * frame_ms / 1000.0))
    run = StreamRun()
    progress = _Progress(session_id=session_id)
    opts = dict(
        models=models,
        metadata=metadata,
        partials=partials,
        api_key=api_key,
        on_message=on_message,
        stop=stop,
        disconnect_after_s=disconnect_after_s,
        realtime=realtime,
        roles=roles,
        words=words,
        adapt=adapt,
    )
    deadline = time.monotonic() + timeout_s
    pending: Reconnect | None = None  # the recovery under way
    backoff = BACKOFF_FIRST_S
    while True:
        resuming = run.connections > 0
        outcome = await _one_connection(x, rate, step, url, run, progress, deadline, opts)
        if outcome.ready:  # ``pending`` (if any) got its ``ready_at`` from the ready message
            backoff = BACKOFF_FIRST_S
            pending = None
        if outcome.connect_error is not None and not reconnect:
            raise outcome.connect_error
        retryable = outcome.connect_error is not None or outcome.code in RETRY_CLOSE_CODES
        retryable = retryable or (outcome.code == SESSION_BUSY and resuming)
        if outcome.done or not reconnect or not retryable:
            return run
        now = time.monotonic()
        if pending is None:
            pending = Reconnect(after_code=outcome.code, failed_at=now)
            run.reconnects.append(pending)
        if now - pending.failed_at > reconnect_for_s or now >= deadline:
            return run
        delay = backoff * (1.0 + 0.25 * random.random())
        if outcome.retry_after_s is not None:  # the lease of the lost connection runs out then
            delay = min(delay, max(0.05, outcome.retry_after_s))
        backoff = min(BACKOFF_MAX_S, backoff * 2)
        pending.attempts += 1
        if on_reconnect is not None:
            on_reconnect(pending, delay)
        await asyncio.sleep(min(delay, max(0.0, deadline - now)))


def _start_message(x: np.ndarray, rate: int, progress: _Progress, opts: dict[str, Any]) -> dict[str, Any]:
    start: dict[str, Any] = {
        "type": "start",
        "sample_rate": rate,
        "encoding": "pcm_s16le",
        "channels": x.shape[1],
    }
    if opts["models"]:
        start["models"] = opts["models"]
    if progress.session_id:
        start["session_id"] = progress.session_id
    if opts["metadata"]:
        start["metadata"] = opts["metadata"]
    if not opts["partials"]:
        start["partials"] = False
    if opts["roles"]:
        start["roles"] = opts["roles"]
    if opts["words"]:
        start["words"] = True
    if opts["adapt"]:
        start["adapt"] = True
    return start


async def _one_connection(
    x: np.ndarray,
    rate: int,
    step: int,
    url: str,
    run: StreamRun,
    progress: _Progress,
    deadline: float,
    opts: dict[str, Any],
) -> _Outcome:
    """One WebSocket connection of a stream: start (or resume), send audio, collect replies."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    outcome = _Outcome()
    start = _start_message(x, rate, progress, opts)
    on_message = opts["on_message"]
    try:
        ws = await connect(
            url,
            additional_headers=_headers(opts["api_key"]),
            ping_timeout=None,
            max_size=2**22,
            open_timeout=min(30.0, max(1.0, deadline - time.monotonic())),
        )
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        outcome.connect_error = exc
        return outcome
    run.last_connection_at = len(run.messages)
    async with ws:
        ready = asyncio.get_running_loop().create_future()

        def resume(msg: dict) -> None:
            """Place the next frame where the server's timeline resumes (``resume_offset_s``)."""
            offset = float(msg.get("resume_offset_s") or 0.0)
            if progress.base_s is None:
                progress.base_s = offset
            progress.session_id = run.session_id = msg.get("session_id") or progress.session_id
            position = int(round((offset - progress.base_s) * rate))
            progress.position = min(max(0, position), len(x))
            last_seq = int(msg.get("last_seq") or 0)
            if run.connections and last_seq > progress.acked_seq:  # stored, never received
                run.missed_seqs.extend(range(progress.acked_seq + 1, last_seq + 1))
                progress.acked_seq = last_seq
            if run.reconnects and run.reconnects[-1].ready_at is None:
                rec = run.reconnects[-1]
                rec.ready_at = run.received_at[-1]
                rec.resume_offset_s = offset
                rec.resent_s = max(0.0, (progress.sent_to - progress.position) / rate)
            run.connections += 1

        async def receive() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    run.messages.append(msg)
                    run.received_at.append(time.monotonic())
                    kind = msg.get("type")
                    if kind == "ready":
                        resume(msg)
                    elif kind == "final" and isinstance(msg.get("seq"), int):
                        progress.acked_seq = max(progress.acked_seq, msg["seq"])
                    elif kind == "end":
                        progress.ended = True
                    elif kind == "error" and msg.get("retry_after_s") is not None:
                        outcome.retry_after_s = float(msg["retry_after_s"])
                    if on_message is not None:
                        on_message(msg)
                    if kind in ("ready", "error") and not ready.done():
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
            outcome.ready = True
            if progress.t0 is None:
                progress.t0 = run.started_at = time.monotonic()
            t0 = progress.t0
            for a in range(progress.position, len(x), step):
                chunk = x[a : a + step]
                if opts["realtime"]:
                    # Absolute schedule: frame i leaves when its audio would have been captured.
                    delay = t0 + (a + len(chunk)) / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(to_pcm16(chunk.reshape(-1)))
                progress.position = a + len(chunk)
                progress.sent_to = max(progress.sent_to, progress.position)
                run.audio_s = max(run.audio_s, progress.position / rate)
                if opts["disconnect_after_s"] is not None and run.audio_s >= opts["disconnect_after_s"]:
                    outcome.done = True  # on purpose: no reconnect
                    await ws.close()
                    return
            if opts["stop"]:
                run.stop_sent_at = time.monotonic()
                await ws.send(json.dumps({"type": "stop"}))

        receiver = asyncio.create_task(receive())
        try:
            await asyncio.wait_for(asyncio.gather(send(), receiver), max(0.0, deadline - time.monotonic()))
        except ConnectionClosed:
            await receiver
        finally:  # past ``timeout_s``, asyncio.TimeoutError reaches the caller (as before reconnects)
            receiver.cancel()
        run.close_code = ws.close_code
        run.close_reason = ws.close_reason or ""
    outcome.code = run.close_code
    outcome.done = outcome.done or progress.ended or run.close_code == 1000
    return outcome


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
        raise SystemExit(f"--mic needs the sounddevice package: {MIC_EXTRA_HINT}") from exc
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    run = StreamRun()
    on_message = kwargs.pop("on_message", None)
    api_key = kwargs.pop("api_key", None)
    start = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "channels": channels}
    for k in ("models", "session_id", "metadata", "roles", "words", "adapt"):
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


def mic_problem() -> str | None:
    """Why ``--mic`` cannot work here (no package, no PortAudio, no input device), or None."""
    try:
        import sounddevice as sd
    except ImportError:
        return f"--mic needs the sounddevice package, which the [mic] extra installs: {MIC_EXTRA_HINT}"
    except OSError as exc:  # the package imports PortAudio at import time
        return (
            f"--mic: sounddevice cannot load PortAudio ({exc}); on Debian/Ubuntu: apt install libportaudio2"
        )
    try:
        sd.query_devices(kind="input")
    except Exception as exc:
        return f"--mic: no sound input device ({exc})"
    return None


# --- command line -------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stream",
        help="stream a file (or the microphone) to WS /v1/stream; readable text or JSON lines",
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
    p.add_argument(
        "--mic", action="store_true", help="stream the default input device (needs the [mic] extra)"
    )
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default=None,
        help="text: one line per utterance, a summary at the end; json: every message as a JSON line "
        "(default: text on a terminal, else json)",
    )
    p.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="do not reconnect and resume the session after a lost connection (files only; --mic never does)",
    )
    p.add_argument(
        "--reconnect-for", type=float, default=60.0, help="give up reconnecting after this many seconds (60)"
    )
    p.add_argument("--roles", default="", help="role per channel, e.g. agent,customer")
    p.add_argument("--words", action="store_true", help="finals with word timings and confidences")
    p.add_argument(
        "--adapt",
        action="store_true",
        help="per-session adaptation: normalise to this caller's earlier utterances (helps a caller whose "
        "emotion varies, hurts one who stays in one emotion: models/RESULTS.md)",
    )
    p.set_defaults(func=cmd_stream)
    return p


def cmd_stream(args: argparse.Namespace) -> int:
    import os

    from app.cli.output import StreamPrinter

    emit = StreamPrinter.for_terminal(args.format)  # JSON lines, or text (app.cli.render)

    kwargs: dict[str, Any] = dict(
        models=[m.strip() for m in args.models.split(",") if m.strip()] or None,
        session_id=args.session_id,
        metadata=json.loads(args.metadata) if args.metadata else None,
        roles=[r.strip() for r in args.roles.split(",") if r.strip()] or None,
        words=args.words,
        adapt=args.adapt,
        api_key=args.api_key or os.environ.get("EMOTION_API_KEY"),
        on_message=emit,
    )
    try:
        if args.mic:
            problem = mic_problem()
            if problem:
                print(f"emotion-server stream: {problem}", file=sys.stderr)
                return 2
            run = asyncio.run(stream_mic(args.url, frame_ms=args.frame_ms, **kwargs))
        else:
            if not args.file:
                print("stream: give a FILE or --mic", file=sys.stderr)
                return 2

            def on_reconnect(record: Reconnect, delay_s: float) -> None:
                why = f"close {record.after_code}" if record.after_code is not None else "connect failed"
                print(f"stream: connection lost ({why}); reconnecting in {delay_s:.2f} s", file=sys.stderr)

            run = asyncio.run(
                stream_file(
                    args.file,
                    args.url,
                    realtime=args.realtime,
                    frame_ms=args.frame_ms,
                    partials=not args.no_partials,
                    reconnect=args.reconnect,
                    reconnect_for_s=args.reconnect_for,
                    on_reconnect=on_reconnect,
                    **kwargs,
                )
            )
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"stream: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    finally:
        emit.finish()  # text: clear the partial line; summarise if no `end` came
    if args.mic:
        ok = run.close_code in (1000, None) and not run.of_type("error")
    else:  # every final delivered, and the last connection ended without an error
        ok = run.ended and not [m for m in run.last_connection() if m.get("type") == "error"]
        if not run.connections:
            print(f"stream: could not connect to {args.url}", file=sys.stderr)
    return 0 if ok else 1
