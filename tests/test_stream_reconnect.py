"""The streaming client's reconnect and resume (``app.streaming.client.stream_audio(reconnect=True)``)
against a scripted WebSocket server on loopback, so every step is deterministic:

* a connection dropped without a close frame (1006) is reconnected; a 4009 while resuming (the
  lost connection's lease still runs) is retried after ``retry_after_s``; the resumed connection
  gets the audio from the server's ``resume_offset_s`` on, sample for sample; finals stored but
  never received are reported (``missed_seqs``);
* a definitive close (1007) is not retried; a connect that keeps failing gives up after
  ``reconnect_for_s``; without ``reconnect`` a failed connect raises as before.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from websockets.asyncio.server import serve
from websockets.frames import CloseCode

from app.streaming.client import stream_audio, to_pcm16
from tests.stream_support import free_port

RATE = 16000


def ramp(seconds: float) -> np.ndarray:
    """Audio whose every sample tells its own index (mod 4096), to check where a resume starts."""
    n = int(seconds * RATE)
    return ((np.arange(n) % 4096) / 32768.0).astype(np.float32)


def ready(session_id: str, offset: float, last_seq: int) -> str:
    return json.dumps(
        {"type": "ready", "session_id": session_id, "resume_offset_s": offset, "last_seq": last_seq}
    )


def final(seq: int, start: float, end: float) -> str:
    return json.dumps(
        {"type": "final", "seq": seq, "session_id": "s1", "start": start, "end": end, "text": "x"}
    )


def test_dropped_connection_resumes_from_the_servers_resume_point():
    x = ramp(2.0)
    seen: list[dict] = []  # per connection: start message and audio bytes received

    async def handler(ws):
        n = len(seen)
        conn = {"start": json.loads(await ws.recv()), "audio": bytearray()}
        seen.append(conn)
        if n == 0:  # the replica that dies: one final out, a second stored but never sent
            await ws.send(ready("s1", 0.0, 0))
            while len(conn["audio"]) < 1.0 * RATE * 2:
                conn["audio"] += await ws.recv()
            await ws.send(final(1, 0.1, 0.5))
            await asyncio.sleep(0.05)
            ws.transport.abort()  # kill -9: no close frame
            return
        if n == 1:  # the other replica while the dead one's lease still runs
            await ws.send(json.dumps({"type": "error", "error": "session_busy", "detail": "busy",
                                      "close_code": 4009, "retry_after_s": 0.2}))  # fmt: skip
            await ws.close(4009, json.dumps({"error": "session_busy"}))
            return
        await ws.send(ready("s1", 0.75, 2))  # stored results end at 0.75 s, last seq 2
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                assert json.loads(msg)["type"] == "stop"
                break
            conn["audio"] += msg
        await ws.send(final(3, 1.2, 1.6))
        await ws.send(json.dumps({"type": "end", "session_id": "s1", "stats": {}}))
        await ws.close()

    async def body():
        port = free_port()
        async with serve(handler, "127.0.0.1", port):
            return await stream_audio(
                x, RATE, f"ws://127.0.0.1:{port}", realtime=False, reconnect=True, reconnect_for_s=10.0
            )

    run = asyncio.run(body())
    assert run.ended and run.close_code == CloseCode.NORMAL_CLOSURE
    assert len(seen) == 3 and run.connections == 2
    assert seen[0]["start"].get("session_id") is None  # a new session: the server named it
    assert seen[1]["start"]["session_id"] == seen[2]["start"]["session_id"] == "s1"
    (rec,) = run.reconnects
    assert rec.after_code == 1006 and rec.attempts == 2 and rec.resume_offset_s == 0.75
    assert rec.gap_s is not None and 0.2 <= rec.gap_s < 3.0  # waited for the busy lease, not longer
    assert run.missed_seqs == [2]  # stored by the dead replica, never received: read it over REST
    assert [f["seq"] for f in run.of_type("final")] == [1, 3]
    resumed = bytes(seen[2]["audio"])
    assert resumed == to_pcm16(x[int(0.75 * RATE) :])  # everything from the resume point, once


def test_definitive_close_is_not_retried():
    connections = []

    async def handler(ws):
        connections.append(json.loads(await ws.recv()))
        await ws.send(
            json.dumps({"type": "error", "error": "invalid_payload", "detail": "no", "close_code": 1007})
        )
        await ws.close(1007, json.dumps({"error": "invalid_payload"}))

    async def body():
        port = free_port()
        async with serve(handler, "127.0.0.1", port):
            return await stream_audio(
                ramp(0.5), RATE, f"ws://127.0.0.1:{port}", realtime=False, reconnect=True
            )

    run = asyncio.run(body())
    assert len(connections) == 1 and run.close_code == 1007 and not run.reconnects and not run.ended


def test_connect_failures_back_off_then_give_up():
    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens
    delays: list[float] = []
    t0 = time.monotonic()
    run = asyncio.run(
        stream_audio(
            ramp(0.5),
            RATE,
            url,
            realtime=False,
            reconnect=True,
            reconnect_for_s=1.5,
            on_reconnect=lambda rec, delay: delays.append(delay),
        )
    )
    assert 1.5 <= time.monotonic() - t0 < 6.0
    assert run.connections == 0 and len(run.reconnects) == 1 and run.reconnects[0].after_code is None
    assert len(delays) >= 3 and delays[1] > delays[0]  # exponential backoff
    with pytest.raises(OSError):
        asyncio.run(stream_audio(ramp(0.5), RATE, url, realtime=False))
