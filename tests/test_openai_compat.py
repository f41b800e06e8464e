"""``POST /v1/audio/transcriptions`` driven by the official ``openai`` client against a LIVE server
(uvicorn in a thread on a free loopback port) with the shipped models (default settings, as
``make serve``) and an API key: the words of the fixture, an emotion per segment equal to
``/v1/predict``'s, the text/srt/vtt formats, and errors in OpenAI's shape."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.serving_helpers import wav_bytes
from tests.stream_support import free_port

openai = pytest.importorskip("openai")

KIDS = (
    Path(__file__).parent / "fixtures" / "kids_angry_a01.flac"
)  # RAVDESS a01: "Kids are talking by the door"
KEY = "sk-test-openai-compat"
CLASSES = {"neutral", "happy", "sad", "angry"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(
        sqlite_path=tmp_path_factory.mktemp("openai") / "sessions.db", api_keys=[KEY], device="cpu"
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="openai-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("live server not ready")
        time.sleep(0.2)
    yield base
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def verbose(client):
    with KIDS.open("rb") as f:
        return client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_verbose_json_has_the_words_and_an_emotion_per_segment(verbose, server):
    # tiny.en hears the shouted "Kids" of this clip as "KINDS" (the golden file records the same):
    # the other five words must be exact.
    assert _words(verbose.text)[1:] == ["are", "talking", "by", "the", "door"], verbose.text
    assert _words(verbose.text)[0] in ("kids", "kinds")
    assert verbose.language == "english" and abs(verbose.duration - sf.info(str(KIDS)).duration) < 1e-3
    assert [w.word.strip(" !.,").lower() for w in verbose.words][1:] == [
        "are",
        "talking",
        "by",
        "the",
        "door",
    ]
    assert len(verbose.segments) == 1
    seg = verbose.segments[0]
    assert seg.id == 0 and seg.text == verbose.text and seg.temperature == 0.0
    assert seg.tokens and seg.avg_logprob < 0 and 0 <= seg.no_speech_prob <= 1 and seg.compression_ratio > 0
    assert seg.seek == round(seg.start * 100)
    for w in verbose.words:
        assert seg.start <= w.start <= w.end <= seg.end and 0 <= w.confidence <= 1

    emotion = seg.emotion  # additions to OpenAI's shape: kept by the client as extra fields
    assert emotion["label"] in CLASSES and emotion["ranking"][0]["label"] == emotion["label"]
    assert set(emotion["per_model"]) == {"cmt-awc", "ca-mser", "adf", "3m-ser"}
    assert seg.text_sentiment["source"] == "vader"
    # the same path as /v1/predict: the same cut, text and probabilities
    r = httpx.post(
        server + "/v1/predict",
        files={"file": ("kids.flac", KIDS.read_bytes())},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    ours = r.json()["segments"][0]
    assert (ours["start"], ours["end"], ours["text"]) == (seg.start, seg.end, seg.text)
    assert ours["emotion"]["label"] == emotion["label"]
    for label, p in ours["emotion"]["probabilities"].items():
        assert abs(p - emotion["probabilities"][label]) < 1e-6


def test_json_text_srt_and_vtt(client, verbose):
    data = KIDS.read_bytes()
    plain = client.audio.transcriptions.create(model="whisper-1", file=("kids.flac", data))
    assert plain.text == verbose.text
    text = client.audio.transcriptions.create(
        model="tiny.en", file=("kids.flac", data), response_format="text"
    )
    assert isinstance(text, str) and text.strip() == verbose.text
    seg = verbose.segments[0]

    def stamp(s: float, sep: str) -> str:
        ms = round(s * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"

    srt = client.audio.transcriptions.create(
        model="whisper-1", file=("kids.flac", data), response_format="srt"
    )
    cues = re.findall(r"(\d+)\n(\S+) --> (\S+)\n(.+)\n\n", srt)
    assert cues == [("1", stamp(seg.start, ","), stamp(seg.end, ","), verbose.text)], srt
    vtt = client.audio.transcriptions.create(
        model="whisper-1", file=("kids.flac", data), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n")
    assert re.findall(r"(\S+) --> (\S+)\n(.+)\n", vtt) == [
        (stamp(seg.start, "."), stamp(seg.end, "."), verbose.text)
    ]


def test_silence_is_an_empty_transcript(client):
    silence = wav_bytes(np.zeros(16000, np.float32))
    out = client.audio.transcriptions.create(
        model="whisper-1", file=("silence.wav", silence), response_format="verbose_json"
    )
    assert out.text == "" and out.segments == [] and abs(out.duration - 1.0) < 1e-3


def test_errors_have_openais_shape(server, client):
    data = KIDS.read_bytes()
    with pytest.raises(openai.AuthenticationError) as bad_key:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).audio.transcriptions.create(
            model="whisper-1", file=("kids.flac", data)
        )
    assert bad_key.value.status_code == 401 and bad_key.value.code == "unauthorized"
    with pytest.raises(openai.BadRequestError) as model:
        client.audio.transcriptions.create(model="gpt-9", file=("kids.flac", data))
    assert model.value.param == "model" and model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as granularity:
        client.audio.transcriptions.create(
            model="whisper-1", file=("kids.flac", data), timestamp_granularities=["word"]
        )
    assert granularity.value.param == "timestamp_granularities"
    with pytest.raises(openai.APIStatusError) as garbage:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio at all" * 50))
    assert garbage.value.status_code == 415 and garbage.value.code == "unsupported_audio"
    r = httpx.post(
        server + "/v1/audio/transcriptions",
        data={"model": "whisper-1", "response_format": "xml"},
        files={"file": ("kids.flac", data)},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
