"""Server-sent events, long polls that wait for a session, tenants, alerts and summaries against a
LIVE server (uvicorn with the server's own protocol options, on a free loopback port): the real
Analyzer (tiny.en ASR, MiniLM) with dummy ONNX emotion models, SQLite store; and two replicas
sharing a real redis-server."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.streaming.client import stream_file
from tests.serving_helpers import make_service
from tests.stream_support import free_port, redis_server

FIXTURES = Path(__file__).parent / "fixtures"
TWO_UTT = FIXTURES / "two_utterances.flac"  # kids_angry_a01 + 1 s of silence + dogs_neutral_a02
ANGRY = FIXTURES / "kids_angry_a01.flac"
# every result with an emotion is a hit (min_score 0): the rule fires on each session's 2nd result
RULES = '[{"name": "two_in_a_row", "label": "angry", "min_score": 0.0, "consecutive": 2}]'
KEYS = {"api_keys": ["alice:ka", "bob:kb"], "admin_keys": ["root"], "auth_fail_burst": 0, "key_rate_per_s": 0}


class LiveServer:
    """uvicorn in a thread with ``server_options`` (the protocol with the long-response hooks)."""

    def __init__(self, tmp: Path, **overrides):
        self.tmp = tmp
        self.overrides = {"stream_idle_timeout_s": 30.0, "sse_keepalive_s": 1.0, **overrides}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import uvicorn

        from app.api.limits import server_options
        from app.main import create_app

        service = make_service(self.tmp, **self.overrides)
        self.settings = service.settings
        self.app = create_app(service.settings, service)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **server_options(self.settings),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="sse-uvicorn", daemon=True)
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

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        assert self._server is not None
        self.loop.run_until_complete(self._server.serve())
        self.loop.close()

    def _pending(self) -> str:
        """What the server's loop still waits for (the message of a failed shutdown)."""
        lines = []
        for task in asyncio.all_tasks(self.loop):
            coro, frames = task.get_coro(), []
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    frames.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            lines.append(" <- ".join(frames))
        return "\n".join(lines)

    def stop(self) -> float:
        """Seconds the shutdown took."""
        t0 = time.monotonic()
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=60)
            assert not self._thread.is_alive(), (
                "the server did not shut down; waiting for:\n" + self._pending()
            )
            self._server = None
        return time.monotonic() - t0

    @property
    def bus(self):
        return self.app.state.events

    def wait_subscribers(self, n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.bus.subscriber_count != n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.bus.subscriber_count == n


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def read_sse(
    http: httpx.AsyncClient, path: str, stop, params=None, headers=None, timeout_s=120.0, opened=None
):
    """Parse a text/event-stream into dicts ({"id", "event", "data"} or {"comment"}) until
    ``stop(events)`` is true, the server ends the stream, or ``timeout_s``. ``opened`` (an
    asyncio.Event) is set once the first event arrived."""
    events: list[dict] = []

    async def run() -> None:
        async with http.stream("GET", path, params=params, headers=headers, timeout=None) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            current: dict = {}
            async for line in r.aiter_lines():
                if line == "":
                    if current:
                        events.append(current)
                        current = {}
                        if opened is not None:
                            opened.set()
                        if stop(events):
                            return
                    continue
                if line.startswith(":"):
                    events.append({"comment": line[1:].strip()})
                    continue
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value

    try:
        await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        pass
    return events


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("event") == kind]


def has(kind: str, n: int = 1):
    return lambda events: len(of(events, kind)) >= n


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(
        tmp_path_factory.mktemp("sse-live"),
        alert_rules=RULES,
        sse_queue_size=16,
        sse_send_timeout_s=2.0,
        **KEYS,
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def live_call(server):
    """An SSE client subscribed BEFORE the session exists, then a stream of two utterances (roles)."""

    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("ka")) as http:
            watcher = asyncio.create_task(read_sse(http, "/v1/sessions/sse-live/events", has("ended")))
            await asyncio.sleep(1.5)  # the stream waits (keep-alives) for a session that does not exist
            run = await stream_file(
                TWO_UTT, server.ws, realtime=False, session_id="sse-live", roles=["customer"], api_key="ka"
            )
            return run, await watcher

    return asyncio.run(body())


