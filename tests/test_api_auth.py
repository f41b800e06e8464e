"""API keys: /v1 routes and /predict need ``Authorization: Bearer <key>``; health and metrics stay open."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.serving_helpers import ANGRY, make_service, wait_ready

KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    service = make_service(
        tmp_path_factory.mktemp("auth"), api_keys=KEYS, cors_origins=["https://app.example"]
    )
    app = create_app(service.settings, service, store=None)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def post(client, headers=None, path="/v1/predict"):
    return client.post(
        path, content=ANGRY.read_bytes(), headers={"Content-Type": "audio/flac", **(headers or {})}
    )


@pytest.mark.parametrize("path", ["/v1/predict", "/predict"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}, {"Authorization": "Basic key-one"}],
)
def test_rejected_without_a_valid_key(client, path, headers):
    r = post(client, headers, path)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized" and set(r.json()) == {"error", "detail"}
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_models_listing_needs_the_key(client):
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200


def test_accepted_with_any_configured_key(client):
    for key in KEYS:
        r = post(client, {"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    assert post(client, {"Authorization": "bearer key-one"}, "/predict").status_code == 200


def test_health_metrics_and_docs_stay_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_cors_headers(client):
    r = client.options(
        "/v1/predict",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    denied = post(client, {"Origin": "https://app.example"})  # an error response still carries CORS
    assert (
        denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
    )
