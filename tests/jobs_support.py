"""Helpers for the job and webhook tests: a webhook receiver on loopback, a live server on real models.

``Receiver``: an ``http.server`` in a thread that records every request (arrival time, headers, raw
body) and answers with scripted statuses (then 200). ``JobServer``: uvicorn in a thread serving
``create_app`` with the shipped models (``models/``), the shared Analyzer, and a given data
directory, so a test can stop it and start a new one on the same SQLite files (a restart).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from app.settings import REPO_ROOT
from tests.serving_helpers import FIXTURES, make_service

SECRET = "test-secret-0123456789abcdef"
# ~20 s: the four fixture utterances (four utterances) with 1 s of silence between them
PARTS = ("kids_angry_a01.flac", "dogs_neutral_a02.flac", "happy_dogs.flac", "angry_kids.flac")


def long_recording_wav(repeat: int = 1) -> tuple[bytes, float]:
    """A WAV of the PARTS (``repeat`` times) with 1-s gaps (0.5 s at the ends), and its duration."""
    from app.analysis.audio import decode

    gap, edge = np.zeros(16000, np.float32), np.zeros(8000, np.float32)
    parts = PARTS * repeat
    pieces = [edge]
    for i, name in enumerate(parts):
        pieces.append(decode(FIXTURES / name).mono)
        pieces.append(gap if i < len(parts) - 1 else edge)
    audio = np.concatenate(pieces)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(audio) / 16000


@dataclass
class Hit:
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: ``statuses`` are answered first, then 200."""

    statuses: list[int] = field(default_factory=list)
    port: int = 0
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hits.append(Hit(time.monotonic(), dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_for(predicate, timeout_s: float = 30.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError("condition not met in time")


class JobServer:
    """uvicorn in a thread, the shipped models, data under ``tmp``; ``start``/``stop`` repeatable."""

    def __init__(self, tmp: Path, port: int, **overrides):
        self.tmp = tmp
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.overrides = dict(model_dir=REPO_ROOT / "models", models=["cmt-awc", "ca-mser", "adf", "3m-ser"])
        self.overrides.update(overrides)
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, **overrides) -> JobServer:
        import uvicorn

        from app.main import create_app

        service = make_service(self.tmp, **{**self.overrides, **overrides})
        app = create_app(service.settings, service)
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="jobs-uvicorn", daemon=True)
        self._thread.start()
        wait_for(self._ready, timeout_s=180, every_s=0.1)
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=60)
            self._server = None

    def request(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.request(method, self.base + path, headers=headers, timeout=kw.pop("timeout", 60), **kw)
