"""Record what the shipped models say about the fixture clips: ``tests/golden/shipped.json``.

Run after exporting new models (``make train-defaults``) and commit the files with them:

    .venv/bin/python -m tests.golden.record               # tiny.en + models/       -> shipped.json
    .venv/bin/python -m tests.golden.record --asr base    # base + models/base/     -> shipped-base.json

``tests/test_golden.py`` then checks that ``create_app()`` with nothing injected (default
settings, the shipped ``models/``, the bundled ASR and text encoder) still gives these labels and
probabilities: any change to the feature path that the models were not retrained for shows up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastapi.testclient import TestClient

GOLDEN = Path(__file__).with_name("shipped.json")


def golden_file(asr: str) -> Path:
    """The recorded results of the models shipped for one named ASR model."""
    return GOLDEN if asr == "tiny.en" else GOLDEN.with_name(f"shipped-{asr}.json")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLIPS = (
    "kids_angry_a01.flac",
    "dogs_neutral_a02.flac",
    "happy_dogs.flac",
    "angry_kids.flac",
    "two_utterances.flac",
)


def predict_all(client: TestClient) -> dict[str, dict]:
    out = {}
    for name in CLIPS:
        r = client.post("/v1/predict", files={"file": (name, (FIXTURES / name).read_bytes())})
        r.raise_for_status()
        body = r.json()
        out[name] = {
            "segments": [
                {
                    "start": s["start"],
                    "end": s["end"],
                    "text": s["text"],
                    "label": s["emotion"]["label"],
                    # the file's "ensemble" entry is the v2 top level (1.x had it in per_model): the
                    # file and its numbers did not change with the result shape
                    "per_model": {
                        **{m: e["probabilities"] for m, e in s["emotion"]["per_model"].items()},
                        "ensemble": s["emotion"]["probabilities"],
                    },
                }
                for s in body["segments"]
            ],
            "models": {m["id"]: m["sha256"] for m in body["models"]},
        }
    return out


def wait_ready(client: TestClient, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(client.get("/readyz").text)
        time.sleep(0.2)


def main() -> int:
    import argparse

    from app.main import create_app
    from app.settings import Settings

    ap = argparse.ArgumentParser(description="record the shipped models' results on the fixtures")
    ap.add_argument("--asr", default="tiny.en", help="named ASR model (default: tiny.en)")
    args = ap.parse_args()
    settings = Settings(asr_model=args.asr) if args.asr != "tiny.en" else Settings()
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        golden_file(args.asr).write_text(json.dumps(predict_all(client), indent=1) + "\n")
    print(f"wrote {golden_file(args.asr)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
