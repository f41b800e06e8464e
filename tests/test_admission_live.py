"""Admission control against a LIVE server (uvicorn on a loopback port, dummy emotion models):

* a burst of WebSocket connects beyond ``stream_max_streams`` admits exactly the limit (1013 + JSON
  reason for the rest);
* a client that stops reading is dropped (``client_not_reading``) and its slot freed within the
  send timeout plus slack;
* ``/v1/predict`` refuses with 503 + Retry-After, before decoding, an upload whose header declares
  more decoded samples than the budget has room for, an upload over the upload-bytes budget, and
  any request while the estimated queueing wait is too long; budgets are returned afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app import metrics
from app.analysis import decoding
from tests.serving_helpers import ANGRY
from tests.test_stream_ws import LiveServer

MAX_STREAMS = 3
SEND_TIMEOUT_S = 2.0
START = json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(
        tmp_path_factory.mktemp("admission-live"),
        stream_max_streams=MAX_STREAMS,
        stream_send_timeout_s=SEND_TIMEOUT_S,
        decoded_budget_mb=4,
        upload_budget_mb=4,
    )
    srv.start()
    yield srv
    srv.stop()


def admission_of(server):
    return server._server.config.app.state.admission


def wait_slots_free(server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while admission_of(server).streams.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admission_of(server).streams.held == 0


def count(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- (a) atomic stream admission ---------------------------------------------------------------


async def _try_stream(url: str):
    ws = await connect(url, open_timeout=60, ping_interval=None)
    try:
        # a refused connection may be closed by the server before ``start`` is even sent
        await ws.send(START)
        first = json.loads(await asyncio.wait_for(ws.recv(), 60))
    except ConnectionClosed:
        first = {"type": "closed"}
    if first["type"] != "ready":
        await asyncio.wait_for(ws.wait_closed(), 30)
    return first, ws


def test_burst_of_connects_admits_exactly_the_limit(server):
    wait_slots_free(server)
    n = 4 * MAX_STREAMS

    async def burst():
        results = await asyncio.gather(*(_try_stream(server.ws) for _ in range(n)))
        held = admission_of(server).streams.held
        for _, ws in results:
            await ws.close()
        return results, held

    results, held = asyncio.run(burst())
    ready = [first for first, _ in results if first["type"] == "ready"]
    refused = [(first, ws) for first, ws in results if first["type"] != "ready"]
    assert len(ready) == MAX_STREAMS, [f for f, _ in results]
    assert held == MAX_STREAMS
    for first, ws in refused:
        # the error message, unless the close overtook the client's own ``start``
        assert first["type"] == "closed" or first == {**first, "type": "error", "error": "overloaded"}, first
        assert ws.close_code == 1013
        assert json.loads(ws.close_reason)["error"] == "overloaded"
    wait_slots_free(server)


# --- (b) a client that stops reading ---------------------------------------------------------------


def test_client_that_stops_reading_is_closed_and_its_slot_freed(server):
    wait_slots_free(server)
    before = count("emotion_errors_total", {"type": "client_not_reading"})

    async def scenario():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: fills quickly
        sock.connect(("127.0.0.1", server.port))
        # max_queue=1: the client stops reading its socket; no compression: the pongs really take room
        ws = await connect(
            server.ws, sock=sock, max_queue=1, ping_interval=None, compression=None, open_timeout=60
        )
        await ws.send(START)
        assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "ready"
        assert admission_of(server).streams.held == 1
        big = "x" * 60_000  # each ping is echoed as a ~60 kB pong the client never reads

        async def flood():
            for _ in range(1000):
                await ws.send(json.dumps({"type": "ping", "id": big}))

        flooding = asyncio.create_task(flood())
        t0 = time.monotonic()
        deadline = t0 + SEND_TIMEOUT_S + 15.0
        while admission_of(server).streams.held and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        freed_after = time.monotonic() - t0
        held = admission_of(server).streams.held
        flooding.cancel()
        ws.transport.abort()
        return held, freed_after

    held, freed_after = asyncio.run(scenario())
    assert held == 0, "the stalled client still holds its stream slot"
    assert freed_after < SEND_TIMEOUT_S + 15.0
    assert count("emotion_errors_total", {"type": "client_not_reading"}) == before + 1

    async def another():  # the server still serves streams
        first, ws = await _try_stream(server.ws)
        await ws.close()
        return first

    assert asyncio.run(another())["type"] == "ready"
    wait_slots_free(server)


# --- (c) memory budgets and (d) load shedding on /v1/predict -----------------------------------------


def flac_declaring_ten_minutes_at_192k_stereo() -> bytes:
    data = bytearray(ANGRY.read_bytes())  # a real FLAC whose STREAMINFO is rewritten: 448 kB-style bomb
    rate = 192000
    bits = (rate << 44) | (1 << 41) | (15 << 36) | (600 * rate)
    data[18:26] = bits.to_bytes(8, "big")
    return bytes(data)


def post(server, data: bytes) -> httpx.Response:
    return httpx.post(
        server.base + "/v1/predict", content=data, headers={"Content-Type": "audio/flac"}, timeout=120
    )


def expect_503(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"] == code, r.text
    assert int(r.headers["Retry-After"]) >= 1


def test_declared_decoded_size_over_budget_is_503_before_decoding(server):
    adm = admission_of(server)
    held = adm.decoded.reserve(1)  # something else in flight: the bomb cannot run alone
    jobs = decoding.default_pool().stats["jobs"]
    shed = count("emotion_admission_shed_total", {"reason": "decoded_budget"})
    try:
        t0 = time.monotonic()
        r = post(server, flac_declaring_ten_minutes_at_192k_stereo())
        elapsed = time.monotonic() - t0
    finally:
        held.release()
    expect_503(r, "memory_budget")
    assert elapsed < 10.0
    assert decoding.default_pool().stats["jobs"] == jobs, "the upload reached a decoder"
    assert count("emotion_admission_shed_total", {"reason": "decoded_budget"}) == shed + 1
    assert adm.decoded.used == 0 and adm.upload.used == 0 and adm.work.pending_s == 0


def test_upload_over_the_upload_budget_is_503(server):
    adm = admission_of(server)
    held = adm.upload.reserve(adm.upload.capacity - 1000)
    try:
        r = post(server, ANGRY.read_bytes())
    finally:
        held.release()
    expect_503(r, "memory_budget")
    assert adm.upload.used == 0 and adm.work.pending_s == 0


def test_estimated_wait_over_target_is_503(server):
    adm = admission_of(server)
    ahead = adm.work.admit()
    ahead.set_audio(1e6)  # far more queued work than the target allows
    shed = count("emotion_admission_shed_total", {"reason": "estimated_wait"})
    try:
        t0 = time.monotonic()
        r = post(server, ANGRY.read_bytes())
        elapsed = time.monotonic() - t0
    finally:
        ahead.done(completed=False)
    expect_503(r, "overloaded")
    assert elapsed < 10.0
    assert count("emotion_admission_shed_total", {"reason": "estimated_wait"}) == shed + 1


def test_admitted_request_is_served_and_returns_its_budgets(server):
    adm = admission_of(server)
    r = post(server, ANGRY.read_bytes())
    assert r.status_code == 200, r.text
    assert adm.decoded.used == 0 and adm.upload.used == 0 and adm.work.pending_s == 0
    assert adm.work.cost > 0
