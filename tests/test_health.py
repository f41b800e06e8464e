"""Honest health: /healthz fails once start-up failed, /readyz checks models, store and load, and
client disconnects / 503s are not logged as server errors. A stub service: no models are loaded."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.api.errors import error_response
from app.errors import QueueFull
from app.inference.scheduler import LaneLimits, Priority
from app.main import create_app
from app.settings import Settings


class StubLane:
    def __init__(self, limits: LaneLimits, waiting: dict[Priority, int] | None = None):
        self.limits = limits
        self.queued = waiting or {}

    def waiting(self, priority: Priority | None = None) -> int:
        return sum(self.queued.values()) if priority is None else self.queued.get(priority, 0)


class StubEngine:
    providers = ["CPUExecutionProvider"]

    def __init__(self) -> None:
        self.asr_lane: StubLane | None = None


class StubService:
    """What the app needs of ``EmotionService`` for these routes; ``start`` does what it is told."""

    def __init__(self, fail: bool = False, hold: bool = False) -> None:
        self.fail, self.hold = fail, hold
        self.ready, self.state, self.error = False, "created", None
        self.engine = StubEngine()
        self.model_ids = ["adf"]
        self.classes = ("angry", "happy", "neutral", "sad")
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.state = "loading"
        if self.hold:
            await self.release.wait()
        if self.fail:
            self.state, self.error = "failed", "RuntimeError: no such model"
            raise RuntimeError("no such model")
        self.ready, self.state = True, "ready"

    async def stop(self) -> None:
        self.state = "stopped"


class StubStore:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def ping(self) -> None:
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        pass


def client_for(service, store=None) -> TestClient:
    return TestClient(create_app(Settings(), service, store=store), raise_server_exceptions=False)


def wait_state(service, state: str) -> None:
    deadline = time.monotonic() + 5
    while service.state != state and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.state == state


def test_healthz_is_503_once_start_up_failed():
    service = StubService(fail=True)
    with client_for(service) as c:
        wait_state(service, "failed")
        time.sleep(0.05)  # the start task records the failure right after the state flips
        r = c.get("/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "start_failed" and "no such model" in r.json()["detail"]
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert r.json()["checks"]["models"] != "ok" and "Retry-After" in r.headers


def test_healthz_is_200_while_loading():
    service = StubService(hold=True)
    with client_for(service) as c:
        wait_state(service, "loading")
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"


def test_readyz_ok_reports_every_check():
    service = StubService()
    with client_for(service, StubStore()) as c:
        wait_state(service, "ready")
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"models": "ok", "store": "ok", "load": "ok"}


def test_readyz_checks_the_store():
    service = StubService()
    with client_for(service, StubStore(ConnectionError("redis is down"))) as c:
        wait_state(service, "ready")
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["error"] == "store_unavailable" and "redis is down" in body["checks"]["store"]
        assert body["checks"]["models"] == "ok" and "Retry-After" in r.headers
        assert c.get("/healthz").status_code == 200  # alive: restarting would not help


def test_readyz_checks_a_real_redis_store_that_is_down():
    from app.store.redis import RedisStore

    service = StubService()
    with client_for(service, RedisStore("redis://127.0.0.1:1/0")) as c:
        wait_state(service, "ready")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text


def test_readyz_checks_the_asr_lane_load():
    service = StubService()
    limits = LaneLimits(max_queue=10, final_reserve=2)  # REST refused from 8 FINAL + REST waiting
    with client_for(service) as c:
        wait_state(service, "ready")
        service.engine.asr_lane = StubLane(limits, {Priority.FINAL: 3, Priority.REST: 4})
        assert c.get("/readyz").status_code == 200
        service.engine.asr_lane = StubLane(limits, {Priority.FINAL: 3, Priority.REST: 5})
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "overloaded"
        assert "8 jobs waiting" in r.json()["checks"]["load"]


def test_503_is_not_logged_as_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="app.api"):
        r = error_response(QueueFull("asr: 256 jobs queued"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


def test_client_disconnect_mid_upload_is_499_not_an_error(caplog):
    service = StubService()
    service.ready, service.state = True, "ready"
    app = create_app(Settings(), service, store=None)
    sent: list[dict] = []
    chunks = [
        {"type": "http.request", "body": b"RIFF" + b"\0" * 1000, "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"audio/wav"), (b"content-length", b"100000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    before = metrics.HTTP_REQUESTS.labels(route="/v1/predict", method="POST", status="499")._value.get()
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text
    after = metrics.HTTP_REQUESTS.labels(route="/v1/predict", method="POST", status="499")._value.get()
    assert after == before + 1


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
