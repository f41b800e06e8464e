"""Load benchmark of POST /v1/predict against a real server process.

Starts ``emotion-server serve`` on a free loopback port (settings from the EMOTION_* environment;
``--model-dir`` sets EMOTION_MODEL_DIR), waits for /readyz, then posts a fixed list of RAVDESS clips
at each concurrency level (1, 2, 4, 8, 16) with a bounded number of requests and a time budget
per level. Reports throughput (audio seconds per wall second), latency p50/p95, errors, and the
mean model batch size (from /metrics). Finally, with the server stopped, it times plain faster-whisper
transcription alone on the same clips (``WhisperModel.transcribe``, bundled tiny.en, int8, every
core, beam 1) and reports end-to-end latency at concurrency 1 relative to it.

    python bench/predict_bench.py                 # full run -> bench/results/predict.{json,md}
    python bench/predict_bench.py --quick --model-dir /tmp/dummy-models   # smoke run -> bench/results/tmp/
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess-a01-18"
FOUR_CLASS = {"neutral", "calm", "happy", "sad", "angry"}


# --- clips ------------------------------------------------------------------------------------


def fixed_clips(data: Path, n: int) -> list[Path]:
    """``n`` clips spread evenly over the sorted 4-class list (every actor and emotion represented)."""
    with open(data / "labels.csv", newline="") as fh:
        rows = sorted(r["path"] for r in csv.DictReader(fh) if r["label"] in FOUR_CLASS)
    step = len(rows) / n
    return [data / rows[int(i * step)] for i in range(n)]


def clip_seconds(path: Path) -> float:
    import soundfile as sf

    return sf.info(str(path)).duration


# --- server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log_path: Path, model_dir: str | None) -> subprocess.Popen:
    exe = shutil.which("emotion-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "emotion-server"
    )
    cmd = [exe, "serve"] if exe else [sys.executable, "-m", "app.cli", "serve"]
    env = dict(os.environ)
    if model_dir:
        env["EMOTION_MODEL_DIR"] = model_dir
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
            last = r.text
            if '"not_ready"' in last and "failed" in last:
                raise RuntimeError(f"server failed to start: {last}")
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"server not ready after {timeout_s} s: {last}")


# --- metrics ----------------------------------------------------------------------------------


def batch_totals(base: str) -> tuple[float, float]:
    """(sum, count) of emotion_batch_size over all models."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        m = re.match(r"^emotion_batch_size_(sum|count)\{[^}]*\} (\S+)$", line)
        if m:
            if m.group(1) == "sum":
                total += float(m.group(2))
            else:
                count += float(m.group(2))
    return total, count


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- load levels ------------------------------------------------------------------------------


async def run_level(
    base: str, clips: list[tuple[Path, bytes, float]], concurrency: int, n_requests: int, budget_s: float
) -> dict:
    results: list[tuple[float, int, float]] = []  # (latency s, status, audio s)
    errors: dict[str, int] = {}
    counter = iter(range(n_requests))
    t_end = time.monotonic() + budget_s

    async def worker(client: httpx.AsyncClient):
        for i in counter:
            if time.monotonic() > t_end:
                return
            path, data, seconds = clips[i % len(clips)]
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    f"{base}/v1/predict",
                    content=data,
                    headers={"Content-Type": "audio/flac", **_auth()},
                    timeout=120,
                )
                status = r.status_code
                if status != 200:
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    code = r.json().get("error", str(status)) if is_json else str(status)
                    errors[code] = errors.get(code, 0) + 1
            except httpx.HTTPError as exc:
                status = 0
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            results.append((time.perf_counter() - t0, status, seconds))

    before = batch_totals(base)
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    after = batch_totals(base)
    ok = [r for r in results if r[1] == 200]
    lat = [r[0] for r in ok]
    d_sum, d_count = after[0] - before[0], after[1] - before[1]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "wall_s": round(wall, 3),
        "audio_s": round(sum(r[2] for r in ok), 3),
        "throughput_audio_s_per_s": round(sum(r[2] for r in ok) / wall, 3) if wall > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "latency_p50_s": round(percentile(lat, 0.5), 4),
        "latency_p95_s": round(percentile(lat, 0.95), 4),
        "latency_mean_s": round(statistics.fmean(lat), 4) if lat else float("nan"),
        "mean_batch_size": round(d_sum / d_count, 3) if d_count else None,
        "batches": int(d_count),
    }


# --- ASR alone --------------------------------------------------------------------------------


def asr_baseline(clips: list[tuple[Path, bytes, float]]) -> dict:
    """Plain faster-whisper (``WhisperModel.transcribe``, the bundled model, all cores, beam 1,
    English, word timestamps, no VAD), sequentially on the same clips: what a user would get from
    the ASR library alone, the yardstick for the whole request."""
    from faster_whisper import WhisperModel

    from app.analysis.asr import bundled_model_path
    from app.analysis.audio import decode
    from app.inference.engine import available_cores

    cores = available_cores()
    model = WhisperModel(str(bundled_model_path()), device="cpu", compute_type="int8", cpu_threads=cores)
    audios = [decode(data).mono for _, data, _ in clips]

    def transcribe(audio):
        segments, _ = model.transcribe(
            audio, beam_size=1, language="en", word_timestamps=True, vad_filter=False, temperature=0.0
        )
        return list(segments)

    transcribe(audios[0])  # warm-up
    times = []
    for a in audios:
        t0 = time.perf_counter()
        transcribe(a)
        times.append(time.perf_counter() - t0)
    return {
        "what": "faster_whisper.WhisperModel.transcribe alone",
        "device": "cpu",
        "compute_type": "int8",
        "cpu_threads": cores,
        "beam_size": 1,
        "clips": len(times),
        "mean_s": round(statistics.fmean(times), 4),
        "p50_s": round(percentile(times, 0.5), 4),
    }


