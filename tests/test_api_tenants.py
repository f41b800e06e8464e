"""Tenants, origin check, auth rate limits and log redaction (app/api/auth.py), without models:
a stub service and a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.api.auth import RedactSecrets, key_id
from app.main import create_app
from app.settings import Settings
from app.store.sqlite import SQLiteStore
from tests.test_health import StubService

START = {"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1}


class Service(StubService):
    def resolve_models(self, models):
        return ["adf"], False


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_client(tmp_path, **overrides):
    values = dict(
        api_keys=["alice:ka", "kb"],
        admin_keys=["root"],
        sqlite_path=tmp_path / "sessions.db",
        auth_fail_burst=0,
        key_rate_per_s=0,
    )
    values.update(overrides)
    settings = Settings(**values)
    store = SQLiteStore(settings.sqlite_path, poll_interval_s=0.2)
    return TestClient(create_app(settings, Service(), store=store)), store


def seed(store: SQLiteStore) -> None:
    async def body():
        await store.open_session("of-alice", source="rest", tenant="alice")
        await store.open_session("of-kb", source="rest", tenant=key_id("kb"))
        await store.open_session("legacy", source="rest")  # before tenants: no owner

    asyncio.run(body())


def ids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {s["id"] for s in response.json()["sessions"]}


def test_sessions_are_scoped_to_their_tenant(tmp_path):
    client, store = make_client(tmp_path)
    seed(store)
    with client as c:
        assert ids(c.get("/v1/sessions", headers=bearer("ka"))) == {"of-alice"}
        assert ids(c.get("/v1/sessions", headers=bearer("kb"))) == {"of-kb"}
        assert ids(c.get("/v1/sessions", headers=bearer("root"))) == {"of-alice", "of-kb", "legacy"}
        for path in ("/v1/sessions/of-alice", "/v1/sessions/of-alice/results", "/v1/sessions/legacy"):
            r = c.get(path, headers=bearer("kb"))
            assert r.status_code == 404 and r.json()["error"] == "session_not_found", (path, r.text)
        assert c.delete("/v1/sessions/of-alice", headers=bearer("kb")).status_code == 404
        mine = c.get("/v1/sessions/of-alice", headers=bearer("ka"))
        assert mine.status_code == 200 and mine.json()["tenant"] == "alice"
        # a plain key is its own tenant, stored as a hash of the key, never the key
        theirs = c.get("/v1/sessions/of-kb", headers=bearer("kb")).json()
        assert theirs["tenant"] == key_id("kb") and "kb" not in theirs["tenant"]
        assert c.get("/v1/sessions/legacy", headers=bearer("root")).status_code == 200
        assert c.delete("/v1/sessions/of-alice", headers=bearer("root")).status_code == 204
        assert c.get("/v1/sessions/of-alice", headers=bearer("ka")).status_code == 404


def test_auth_off_sees_everything(tmp_path):
    client, store = make_client(tmp_path, api_keys=[], admin_keys=[])
    seed(store)
    with client as c:
        assert ids(c.get("/v1/sessions")) == {"of-alice", "of-kb", "legacy"}


def test_predict_into_another_tenants_session_is_404(tmp_path):
    client, store = make_client(tmp_path)
    seed(store)
    with client as c:
        r = c.post(
            "/v1/predict?session_id=of-alice",
            content=b"RIFF....WAVE",
            headers={"Content-Type": "audio/wav", **bearer("kb")},
        )
        assert r.status_code == 404 and r.json()["error"] == "session_not_found", r.text
    assert asyncio.run(store.get_session("of-alice"))["result_count"] == 0


def _ws_close(c: TestClient, start: dict, headers=None, url="/v1/stream"):
    with c.websocket_connect(url, headers=headers or {}) as ws:
        ws.send_text(json.dumps(start))
        try:
            message = ws.receive_json()
        except WebSocketDisconnect as closed:
            return None, closed.code, closed.reason
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        return message, closed.value.code, closed.value.reason


def test_ws_continuing_another_tenants_session_closes_4404(tmp_path):
    client, store = make_client(tmp_path)
    seed(store)
    with client as c:
        message, code, reason = _ws_close(c, {**START, "session_id": "of-alice"}, bearer("kb"))
        assert code == 4404 and json.loads(reason)["error"] == "session_not_found"
        assert message["error"] == "session_not_found"
    assert asyncio.run(store.get_session("of-alice"))["state"] == "active"


def test_ws_session_gets_the_callers_tenant(tmp_path):
    client, store = make_client(tmp_path)
    with client as c:
        with c.websocket_connect("/v1/stream?api_key=ka") as ws:
            ws.send_text(json.dumps({**START, "session_id": "new-one"}))
            assert ws.receive_json()["type"] == "ready"
            ws.send_text(json.dumps({"type": "stop"}))
            assert ws.receive_json()["type"] == "end"
        assert c.get("/v1/sessions/new-one", headers=bearer("ka")).json()["tenant"] == "alice"
        assert c.get("/v1/sessions/new-one", headers=bearer("kb")).status_code == 404


def test_foreign_origin_is_refused(tmp_path):
    client, _ = make_client(tmp_path, api_keys=[], admin_keys=[], cors_origins=["https://app.example"])
    with client as c:
        r = c.post(
            "/v1/predict",
            content=b"x",
            headers={"Content-Type": "audio/wav", "Origin": "https://evil.example"},
        )
        assert r.status_code == 403 and r.json() == {
            "error": "origin_not_allowed",
            "detail": r.json()["detail"],
        }
        r = c.delete("/v1/sessions/abc", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        # allowed origin, same origin and no Origin header (curl) pass the check (404: no such session)
        for headers in ({"Origin": "https://app.example"}, {"Origin": "http://testserver"}, {}):
            assert c.delete("/v1/sessions/abc", headers=headers).status_code == 404, headers
        _, code, reason = _ws_close(c, START, {"Origin": "https://evil.example"})
        assert code == 1008 and json.loads(reason)["error"] == "origin_not_allowed"
        with c.websocket_connect("/v1/stream", headers={"Origin": "https://app.example"}) as ws:
            ws.send_text(json.dumps(START))
            assert ws.receive_json()["type"] == "ready"
            ws.send_text(json.dumps({"type": "stop"}))
            assert ws.receive_json()["type"] == "end"


def test_default_config_refuses_cross_origin_posts(tmp_path):
    client, _ = make_client(tmp_path, api_keys=[], admin_keys=[])
    with client as c:
        r = c.post("/v1/predict", files={"file": ("a.wav", b"x")}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403, r.text


def test_wrong_keys_are_rate_limited_per_address(tmp_path):
    client, _ = make_client(tmp_path, auth_fail_burst=3, auth_fail_per_min=1.0)
    with client as c:
        for _ in range(3):
            assert c.get("/v1/sessions", headers=bearer("guess")).status_code == 401
        r = c.get("/v1/sessions", headers=bearer("guess"))
        assert (
            r.status_code == 429
            and r.json()["error"] == "rate_limited"
            and set(r.json()) == {"error", "detail"}
        )
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # while the address is blocked, even a right key is not looked at
        assert c.get("/v1/sessions", headers=bearer("ka")).status_code == 429
        _, code, reason = _ws_close(c, START, url="/v1/stream?api_key=ka")
        assert code == 1013 and json.loads(reason)["error"] == "rate_limited"


def test_requests_are_rate_limited_per_key(tmp_path):
    client, _ = make_client(tmp_path, key_rate_per_s=0.01, key_rate_burst=3)
    with client as c:
        for _ in range(3):
            assert c.get("/v1/sessions", headers=bearer("ka")).status_code == 200
        r = c.get("/v1/sessions", headers=bearer("ka"))
        assert r.status_code == 429 and r.json()["error"] == "rate_limited" and "Retry-After" in r.headers
        assert c.get("/v1/sessions", headers=bearer("kb")).status_code == 200  # other keys unaffected


def test_api_key_is_masked_in_uvicorn_logs(tmp_path):
    import io

    client, _ = make_client(tmp_path)
    access = logging.getLogger("uvicorn.access")
    error = logging.getLogger("uvicorn.error")
    assert any(isinstance(f, RedactSecrets) for f in access.filters)
    # a handler of our own: a uvicorn started earlier in this process stops these loggers propagating
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    levels = access.level, error.level
    for logger in (access, error):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        access.info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", "/v1/stream?api_key=ka&x=1", "1.1", 101)
        error.info('%s - "WebSocket %s" [accepted]', ("1.2.3.4", 5), "/v1/stream?api_key=sekret")
    finally:
        for logger, level in zip((access, error), levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    text = buf.getvalue()
    assert "ka&" not in text and "sekret" not in text
    assert "api_key=***&x=1" in text and "api_key=***" in text


def test_api_keys_as_a_json_mapping():
    s = Settings(api_keys='{"alice": "ka", "bob": ["kb1", "kb2"]}', admin_keys="root")
    assert s.api_keys == ["alice:ka", "bob:kb1", "bob:kb2"] and s.admin_keys == ["root"]
