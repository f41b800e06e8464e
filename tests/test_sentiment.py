"""Text sentiment (``app.analysis.sentiment``, VADER 3.3.2) and the result shape v2 models that carry it
(``app.schemas``): labels, thresholds, the whole-transcript mean, no download at run time, ranking,
words only when asked, what the store keeps."""

from __future__ import annotations

import socket

import pytest

from app.analysis import sentiment
from app.analysis.sentiment import disagrees, label_of, mean_sentiment, text_sentiment
from app.schemas import Emotion, ModelEmotion, SegmentOut, Timing, UtteranceResult, WordOut


def test_labels_follow_vaders_standard_thresholds():
    happy = text_sentiment("Thank you so much, that was really helpful and great!")
    angry = text_sentiment("This is terrible, I hate waiting and nobody helped me.")
    flat = text_sentiment("Dogs are sitting by the door.")
    assert happy is not None and happy.label == "positive" and happy.compound >= 0.05 and happy.pos > 0
    assert angry is not None and angry.label == "negative" and angry.compound <= -0.05 and angry.neg > 0
    assert flat is not None and flat.label == "neutral" and flat.compound == 0.0 and flat.neu == 1.0
    assert happy.source == "vader"
    assert happy.pos + happy.neu + happy.neg == pytest.approx(1.0, abs=0.002)
    assert (label_of(0.05), label_of(0.0499), label_of(-0.0499), label_of(-0.05)) == (
        "positive",
        "neutral",
        "neutral",
        "negative",
    )


def test_no_text_or_another_language_has_no_sentiment():
    assert text_sentiment("") is None and text_sentiment("  ... !") is None
    assert text_sentiment("Das ist schrecklich", language="de") is None  # VADER's lexicon is English
    assert text_sentiment("This is great", language="en") is not None
    assert text_sentiment("This is great", language=None) is not None


def test_whole_transcript_is_the_mean_of_the_segments():
    parts = [text_sentiment("I love it, great!"), None, text_sentiment("This is awful.")]
    mean = mean_sentiment(parts)
    assert mean is not None
    scored = [p for p in parts if p is not None]
    assert mean.compound == pytest.approx(sum(p.compound for p in scored) / 2, abs=1e-4)
    assert mean.label == label_of(mean.compound)
    assert mean_sentiment([None, None]) is None and mean_sentiment([]) is None


def test_text_and_voice_disagreement():
    pos, neg = text_sentiment("Great, thank you so much!"), text_sentiment("This is awful.")
    flat = text_sentiment("Dogs are sitting by the door.")
    assert disagrees(pos, "angry") and disagrees(pos, "sad") and disagrees(neg, "happy")
    assert not disagrees(pos, "happy") and not disagrees(neg, "angry") and not disagrees(neg, "neutral")
    assert not disagrees(flat, "angry") and not disagrees(None, "angry") and not disagrees(pos, None)


def test_a_long_text_is_scored_off_the_loop_with_the_same_result(monkeypatch):
    import asyncio
    import threading

    from app.service import score_text

    threads: list[str] = []

    def spy(text, language=None):
        threads.append(threading.current_thread().name)
        return text_sentiment(text, language)

    monkeypatch.setattr(sentiment, "text_sentiment", spy)
    long_text = "I waited an hour and nobody helped me, this is terrible service. " * 10
    assert len(long_text) > sentiment.INLINE_MAX_CHARS
    assert asyncio.run(score_text(long_text)) == text_sentiment(long_text)
    assert asyncio.run(score_text("great")) == text_sentiment("great")
    main = threading.main_thread().name
    assert threads[0] != main and threads[1] == main  # long: a worker thread; short: inline


def test_the_lexicon_ships_with_the_package_and_nothing_is_downloaded(monkeypatch):
    """A fresh analyzer loads with every socket refused: the lexicon is read from the package."""

    def no_network(*args, **kwargs):
        raise AssertionError("VADER tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(sentiment, "_analyzer", None)
    result = text_sentiment("What a wonderful day")
    assert result is not None and result.label == "positive"


def test_emotion_ranking_label_and_score():
    emo = Emotion.of(
        {"neutral": 0.17, "happy": 0.04, "sad": 0.08, "angry": 0.71},
        {"m": ModelEmotion.of({"neutral": 0.5, "happy": 0.1, "sad": 0.1, "angry": 0.3})},
    )
    assert (emo.label, emo.score) == ("angry", 0.71)
    assert [r.label for r in emo.ranking] == ["angry", "neutral", "sad", "happy"]
    assert [r.score for r in emo.ranking] == sorted(emo.probabilities.values(), reverse=True)
    assert (emo.per_model["m"].label, emo.per_model["m"].score) == ("neutral", 0.5)
    # a 1.x stored emotion (no score, no ranking) still reads as v2
    old = Emotion.model_validate(
        {"label": "sad", "probabilities": {"sad": 0.6, "happy": 0.4}, "per_model": {}}
    )
    assert old.score == 0.6 and [r.label for r in old.ranking] == ["sad", "happy"]


def _utterance(**kw) -> UtteranceResult:
    return UtteranceResult(
        channel=1,
        role="customer",
        start=1.0,
        end=2.0,
        text="I hate this",
        language="en",
        words=[WordOut(word="I", start=1.1, end=1.2, confidence=0.9)],
        emotion=Emotion.of({"angry": 0.8, "sad": 0.2}),
        text_sentiment=text_sentiment("I hate this"),
        timing_ms=Timing(),
        **kw,
    )


def test_segment_words_only_when_asked_and_the_store_keeps_them():
    u = _utterance()
    plain = u.to_segment().model_dump(mode="json")
    assert "words" not in plain  # absent, not [] nor null
    assert plain["role"] == "customer" and plain["text_sentiment"]["label"] == "negative"
    assert u.to_segment(include_words=True).model_dump()["words"][0]["word"] == "I"
    assert "words" not in SegmentOut.model_validate(plain).model_dump()
    stored = u.to_store(source="rest")
    assert stored["words"][0]["confidence"] == 0.9  # the store keeps words always
    assert stored["role"] == "customer" and stored["text_sentiment"]["source"] == "vader"
    assert stored["emotion"]["ranking"][0] == {"label": "angry", "score": 0.8}
    assert "ensemble" not in stored["emotion"]["per_model"] and "decoding" not in stored
