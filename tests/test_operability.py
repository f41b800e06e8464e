"""Operability: JSON logs with request/session ids, process metrics, .env, unknown-variable
warnings, ``emotion-server --version`` and ``config``.

No models are loaded: the app is built around a stub service and its lifespan is not run.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import WebSocket
from fastapi.testclient import TestClient

from app import metrics
from app.cli import build_parser, package_version
from app.main import create_app
from app.observability import (
    REQUEST_ID,
    SESSION_ID,
    ContextFilter,
    JsonFormatter,
    redacted_settings,
    unknown_env_vars,
    warn_unknown_env_vars,
)
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class _StubService:
    def __init__(self, settings: Settings):
        self.settings = settings

    async def start(self) -> None:  # pragma: no cover - the lifespan is not run here
        pass

    async def stop(self) -> None:  # pragma: no cover
        pass


@pytest.fixture
def json_log():
    """Lines logged to ``test.operability`` as JSON (a handler as ``configure_logging`` makes it)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.operability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger, lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def app(tmp_path):
    settings = Settings(sqlite_path=tmp_path / "s.db", api_keys=[])
    app = create_app(settings, _StubService(settings), store=None)  # type: ignore[arg-type]
    logger = logging.getLogger("test.operability")

    @app.get("/_log")
    async def log_something() -> dict:
        logger.info("handling")
        await asyncio.create_task(asyncio.sleep(0))  # a task created here shares the ids
        return {"ok": True}

    @app.websocket("/_ws")
    async def ws_stream(ws: WebSocket) -> None:
        await ws.accept()
        session_id = await ws.receive_text()
        SESSION_ID.set(session_id)  # as app/api/stream.py does once the session id is known

        async def final() -> None:
            logger.info("final sent")

        await asyncio.create_task(final())  # like the session's finals task
        await ws.send_text("done")
        await ws.close()

    return app


# --- JSON logs ------------------------------------------------------------------------------------


def test_json_lines_outside_a_request_have_null_ids(json_log):
    logger, lines = json_log
    logger.warning("plain %s", "message")
    (line,) = lines()
    assert line["message"] == "plain message" and line["level"] == "warning"
    assert line["logger"] == "test.operability"
    assert line["request_id"] is None and line["session_id"] is None
    assert line["ts"].endswith("Z")


def test_filter_reads_the_context_variables(json_log):
    logger, lines = json_log
    rt, st = REQUEST_ID.set("req-1"), SESSION_ID.set("sess-1")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        SESSION_ID.reset(st)
        REQUEST_ID.reset(rt)
    (line,) = lines()
    assert line["request_id"] == "req-1" and line["session_id"] == "sess-1"
    assert "ValueError: boom" in line["exc"]


def test_text_format_is_the_default():
    assert Settings().log_format == "text"


def test_request_id_generated_echoed_and_logged(app, json_log):
    _, lines = json_log
    client = TestClient(app)
    r = client.get("/_log")
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    (line,) = lines()
    assert line["message"] == "handling" and line["request_id"] == rid
    assert REQUEST_ID.get() is None  # reset after the request


