"""One definition of an utterance (``app.analysis.segmenter``) for REST, streaming and training.

A recording built from four fixture utterances with 1-s gaps must give four utterances whether it
is split offline (``split_utterances``, what ``/v1/predict`` and the training cache call), fed to
the streaming segmenter in any frame size, uploaded, or streamed to a live server, and the
streamed finals must carry the same words and probabilities as the uploaded segments.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from app.analysis.audio import decode
from app.analysis.segmenter import (
    SegmenterConfig,
    UtteranceEnd,
    UtterancePolicy,
    UtteranceSegmenter,
    split_utterances,
)
from app.streaming.client import stream_audio
from tests.serving_helpers import FIXTURES
from tests.test_stream_ws import LiveServer

PARTS = [
    ("kids_angry_a01.flac", "kids are talking by the door"),
    ("dogs_neutral_a02.flac", "dogs are sitting by the door"),
    ("happy_dogs.flac", "dogs are sitting by the door"),
    ("angry_kids.flac", "kids are talking by the door"),
]
# Stream vs REST: the same samples reach the same analyzer, so times and words are equal, and so are
# the probabilities up to float noise. The server runs with model batches of one: the dummy test
# models average over zero-padded axes (the real ones read masks), so collating a segment with a
# longer one would move its dummy probabilities by up to 0.015.
PROB_TOLERANCE = 1e-4
TIME_TOLERANCE_S = 0.001


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalpha() or c == " ").split()


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The four utterances with 1 s of silence between them (and 0.5 s around), as 16-bit samples
    (what a WAV upload and a pcm_s16le stream both carry), and each part's sample range."""
    gap, edge = np.zeros(16000, np.float32), np.zeros(8000, np.float32)
    pieces, ranges, pos = [edge], [], len(edge)
    for i, (name, _) in enumerate(PARTS):
        clip = decode(FIXTURES / name).mono
        pieces.append(clip)
        ranges.append((pos, pos + len(clip)))
        pos += len(clip)
        if i < len(PARTS) - 1:
            pieces.append(gap)
            pos += len(gap)
    pieces.append(edge)
    audio = np.concatenate(pieces)
    audio = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
    return audio, ranges


def test_a_recording_splits_into_its_utterances(recording):
    audio, ranges = recording
    spans = split_utterances(audio)
    assert len(spans) == len(PARTS)
    for span, (lo, hi) in zip(spans, ranges, strict=True):
        assert lo <= span.start and span.end <= hi + 0.2 * 16000  # inside its part (+ post pad)
        assert span.reason in ("end_of_speech", "stop")
    assert split_utterances(np.zeros(3 * 16000, np.float32)) == []


@pytest.mark.parametrize("frame", [320, 512, 1000, 4799])
def test_streaming_segmenter_cuts_the_same_spans(recording, frame):
    """Streaming finals are cut by the very segmenter REST runs offline: any frame size gives the
    same spans (partials and speculation do not move them)."""
    audio, _ = recording
    seg = UtteranceSegmenter(SegmenterConfig(UtterancePolicy(), partial_every_s=0.5, speculative=True))
    ends = []
    for i in range(0, len(audio), frame):
        ends += [e for e in seg.feed(audio[i : i + frame]) if isinstance(e, UtteranceEnd)]
    ends += [e for e in seg.flush("stop") if isinstance(e, UtteranceEnd)]
    assert [(e.start, e.end) for e in ends] == [(s.start, s.end) for s in split_utterances(audio)]
    assert all(np.array_equal(e.audio, audio[e.start : e.end]) for e in ends)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("utterances-live"), max_batch_size=1)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def rest_segments(server, recording):
    audio, _ = recording
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    r = httpx.post(
        server.base + "/v1/predict?words=true",
        files={"file": ("four.wav", buf.getvalue(), "audio/wav")},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["segments"], buf.getvalue()


def test_rest_gives_one_segment_per_utterance(rest_segments):
    """Each segment holds its own utterance's words. tiny.en mis-hears the shouted first word of
    kids_angry_a01 once it is cut ("KINDS"/"Hints are talking..."), so one substituted word per
    utterance is allowed; the other five words, and their order, must be right."""
    segments, _ = rest_segments
    assert len(segments) == len(PARTS)
    for segment, (_, expected) in zip(segments, PARTS, strict=True):
        got, want = _words(segment["text"]), expected.split()
        assert len(got) == len(want) and sum(g != w for g, w in zip(got, want, strict=True)) <= 1, got


def test_rest_whole_mode_keeps_the_channel_as_one_segment(server, rest_segments):
    _, wav = rest_segments
    r = httpx.post(
        server.base + "/v1/predict?segmentation=whole",
        files={"file": ("four.wav", wav, "audio/wav")},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]
    assert len(segments) == 1 and segments[0]["start"] == 0.0
    assert "talking" in segments[0]["text"].lower() and "sitting" in segments[0]["text"].lower()


def test_streamed_finals_match_rest_segments(server, recording, rest_segments):
    audio, _ = recording
    segments, _ = rest_segments
    run = asyncio.run(stream_audio(audio, 16000, server.ws, realtime=False, timeout_s=180, words=True))
    finals = run.of_type("final")
    assert len(finals) == len(segments)
    for f, s in zip(finals, segments, strict=True):
        assert (
            abs(f["start"] - s["start"]) <= TIME_TOLERANCE_S and abs(f["end"] - s["end"]) <= TIME_TOLERANCE_S
        )
        assert f["text"] == s["text"]
        assert [w["word"] for w in f["words"]] == [w["word"] for w in s["words"]]
        for model, fe in f["emotion"]["per_model"].items():
            se = s["emotion"]["per_model"][model]["probabilities"]
            for label, p in fe["probabilities"].items():
                assert abs(p - se[label]) <= PROB_TOLERANCE, (model, label)
