"""``emotion-server predict`` prints one JSON object per file and fails with a non-zero status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser
from app.schemas import PredictResponse
from tests.serving_helpers import ANGRY, HAPPY, STEREO, write_dummy_models

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


# --- predict: fail fast, concurrency, order, text on a terminal --------------------------------------


def test_predict_missing_files_fail_fast_before_any_work(monkeypatch, tmp_path, capsys):
    import app.service
    from app.cli import main

    def no_service(*a, **k):
        raise AssertionError("the service must not be built when an input is missing")

    monkeypatch.setattr(app.service, "EmotionService", no_service)
    missing = tmp_path / "missing.wav"
    code = main(["predict", str(ANGRY), str(missing), str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert f"{missing}: no such file" in captured.err and f"{tmp_path}: not a file" in captured.err


def test_map_ordered_bounds_concurrency_and_emits_in_input_order():
    import asyncio

    from app.cli import map_ordered

    delays = [0.08, 0.01, 0.05, 0.0, 0.02]  # the first item finishes last
    running, peak, done, emitted = 0, 0, [], []

    async def worker(i: int) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(delays[i])
        running -= 1
        return f"r{i}"

    asyncio.run(
        map_ordered(
            list(range(5)), worker, 3, lambda i, r: emitted.append((i, r)), lambda i, r: done.append(i)
        )
    )
    assert emitted == [(i, f"r{i}") for i in range(5)]
    assert done != sorted(done) and sorted(done) == list(range(5))  # they did finish out of order
    assert peak == 3


def test_predict_concurrent_json_keeps_input_order(model_dir, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 50)
    files = [str(STEREO), str(garbage), str(ANGRY), str(HAPPY)]  # the garbage fails first
    proc = run_cli(["predict", *files, "--concurrency", "4", "--format", "json"], model_dir)
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == files
    assert [("error" in line) for line in lines] == [False, True, False, False]
    assert "\r" not in proc.stderr  # no progress bar off a terminal


def test_predict_on_a_terminal_prints_text_colour_and_progress(model_dir):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(
        EMOTION_MODEL_DIR=str(model_dir), EMOTION_DEVICE="cpu", EMOTION_MODELS="adf,3m-ser", TERM="xterm"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "predict", str(ANGRY)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=240) == 0
    screen = b"".join(chunks).decode()
    assert "[" + "█" * 30 + "] 1/1 files" in screen  # the bar reached the end
    plain = re.sub(r"\x1b\[[0-9;]*[mK]", "", screen).replace("\r\n", "\n")
    assert "\x1b[2m00:0" in screen  # colour: times dimmed
    assert re.search(
        r'(?i)\n  \d\d:\d\d\.\d–\d\d:\d\d\.\d  \w+ +0\.\d\d  ▇* *"kids are talking by the door', plain
    )
    assert re.search(r"summary: 1 utterance, \d+\.\d s of speech  ·  \w+ 1  ·  dominant \w+", plain)


def test_stream_mic_without_sounddevice_names_the_extra(monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as if not installed
    assert main(["stream", "--mic", "--url", "ws://127.0.0.1:9/v1/stream"]) == 2
    assert "pip install 'emotion-server[mic]'" in capsys.readouterr().err
