"""``WS /v1/stream`` and the session routes against a LIVE server (uvicorn on a free loopback port)
with the real Analyzer (tiny.en ASR, MiniLM) and dummy ONNX emotion models, SQLite store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from app.streaming.client import stream_audio, stream_file
from tests.serving_helpers import STEREO, make_service
from tests.stream_support import free_port

FIXTURES = Path(__file__).parent / "fixtures"
# RAVDESS (CC BY-NC-SA 4.0): kids_angry_a01.flac + 1.0 s of digital silence + dogs_neutral_a02.flac.
TWO_UTT = FIXTURES / "two_utterances.flac"


class LiveServer:
    """uvicorn in a thread; ``restart()`` brings up a new app (new service, same SQLite file)."""

    def __init__(self, tmp: Path, **overrides):
        self.tmp = tmp
        self.overrides = {"stream_idle_timeout_s": 30.0, **overrides}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"
        self._server = None
        self._thread = None

    def start(self) -> None:
        import uvicorn

        from app.main import create_app

        service = make_service(self.tmp, **self.overrides)
        self.settings = service.settings
        app = create_app(service.settings, service)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="live-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("live server not ready")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, timeout=kw.pop("timeout", 10), **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("stream-live"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def two_utt_run(server):
    """One real-time stream of the two-utterance fixture, shared by several checks."""
    return asyncio.run(
        stream_file(TWO_UTT, server.ws, realtime=True, session_id="two-utt", timeout_s=120, words=True)
    )


def test_realtime_stream_partials_finals_and_end(two_utt_run):
    run = two_utt_run
    types = [m["type"] for m in run.messages]
    assert types[0] == "ready" and types[-1] == "end", types
    assert run.close_code == 1000
    ready = run.messages[0]
    assert ready["session_id"] == "two-utt" and ready["settings"]["max_frame_bytes"] > 0
    finals = run.of_type("final")
    assert [f["seq"] for f in finals] == [1, 2]
    assert [f["utterance"] for f in finals] == [0, 1] and all(f["channel"] == 0 for f in finals)
    assert "talking" in finals[0]["text"].lower() and "sitting" in finals[1]["text"].lower()
    for f in finals:
        assert f["reason"] == "end_of_speech"
        assert set(f["emotion"]["probabilities"]) == {"neutral", "happy", "sad", "angry"}
        # result shape v2: ranking, no ensemble entry, no role without roles, text sentiment, and
        # words because the start message asked (tests/test_streaming_state.py: none unless asked)
        assert f["emotion"]["ranking"][0]["label"] == f["emotion"]["label"]
        assert "ensemble" not in f["emotion"]["per_model"] and f["emotion"]["per_model"]
        assert f["role"] is None and f["text_sentiment"]["source"] == "vader"
        assert f["words"] and 0 < f["words"][0]["confidence"] <= 1
        # measured, positive and bounded by the test's own duration; speed itself is bench/stream_bench.py's job
        assert 0 < f["latency_ms"] < 60_000
    assert 0.6 < finals[0]["start"] < 1.2 and 5.7 < finals[1]["start"] < 6.3
    # Partials: the stream produced some, and each utterance's partials all precede its final.
    # (Partials may be thinned when the ASR pool is busy, so one utterance may have none.)
    assert run.of_type("partial"), "no partial at all"
    for f in finals:
        idx = run.messages.index(f)
        partials = [
            i
            for i, m in enumerate(run.messages)
            if m["type"] == "partial" and m["utterance"] == f["utterance"]
        ]
        assert all(i < idx for i in partials)
    end = run.messages[-1]
    assert end["stats"]["finals"] == 2 and end["stats"]["stored"] == 2


def test_confirmed_prefix_never_changes(two_utt_run):
    for utt in (0, 1):
        confirmed = [m["confirmed"] for m in two_utt_run.of_type("partial") if m["utterance"] == utt]
        for a, b in zip(confirmed, confirmed[1:], strict=False):
            assert b.startswith(a), (a, b)


def test_every_utterance_stored_exactly_once(server, two_utt_run):
    r = server.get("/v1/sessions/two-utt/results", params={"words": "true"})
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "ended" and body["last_seq"] == 2
    stored = body["results"]
    finals = two_utt_run.of_type("final")
    assert [s["seq"] for s in stored] == [1, 2]
    assert [(s["start"], s["end"], s["text"]) for s in stored] == [
        (f["start"], f["end"], f["text"]) for f in finals
    ]
    assert "words" not in server.get("/v1/sessions/two-utt/results").json()["results"][0]  # only if asked
    for s, f in zip(stored, finals, strict=True):  # the store keeps the words
        assert s["words"] and all(0 <= w["confidence"] <= 1 for w in s["words"])
        assert s["start"] <= s["words"][0]["start"] and s["words"][-1]["end"] <= s["end"] + 0.05
        assert (s["emotion"], s["text_sentiment"], s["role"]) == (f["emotion"], f["text_sentiment"], None)
    view = server.get("/v1/sessions/two-utt").json()
    assert view["result_count"] == 2 and view["source"] == "stream" and view["emotion"]["n"] == 2
    assert sum(view["emotion"]["counts"].values()) == 2
    assert sum(view["emotion"]["mean_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert view["last_result"]["seq"] == 2
    listed = server.get("/v1/sessions", params={"state": "ended"}).json()["sessions"]
    assert "two-utt" in [s["id"] for s in listed]


def test_stereo_results_name_their_channel(server):
    # a small slack, so that a 2.3-s file sent at full speed is "too fast" even on a loaded machine
    server.settings.stream_realtime_slack_s = 0.2
    try:
        run = asyncio.run(stream_file(STEREO, server.ws, realtime=False, session_id="stereo", timeout_s=120))
    finally:
        server.settings.stream_realtime_slack_s = 2.0
    assert run.close_code == 1000, run.messages[-3:]
    finals = run.of_type("final")
    assert sorted({f["channel"] for f in finals}) == [0, 1]
    assert [f["seq"] for f in finals] == list(range(1, len(finals) + 1))
    view = server.get("/v1/sessions/stereo").json()
    assert view["channels"] == [0, 1] and view["result_count"] == len(finals)
    # --fast: the client is told it is ahead of real time; nothing is dropped for it.
    assert any(w["code"] == "client_too_fast" for w in run.of_type("warning"))


def test_long_poll_wakes_promptly(server):
    audio, rate = sf.read(TWO_UTT, dtype="float32")
    first = audio[: int(4.1 * rate)]  # one utterance

    async def body():
        async with httpx.AsyncClient(base_url=server.base, timeout=40) as http:
            # The session must exist before the poll: open it with a stream that waits for audio.
            poll_started = asyncio.Event()
            finals_at: list[float] = []

            def on_message(m):
                if m["type"] == "ready":
                    poll_started.set()
                if m["type"] == "final":
                    finals_at.append(time.monotonic())

            async def poll():
                await poll_started.wait()
                t0 = time.monotonic()
                r = await http.get("/v1/sessions/poll-me/results", params={"after": 0, "wait": 30})
                return r, t0, time.monotonic()

            poller = asyncio.create_task(poll())
            run = await stream_audio(
                first, rate, server.ws, realtime=False, session_id="poll-me", on_message=on_message
            )
            r, t0, t1 = await poller
            return run, r, t0, t1, finals_at

    run, r, t0, t1, finals_at = asyncio.run(body())
    assert r.status_code == 200
    assert [x["seq"] for x in r.json()["results"]] == [1]
    assert t1 - t0 < 10.0  # far less than wait=30
    assert abs(t1 - finals_at[0]) < 1.0  # answered as soon as the result was stored


def test_disconnect_mid_utterance_keeps_what_was_received(server):
    run = asyncio.run(
        stream_file(
            TWO_UTT, server.ws, realtime=False, session_id="cut-off", disconnect_after_s=2.0, timeout_s=60
        )
    )
    assert not run.of_type("final")  # gone before the utterance ended
    deadline = time.monotonic() + 30
    view = None
    while time.monotonic() < deadline:
        view = server.get("/v1/sessions/cut-off").json()
        if view.get("state") == "ended":
            break
        time.sleep(0.2)
    assert view["state"] == "ended", view
    results = server.get("/v1/sessions/cut-off/results").json()["results"]
    assert len(results) == 1 and results[0]["reason"] == "disconnect"
    assert results[0]["end"] == pytest.approx(2.0, abs=0.03)
    assert results[0]["text"]


# --- protocol errors ---------------------------------------------------------------------------


async def _exchange(url: str, *messages, headers=None, wait_s: float = 10.0):
    """Send messages (str = text, bytes = binary), return (server messages, close code, reason)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    got = []
    async with connect(url, additional_headers=headers) as ws:
        try:
            for m in messages:
                await ws.send(m)
            while True:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), wait_s)))
        except ConnectionClosed:
            pass
        return got, ws.close_code, ws.close_reason


