"""POST /v1/predict and /predict on real speech, with the real Analyzer and dummy ONNX models:
result shape v2 (emotion ranking and score, no ensemble entry, words only when asked, roles, text
sentiment), options, session storing, the OpenAPI document."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import PredictResponse
from tests.serving_helpers import ALL_MODELS, ANGRY, CLASSES, HAPPY, STEREO, make_service, wait_ready


class MemoryStore:
    """The SessionStore calls the predict route makes, in memory."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.results: dict[str, list] = {}

    async def get_session(self, session_id):
        return self.sessions.get(session_id)

    async def open_session(self, session_id, metadata=None, source="stream", roles=None):
        self.sessions[session_id] = {"id": session_id, "source": source, "roles": roles}
        self.results.setdefault(session_id, [])
        return self.sessions[session_id]

    async def append_result(self, session_id, result):
        if session_id not in self.sessions:
            raise KeyError(session_id)
        self.results[session_id].append(result)
        return len(self.results[session_id])

    async def close(self):
        pass


@pytest.fixture(scope="module")
def store():
    return MemoryStore()


@pytest.fixture(scope="module")
def client(tmp_path_factory, store):
    service = make_service(tmp_path_factory.mktemp("predict"))
    app = create_app(service.settings, service, store=store)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def angry(client):
    r = client.post(
        "/v1/predict?words=true", files={"file": ("angry.flac", ANGRY.read_bytes(), "audio/flac")}
    )
    assert r.status_code == 200, r.text
    return r.json()


def _check_emotion(emotion, expected_models):
    probs = emotion["probabilities"]
    assert emotion["label"] in CLASSES
    assert set(probs) == set(CLASSES)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)
    assert emotion["label"] == max(probs, key=probs.get) and emotion["score"] == probs[emotion["label"]]
    # ranking: every class once, with its probability, most probable first
    ranking = emotion["ranking"]
    assert [r["label"] for r in ranking] == sorted(probs, key=probs.get, reverse=True)
    assert all(r["score"] == probs[r["label"]] for r in ranking) and ranking[0]["label"] == emotion["label"]
    assert set(emotion["per_model"]) == set(expected_models)  # the ensemble is the top level, not an entry
    for entry in emotion["per_model"].values():
        assert math.isclose(sum(entry["probabilities"].values()), 1.0, abs_tol=1e-6)
        assert all(0.0 <= p <= 1.0 for p in entry["probabilities"].values())
        assert (
            entry["score"] == entry["probabilities"][entry["label"]] == max(entry["probabilities"].values())
        )


def test_response_schema_and_types(angry):
    PredictResponse.model_validate(angry)  # the documented response model
    assert isinstance(angry["duration_s"], float) and abs(angry["duration_s"] - 3.87) < 0.01
    assert "door" in angry["transcript"].lower()
    assert angry["language"] == "en"
    assert [m["id"] for m in angry["models"]] == list(ALL_MODELS)
    assert all(m["variant"] == "dummy" and len(m["sha256"]) == 64 for m in angry["models"])
    _check_emotion(angry["emotion"], ALL_MODELS)
    assert "words" not in angry  # v2: words live in the segments only
    assert len(angry["segments"]) == 1
    seg = angry["segments"][0]
    assert seg["channel"] == 0 and 0.0 <= seg["start"] < seg["end"] <= angry["duration_s"]
    assert seg["role"] is None  # no roles= given
    _check_emotion(seg["emotion"], ALL_MODELS)
    # TEXT sentiment of "Kids are talking by the door": no sentiment-bearing word, so neutral
    assert seg["text_sentiment"]["source"] == "vader" and seg["text_sentiment"]["label"] == "neutral"
    assert angry["text_sentiment"] == seg["text_sentiment"]  # one segment: the mean is that segment's
    timing = angry["timing_ms"]
    assert set(timing) == {"decode", "asr", "features", "inference", "total"}
    assert all(isinstance(v, float) and v >= 0 for v in timing.values())
    assert timing["asr"] > 0 and timing["total"] >= timing["decode"]
    assert angry["session_id"] is None and angry["seq"] is None


def test_ensemble_is_the_mean_of_the_models(angry):
    emo = angry["segments"][0]["emotion"]
    for c in CLASSES:
        mean = sum(emo["per_model"][m]["probabilities"][c] for m in ALL_MODELS) / len(ALL_MODELS)
        assert math.isclose(emo["probabilities"][c], mean, abs_tol=1e-9)  # the top level is the ensemble
    # one segment: the whole-input emotion is that segment's
    assert angry["emotion"]["probabilities"] == pytest.approx(emo["probabilities"])