def test_sse_waits_for_the_session_then_streams_results_in_order(live_call):
    run, events = live_call
    finals = run.of_type("final")
    assert [f["seq"] for f in finals] == [1, 2]
    assert all("words" not in f and f["role"] == "customer" for f in finals)  # words only when asked
    assert events[0] == {"retry": "3000"}
    assert {"comment": "keep-alive"} in events[: events.index(of(events, "result")[0])]  # waited
    kinds = [e["event"] for e in events if "event" in e]
    assert kinds == ["result", "result", "alert", "ended"]  # the rule fires on the 2nd result
    results = of(events, "result")
    assert [r["id"] for r in results] == ["1", "2"]  # id = seq: Last-Event-ID resumes
    assert [r["data"]["text"] for r in results] == [f["text"] for f in finals]
    for r in results:
        assert r["data"]["role"] == "customer" and r["data"]["received_at"].endswith("Z")
        assert "words" not in r["data"]
    alert = of(events, "alert")[0]["data"]
    assert alert["rule"] == "two_in_a_row" and alert["seq"] == 2 and alert["seqs"] == [1, 2]
    ended = of(events, "ended")[0]["data"]
    assert ended["id"] == "sse-live" and ended["state"] == "ended" and ended["ended_at"].endswith("Z")
    assert ended["roles"] == ["customer"] and ended["alert_count"] == 1
    assert ended["summary"]["utterances"] == 2 and list(ended["summary"]["by_role"]) == ["customer"]


def test_sse_resumes_after_last_event_id_and_words_on_request(server, live_call):
    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("ka")) as http:
            resumed = await read_sse(
                http,
                "/v1/sessions/sse-live/events",
                has("ended"),
                headers={"Last-Event-ID": "1"},
                params={"after": 0},
            )
            with_words = await read_sse(
                http, "/v1/sessions/sse-live/events", has("ended"), params={"after": 1, "words": "true"}
            )
            return resumed, with_words

    resumed, with_words = asyncio.run(body())
    assert [e["event"] for e in resumed if "event" in e] == ["result", "alert", "ended"]
    assert of(resumed, "result")[0]["id"] == "2"  # the header wins over ?after=0
    words = of(with_words, "result")[0]["data"]["words"]
    assert words and all(0 <= w["confidence"] <= 1 for w in words)