def test_incoming_request_id_is_kept_and_a_bad_one_replaced(app, json_log):
    _, lines = json_log
    client = TestClient(app)
    r = client.get("/_log", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r2 = client.get("/_log", headers={"X-Request-ID": 'evil" injected\tvalue'})
    assert r2.headers["x-request-id"] != 'evil" injected\tvalue'
    assert [line["request_id"] for line in lines()] == ["abc-123", r2.headers["x-request-id"]]
    # every route has it, also the built-in ones (and 404s)
    assert client.get("/nope").headers["x-request-id"]


def test_stream_lines_carry_request_and_session_ids(app, json_log):
    _, lines = json_log
    client = TestClient(app)
    with client.websocket_connect("/_ws", headers={"X-Request-ID": "ws-req"}) as ws:
        ws.send_text("sess-42")
        assert ws.receive_text() == "done"
    (line,) = lines()
    assert line["message"] == "final sent"
    assert line["request_id"] == "ws-req" and line["session_id"] == "sess-42"


def test_configure_logging_json(capsys):
    from app.observability import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json")
        rt = REQUEST_ID.set("r-9")
        try:
            logging.getLogger("uvicorn.error").info("from uvicorn")
        finally:
            REQUEST_ID.reset(rt)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["logger"] == "uvicorn.error" and line["request_id"] == "r-9"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_have_process_gc_and_final_latency(app):
    metrics.STREAM_FINAL_LATENCY.observe(0.3)
    text = TestClient(app).get("/metrics").text
    for name in (
        "process_resident_memory_bytes",
        "python_gc_objects_collected_total",
        "python_info",
        "emotion_stream_final_latency_seconds_bucket",
        "emotion_stream_final_latency_seconds_count",
    ):
        assert any(line.startswith(name) for line in text.splitlines()), name


# --- settings: .env and unknown variables ---------------------------------------------------------


def test_dotenv_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMOTION_PORT", raising=False)
    monkeypatch.delenv("EMOTION_LOG_FORMAT", raising=False)
    assert Settings().port == 8000  # no .env: defaults
    (tmp_path / ".env").write_text("EMOTION_PORT=9123\nEMOTION_LOG_FORMAT=json\nOTHER=1\n")
    s = Settings()
    assert s.port == 9123 and s.log_format == "json"
    monkeypatch.setenv("EMOTION_PORT", "9200")
    assert Settings().port == 9200


def test_unknown_variables_are_warned_with_the_closest_name(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("EMOTION_STREAM_MAX_STREAM=3\n")
    env = {"EMOTION_ASR_BEAMSIZE": "3", "EMOTION_PORT": "1", "EMOTION_API_KEY": "k", "EMOTION_ZZZZ": "1"}
    found = unknown_env_vars(env)
    assert found == [
        ("EMOTION_ASR_BEAMSIZE", "EMOTION_ASR_BEAM_SIZE"),
        ("EMOTION_ZZZZ", None),
        ("EMOTION_STREAM_MAX_STREAM", "EMOTION_STREAM_MAX_STREAMS"),
    ]
    monkeypatch.setenv("EMOTION_ASR_BEAMSIZE", "3")
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        warn_unknown_env_vars()
    text = caplog.text
    assert "EMOTION_ASR_BEAMSIZE" in text and "did you mean EMOTION_ASR_BEAM_SIZE?" in text


# --- CLI --------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"emotion-server {package_version()}"
    assert package_version() != "unknown"


def test_redaction():
    s = Settings(
        api_keys=["tenant:sekret1", "sekret2"],
        admin_keys=["adminsekret"],
        redis_url="redis://user:pw-sekret@redis.example:6380/1",
    )
    data = redacted_settings(s)
    dumped = json.dumps(data)
    assert "sekret" not in dumped
    assert data["api_keys"] == ["***", "***"] and data["admin_keys"] == ["***"]
    assert data["redis_url"] == "redis://user:***@redis.example:6380/1"
    assert data["port"] == s.port and data["key_rate_per_s"] == s.key_rate_per_s  # not a secret
    plain = redacted_settings(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert plain["redis_url"] == "redis://127.0.0.1:6379/0"


def test_config_command_prints_redacted_settings(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "EMOTION_API_KEYS": "t1:topsecret",
        "EMOTION_REDIS_URL": "redis://:hunter2@localhost:6379/0",
        "EMOTION_PORT": "9001",
        "EMOTION_ASR_BEAMSIZE": "2",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["port"] == 9001 and data["api_keys"] == ["***"]
    assert "hunter2" not in out.stdout and "topsecret" not in out.stdout
    assert data["redis_url"] == "redis://:***@localhost:6379/0"
    assert "did you mean EMOTION_ASR_BEAM_SIZE?" in out.stderr


# --- a live stream (uvicorn in a thread, dummy emotion models, real ASR) ------------------------------


def test_live_stream_logs_carry_session_id_and_final_latency_is_observed(tmp_path):
    from app.streaming.client import stream_file
    from tests.test_stream_ws import TWO_UTT, LiveServer

    def final_count() -> float:
        samples = metrics.STREAM_FINAL_LATENCY.collect()[0].samples
        return next(s.value for s in samples if s.name.endswith("_count"))

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    app_logger = logging.getLogger("app")
    saved_level = app_logger.level
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    srv = LiveServer(tmp_path)
    srv.start()
    try:
        before = final_count()
        run = asyncio.run(stream_file(TWO_UTT, srv.ws, realtime=False, session_id="ops-sess", timeout_s=120))
        assert len(run.of_type("final")) == 2
        assert final_count() - before == 2
    finally:
        srv.stop()
        app_logger.removeHandler(handler)
        app_logger.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ended = [line for line in lines if line["message"].startswith("stream ops-sess ended")]
    assert ended, lines
    assert ended[0]["session_id"] == "ops-sess" and len(ended[0]["request_id"] or "") == 32
