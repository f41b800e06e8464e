"""``emotion-server predict`` prints one JSON object per file and fails with a non-zero status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser
from app.schemas import PredictResponse
from tests.serving_helpers import ANGRY, STEREO, write_dummy_models

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], model_dir: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "EMOTION_MODEL_DIR": str(model_dir),
        "EMOTION_DEVICE": "cpu",
        "EMOTION_MODELS": "cmt-awc,ca-mser,adf,3m-ser",
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_dummy_models(tmp_path_factory.mktemp("cli") / "models")


def test_predict_prints_json_lines(model_dir, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 50)
    proc = run_cli(
        ["predict", str(ANGRY), str(garbage), str(STEREO), "--words", "--channels", "separate"], model_dir
    )
    assert proc.returncode == 1, proc.stderr  # one file failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(ANGRY), str(garbage), str(STEREO)]

    ok = lines[0]
    PredictResponse.model_validate({k: v for k, v in ok.items() if k != "file"})
    assert "door" in ok["transcript"].lower() and "words" not in ok  # v2: words in the segments only
    assert all(s["words"] for s in ok["segments"])  # --words
    assert abs(sum(ok["emotion"]["probabilities"].values()) - 1) < 1e-6
    assert (
        "ensemble" not in ok["emotion"]["per_model"]
        and ok["emotion"]["ranking"][0]["label"] == ok["emotion"]["label"]
    )
    assert ok["text_sentiment"]["source"] == "vader"

    assert lines[1] == {"file": str(garbage), "error": "unsupported_audio", "detail": lines[1]["detail"]}
    assert {s["channel"] for s in lines[2]["segments"]} == {0, 1}


def test_predict_unknown_model_is_a_usage_error(model_dir):
    proc = run_cli(["predict", str(ANGRY), "--models", "nope"], model_dir)
    assert proc.returncode == 2
    assert proc.stdout == "" and "nope" in proc.stderr


def test_parser_has_serve_and_predict():
    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "9001"])
    assert args.port == 9001 and callable(args.func)
    args = parser.parse_args(["predict", "a.wav", "b.wav", "--models", "adf,ensemble"])
    assert args.files == ["a.wav", "b.wav"] and args.channels == "mix" and not args.words