START = json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1})


@pytest.mark.parametrize(
    ("messages", "code", "error"),
    [
        ((b"\x00\x00" * 160,), 4000, "audio_before_start"),
        (("{not json",), 1007, "invalid_payload"),
        ((json.dumps({"type": "start", "channels": 0}),), 1007, "invalid_payload"),
        ((json.dumps({"type": "start", "session_id": "bad id!"}),), 1007, "invalid_payload"),
        (
            (json.dumps({"type": "start", "channels": 1, "roles": ["agent", "customer"]}),),
            1007,
            "invalid_payload",
        ),
        ((json.dumps({"type": "start", "models": ["nope"]}),), 1007, "unknown_model"),
        ((json.dumps({"type": "start", "encoding": "mulaw"}),), 1003, "unsupported_data"),
        ((json.dumps({"type": "start", "channels": 3}),), 1003, "unsupported_data"),
        # the dummy models ship no adaptation.json (population statistics)
        ((json.dumps({"type": "start", "adapt": True}),), 1003, "adaptation_unavailable"),
        ((json.dumps({"type": "dance"}),), 1003, "unsupported_data"),
        ((json.dumps({"type": "start", "metadata": {"x": "y" * 70000}}),), 1009, "message_too_big"),
        ((START, b"\x00" * (64 * 1024 + 2)), 1008, "frame_too_large"),
        ((START, START), 4001, "duplicate_start"),
        (
            (START.replace("pcm_s16le", "f32le"), np.full(160, np.nan, "<f4").tobytes()),
            1007,
            "invalid_payload",
        ),
        ((json.dumps({"type": "stop"}),), 4000, "audio_before_start"),
    ],
)
def test_protocol_errors_close_with_the_right_code(server, messages, code, error):
    got, close_code, reason = asyncio.run(_exchange(server.ws, *messages))
    assert close_code == code, (got, reason)
    assert json.loads(reason)["error"] == error
    errors = [m for m in got if m["type"] == "error"]
    assert errors and errors[-1]["error"] == error and errors[-1]["close_code"] == code


