"""Overload benchmark for ``/v1/predict`` admission control (not a test).

Starts a server (uvicorn, loopback only, in a child process) and drives it with ``--concurrency``
closed-loop clients for ``--seconds``, each posting a speech clip over and over. Reports the admitted
(200) requests' p50/p95 latency, the 503 answers (and how many carried Retry-After), other statuses,
and the peak RSS of the server process (VmHWM) and its decoder children.

    python bench/overload_bench.py                                   # concurrency 64 for 60 s, real models
    python bench/overload_bench.py --seconds 5 --concurrency 4 --dummy-models   # smoke run

Every loop is bounded: by the deadline, and by ``--max-requests`` per client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = ROOT / "tests" / "fixtures" / "angry_kids.flac"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # children forked by any thread
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids + [g for k in kids for g in children(k)]


def start_server(args, port: int, workdir: Path) -> subprocess.Popen:
    env = dict(os.environ, EMOTION_HOST="127.0.0.1", EMOTION_PORT=str(port))
    env["EMOTION_SQLITE_PATH"] = str(workdir / "sessions.db")
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    if args.dummy_models:
        sys.path.insert(0, str(ROOT))
        from tests.serving_helpers import ALL_MODELS, write_dummy_models

        env["EMOTION_MODEL_DIR"] = str(write_dummy_models(workdir / "models"))
        env["EMOTION_MODELS"] = ",".join(ALL_MODELS)
    code = (
        "import uvicorn; from app.main import create_app; from app.settings import Settings;"
        "s = Settings(); uvicorn.run(create_app(s), host='127.0.0.1', port=s.port, log_level='warning')"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


async def drive(base: str, clip: bytes, args) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    retry_after = 0
    errors = 0
    deadline = time.monotonic() + args.seconds
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal retry_after, errors
            for _ in range(args.max_requests):
                if time.monotonic() >= deadline:
                    return
                t0 = time.monotonic()
                try:
                    r = await client.post(
                        "/v1/predict", content=clip, headers={"Content-Type": "application/octet-stream"}
                    )
                except httpx.HTTPError:
                    errors += 1
                    await asyncio.sleep(0.1)
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(time.monotonic() - t0)
                elif r.status_code == 503:
                    if "retry-after" in r.headers:
                        retry_after += 1
                    await asyncio.sleep(min(1.0, float(r.headers.get("retry-after", 1)) / 4))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else None

    return {
        "admitted": len(latencies),
        "p50_s": pct(0.50),
        "p95_s": pct(0.95),
        "max_s": round(latencies[-1], 3) if latencies else None,
        "status_503": statuses.get(503, 0),
        "status_503_with_retry_after": retry_after,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "transport_errors": errors,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (default 64)")
    p.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="audio file each request posts")
    p.add_argument("--dummy-models", action="store_true", help="tiny dummy emotion models (tests/ helpers)")
    p.add_argument("--max-requests", type=int, default=100_000, help="per-client bound on requests")
    p.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request (s)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="server start-up limit (s)")
    p.add_argument("--env", action="append", default=[], help="extra server setting, e.g. EMOTION_X=1")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()

    clip = args.clip.read_bytes()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="overload-bench-") as tmp:
        proc = start_server(args, port, Path(tmp))
        try:
            wait_ready(base, proc, args.ready_timeout)
            peak_children = 0
            stop = False

            async def sample_rss() -> None:
                nonlocal peak_children
                while not stop:
                    kids = sum(proc_kb(k, "VmRSS") for k in children(proc.pid))
                    peak_children = max(peak_children, kids)
                    await asyncio.sleep(0.5)

            async def run() -> dict:
                nonlocal stop
                sampler = asyncio.create_task(sample_rss())
                try:
                    return await drive(base, clip, args)
                finally:
                    stop = True
                    await sampler

            report = asyncio.run(run())
            report.update(
                seconds=args.seconds,
                concurrency=args.concurrency,
                clip=str(args.clip),
                server_peak_rss_mb=round(proc_kb(proc.pid, "VmHWM") / 1024, 1),
                children_peak_rss_mb=round(peak_children / 1024, 1),
            )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
