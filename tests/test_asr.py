"""app.analysis.asr: transcripts, word times and confidences, encoder frames, VAD, offline loading."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.analysis import asr
from app.analysis.audio import decode


@pytest.fixture(scope="module")
def clips(fixtures_dir):
    return {
        "kids": decode(fixtures_dir / "kids_angry_a01.flac").mono,
        "dogs": decode(fixtures_dir / "dogs_neutral_a02.flac").mono,
    }


@pytest.mark.parametrize(
    "name,expected", [("kids", "kids are talking by the door"), ("dogs", "dogs are sitting by the door")]
)
def test_transcript_and_words(analyzer, clips, name, expected):
    tr = analyzer.recognizer.transcribe(clips[name])
    normalised = "".join(c for c in tr.text.lower() if c.isalpha() or c == " ")
    assert normalised.split() == expected.split()
    assert tr.language == "en"
    assert len(tr.words) == 6
    duration = len(clips[name]) / 16000
    previous_end = 0.0
    for w in tr.words:
        assert 0.0 <= w.start <= w.end <= duration + 0.05
        assert w.start >= previous_end - 1e-6  # ordered, non-overlapping
        assert 0.0 <= w.confidence <= 1.0
        previous_end = w.end
    assert np.mean([w.confidence for w in tr.words]) > 0.5


def test_encoder_frames_match_duration(analyzer, clips):
    for audio in (clips["kids"], clips["dogs"][:8000]):
        tr = analyzer.recognizer.transcribe(audio)
        assert tr.encoder_frame_rate == 50.0
        assert tr.encoder_frames.shape == (math.ceil(len(audio) / 16000 * 50), 384)
        assert tr.encoder_frames.dtype == np.float32 and np.isfinite(tr.encoder_frames).all()


def test_encoder_frames_are_deterministic_per_clip(analyzer, clips):
    a = analyzer.recognizer.transcribe(clips["kids"]).encoder_frames
    b = analyzer.recognizer.transcribe(clips["kids"]).encoder_frames
    c = analyzer.recognizer.transcribe(clips["dogs"]).encoder_frames
    assert np.allclose(a, b, atol=1e-5)
    n = min(len(a), len(c))
    assert not np.allclose(a[:n], c[:n], atol=1e-2)


def test_silence_gives_empty_transcript(analyzer):
    tr = analyzer.recognizer.transcribe(np.zeros(16000, np.float32))
    assert tr.words == [] and tr.encoder_frames.shape == (50, 384)


def test_vad_finds_speech_between_silences(clips):
    silence = np.zeros(16000, np.float32)
    audio = np.concatenate([silence, clips["kids"], silence, clips["dogs"], silence])
    regions = asr.speech_regions(audio)
    assert len(regions) == 2
    assert regions[0].start > 16000 * 0.8 and regions[1].start > 16000 * 2 + len(clips["kids"]) * 0.9
    assert asr.speech_regions(np.zeros(32000, np.float32)) == []


def test_model_name_never_reaches_a_hub(tmp_path):
    with pytest.raises(asr.ASRError):
        asr.Recognizer(model_path=tmp_path / "small.en")
