"""HTTP server limits against a live uvicorn on loopback, with raw sockets: oversized headers,
headers that never finish, a Content-Length larger than the body; the server keeps answering.
A stub service (no models): the limits are the server's, not the routes'."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from app.api.limits import server_options
from app.main import create_app
from app.settings import Settings
from tests.stream_support import free_port
from tests.test_health import StubService

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server():
    import uvicorn

    settings = Settings(
        http_max_header_bytes=16 * 1024,
        http_header_timeout_s=HEADER_TIMEOUT_S,
        body_read_timeout_s=BODY_TIMEOUT_S,
        http_keep_alive_s=2,
    )
    service = StubService()
    app = create_app(settings, service, store=None)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **server_options(settings)
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="limits-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200 and service.ready:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield port, base
    srv.should_exit = True
    thread.join(timeout=10)


def read_reply(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``timeout_s``), and the time it took. A reset
    is a close: a server that closes with our unread bytes in its buffer sends RST, and whether that
    surfaces in our last ``sendall`` or in ``recv`` is timing."""
    sock.settimeout(timeout_s)
    t0, data = time.monotonic(), b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - t0


def still_serving(base: str) -> None:
    assert httpx.get(base + "/healthz", timeout=5).status_code == 200


def test_oversized_headers_are_refused(server):
    port, base = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(64):  # up to 4 MiB of headers; the server stops reading long before
                s.sendall(b"X-Junk: " + b"a" * 65536 + b"\r\n")
        except OSError:  # reset by the server: refused
            pass
        reply, took = read_reply(s, 10)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431") or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert took < 5
    still_serving(base)


def test_incomplete_headers_time_out(server):
    port, base = server
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        still_serving(base)  # others are served meanwhile
        for s in socks:
            reply, took = read_reply(s, HEADER_TIMEOUT_S + 5)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert took < HEADER_TIMEOUT_S + 3
    finally:
        for s in socks:
            s.close()
    still_serving(base)


def test_silent_connection_is_closed(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        reply, took = read_reply(s, HEADER_TIMEOUT_S + 5)
    assert took < HEADER_TIMEOUT_S + 3


def test_body_shorter_than_content_length_is_408(server):
    port, base = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: 100000\r\n\r\nRIFF" + b"\0" * 1000
        )
        t0 = time.monotonic()
        reply, _ = read_reply(s, BODY_TIMEOUT_S + 5)
        took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b'"error":"request_timeout"' in reply.replace(b" ", b"")
    assert took < BODY_TIMEOUT_S + 3
    still_serving(base)


def test_slow_body_is_408(server):
    port, base = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 1000\r\n\r\n"
        )
        t0 = time.monotonic()
        s.settimeout(0.2)
        reply = b""
        for _ in range(40):  # one byte every 0.2 s: would take 200 s
            try:
                s.sendall(b"\0")
                reply += s.recv(65536)
            except (TimeoutError, OSError):
                pass
            if reply:
                break
        reset = False
        try:
            rest, _ = read_reply(s, 3)
            reply += rest
        except ConnectionResetError:
            # the client was still sending when the server closed after its 408: the kernel may
            # then reset the connection and drop the unread reply. Either way the slow body was cut.
            reset = True
        took = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408") or (reset and not reply), reply[:300]
    assert took < BODY_TIMEOUT_S + 3
    still_serving(base)
