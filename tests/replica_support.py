"""Helpers for the replica test: real server processes and nginx (deploy/nginx.conf) on loopback.

``ServerProcess`` runs ``python -m app.cli serve`` on a free loopback port with the environment it
is given (the same entry point as ``emotion-server serve``), logs to a file, and can be killed with
SIGKILL (``kill -9``). ``nginx_proxy`` runs the Debian ``nginx`` binary (installed by
``make system-deps``) with the shipped ``deploy/nginx.conf``, rewritten only where a loopback test
must differ: the upstream servers, the listen address, the include path of
``deploy/nginx-proxy.conf``, one worker, and pid/log/temp paths in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.stream_support import free_port, wait_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


class ServerProcess:
    """One emotion-server process (a replica) on a free loopback port."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path):
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def nginx_binary() -> str | None:
    """The nginx binary (root's PATH has /usr/sbin; other users' may not)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx.conf changed: expected one {old!r}"
    return text.replace(old, new)


def nginx_conf_for(upstream_ports: list[int], listen_port: int, workdir: Path) -> str:
    """deploy/nginx.conf for loopback: its own upstreams, port, paths; everything else as shipped."""
    text = (DEPLOY / "nginx.conf").read_text()
    servers = "\n        ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in upstream_ports)
    head = f"worker_processes 1;\npid {workdir}/nginx.pid;\n"
    if os.geteuid() == 0:  # workers would run as nobody and could not use the private temp paths
        head += "user root;\n"
    text = _replace_once(text, "worker_processes auto;\n", head)
    temp = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = _replace_once(
        text,
        "    access_log /dev/stdout;\n",
        temp
        + "    log_format replicas '$msec \"$request\" $status upstream=$upstream_addr';\n"
        + f"    access_log {workdir}/access.log replicas;\n",
    )
    text = _replace_once(text, "error_log /dev/stderr warn;", f"error_log {workdir}/error.log warn;")
    text = _replace_once(text, "server server:8000 max_fails=1 fail_timeout=10s;", servers)
    text = _replace_once(text, "listen 80;", f"listen 127.0.0.1:{listen_port};")
    return _replace_once(
        text, "include /etc/nginx/emotion-proxy.conf;", f"include {DEPLOY / 'nginx-proxy.conf'};"
    )


@contextlib.contextmanager
def nginx_proxy(upstream_ports: list[int], workdir: Path) -> Iterator[int]:
    """Run nginx in front of ``upstream_ports``; yield its loopback port."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf_for(upstream_ports, port, workdir))
    log = open(workdir / "nginx.out", "wb")
    cmd = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"), "-g", "daemon off;"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(port)
        except TimeoutError:
            raise RuntimeError(
                f"nginx did not start: {(workdir / 'nginx.out').read_text()}"
                f"{(workdir / 'error.log').read_text() if (workdir / 'error.log').exists() else ''}"
            ) from None
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