def test_api_key_failure_closes_1008(server):
    server.settings.api_keys = ["sekret"]
    try:
        _, code, reason = asyncio.run(_exchange(server.ws, START))
        assert code == 1008 and json.loads(reason)["error"] == "unauthorized"
        got, code, _ = asyncio.run(
            _exchange(
                server.ws, START, json.dumps({"type": "stop"}), headers={"Authorization": "Bearer sekret"}
            )
        )
        assert code == 1000 and [m["type"] for m in got] == ["ready", "end"]
        assert server.get("/v1/sessions").status_code == 401
    finally:
        server.settings.api_keys = []


def test_idle_timeout_and_ping(server):
    server.settings.stream_idle_timeout_s = 1.0
    try:
        t0 = time.monotonic()
        got, code, reason = asyncio.run(_exchange(server.ws, START, json.dumps({"type": "ping", "id": 7})))
        assert code == 4008 and json.loads(reason)["error"] == "idle_timeout"
        assert 0.9 < time.monotonic() - t0 < 5
        assert {"type": "pong", "id": 7} in got
    finally:
        server.settings.stream_idle_timeout_s = 30.0


def test_session_routes_errors_and_delete(server):
    r = server.get("/v1/sessions/no-such-session")
    assert r.status_code == 404 and r.json()["error"] == "session_not_found" and r.json()["detail"]
    assert server.get("/v1/sessions/no-such-session/results").status_code == 404
    assert httpx.delete(server.base + "/v1/sessions/no-such-session").status_code == 404
    asyncio.run(
        _exchange(
            server.ws,
            START.replace('"channels": 1', '"channels": 1, "session_id": "to-delete"'),
            json.dumps({"type": "stop"}),
        )
    )
    assert server.get("/v1/sessions/to-delete").status_code == 200
    assert httpx.delete(server.base + "/v1/sessions/to-delete").status_code == 204
    assert server.get("/v1/sessions/to-delete").status_code == 404
    assert server.get("/v1/sessions", params={"state": "paused"}).status_code == 422


def test_sessions_survive_a_server_restart(server):
    audio, rate = sf.read(TWO_UTT, dtype="float32")
    run = asyncio.run(
        stream_audio(audio[: int(4.1 * rate)], rate, server.ws, realtime=False, session_id="durable")
    )
    assert [f["seq"] for f in run.of_type("final")] == [1]
    before = server.get("/v1/sessions/durable/results").json()
    server.restart()
    after = server.get("/v1/sessions/durable/results").json()
    assert after == before and after["state"] == "ended"
    # Continuing the session after the restart goes on numbering, and its times go on from the end
    # of the last stored result (the resume point), so the session's timeline keeps increasing.
    first = before["results"][0]
    run = asyncio.run(
        stream_audio(
            np.asarray(audio[: int(4.1 * rate)]), rate, server.ws, realtime=False, session_id="durable"
        )
    )
    assert [f["seq"] for f in run.of_type("final")] == [2]
    ready, final = run.of_type("ready")[0], run.of_type("final")[0]
    assert ready["resume_offset_s"] == first["end"] and ready["last_seq"] == 1
    assert final["start"] == pytest.approx(first["end"] + first["start"], abs=0.002)
    assert final["end"] == pytest.approx(first["end"] + first["end"], abs=0.002)
    stored = server.get("/v1/sessions/durable/results", params={"after": 1, "words": "true"}).json()
    words = stored["results"][0]["words"]  # finals carry words only when asked; the store keeps them
    assert words and all(w["start"] >= final["start"] - 0.05 for w in words)  # on the same timeline


def test_cli_stream_prints_one_json_line_per_message(server, capsys):
    from app.cli import main

    code = main(
        ["stream", str(FIXTURES / "kids_angry_a01.flac"), "--fast", "--url", server.ws, "--session-id", "cli"]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert lines[0]["type"] == "ready" and lines[-1]["type"] == "end"
    assert [m["seq"] for m in lines if m["type"] == "final"] == [1]