def test_summary_alerts_and_iso_session_routes(server, live_call):
    h = auth("ka")
    summary = httpx.get(server.base + "/v1/sessions/sse-live/summary", headers=h).json()
    customer = summary["by_role"]["customer"]
    assert summary["utterances"] == customer["utterances"] == 2 and customer["channels"] == [0]
    assert sum(customer["mean_probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert customer["trend"] is None  # 2 utterances: no thirds
    alerts = httpx.get(server.base + "/v1/sessions/sse-live/alerts", headers=h).json()["alerts"]
    assert [a["rule"] for a in alerts] == ["two_in_a_row"]
    view = httpx.get(server.base + "/v1/sessions/sse-live", headers=h).json()
    assert view["created_at"].endswith("Z") and isinstance(view["created_at_ts"], float)
    assert view["summary"] == summary and "words" not in view["last_result"]
    results = httpx.get(server.base + "/v1/sessions/sse-live/results", headers=h).json()["results"]
    assert all("words" not in r for r in results)
    assert httpx.get(server.base + "/v1/sessions/nope/summary", headers=h).status_code == 404


def test_long_poll_waits_for_a_session_created_later(server):
    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("ka"), timeout=120) as http:
            t0 = time.monotonic()
            missing = await http.get("/v1/sessions/never-made/results", params={"wait": 1})
            waited = time.monotonic() - t0
            poll = asyncio.create_task(http.get("/v1/sessions/lp-later/results", params={"wait": 60}))
            await asyncio.sleep(1.0)
            assert not poll.done()
            r = await http.post(
                "/v1/predict", params={"session_id": "lp-later"}, files={"file": ANGRY.open("rb")}
            )
            assert r.status_code == 200, r.text
            stored_at = time.monotonic()
            got = await poll
            return missing, waited, got, time.monotonic() - stored_at

    missing, waited, got, lag = asyncio.run(body())
    assert missing.status_code == 404 and 0.9 < waited < 10  # waited, then: it never appeared
    assert got.status_code == 200 and [x["seq"] for x in got.json()["results"]] == [1]
    assert lag < 5.0


def test_tenants_only_see_their_own_events(server):
    async def body():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
            # alice's and bob's session lists (bob via ?api_key=, as EventSource does), the admin's,
            # and bob watching alice's session id before it exists
            def until_both(events):
                return len({e["data"]["session_id"] for e in of(events, "result")}) >= 2

            watchers = [
                asyncio.create_task(
                    read_sse(http, "/v1/events", has("result"), headers=auth("ka"), timeout_s=90)
                ),
                asyncio.create_task(
                    read_sse(http, "/v1/events", has("result"), params={"api_key": "kb"}, timeout_s=90)
                ),
                asyncio.create_task(
                    read_sse(http, "/v1/events", until_both, headers=auth("root"), timeout_s=90)
                ),
                asyncio.create_task(
                    read_sse(
                        http, "/v1/sessions/t-alice/events", lambda e: False, headers=auth("kb"), timeout_s=12
                    )
                ),
            ]
            await asyncio.sleep(1.5)
            for key, sid in (("ka", "t-alice"), ("kb", "t-bob")):
                r = await http.post(
                    "/v1/predict",
                    params={"session_id": sid},
                    files={"file": ANGRY.open("rb")},
                    headers=auth(key),
                )
                assert r.status_code == 200, r.text
            foreign_poll = await http.get(
                "/v1/sessions/t-alice/results", params={"wait": 1}, headers=auth("kb")
            )
            wrong_key = await http.get("/v1/events", params={"api_key": "nope"})
            return [await w for w in watchers], foreign_poll, wrong_key

    (alice, bob, admin, bob_on_alice), foreign_poll, wrong_key = asyncio.run(body())

    def sessions(events):
        return {e["data"]["session_id"] for e in events if "event" in e}

    assert sessions(alice) == {"t-alice"} and sessions(bob) == {"t-bob"}
    assert sessions(admin) == {"t-alice", "t-bob"}
    created = of(alice, "created")[0]["data"]["session"]
    assert created["id"] == "t-alice" and created["tenant"] == "alice" and created["created_at"].endswith("Z")
    assert of(alice, "result")[0]["data"]["result"]["seq"] == 1
    # bob's stream on alice's session id: only keep-alives, like a session that does not exist
    assert bob_on_alice[0] == {"retry": "3000"} and all("comment" in e for e in bob_on_alice[1:])
    assert len(bob_on_alice) > 3
    assert foreign_poll.status_code == 404  # waited like for an unknown id, then 404
    assert wrong_key.status_code == 401


def test_list_stream_resumes_with_last_event_id(server):
    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("root"), timeout=120) as http:
            first = await read_sse(http, "/v1/events", has("result"), timeout_s=5)  # nothing new: times out
            before = [e for e in first if "event" in e]
            assert before == []
            # the retained history: every event so far; resume after the first one
            history = await server_history(server)
            resumed = await read_sse(
                http, "/v1/events", lambda ev: len([e for e in ev if "event" in e]) >= 2,
                headers={"Last-Event-ID": history[0].id}, timeout_s=10,
            )  # fmt: skip
            return history, resumed

    history, resumed = asyncio.run(body())
    got = [e for e in resumed if "event" in e]
    assert [e["id"] for e in got] == [h.id for h in history[1:3]]
    assert [e["event"] for e in got] == [h.type for h in history[1:3]]


async def server_history(server):
    return await server.bus.history("0-0")


@pytest.fixture
def server_logs(caplog):
    """Log records of the app and of uvicorn (whose loggers do not propagate to the root)."""
    caplog.set_level(logging.INFO)
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    yield caplog
    uvicorn_logger.removeHandler(caplog.handler)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_disconnect_is_clean(server, server_logs):
    server.wait_subscribers(0)  # the streams of earlier tests are gone (none leaks)
    base = 0

    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("root")) as http:
            for path in ("/v1/events", "/v1/sessions/sse-live/events", "/v1/sessions/not-yet/events"):
                async with http.stream("GET", path, timeout=10) as r:
                    assert r.status_code == 200
                    async for _line in r.aiter_lines():
                        break  # read the first line, then hang up

    asyncio.run(body())
    server.wait_subscribers(base)
    assert errors(server_logs) == []


