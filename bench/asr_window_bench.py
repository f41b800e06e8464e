"""Whisper encoder window: the full 30-s window against a window fitted to the utterance.

CTranslate2 accepts fewer than 3000 mel frames; the encoder's cost is linear in them. This
measures, on whole RAVDESS clips (every n-th row of labels.csv), the word error rate against the
corpus transcripts and the ASR time per clip for each window policy (one CTranslate2 thread).

    python bench/asr_window_bench.py --data ../shared/data/ravdess-a01-18 --every 6
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import numpy as np

from app.analysis.asr import Recognizer
from app.analysis.audio import decode


def wer(ref: str, hyp: str) -> tuple[int, int]:
    r = re.sub(r"[^a-z' ]", " ", ref.lower()).split()
    h = re.sub(r"[^a-z' ]", " ", hyp.lower()).split()
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
            prev, d[j] = d[j], cur
    return int(d[len(h)]), len(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ravdess-a01-18")
    ap.add_argument("--every", type=int, default=6, help="take every n-th clip of labels.csv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/asr_window.json")
    a = ap.parse_args()
    root = Path(a.data)
    rows = list(csv.DictReader(open(root / "labels.csv")))[:: a.every]
    policies = {"30s": None, "fitted": "fitted"}
    results = {}
    for name, window in policies.items():
        rec = Recognizer(cpu_threads=a.threads, encoder_window=window or "full")
        rec.transcribe(np.zeros(16000, np.float32))
        errors = words = 0
        t0 = time.perf_counter()
        for row in rows:
            tr = rec.transcribe(decode(root / row["path"]).mono)
            e, n = wer(row["text"], tr.text)
            errors, words = errors + e, words + n
        seconds = time.perf_counter() - t0
        results[name] = {"wer": errors / words, "clips": len(rows), "s_per_clip": seconds / len(rows)}
        print(name, json.dumps(results[name]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
