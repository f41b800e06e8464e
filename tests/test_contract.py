"""The documented contract matches what the server sends: every 422 (and 401/503 of the session
routes) is ``{error, detail}`` in the OpenAPI spec, except on the OpenAI-compatible route, whose
errors (401 included, raised by the API-key dependency) have OpenAI's shape; the API version is
2.0.0 (result shape v2); deeply nested JSON on the WebSocket is a client error (1007), not a server
fault (1011). A stub service: no models are loaded."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.main import create_app
from app.settings import Settings
from app.store import StoreBusy
from tests.test_health import StubService

ERROR_REF = "#/components/schemas/ErrorBody"
OPENAI_ERROR_REF = "#/components/schemas/OpenAIErrorBody"
OPENAI_PATH = "/v1/audio/transcriptions"


def schema_ref(op: dict, status: str) -> str | None:
    return op["responses"][status]["content"]["application/json"]["schema"].get("$ref")


@pytest.fixture(scope="module")
def spec() -> dict:
    return create_app(Settings(), StubService(), store=None).openapi()


def test_every_422_is_the_error_body(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    ops = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert ops
    for path, method, op in ops:
        assert schema_ref(op, "422") == (OPENAI_ERROR_REF if path == OPENAI_PATH else ERROR_REF), (
            path,
            method,
        )


def test_api_version_and_the_changes_it_lists(spec):
    info = spec["info"]
    assert info["version"] == "2.0.0"
    for moved in ("Changes in 2.0", "ranking", "per_model", "ensemble", "words", "roles", "text_sentiment"):
        assert moved in info["description"], moved
    op = spec["paths"][OPENAI_PATH]["post"]
    for status in ("400", "401", "503"):
        assert schema_ref(op, status) == OPENAI_ERROR_REF, status
    assert "text/plain" in op["responses"]["200"]["content"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"file", "model", "response_format", "timestamp_granularities[]"} <= set(form)


def test_openai_route_answers_a_missing_key_in_openais_shape():
    settings = Settings(api_keys=["k1"], auth_fail_burst=0)
    with TestClient(create_app(settings, StubService(), store=None)) as c:
        r = c.post(OPENAI_PATH, files={"file": ("a.wav", b"RIFF")})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json() == {
            "error": {
                "message": r.json()["error"]["message"],
                "type": "authentication_error",
                "param": None,
                "code": "unauthorized",
            }
        }
        # the rest of the API keeps its own shape
        assert c.post("/v1/predict").json()["error"] == "unauthorized"


def test_session_routes_declare_401_and_503(spec):
    session_ops = [
        (path, method, op)
        for path, item in spec["paths"].items()
        if path.startswith("/v1/sessions")
        for method, op in item.items()
    ]
    # list, get, delete, results (long poll), summary, alerts, events (SSE)
    assert len(session_ops) == 7
    for path, method, op in session_ops:
        for status in ("401", "503"):
            assert schema_ref(op, status) == ERROR_REF, (path, method, status)
    for path in ("/v1/predict", "/v1/models"):
        assert schema_ref(next(iter(spec["paths"][path].values())), "401") == ERROR_REF


def test_store_busy_long_poll_is_503_with_retry_after():
    class BusyStore:
        async def get_session(self, session_id):
            return {"id": session_id, "state": "active"}

        async def results(self, *args, **kwargs):
            raise StoreBusy("every long-poll connection is in use; retry later")

        async def close(self):
            pass

    with TestClient(create_app(Settings(), StubService(), store=BusyStore())) as c:
        r = c.get("/v1/sessions/abc/results?wait=5")
        assert r.status_code == 503 and r.json()["error"] == "store_busy", r.text
        assert r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("depth", [40, 900, 20_000])
def test_deeply_nested_ws_json_closes_1007(depth):
    message = '{"type": "start", "metadata": {"a": ' + "[" * depth + "]" * depth + "}}"
    with TestClient(create_app(Settings(), StubService(), store=None)) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_text(message)
            error = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
    assert error["type"] == "error" and error["error"] == "invalid_payload", error
    assert error["close_code"] == 1007 and closed.value.code == 1007, closed.value


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_without_a_cdn(page):
    """/docs and /redoc reference only assets this server serves (they work offline), and those
    assets are there."""
    import re

    client = TestClient(create_app(Settings(), StubService(), store=None))
    html = client.get(page).text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assets = [u for u in urls if not u.startswith("#")]
    assert assets, html
    for url in assets:
        assert url.startswith("/"), f"{page} loads {url} from another host"
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url
    assert "http://" not in html and "https://" not in html