def test_slow_sse_client_is_dropped_without_growing_memory(server, server_logs):
    """A client that stops reading: its queue overflows (the subscription is dropped and its memory
    freed at once), and the connection is aborted after ``sse_send_timeout_s``."""
    server.wait_subscribers(0)
    base = 0
    before = set(server.bus._all)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer root\r\n\r\n")
    server.wait_subscribers(base + 1)
    (sub,) = set(server.bus._all) - before

    async def flood():
        store = server.app.state.store
        await store.open_session("flood", source="rest")
        for i in range(100):  # ~10 MB of events for a client that reads nothing
            await store.append("flood", {"channel": 0, "start": i, "end": i + 1, "text": "x" * 100_000})
            assert sub.pending <= 17

    asyncio.run(flood())
    server.wait_subscribers(base)  # it left the bus: dropped (queue full) or closed (send deadline)
    assert (sub.dropped or sub.closed) and sub.pending <= 1
    sock.settimeout(30)
    closed = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:  # drain what was buffered until the server's abort shows
            if not sock.recv(65536):
                closed = True
                break
    except (ConnectionResetError, TimeoutError, OSError) as exc:
        closed = not isinstance(exc, TimeoutError)
    finally:
        sock.close()
    assert closed, "the server kept the connection of a client that does not read"
    assert errors(server_logs) == []
    assert any(
        "did not read" in m or "fell behind" in m for m in (r.getMessage() for r in server_logs.records)
    )


def test_alerts_survive_a_restart_and_streams_end_on_shutdown(server, live_call):
    """Last in this module: restarts the server while an event stream is open."""

    async def body():
        async with httpx.AsyncClient(base_url=server.base, headers=auth("ka")) as http:
            opened = asyncio.Event()
            watcher = asyncio.create_task(
                read_sse(http, "/v1/events", lambda e: False, timeout_s=60, opened=opened)
            )
            await asyncio.wait_for(opened.wait(), 30)
            took = await asyncio.to_thread(server.stop)
            events = await asyncio.wait_for(watcher, 10)  # the stream ended with the server
            return took, events

    took, events = asyncio.run(body())
    assert took < 10, f"shutdown took {took:.1f} s with an event stream open"
    assert events[0] == {"retry": "3000"}
    server.start()
    alerts = httpx.get(server.base + "/v1/sessions/sse-live/alerts", headers=auth("ka")).json()["alerts"]
    assert [(a["rule"], a["seq"]) for a in alerts] == [("two_in_a_row", 2)]


# --- two replicas sharing Redis ------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    with redis_server() as url:
        common = {"store": "redis", "redis_url": url, "redis_prefix": "sse:", "alert_rules": RULES}
        a = LiveServer(tmp_path_factory.mktemp("replica-a"), **common)
        b = LiveServer(tmp_path_factory.mktemp("replica-b"), **common)
        a.start()
        b.start()
        yield a, b
        a.stop()
        b.stop()


def test_events_reach_every_replica_through_redis(replicas):
    a, b = replicas

    async def body():
        async with httpx.AsyncClient(timeout=120) as http:
            on_b = [
                asyncio.create_task(read_sse(http, b.base + "/v1/events", has("result"), timeout_s=90)),
                asyncio.create_task(
                    read_sse(http, b.base + "/v1/sessions/rep-1/events", has("result"), timeout_s=90)
                ),
                asyncio.create_task(http.get(b.base + "/v1/sessions/rep-1/results", params={"wait": 60})),
            ]
            await asyncio.sleep(1.5)
            r = await http.post(
                a.base + "/v1/predict", params={"session_id": "rep-1"}, files={"file": ANGRY.open("rb")}
            )
            assert r.status_code == 200, r.text
            return await asyncio.gather(*on_b)

    listing, session, poll = asyncio.run(body())
    assert [e["event"] for e in listing if "event" in e][:2] == ["created", "result"]
    assert of(session, "result")[0]["id"] == "1" and of(session, "result")[0]["data"]["session_id"] == "rep-1"
    assert poll.status_code == 200 and [x["seq"] for x in poll.json()["results"]] == [1]