def test_words_are_in_range_and_ordered(angry):
    seg = angry["segments"][0]
    words = seg["words"]
    assert len(words) >= 4
    prev = 0.0
    for w in words:
        assert w["word"].strip()
        assert seg["start"] <= w["start"] <= w["end"] <= seg["end"]
        assert w["start"] >= prev
        assert 0.0 <= w["confidence"] <= 1.0
        prev = w["start"]


def test_words_off_by_default(client):
    r = client.post("/v1/predict", files={"file": ("angry.flac", ANGRY.read_bytes(), "audio/flac")})
    assert r.status_code == 200
    assert "words" not in r.json() and "words" not in r.json()["segments"][0]  # absent, not []


def test_predict_alias_and_raw_body_equal_v1(client, angry):
    raw = client.post(
        "/predict?words=true", content=ANGRY.read_bytes(), headers={"Content-Type": "audio/flac"}
    )
    assert raw.status_code == 200, raw.text
    a, b = dict(angry), raw.json()
    a.pop("timing_ms"), b.pop("timing_ms")
    assert a == b  # same pipeline, deterministic models: identical apart from timings


def test_models_option_selects_models_and_ensemble(client):
    data = ANGRY.read_bytes()
    one = client.post("/v1/predict?models=adf", content=data, headers={"Content-Type": "audio/flac"}).json()
    assert [m["id"] for m in one["models"]] == ["adf"]
    assert set(one["emotion"]["per_model"]) == {"adf"}
    assert one["emotion"]["probabilities"] == pytest.approx(
        one["emotion"]["per_model"]["adf"]["probabilities"]
    )

    # `ensemble` (1.x) is accepted and adds nothing: the top level is the ensemble of the listed models
    two = client.post(
        "/v1/predict?models=adf,cmt-awc,ensemble", content=data, headers={"Content-Type": "audio/flac"}
    ).json()
    assert [m["id"] for m in two["models"]] == ["adf", "cmt-awc"]
    assert set(two["emotion"]["per_model"]) == {"adf", "cmt-awc"}
    for c in CLASSES:
        mean = sum(two["emotion"]["per_model"][m]["probabilities"][c] for m in ("adf", "cmt-awc")) / 2
        assert math.isclose(two["emotion"]["probabilities"][c], mean, abs_tol=1e-6)

    only = client.post(
        "/v1/predict?models=ensemble", content=data, headers={"Content-Type": "audio/flac"}
    ).json()
    assert set(only["emotion"]["per_model"]) == set(ALL_MODELS)


