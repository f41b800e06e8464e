"""Which Whisper to run by default: word error rate and CPU latency of each named ASR model.

For every model in ``app.analysis.asr_models.ASR_MODELS`` (tiny.en, base) it transcribes the same
RAVDESS clips (every ``--stride``-th of the 4-class clips, sorted by path) with the server's
``Recognizer`` (int8, beam 1, the server's fitted encoder window) and reports:

- WER against the corpus transcript (``labels.csv`` ``text``), lower-cased, punctuation removed;
- seconds per clip (p50, p95) and the real-time factor, with ``--threads`` CTranslate2 threads.

Each model runs with its own encoder window (``app.analysis.asr_models``: tiny.en fitted, base full).

Emotion accuracy per ASR model is not measured here: it comes from training's cross-validation
(``models/RESULTS.md`` and ``models/base/RESULTS.md``).

    python bench/asr_choice_bench.py                  # -> bench/results/asr_choice.{json,md}
    python bench/asr_choice_bench.py --stride 20 --out bench/results/tmp   # quick run
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess-a01-18"
FOUR_CLASS = {"neutral", "calm", "happy", "sad", "angry"}


def words_of(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def clips(data: Path, stride: int) -> list[tuple[Path, str]]:
    with open(data / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in FOUR_CLASS]
    rows.sort(key=lambda r: r["path"])
    return [(data / r["path"], r["text"]) for r in rows[::stride]]


def measure(name: str, items: list[tuple[Path, str]], threads: int) -> dict:
    from app.analysis.asr import Recognizer
    from app.analysis.audio import decode

    rec = Recognizer(name, device="cpu", cpu_threads=threads)
    audio = [decode(p).mono for p, _ in items]
    rec.transcribe(audio[0])  # first-call allocations
    seconds, errors, ref_words, audio_s = [], 0, 0, 0.0
    for (_path, text), x in zip(items, audio, strict=True):
        t0 = time.perf_counter()
        tr = rec.transcribe(x)
        seconds.append(time.perf_counter() - t0)
        ref = words_of(text)
        errors += edit_distance(ref, words_of(tr.text))
        ref_words += len(ref)
        audio_s += len(x) / 16000
    q = statistics.quantiles(seconds, n=20)
    return {
        "asr_model": name,
        "encoder_window": rec.encoder_window,
        "clips": len(items),
        "wer": errors / ref_words,
        "word_errors": errors,
        "reference_words": ref_words,
        "seconds_per_clip_p50": statistics.median(seconds),
        "seconds_per_clip_p95": q[18],
        "mean_clip_s": audio_s / len(items),
        "real_time_factor": sum(seconds) / audio_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--stride", type=int, default=5, help="every N-th 4-class clip (default 5: 130 clips)")
    ap.add_argument("--threads", type=int, default=1, help="CTranslate2 threads (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    from app.analysis.asr_models import ASR_MODELS

    items = clips(args.data, args.stride)
    rows = [measure(name, items, args.threads) for name in ASR_MODELS]
    report = {
        "bench": "asr_choice",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "threads": args.threads,
        "compute_type": "int8",
        "beam_size": 1,
        "rows": rows,
        "command": "python bench/asr_choice_bench.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "asr_choice.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"ASR choice ({len(items)} RAVDESS clips, int8, beam 1, {args.threads} thread(s), CPU)",
        "",
        "| ASR model | WER | s/clip p50 | s/clip p95 | real-time factor |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['asr_model']} | {100 * r['wer']:.2f} % ({r['word_errors']}/{r['reference_words']}) "
            f"| {r['seconds_per_clip_p50']:.3f} | {r['seconds_per_clip_p95']:.3f} | {r['real_time_factor']:.3f} |"
        )
    (args.out / "asr_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
