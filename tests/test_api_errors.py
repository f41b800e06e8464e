"""Every bad request gets its precise status and the JSON body {"error", "detail"}; the server
keeps serving afterwards. One app with small limits (5 s of audio, 200 kB uploads)."""

from __future__ import annotations

import io
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.errors import DeadlineExceededError, QueueFull
from app.main import create_app
from tests.serving_helpers import ANGRY, make_service, wait_ready, wav_bytes

FUZZ_CORPUS = Path(__file__).parent / "fixtures" / "fuzz"

LIMIT_BYTES = 200_000


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    service = make_service(
        tmp_path_factory.mktemp("errors"), max_audio_seconds=5.0, max_upload_bytes=LIMIT_BYTES
    )
    app = create_app(service.settings, service, store=None)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def expect(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def raw(client, data: bytes, content_type: str = "audio/wav", query: str = ""):
    return client.post(f"/v1/predict{query}", content=data, headers={"Content-Type": content_type})


def upload(client, data: bytes, query: str = "", **form):
    return client.post(
        f"/v1/predict{query}", files={"file": ("clip", data, "application/octet-stream")}, data=form
    )


def wav_with_rate(rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(2000, np.int16).tobytes())
    return buf.getvalue()


def noise(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((int(seconds * rate), channels)).astype(np.float32) * 0.1
    return x[:, 0] if channels == 1 else x


# --- audio content ------------------------------------------------------------------------------


def test_empty_body(client):
    expect(raw(client, b""), 422, "empty_audio")
    expect(upload(client, b""), 422, "empty_audio")


def test_garbage_bytes(client):
    garbage = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    expect(upload(client, garbage), 415, "unsupported_audio")


def test_truncated_files(client):
    expect(upload(client, ANGRY.read_bytes()[:40]), 415, "unsupported_audio")  # header only
    expect(upload(client, wav_bytes(np.zeros(1600, np.float32))[:44]), 422, "empty_audio")  # no frames
    # cut in the middle: what decodes is kept, as players do
    data = ANGRY.read_bytes()
    assert upload(client, data[: len(data) * 3 // 4]).status_code == 200


def test_crafted_file_that_crashed_the_server(client):
    # an M4A whose AAC header says stereo and whose 4th frame has 38 channels: it used to SIGSEGV
    crafted = (FUZZ_CORPUS / "m4a_pce38_packet4.m4a").read_bytes()
    for _ in range(3):
        body = expect(upload(client, crafted), 422, "undecodable_audio")
        assert "38 channels" in body["detail"]
    expect(upload(client, (FUZZ_CORPUS / "wav_bps0.wav").read_bytes()), 415, "unsupported_audio")
    expect(upload(client, (FUZZ_CORPUS / "adts_stereo_then_mono.aac").read_bytes()), 422, "undecodable_audio")
    assert upload(client, ANGRY.read_bytes()).status_code == 200


def test_dead_decoder_process_is_422_and_replaced(client, monkeypatch):
    from app.analysis import decoding
    from tests.test_decoding import MisbehavingPool

    pool = MisbehavingPool(workers=1, memory_mb=1024, timeout_s=5.0)
    monkeypatch.setattr(decoding, "pool_for", lambda settings: pool)
    try:
        body = expect(upload(client, b"CRASH" + bytes(2000)), 422, "undecodable_audio")
        assert "crashed" in body["detail"]
        r = upload(client, ANGRY.read_bytes())  # the same pool, with a fresh worker
        assert r.status_code == 200, r.text
        assert pool.stats["crashes"] == 1 and pool.stats["started"] == 2
    finally:
        pool.close()


def test_session_results_after_beyond_int64(client):
    expect(client.get(f"/v1/sessions/abc/results?after={2**63}"), 422, "invalid_request")
    expect(client.get("/v1/sessions/abc/results?after=-1"), 422, "invalid_request")
    # in range: validation passes (this app has no session store)
    expect(client.get(f"/v1/sessions/abc/results?after={2**63 - 1}"), 503, "store_unavailable")


def test_too_many_channels(client):
    expect(upload(client, wav_bytes(noise(0.5, channels=3))), 422, "too_many_channels")


def test_absurd_sample_rates(client):
    expect(upload(client, wav_with_rate(1_000_000)), 422, "bad_sample_rate")
    expect(upload(client, wav_with_rate(100)), 422, "bad_sample_rate")


def test_nan_samples(client):
    x = noise(0.5)
    x[100] = np.nan
    expect(upload(client, wav_bytes(x, subtype="FLOAT")), 422, "invalid_samples")


def test_too_long_audio(client):
    body = expect(
        upload(client, wav_bytes(noise(6.0))), 413, "audio_too_long"
    )  # 192 kB: under the byte limit
    assert "limit" in body["detail"]


def test_too_big_upload_by_content_length(client):
    expect(raw(client, b"\0" * (LIMIT_BYTES + 1)), 413, "upload_too_large")
    expect(upload(client, b"\0" * (LIMIT_BYTES + 1)), 413, "upload_too_large")


def test_too_big_upload_streamed_without_length(client):
    def chunks():
        for _ in range(30):
            yield b"\0" * 10_000

    r = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "audio/wav"})
    expect(r, 413, "upload_too_large")


def test_silence_has_no_speech(client):
    expect(upload(client, wav_bytes(np.zeros(32000, np.float32))), 422, "no_speech")
    # separate mode: two silent channels are still no speech at all
    expect(
        upload(client, wav_bytes(np.zeros((32000, 2), np.float32)), "?channels=separate"), 422, "no_speech"
    )


# --- request shape ------------------------------------------------------------------------------


def test_unknown_model(client):
    body = expect(upload(client, ANGRY.read_bytes(), "?models=adf,nope"), 400, "unknown_model")
    assert "nope" in body["detail"]


def test_missing_file(client):
    expect(
        client.post("/v1/predict", data={"models": "adf"}, files={"other": ("x", b"abc")}),
        400,
        "missing_file",
    )
    expect(client.post("/v1/predict"), 400, "missing_file")


def test_wrong_content_type(client):
    expect(raw(client, b"hello", "text/plain"), 415, "unsupported_media_type")


def test_malformed_multipart(client):
    r = client.post("/v1/predict", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    expect(r, 400, "bad_request")


def test_bad_options(client):
    data = ANGRY.read_bytes()
    expect(upload(client, data, "?channels=both"), 422, "invalid_request")
    expect(upload(client, data, "?words=maybe"), 422, "invalid_request")
    expect(upload(client, data, "?session_id=../etc"), 422, "invalid_request")
    expect(upload(client, data, channels="both"), 422, "invalid_request")  # as a form field


def test_unknown_route_and_method(client):
    expect(client.get("/v2/nothing"), 404, "not_found")
    expect(client.get("/v1/predict"), 405, "method_not_allowed")


def test_session_id_without_store(client):
    expect(upload(client, ANGRY.read_bytes(), "?session_id=abc"), 503, "store_unavailable")


# --- server-side conditions -------------------------------------------------------------------


def test_queue_full_is_503_with_retry_after(client, monkeypatch):
    async def full(*args, **kwargs):
        raise QueueFull("asr: 256 jobs queued", retry_after=2)

    monkeypatch.setattr(client.app.state.service.engine, "run_cpu", full)
    r = upload(client, ANGRY.read_bytes())
    expect(r, 503, "queue_full")
    assert r.headers["Retry-After"] == "2"


def test_deadline_is_504(client, monkeypatch):
    async def late(*args, **kwargs):
        raise DeadlineExceededError("no result within 120 s")

    monkeypatch.setattr(client.app.state.service.engine, "run_cpu", late)
    expect(upload(client, ANGRY.read_bytes()), 504, "deadline_exceeded")


def test_unexpected_exception_is_500_json(client, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app.state.service.engine, "run_cpu", broken)
    body = expect(upload(client, ANGRY.read_bytes()), 500, "internal_error")
    assert "secret" not in body["detail"]


def test_still_serving_after_all_errors(client):
    r = upload(client, ANGRY.read_bytes())
    assert r.status_code == 200, r.text
    assert "door" in r.json()["transcript"].lower()
    assert client.get("/healthz").json() == {"status": "ok"}


# --- readiness --------------------------------------------------------------------------------


def test_not_ready_when_start_fails(tmp_path):
    service = make_service(tmp_path, models=["adf", "no-such-model"])
    app = create_app(service.settings, service, store=None)
    with TestClient(app) as c:
        for _ in range(600):
            if service.state == "failed":
                break
            time.sleep(0.05)
        time.sleep(0.1)  # the start task records the failure right after the state flips
        expect(c.get("/healthz"), 503, "start_failed")  # failed, not loading: restart the process
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready", r.text
        assert "no-such-model" in r.json()["detail"] and "no-such-model" in r.json()["checks"]["models"]
        assert "Retry-After" in r.headers
        r = upload(c, ANGRY.read_bytes())
        expect(r, 503, "not_ready")
        assert "Retry-After" in r.headers