# --- report -----------------------------------------------------------------------------------


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# /v1/predict benchmark",
        "",
        f"{report['date']}, git {report['git']}, {report['machine']}.",
        f"Server: {report['server']['models']} on {report['server']['providers']}; "
        f"{report['clips']['n']} RAVDESS clips ({report['clips']['mean_s']:.2f} s mean), one request = one clip.",
        "" if not report["quick"] else "**Quick run (smoke test): not representative.**",
        "",
        "| concurrency | requests | ok | errors | audio s / wall s | req/s | p50 s | p95 s | mean batch |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for lv in report["levels"]:
        errs = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "0"
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['ok']} | {errs} | {lv['throughput_audio_s_per_s']:.2f} | "
            f"{lv['requests_per_s']:.2f} | {lv['latency_p50_s']:.3f} | {lv['latency_p95_s']:.3f} | "
            f"{lv['mean_batch_size'] if lv['mean_batch_size'] is not None else '-'} |"
        )
    b = report["asr_alone"]
    if b:
        lines += [
            "",
            f"faster-whisper alone on the same clips (concurrency 1, {b['device']}, {b['compute_type']}, "
            f"{b['cpu_threads']} threads, beam {b['beam_size']}): {b['mean_s']:.3f} s mean per clip.",
            f"End-to-end /v1/predict at concurrency 1 over transcription alone: "
            f"**{report['ratio_e2e_to_asr']:.2f}x** (mean latency {report['levels'][0]['latency_mean_s']:.3f} s).",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=0, help="per level; default max(24, 3 x concurrency)")
    ap.add_argument("--budget-s", type=float, default=180.0, help="time budget per level")
    ap.add_argument("--model-dir", default=None, help="EMOTION_MODEL_DIR for the server")
    ap.add_argument(
        "--out", type=Path, default=None, help="default bench/results (bench/results/tmp with --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="6 clips, levels 1,2,4, few requests (smoke test)")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    args = ap.parse_args(argv)

    if args.quick:
        args.clips, args.levels = min(args.clips, 6), "1,2,4"
        args.requests = args.requests or 8
        args.budget_s = min(args.budget_s, 60.0)
    out = args.out or (ROOT / "bench" / "results" / ("tmp" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    paths = fixed_clips(args.data, args.clips)
    clips = [(p, p.read_bytes(), clip_seconds(p)) for p in paths]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, ROOT / "bench" / "results" / "tmp" / "server.log", args.model_dir)
    try:
        t0 = time.monotonic()
        ready = wait_ready(base, proc, args.ready_timeout_s)
        startup_s = time.monotonic() - t0
        models = httpx.get(f"{base}/v1/models", timeout=10, headers=_auth()).json()
        for _, data, _ in clips[:2]:  # first requests pay one-off costs
            httpx.post(
                f"{base}/v1/predict",
                content=data,
                headers={"Content-Type": "audio/flac", **_auth()},
                timeout=120,
            )
        results = []
        for c in levels:
            n = args.requests or max(24, 3 * c)
            lv = asyncio.run(run_level(base, clips, c, n, args.budget_s))
            print(json.dumps(lv), flush=True)
            results.append(lv)
    finally:
        stop_server(proc)

    baseline = asr_baseline(clips)
    c1 = next((lv for lv in results if lv["concurrency"] == 1), None)
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": git_rev(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "quick": args.quick,
        "server": {
            "startup_to_ready_s": round(startup_s, 2),
            "models": [m["id"] for m in models.get("models", [])] or ready.get("models"),
            "variants": {m["id"]: m["variant"] for m in models.get("models", [])},
            "providers": sorted({m["provider"] for m in models.get("models", [])}),
            "env": {k: v for k, v in os.environ.items() if k.startswith("EMOTION_") and "KEY" not in k},
        },
        "clips": {
            "n": len(clips),
            "mean_s": statistics.fmean(c[2] for c in clips),
            "paths": [str(p.relative_to(args.data)) for p in paths],
        },
        "levels": results,
        "asr_alone": baseline,
        "ratio_e2e_to_asr": round(c1["latency_mean_s"] / baseline["mean_s"], 3) if c1 and c1["ok"] else None,
    }
    (out / "predict.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "predict.md")
    print(f"wrote {out / 'predict.json'} and {out / 'predict.md'}")
    return 0 if all(lv["ok"] == lv["requests"] for lv in results) else 1


def _auth() -> dict[str, str]:
    """The first configured API key, so the bench also works against a secured server."""
    keys = os.environ.get("EMOTION_API_KEYS", "").strip()
    if not keys:
        return {}
    first = json.loads(keys)[0] if keys.startswith("[") else keys.split(",")[0].strip()
    return {"Authorization": f"Bearer {first}"}


if __name__ == "__main__":
    sys.exit(main())
