"""GPU streaming capacity: how many real-time streams one GPU serves with final p95 <= 1.0 s.

One command on a machine with a CUDA GPU::

    python bench/gpu_bench.py            # [--max-streams 256] [--seconds 20] [--target-ms 1000]

It starts the server **in this process** (uvicorn in a thread, ``EMOTION_DEVICE=cuda``: faster-whisper
and ONNX Runtime on the GPU; models from ``EMOTION_MODEL_DIR`` / ``models/``), then ramps N
simulated real-time streams (``bench/stream_bench.py``'s machinery: RAVDESS clips with silence
between them, 20-ms frames at real-time pace over loopback): N doubles while p95 <= target, then
bisects between the last passing and the first failing N. Per level it reports final latency
p50/p95/max (server-measured ``latency_ms``), partials sent/skipped, the ASR batch-size
distribution of that level (``emotion_asr_batch_size`` from ``/metrics``) and peak GPU memory
(``nvidia-smi``, else ``pynvml``, else "unavailable"). The answer, **streams per GPU**, is the largest
N with p95 <= ``--target-ms`` and no errors. Writes ``gpu.json`` and ``gpu.md`` to ``--out`` (``bench/results/``).

Without CUDA it stops at once with a clear message (exit code 2). ``--device cpu --dummy-models``
runs the harness itself on a CPU (a smoke test, not a capacity figure). The client runs in this
process too (its own event loop and thread): with hundreds of streams the client's share of the
GIL can inflate latencies a little; ``client_latency_ms`` shows the loopback-side view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream_bench import DEFAULT_DATA, RESULTS, free_port, load_clips, run_level, stream_audio_for  # noqa: E402

BATCH_METRIC = "emotion_asr_batch_size"


# --- environment checks ---------------------------------------------------------------------


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU benchmark, or None."""
    try:
        import ctranslate2
    except Exception as exc:  # pragma: no cover - ctranslate2 ships with faster-whisper
        return f"ctranslate2 (faster-whisper's runtime) cannot be imported: {exc}"
    try:
        devices = ctranslate2.get_cuda_device_count()
    except Exception as exc:
        return f"CTranslate2 cannot query CUDA: {exc}"
    if devices < 1:
        return (
            "CTranslate2 sees no CUDA device (no GPU, driver or CUDA build): faster-whisper cannot use a GPU"
        )
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime has no CUDAExecutionProvider: install onnxruntime-gpu"
    return None


# --- GPU memory -----------------------------------------------------------------------------


def gpu_memory_mib() -> list[dict] | None:
    """[{name, used_mib, total_mib}] per GPU via nvidia-smi, else pynvml; None when neither works."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
            return [{"name": r[0], "used_mib": float(r[1]), "total_mib": float(r[2])} for r in rows]
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append(
                    {
                        "name": name.decode() if isinstance(name, bytes) else str(name),
                        "used_mib": mem.used / 2**20,
                        "total_mib": mem.total / 2**20,
                    }
                )
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


class MemorySampler:
    """Peak GPU memory used while a level runs (polled every ``every_s`` in a thread)."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-mem", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            gpus = gpu_memory_mib()
            if gpus:
                used = sum(g["used_mib"] for g in gpus)
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# --- the in-process server ------------------------------------------------------------------


class InProcessServer:
    """The app under uvicorn in a daemon thread; ``ws`` is what ``run_level`` connects to."""

    def __init__(self, args, tmp: Path):
        self.port = free_port()
        os.environ.update(
            EMOTION_DEVICE=args.device,
            EMOTION_STORE="sqlite",
            EMOTION_SQLITE_PATH=str(tmp / "sessions.db"),
            EMOTION_STREAM_MAX_STREAMS=str(max(64, args.max_streams * 2)),
        )
        if args.dummy_models:
            from tests.serving_helpers import ALL_MODELS, write_dummy_models

            os.environ["EMOTION_MODEL_DIR"] = str(write_dummy_models(tmp / "models"))
            os.environ["EMOTION_MODELS"] = ",".join(ALL_MODELS)
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 600.0) -> None:
        import httpx
        import uvicorn

        from app.main import create_app
        from app.settings import Settings

        settings = Settings()
        app = create_app(settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="bench-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up (see the log above)")
            try:
                r = httpx.get(self.base + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                if "failed" in r.text:
                    raise RuntimeError(f"the service failed to start: {r.text}")
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s")

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(self.base + "/metrics", timeout=10).text

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=60)
            self._server = None


# --- the ASR batch-size histogram ----------------------------------------------------------


def batch_histogram(text: str) -> dict[str, float]:
    """Cumulative bucket counts (``le`` -> count) plus ``_sum`` and ``_count`` of the metric."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'^{BATCH_METRIC}_bucket\{{le="([^"]+)"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
            continue
        m = re.match(rf"^{BATCH_METRIC}_(sum|count) (\S+)$", line)
        if m:
            out[f"_{m.group(1)}"] = float(m.group(2))
    return out


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict:
    """Batches per size bucket during one level (``"<=8": 12``), mean batch size, batches."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    bounds = sorted((k for k in delta if not k.startswith("_")), key=lambda k: float(k))
    buckets, previous = {}, 0.0
    for le in bounds:
        n = delta[le] - previous
        previous = delta[le]
        if n > 0:
            label = "+Inf" if le == "+Inf" else f"<={float(le):g}"
            buckets[label] = int(n)
    count = delta.get("_count", 0.0)
    return {
        "batches": int(count),
        "mean": round(delta.get("_sum", 0.0) / count, 2) if count else None,
        "buckets": buckets,
    }