def test_options_as_multipart_form_fields(client):
    r = client.post(
        "/v1/predict",
        files={"file": ("happy.flac", HAPPY.read_bytes(), "audio/flac")},
        data={"models": "3m-ser", "words": "true"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["id"] for m in body["models"]] == ["3m-ser"] and body["segments"][0]["words"]
    assert "dogs" in body["transcript"].lower()


def test_separate_channels_give_per_channel_segments_and_roles(client):
    r = client.post(
        "/v1/predict?channels=separate&words=true&roles=agent,customer",
        files={"file": ("call.wav", STEREO.read_bytes())},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    segs = body["segments"]
    assert sorted({s["channel"] for s in segs}) == [0, 1]
    assert all(s["role"] == ("agent", "customer")[s["channel"]] for s in segs)  # index = channel
    left = " ".join(s["text"] for s in segs if s["channel"] == 0).lower()
    right = " ".join(s["text"] for s in segs if s["channel"] == 1).lower()
    assert "kids" in left and "dogs" in right
    assert [s["start"] for s in segs] == sorted(s["start"] for s in segs)
    for s in segs:
        assert 0 <= s["start"] < s["end"] <= body["duration_s"] + 1e-6
        assert all(s["start"] <= w["start"] <= w["end"] <= s["end"] for w in s["words"])
    # the whole-input emotion is the duration-weighted mean of the segments
    weights = [s["end"] - s["start"] for s in segs]
    for c in CLASSES:
        expected = sum(
            w * s["emotion"]["probabilities"][c] for w, s in zip(weights, segs, strict=True)
        ) / sum(weights)
        assert math.isclose(body["emotion"]["probabilities"][c], expected, abs_tol=1e-6)

    mixed = client.post("/v1/predict", files={"file": ("call.wav", STEREO.read_bytes())}).json()
    assert {s["channel"] for s in mixed["segments"]} == {0}


@pytest.mark.parametrize(
    "query, detail",
    [
        ("roles=agent,customer", "2 role(s) given for 1 analysed channel(s)"),  # mix: one channel
        ("channels=separate&roles=agent,,customer", "role 1"),  # an empty name would shift the channels
        ("channels=separate&roles=agent,the%20customer", "role 1"),
        ("channels=separate&roles=a,b,c", "3 role(s) given for 2 analysed channel(s)"),  # a 2-channel file
    ],
)
def test_bad_roles_are_refused(client, query, detail):
    r = client.post(f"/v1/predict?{query}", files={"file": ("call.wav", STEREO.read_bytes())})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and detail in r.json()["detail"]


def test_session_id_stores_each_segment(client, store):
    r = client.post(
        "/v1/predict?channels=separate&session_id=call-42", files={"file": ("call.wav", STEREO.read_bytes())}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] == "call-42"
    assert body["seq"] == list(range(1, len(body["segments"]) + 1))
    assert store.sessions["call-42"]["source"] == "rest"
    stored = store.results["call-42"]
    assert [s["channel"] for s in stored] == [s["channel"] for s in body["segments"]]
    assert {"channel", "role", "start", "end", "text", "words", "emotion", "text_sentiment"} <= set(stored[0])
    assert all(s["words"] for s in stored)  # the store keeps the words, though the response had none
    assert all("words" not in s for s in body["segments"])
    assert [s["emotion"] for s in stored] == [s["emotion"] for s in body["segments"]]  # one shape
    again = client.post(
        "/v1/predict?session_id=call-42", files={"file": ("a.flac", ANGRY.read_bytes())}
    ).json()
    assert again["seq"] == [len(body["segments"]) + 1]  # appended to the same session
    assert store.sessions["call-42"]["roles"] is None
    named = client.post(  # roles= names the session's channels too (summaries and alerts are per role)
        "/v1/predict?channels=separate&session_id=call-42&roles=agent,customer",
        files={"file": ("call.wav", STEREO.read_bytes())},
    )
    assert named.status_code == 200, named.text
    assert store.sessions["call-42"]["roles"] == ["agent", "customer"]
    assert [r["role"] for r in store.results["call-42"][-2:]] == ["agent", "customer"]


def test_models_listing_and_openapi(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["models"]] == list(ALL_MODELS)
    assert r.json()["classes"] == list(CLASSES)
    assert (r.json()["asr_model"], r.json()["asr_encoder_window"]) == ("tiny.en", "fitted")
    assert r.json()["model_dir"].endswith("models")
    spec = client.get("/openapi.json").json()
    assert spec["info"]["version"] == "2.0.0" and "Changes in 2.0" in spec["info"]["description"]
    op = spec["paths"]["/v1/predict"]["post"]
    assert "PredictResponse" in str(op["responses"]["200"])
    assert {"models", "channels", "words", "roles", "session_id"} <= {p["name"] for p in op["parameters"]}
    schemas = spec["components"]["schemas"]
    assert "words" not in schemas["PredictResponse"]["properties"]
    assert {"score", "ranking"} <= set(schemas["Emotion"]["required"])
    assert {"role", "text_sentiment", "words"} <= set(schemas["SegmentOut"]["properties"])
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "/predict" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_analyze_utterance_absolute_times(client):
    """The streaming entry point: offsets and channel are applied to the result."""
    import soundfile as sf

    service = client.app.state.service
    audio, _ = sf.read(str(HAPPY), dtype="float32")
    result = client.portal.call(service.analyze_utterance, audio[12000:50000], None, 1, 10.0)
    assert (
        result.channel == 1
        and result.start == 10.0
        and math.isclose(result.end, 10.0 + 38000 / 16000, abs_tol=1e-3)
    )
    assert result.words and all(10.0 <= w.start <= w.end <= result.end for w in result.words)
    assert set(result.emotion.per_model) == set(ALL_MODELS)
    assert result.text_sentiment is not None and result.decoding is not None and result.decoding.tokens
    stored = result.to_store()
    assert stored["channel"] == 1 and stored["emotion"]["label"] in CLASSES and stored["role"] is None


def test_concurrent_requests_give_identical_results(client):
    import concurrent.futures

    data = HAPPY.read_bytes()

    def post(_):
        return client.post("/v1/predict?models=adf", content=data, headers={"Content-Type": "audio/flac"})

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        responses = list(ex.map(post, range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    probs = [r.json()["emotion"]["probabilities"] for r in responses]
    assert all(p == pytest.approx(probs[0]) for p in probs)  # concurrency (and batching) changes nothing
