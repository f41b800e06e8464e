"""Golden test: the shipped models, served by ``create_app()`` with nothing injected, give the
recorded segments, labels and probabilities on the fixture clips (``tests/golden/record.py``).

Default settings throughout (tiny.en, MiniLM, ``models/``): this is what ``make serve`` runs; and
the same with ``EMOTION_ASR_MODEL=base``, which serves ``models/base/`` (``shipped-base.json``). The file's ``ensemble`` entry is the response's top-level emotion (result shape v2 has no
``per_model.ensemble``; the file and its numbers did not change with the shape). A change anywhere on the feature path (decoding, utterance cut, ASR decoding, text
encoder, acoustic features, the feature digest) that the models were not retrained for fails here.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.golden.record import FIXTURES, golden_file, predict_all, wait_ready

# The same machine reproduces the probabilities to ~1e-6; another CPU's int8/float kernels may
# round differently, so the check allows 0.01 per probability and requires identical labels, text
# and utterance times.
PROB_TOLERANCE = 0.01


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def asr(request):
    """The named ASR models, each with the emotion models shipped for it (models/, models/base/)."""
    return request.param


@pytest.fixture(scope="module")
def client(tmp_path_factory, asr):
    from app.main import create_app
    from app.settings import Settings

    # default settings but the ASR name; only the session database goes to a temporary file
    named = {"asr_model": asr} if asr != "tiny.en" else {}
    settings = Settings(sqlite_path=tmp_path_factory.mktemp("golden") / "sessions.db", **named)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def served(client):
    return predict_all(client)


def test_shipped_models_give_the_recorded_results(served, asr):
    golden = json.loads(golden_file(asr).read_text())
    assert served.keys() == golden.keys()
    for clip, want in golden.items():
        got = served[clip]
        assert got["models"] == want["models"], "models/ changed: re-record tests/golden/shipped.json"
        assert len(got["segments"]) == len(want["segments"]), clip
        for g, w in zip(got["segments"], want["segments"], strict=True):
            assert (g["start"], g["end"], g["text"], g["label"]) == (
                w["start"],
                w["end"],
                w["text"],
                w["label"],
            )
            for model, probs in w["per_model"].items():
                for label, p in probs.items():
                    assert abs(g["per_model"][model][label] - p) <= PROB_TOLERANCE, (clip, model, label)


def test_shipped_models_serve_result_shape_v2(client, asr):
    """The app answers in result shape v2 with the shipped models (one clip)."""
    golden = json.loads(golden_file(asr).read_text())["dogs_neutral_a02.flac"]["segments"][0]
    clip = FIXTURES / "dogs_neutral_a02.flac"
    body = client.post("/v1/predict", files={"file": (clip.name, clip.read_bytes())}).json()
    seg = body["segments"][0]
    emotion = seg["emotion"]
    assert (
        set(emotion["per_model"])
        == {m["id"] for m in body["models"]}
        == set(golden["per_model"]) - {"ensemble"}
    )
    assert emotion["label"] == golden["label"] and emotion["ranking"][0]["label"] == golden["label"]
    assert abs(emotion["score"] - golden["per_model"]["ensemble"][golden["label"]]) <= PROB_TOLERANCE
    assert seg["text_sentiment"]["label"] == "neutral" and "words" not in seg and "words" not in body
