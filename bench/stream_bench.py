"""Streaming capacity: N concurrent real-time streams of real speech against a server it starts.

For N = 1, 2, 4, 8, ... (up to ``--max-streams``) every stream sends ``--seconds`` of RAVDESS clips
(each followed by ``--gap`` s of silence) in 20-ms frames at real-time pace, over loopback, to
``WS /v1/stream`` of a server started here (``emotion-server serve`` in a subprocess; models from
``EMOTION_MODEL_DIR`` / ``models/``, or ``--dummy-models`` for a smoke run of the harness itself).

Reported per N: final-result latency p50 / p95 / max as measured by the server (``latency_ms``:
from the arrival of the frame in which the utterance's speech ended to the ``final``), the same
seen by the client (including the loopback hop), finals, partials sent / skipped, warnings.
The answer is the largest N whose p95 <= ``--target-ms`` (1500). Escalation stops once p95 exceeds
twice the target. Writes ``bench/results/stream.json`` and ``stream.md``.

Usage: ``python bench/stream_bench.py [--max-streams 16] [--seconds 20] [--data DIR]``.
Bounded: every level runs ``seconds`` of audio plus a drain timeout; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess-a01-18"
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def load_clips(data: Path, n: int, seed: int) -> list[np.ndarray]:
    import soundfile as sf

    from app.analysis.audio import resample

    with open(data / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(seed)
    rng.shuffle(rows)
    clips = []
    for row in rows[:n]:
        x, rate = sf.read(data / row["path"], dtype="float32", always_2d=True)
        clips.append(resample(x.mean(axis=1), rate, 16000) if rate != 16000 else x.mean(axis=1))
    return clips


def stream_audio_for(i: int, clips: list[np.ndarray], seconds: float, gap_s: float) -> np.ndarray:
    """``seconds`` of clips (a different order per stream), each followed by ``gap_s`` of silence."""
    rng = random.Random(1000 + i)
    out, total = [], 0
    gap = np.zeros(int(gap_s * 16000), np.float32)
    while total < seconds * 16000:
        clip = clips[rng.randrange(len(clips))]
        out += [clip, gap]
        total += len(clip) + len(gap)
    return np.concatenate(out)


class Server:
    def __init__(self, args, tmp: Path):
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            EMOTION_HOST="127.0.0.1",
            EMOTION_PORT=str(self.port),
            EMOTION_STORE="sqlite",
            EMOTION_SQLITE_PATH=str(tmp / "sessions.db"),
            EMOTION_STREAM_MAX_STREAMS=str(max(64, args.max_streams)),
        )
        if args.dummy_models:
            from tests.serving_helpers import ALL_MODELS, write_dummy_models

            env["EMOTION_MODEL_DIR"] = str(write_dummy_models(tmp / "models"))
            env["EMOTION_MODELS"] = ",".join(ALL_MODELS)
        self.log = open(tmp / "server.log", "w")
        cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(self.base + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def run_level(server: Server, n: int, audios: list[np.ndarray], args) -> dict:
    from app.streaming.client import stream_audio

    post_pad_s = 0.15
    rng = random.Random(n)

    async def one(i: int):
        await asyncio.sleep(rng.uniform(0, 1.0))  # staggered starts, as real calls arrive
        return await stream_audio(
            audios[i],
            16000,
            server.ws,
            realtime=True,
            session_id=f"bench-{n}-{i}",
            timeout_s=args.seconds * 3 + 120,
        )

    t0 = time.monotonic()
    runs = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    wall = time.monotonic() - t0
    server_lat, client_lat, errors, warnings = [], [], [], {}
    finals = partials = skipped = 0
    for run in runs:
        if isinstance(run, BaseException):
            errors.append(f"{type(run).__name__}: {run}")
            continue
        for m, at in zip(run.messages, run.received_at, strict=True):
            kind = m.get("type")
            if kind == "final":
                finals += 1
                server_lat.append(m["latency_ms"])
                if m["reason"] == "end_of_speech":
                    spoken_end = run.started_at + m["end"] - post_pad_s  # when that audio was sent
                    client_lat.append((at - spoken_end) * 1000.0)
            elif kind == "partial":
                partials += 1
            elif kind == "warning":
                warnings[m["code"]] = warnings.get(m["code"], 0) + 1
            elif kind == "error":
                errors.append(f"{m['error']}: {m['detail']}")
            elif kind == "end":
                skipped += m["stats"]["partials_skipped"]
        if run.close_code != 1000:
            errors.append(f"closed {run.close_code} {run.close_reason}")
    return {
        "streams": n,
        "finals": finals,
        "latency_ms": {
            "p50": percentile(server_lat, 50),
            "p95": percentile(server_lat, 95),
            "max": percentile(server_lat, 100),
        },
        "client_latency_ms": {"p50": percentile(client_lat, 50), "p95": percentile(client_lat, 95)},
        "partials_sent": partials,
        "partials_skipped": skipped,
        "warnings": warnings,
        "errors": errors[:10],
        "wall_s": round(wall, 1),
    }


def write_report(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Streaming benchmark",
        "",
        f"{result['machine']}; {result['seconds_per_stream']} s of RAVDESS speech per stream, real-time pace, "
        f"20-ms pcm_s16le frames over loopback; models: {result['models']}.",
        *(["", "**Smoke run with dummy models: not a capacity figure.**"] if result["dummy_models"] else []),
        "",
        "Latency: server-measured `latency_ms` of each `final` (arrival of the frame in which the speech "
        "ended -> final sent), so it includes the end-of-speech silence wait "
        f"({result['end_silence_ms']} ms; the analysis starts speculatively after the post-pad).",
        "",
        "| streams | finals | p50 ms | p95 ms | max ms | client p95 ms | partials sent / skipped | warnings | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for lv in result["levels"]:
        lat, cl = lv["latency_ms"], lv["client_latency_ms"]
        lines.append(
            f"| {lv['streams']} | {lv['finals']} | {lat['p50']} | {lat['p95']} | {lat['max']} | {cl['p95']} | "
            f"{lv['partials_sent']} / {lv['partials_skipped']} | {lv['warnings'] or ''} | {len(lv['errors'])} |"
        )
    lines += [
        "",
        f"**Largest N with p95 <= {result['target_ms']:.0f} ms: {result['max_streams_within_target']}**",
        "",
    ]
    (RESULTS / "stream.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-streams", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    ap.add_argument("--gap", type=float, default=0.8, help="silence after each clip (s)")
    ap.add_argument("--target-ms", type=float, default=1500.0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--clips", type=int, default=40, help="distinct clips to draw from")
    ap.add_argument("--dummy-models", action="store_true", help="dummy ONNX models (harness smoke test)")
    args = ap.parse_args()

    clips = load_clips(args.data, args.clips, seed=0)
    levels, n, models = [], 1, []
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        server = Server(args, Path(tmp))
        try:
            server.wait_ready()
            import httpx

            loaded = httpx.get(server.base + "/v1/models", timeout=10).json().get("models", [])
            models = [f"{m['id']} ({m.get('variant', '?')})" for m in loaded]
            while n <= args.max_streams:
                audios = [stream_audio_for(i, clips, args.seconds, args.gap) for i in range(n)]
                level = asyncio.run(run_level(server, n, audios, args))
                print(json.dumps(level), flush=True)
                levels.append(level)
                p95 = level["latency_ms"]["p95"]
                if level["errors"] or p95 is None or p95 > 2 * args.target_ms:
                    break
                n *= 2
        finally:
            server.stop()
    ok = [
        lv["streams"]
        for lv in levels
        if lv["latency_ms"]["p95"] is not None
        and lv["latency_ms"]["p95"] <= args.target_ms
        and not lv["errors"]
    ]
    from app.settings import Settings

    s = Settings()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'})",
        "models": ", ".join(models),
        "dummy_models": args.dummy_models,
        "seconds_per_stream": args.seconds,
        "target_ms": args.target_ms,
        "end_silence_ms": s.utterance_end_silence_ms,
        "levels": levels,
        "max_streams_within_target": max(ok) if ok else 0,
    }
    write_report(result)
    print(json.dumps({"max_streams_within_target": result["max_streams_within_target"]}))


if __name__ == "__main__":
    main()
