"""app.analysis.asr: transcripts, word times and confidences, encoder frames, batch parity, offline loading."""

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


def test_batched_transcription_matches_single(analyzer, clips):
    """One batch of utterances from different clients gives each the result it gets alone: same
    words, confidences within 1e-3, encoder frames within 1e-3 (int8 CPU: identical here)."""
    audios = [clips["kids"], clips["dogs"], np.zeros(16000, np.float32), clips["dogs"][:24000]]
    single = [analyzer.recognizer.transcribe(a) for a in audios]
    batched = analyzer.recognizer.transcribe_batch(audios)
    assert [t.text for t in batched] == [t.text for t in single]
    for s, b in zip(single, batched, strict=True):
        assert [w.word for w in b.words] == [w.word for w in s.words]
        for ws, wb in zip(s.words, b.words, strict=True):
            assert abs(ws.confidence - wb.confidence) <= 1e-3
            assert abs(ws.start - wb.start) <= 0.02 and abs(ws.end - wb.end) <= 0.02
        assert b.encoder_frames.shape == s.encoder_frames.shape
        assert np.abs(b.encoder_frames - s.encoder_frames).max() <= 1e-3
    assert batched[0].timing_ms["asr_batch"] == 4.0


def test_encoder_window_fits_the_utterance(analyzer):
    rec = analyzer.recognizer
    if rec.encoder_window == "full":
        assert rec.window_frames(16000) == 3000
    else:
        assert rec.window_frames(4 * 16000) == 1000  # 10 s at least
        assert rec.window_frames(12 * 16000) == 1500  # rounded up to 5 s
        assert rec.window_frames(30 * 16000) == 3000
    with pytest.raises(asr.ASRError, match="at most 30 s"):
        rec.transcribe(np.zeros(31 * 16000, np.float32))


def test_model_name_never_reaches_a_hub(tmp_path):
    with pytest.raises(asr.ASRError):
        asr.Recognizer(model_path=tmp_path / "small.en")