# --- the ramp -------------------------------------------------------------------------------


def passes(level: dict, target_ms: float) -> bool:
    p95 = level["latency_ms"]["p95"]
    return p95 is not None and p95 <= target_ms and not level["errors"]


def run_one(server: InProcessServer, n: int, clips, args) -> dict:
    audios = [stream_audio_for(i, clips, args.seconds, args.gap) for i in range(n)]
    before = batch_histogram(server.metrics_text())
    with MemorySampler() as mem:
        level = asyncio.run(run_level(server, n, audios, args))
    level["asr_batch_size"] = batch_distribution(before, batch_histogram(server.metrics_text()))
    level["gpu_peak_mib"] = round(mem.peak_mib, 0) if mem.peak_mib is not None else None
    print(json.dumps(level), flush=True)
    return level


def ramp(server: InProcessServer, clips, args) -> list[dict]:
    """Double N while it passes, then bisect between the last pass and the first failure."""
    levels: dict[int, dict] = {}
    n, good, bad = args.start_streams, 0, None
    while n <= args.max_streams:
        levels[n] = run_one(server, n, clips, args)
        if not passes(levels[n], args.target_ms):
            bad = n
            break
        good, n = n, n * 2
    for _ in range(args.refine):
        if bad is None or bad - good <= 1:
            break
        mid = (good + bad) // 2
        levels[mid] = run_one(server, mid, clips, args)
        if passes(levels[mid], args.target_ms):
            good = mid
        else:
            bad = mid
    return [levels[k] for k in sorted(levels)]


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    gpus = result["gpus"] or [{"name": "unknown GPU", "total_mib": None}]
    lines = [
        "# GPU streaming benchmark",
        "",
        f"{', '.join(g['name'] for g in gpus)}; device {result['device']}; {result['seconds_per_stream']} s "
        f"of RAVDESS speech per stream at real-time pace; models: {result['models']}; in-process server.",
        *(["", "**Smoke run (dummy models or CPU): not a capacity figure.**"] if result["smoke"] else []),
        "",
        "| streams | finals | p50 ms | p95 ms | max ms | partials sent / skipped | ASR batches | mean batch "
        "| batch sizes | GPU peak MiB | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for lv in result["levels"]:
        lat, bs = lv["latency_ms"], lv["asr_batch_size"]
        lines.append(
            f"| {lv['streams']} | {lv['finals']} | {lat['p50']} | {lat['p95']} | {lat['max']} | "
            f"{lv['partials_sent']} / {lv['partials_skipped']} | {bs['batches']} | {bs['mean']} | "
            f"{bs['buckets']} | {lv['gpu_peak_mib']} | {len(lv['errors'])} |"
        )
    lines += [
        "",
        f"**Streams per GPU at final p95 <= {result['target_ms']:.0f} ms: {result['streams_per_gpu']}**",
        "",
    ]
    (out / "gpu.md").write_text("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-streams", type=int, default=256)
    ap.add_argument("--start-streams", type=int, default=1)
    ap.add_argument("--refine", type=int, default=3, help="bisection levels after the doubling ramp")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    ap.add_argument("--gap", type=float, default=0.8, help="silence after each clip (s)")
    ap.add_argument("--target-ms", type=float, default=1000.0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--clips", type=int, default=40, help="distinct clips to draw from")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where gpu.json and gpu.md go")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: harness smoke test only")
    ap.add_argument("--dummy-models", action="store_true", help="dummy ONNX models (harness smoke test)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        problem = cuda_problem()
        if problem:
            print(f"gpu_bench: this machine cannot run the GPU benchmark: {problem}.", file=sys.stderr)
            print(
                "gpu_bench: run it where a CUDA GPU is available (or --device cpu for a smoke test).",
                file=sys.stderr,
            )
            return 2
    if not (args.data / "labels.csv").is_file():
        print(f"gpu_bench: no RAVDESS clips at {args.data} (labels.csv); pass --data DIR", file=sys.stderr)
        return 2
    clips = load_clips(args.data, args.clips, seed=0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        server = InProcessServer(args, Path(tmp))
        try:
            server.start()
        except Exception as exc:
            server.stop()
            print(f"gpu_bench: the server did not start on {args.device}: {exc}", file=sys.stderr)
            return 2
        try:
            import httpx

            loaded = httpx.get(server.base + "/v1/models", timeout=10).json().get("models", [])
            models = ", ".join(f"{m['id']} ({m.get('variant', '?')})" for m in loaded)
            levels = ramp(server, clips, args)
        finally:
            server.stop()
    ok = [lv["streams"] for lv in levels if passes(lv, args.target_ms)]
    result = {
        "device": args.device,
        "gpus": gpu_memory_mib(),
        "models": models,
        "smoke": args.dummy_models or args.device != "cuda",
        "seconds_per_stream": args.seconds,
        "target_ms": args.target_ms,
        "levels": levels,
        "streams_per_gpu": max(ok) if ok else 0,
    }
    write_report(result, args.out)
    print(json.dumps({"streams_per_gpu": result["streams_per_gpu"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
