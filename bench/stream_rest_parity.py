"""Streaming path against REST path on the corpus: same cut, same words, same probabilities?

Every selected recording of ``labels.csv`` (4 classes by default) is sent to a server started here
twice: uploaded to ``POST /v1/predict`` and streamed (20-ms pcm_s16le frames, as fast as the server
reads) to ``WS /v1/stream``. Per recording it compares the REST segments with the stream's finals:
count, start/end, words, and per-model probabilities; and it scores both paths' recording-level
label (duration-weighted mean of the segments, as ``/v1/predict`` combines them) against the
corpus label.

What this measures and what it does not: the shipped models were trained on every one of these
speakers, so the balanced accuracies printed here are *in-sample* and say nothing about accuracy
(``models/RESULTS.md`` has the cross-validated figures). The point is the *difference*: any
recording on which the two paths disagree would move a cross-validated accuracy of the streaming
path away from the REST path's; with label agreement ``a`` the two accuracies differ by at most
``1 - a`` under any model trained on these features, the cross-validation fold models included.

    python bench/stream_rest_parity.py [--every 1] [--data DIR]

Writes ``bench/results/stream_rest_parity.json``. Loopback only; bounded by the corpus size.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream_bench import Server  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess-a01-18"
RESULTS = ROOT / "bench" / "results"
CLASSES = ("neutral", "happy", "sad", "angry")


def recording_probs(segments: list[dict]) -> dict[str, float] | None:
    """Duration-weighted mean of the segments' ensemble probabilities (how /v1/predict combines)."""
    if not segments:
        return None
    w = np.array([s["end"] - s["start"] for s in segments])
    probs = np.array([[s["emotion"]["probabilities"][c] for c in CLASSES] for s in segments])
    return dict(zip(CLASSES, ((probs * w[:, None]).sum(0) / w.sum()).tolist(), strict=True))


def balanced_accuracy(y: list[str], pred: list[str | None]) -> float:
    recalls = []
    for c in CLASSES:
        idx = [i for i, t in enumerate(y) if t == c]
        if idx:
            recalls.append(sum(pred[i] == c for i in idx) / len(idx))
    return float(np.mean(recalls))


async def compare(server: Server, path: Path) -> dict:
    import httpx
    import soundfile as sf

    from app.streaming.client import stream_audio

    audio, rate = sf.read(path, dtype="float32", always_2d=False)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(
            server.base + "/v1/predict?words=true", files={"file": ("x.wav", buf.getvalue(), "audio/wav")}
        )
    rest = r.json().get("segments", []) if r.status_code == 200 else []
    run = await stream_audio(audio, rate, server.ws, realtime=False, timeout_s=120, words=True)
    finals = run.of_type("final")
    out = {"rest_status": r.status_code, "n_rest": len(rest), "n_stream": len(finals), "same_words": True}
    max_dp, max_dt = 0.0, 0.0
    if len(rest) == len(finals):
        for s, f in zip(rest, finals, strict=True):
            max_dt = max(max_dt, abs(s["start"] - f["start"]), abs(s["end"] - f["end"]))
            # a final carries no words unless its stream asks (result shape v2): compare the texts'
            # words, which are the ASR words joined
            out["same_words"] &= s["text"].split() == f["text"].split()
            for c in CLASSES:
                max_dp = max(max_dp, abs(s["emotion"]["probabilities"][c] - f["emotion"]["probabilities"][c]))
    out.update(max_prob_diff=max_dp, max_time_diff_s=max_dt)
    out["rest_probs"], out["stream_probs"] = (
        recording_probs(rest),
        recording_probs(finals),
    )
    return out


async def run(server: Server, rows: list[dict], data: Path) -> list[dict]:
    results = []
    for i, row in enumerate(rows):
        res = await compare(server, data / row["path"])
        res.update(path=row["path"], label=row["label"])
        results.append(res)
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(rows)}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--every", type=int, default=1, help="take every n-th recording")
    ap.add_argument("--dummy-models", action="store_true", help="smoke-test the harness")
    ap.add_argument("--max-streams", type=int, default=4)
    args = ap.parse_args()
    with open(args.data / "labels.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] in CLASSES][:: args.every]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args, Path(tmp))
        try:
            server.wait_ready()
            results = asyncio.run(run(server, rows, args.data))
        finally:
            server.stop()
    y = [r["label"] for r in results]

    def label(p):
        return max(p, key=p.get) if p else None

    rest_pred = [label(r["rest_probs"]) for r in results]
    stream_pred = [label(r["stream_probs"]) for r in results]
    comparable = [r for r in results if r["n_rest"] == r["n_stream"]]
    summary = {
        "recordings": len(results),
        "same_segment_count": len(comparable),
        "same_words": sum(r["same_words"] for r in comparable),
        "label_agreement": round(
            float(np.mean([a == b for a, b in zip(rest_pred, stream_pred, strict=True)])), 4
        ),
        "max_prob_diff": round(max((r["max_prob_diff"] for r in comparable), default=0.0), 6),
        "max_time_diff_s": round(max((r["max_time_diff_s"] for r in comparable), default=0.0), 4),
        "in_sample_balanced_accuracy": {
            "rest": round(balanced_accuracy(y, rest_pred), 4),
            "stream": round(balanced_accuracy(y, stream_pred), 4),
        },
        "no_speech_recordings": sum(r["n_rest"] == 0 for r in results),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream_rest_parity.json").write_text(
        json.dumps({"summary": summary, "per_recording": results}, indent=1)
    )


if __name__ == "__main__":
    main()
