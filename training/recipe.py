"""The shipped recipe: the exact commands behind the models in ``models/`` (tiny.en) and
``models/base/`` (Whisper base), run in order by ``python -m training train-defaults``.

One list, read by ``train-defaults`` and quoted in ``models/RESULTS.md``:

1. the feature cache, clean and call-audio (``training/conditions.py``), through the server's analyzer;
2. the logistic-regression baseline, trained clean and clean+call (a reference row, not shipped);
3. each paper model, cross-validated on clean and call audio, trained on both, then exported;
4. ``calibrate``: temperatures, the combiner, ``ensemble.json`` and ``RESULTS.md`` in the models dir;
5. ``adaptation-stats``: the population statistics of opt-in per-session adaptation (``adaptation.json``).

Each model's shipped variant reads the Whisper encoder frames of the ASR pass (issue 11 measured it
against each paper's front end: ``models/RESULTS.md``); the member counts trade training time for
seed noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SHIPPED: dict[str, list[str]] = {
    "ca-mser": ["--acoustic", "whisper"],
    "3m-ser": ["--members", "3"],
    "adf": ["--acoustic", "whisper"],
    "cmt-awc": ["--acoustic", "whisper", "--members", "1"],
}
TEST_CONDITIONS = ["--test-conditions", "clean,call"]
TRAIN_CONDITIONS = ["--train-conditions", "clean,call"]
ADAPTATION_TAU = "10"  # models/EXPERIMENTS.md, issue 11 item 5


def steps(common: list[str], models: list[str], models_dir: str, threads: int) -> list[list[str]]:
    """The commands before ``calibrate`` (which needs their run directories)."""
    out = [
        ["cache", *common],
        ["cache", *common, "--condition", "call"],
        ["baseline", *common, *TEST_CONDITIONS],
        ["baseline", *common, *TEST_CONDITIONS, *TRAIN_CONDITIONS],
    ]
    for model in models:
        out.append(
            ["train", "--model", model, *SHIPPED[model], *common, *TEST_CONDITIONS, *TRAIN_CONDITIONS]
            + ["--threads", str(threads), "--models-dir", models_dir]
        )
    return out


def run(
    main: Callable[[list[str]], int],
    common: list[str],
    models: list[str],
    models_dir: str,
    out: str,
    threads: int,
) -> list[Path]:
    """Run every step with ``main`` (``training.__main__.main``), then calibrate and publish.
    Returns the run directories calibrate combined."""
    runs: list[Path] = []
    for argv in steps(common, models, models_dir, threads):
        before = set(Path(out).iterdir()) if Path(out).is_dir() else set()
        print("python -m training " + " ".join(argv), flush=True)
        main(argv + ["--out", out] if argv[0] != "cache" else argv)
        new = sorted(p for p in Path(out).iterdir() if p not in before and (p / "report.json").is_file())
        runs.extend(new)
    calibrate = ["calibrate", *map(str, runs), "--out", out, "--publish", models_dir]
    print("python -m training " + " ".join(calibrate), flush=True)
    main(calibrate)
    stats = ["adaptation-stats", *common, "--tau", ADAPTATION_TAU, "--write", f"{models_dir}/adaptation.json"]
    print("python -m training " + " ".join(stats), flush=True)
    main(stats)
    return runs
