"""training/recipe.py: the shipped recipe is valid command lines, and train-defaults hands calibrate
exactly the run directories its steps wrote."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from training import recipe  # noqa: E402
from training.__main__ import build_parser  # noqa: E402


def test_every_step_parses_with_the_real_cli():
    common = ["--data", "d", "--cache-dir", "c", "--asr-model", "base"]
    steps = recipe.steps(common, list(recipe.SHIPPED), "models/base", 2)
    commands = [s[0] for s in steps]
    assert commands == ["cache", "cache", "baseline", "baseline"] + ["train"] * 4
    parser = build_parser()
    for argv in steps:
        args = parser.parse_args(argv + (["--out", "runs"] if argv[0] != "cache" else []))
        assert args.asr_model == "base"
        if args.command == "train":
            assert args.models_dir == "models/base" and args.threads == 2
            assert args.train_conditions == "clean,call" and args.test_conditions == "clean,call"
    adf = next(s for s in steps if "adf" in s)
    assert parser.parse_args(adf).acoustic == "whisper"


def test_train_defaults_calibrates_the_runs_its_steps_wrote(tmp_path, monkeypatch):
    from training import __main__ as cli

    out = tmp_path / "runs"
    (out / "old-run").mkdir(parents=True)
    (out / "old-run" / "report.json").write_text("{}")
    calls: list[list[str]] = []

    def fake_main(argv):
        calls.append(argv)
        if argv[0] in ("baseline", "train"):
            run = out / f"{argv[0]}-{len(calls)}"
            run.mkdir()
            (run / "report.json").write_text(json.dumps({"argv": argv}))
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["train-defaults", "--asr-model", "base", "--out", str(out), "--models", "adf", "3m-ser"]
    )
    cli.cmd_train_defaults(args)
    assert (tmp_path / "models" / "base").is_dir()  # base's models go to models/base by default
    stats = calls[-1]
    assert stats[0] == "adaptation-stats" and stats[-2:] == ["--write", "models/base/adaptation.json"]
    assert build_parser().parse_args(stats).asr_model == "base"
    calibrate = calls[-2]
    assert calibrate[0] == "calibrate" and calibrate[-2:] == ["--publish", "models/base"]
    combined = calibrate[1 : calibrate.index("--out")]
    assert combined == [
        str(out / f"{c}-{i}") for i, c in ((3, "baseline"), (4, "baseline"), (5, "train"), (6, "train"))
    ]
    assert "old-run" not in " ".join(calibrate)
