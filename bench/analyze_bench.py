"""Cost of ``app.analysis.analyzer.analyze`` on a 5-s clip: median of N warm runs per stage, plus cold start.

Usage: ``python bench/analyze_bench.py [--runs 10]``; writes bench/results/analyze.json.
Cold start = a fresh interpreter importing the pipeline, loading ASR + text encoder and finishing
its first analysis (what a server process pays before its first request).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

COLD = """
import time; t0 = time.perf_counter()
import numpy as np
from app.analysis.analyzer import Analyzer
from app.analysis.audio import decode
a = Analyzer(); t1 = time.perf_counter()
x = decode('{clip}').mono
a.analyze(x); t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def five_second_clip() -> np.ndarray:
    from app.analysis.audio import decode

    a = decode(FIXTURES / "kids_angry_a01.flac").mono
    b = decode(FIXTURES / "dogs_neutral_a02.flac").mono
    return np.concatenate([a, b])[: 5 * 16000]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()

    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", COLD.format(clip=FIXTURES / "kids_angry_a01.flac")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    load_s, first_s = map(float, out.stdout.split())
    cold_total = time.perf_counter() - t0

    from app.analysis.analyzer import Analyzer

    analyzer = Analyzer()
    audio = five_second_clip()
    analyzer.analyze(audio)  # warm
    runs = [analyzer.analyze(audio).timing_ms for _ in range(args.runs)]
    result = {
        "clip_seconds": len(audio) / 16000,
        "runs": args.runs,
        "median_ms": {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]},
        "median_total_ms": round(statistics.median(sum(r.values()) for r in runs), 1),
        "cold_start_s": {
            "process_total": round(cold_total, 2),
            "import_and_load": round(load_s, 2),
            "first_analysis": round(first_s, 2),
        },
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "analyze.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
