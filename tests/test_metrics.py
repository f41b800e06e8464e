"""GET /metrics exposes the service's metrics with the expected names and values."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.main import create_app
from tests.serving_helpers import ALL_MODELS, ANGRY, make_service, wait_ready


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    service = make_service(tmp_path_factory.mktemp("metrics"))
    app = create_app(service.settings, service, store=None)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in the exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if got == want:
            return float(m.group(3))
    return 0.0


def test_metrics_after_requests(client):
    before = client.get("/metrics").text
    r = client.post("/v1/predict", content=ANGRY.read_bytes(), headers={"Content-Type": "audio/flac"})
    assert r.status_code == 200
    bad = client.post("/v1/predict", content=b"junk", headers={"Content-Type": "audio/wav"})
    assert bad.status_code == 415
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text

    for name in (
        "emotion_http_requests_total",
        "emotion_http_request_duration_seconds_bucket",
        "emotion_requests_in_flight",
        "emotion_streams_in_flight",
        "emotion_queue_wait_seconds_bucket",
        "emotion_batch_size_bucket",
        "emotion_inference_seconds_bucket",
        "emotion_asr_seconds_bucket",
        "emotion_audio_seconds_total",
        "emotion_errors_total",
        "emotion_ready",
        "emotion_model_info",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} missing"

    def delta(name, **labels):
        return sample(text, name, **labels) - sample(before, name, **labels)

    route = dict(route="/v1/predict", method="POST")
    assert delta("emotion_http_requests_total", status="200", **route) == 1
    assert delta("emotion_http_requests_total", status="415", **route) == 1
    assert delta("emotion_http_request_duration_seconds_count", status="200", **route) == 1
    assert delta("emotion_errors_total", type="unsupported_audio") == 1
    assert delta("emotion_audio_seconds_total", source="rest") == pytest.approx(3.87, abs=0.01)
    assert delta("emotion_asr_seconds_count") == 1
    for mid in ALL_MODELS:
        assert delta("emotion_batch_size_count", model=mid) == 1
        assert delta("emotion_batch_size_sum", model=mid) == 1
        assert delta("emotion_inference_seconds_count", model=mid) == 1
        assert delta("emotion_queue_wait_seconds_count", queue=mid) == 1
    assert sample(text, "emotion_ready") == 1
    assert sample(text, "emotion_requests_in_flight") == 1  # this very /metrics request


def test_unmatched_paths_share_one_label(client):
    client.get("/no/such/path/12345")
    text = client.get("/metrics").text
    assert "/no/such/path" not in text
    assert sample(text, "emotion_http_requests_total", route="unmatched", method="GET", status="404") >= 1


def test_streams_gauge_is_importable():
    before = metrics.STREAMS_IN_FLIGHT._value.get()
    metrics.STREAMS_IN_FLIGHT.inc()
    assert metrics.STREAMS_IN_FLIGHT._value.get() == before + 1
    metrics.STREAMS_IN_FLIGHT.dec()
