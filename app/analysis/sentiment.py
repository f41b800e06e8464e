"""Text sentiment of a transcript: VADER 3.3.2 (``vaderSentiment``, MIT), beside the voice emotion.

VADER is a rule-based English lexicon model: the package ships its lexicon
(``vader_lexicon.txt``, ``emoji_utf8_lexicon.txt``) and reads it from its own directory, so nothing
is downloaded at run time (its ``requests`` dependency is used only by its ``__main__`` demo).
Labels follow VADER's standard thresholds: ``compound >= 0.05`` positive, ``<= -0.05`` negative,
neutral in between.

Cost, measured on the development machine (one core of 2): loading the lexicon ~20 ms (once per
process), then 0.02 ms for a 6-word utterance, 0.06 ms for 15 words, 0.3 ms for 50 and 0.9 ms
for 100 (a 15-s utterance holds ~40 words). VADER's cost grows with the square of the length
(3,800 words: 0.6 s), so a long text is scored per utterance and averaged (``mean_sentiment``,
VADER's own advice for paragraphs), never as one string.

Thread-safety: ``text_sentiment`` is a pure function; the analyzer it uses is built once under a
lock and only read afterwards (``polarity_scores`` does not mutate it), so any thread may call it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from app.schemas import SentimentLabel, TextSentiment

POSITIVE_AT = 0.05  # VADER's standard thresholds on the compound score
NEGATIVE_AT = -0.05
SOURCE = "vader"
# texts up to this many characters cost well under a millisecond (~70 words: ~0.4 ms): callers on
# an event loop may score them inline and should hand longer ones to a thread
INLINE_MAX_CHARS = 400

_lock = threading.Lock()
_analyzer: Any = None


def _vader() -> Any:
    global _analyzer
    if _analyzer is None:
        with _lock:
            if _analyzer is None:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def label_of(compound: float) -> SentimentLabel:
    if compound >= POSITIVE_AT:
        return "positive"
    if compound <= NEGATIVE_AT:
        return "negative"
    return "neutral"


def is_english(language: str | None) -> bool:
    """VADER's lexicon is English: other languages get no text sentiment (unknown = English)."""
    return not language or language.lower().startswith("en")


def text_sentiment(text: str, language: str | None = None) -> TextSentiment | None:
    """VADER scores of ``text``; None when it holds no word or ``language`` is not English."""
    if not text or not any(ch.isalnum() for ch in text) or not is_english(language):
        return None
    scores = _vader().polarity_scores(text)
    compound = float(scores["compound"])
    return TextSentiment(
        label=label_of(compound),
        compound=compound,
        pos=float(scores["pos"]),
        neu=float(scores["neu"]),
        neg=float(scores["neg"]),
    )


def mean_sentiment(parts: Iterable[TextSentiment | None]) -> TextSentiment | None:
    """The mean of several texts' scores (segments without text left out); None when none has any.

    A whole transcript is scored this way, per utterance, as VADER's authors advise for text of
    several sentences (and in linear time)."""
    scored = [p for p in parts if p is not None]
    if not scored:
        return None
    n = len(scored)
    compound = round(sum(p.compound for p in scored) / n, 4)
    return TextSentiment(
        label=label_of(compound),
        compound=compound,
        pos=round(sum(p.pos for p in scored) / n, 3),
        neu=round(sum(p.neu for p in scored) / n, 3),
        neg=round(sum(p.neg for p in scored) / n, 3),
    )


# voice labels that count as negative (CONTRACTS: angry, sad; and fearful/disgust in larger class sets)
NEGATIVE_EMOTIONS = frozenset({"angry", "sad", "fearful", "disgust"})


def disagrees(text: TextSentiment | None, voice_label: str | None) -> bool:
    """Text and voice disagree: the words are positive while the voice is negative, or the words
    are negative while the voice is happy (the one rule for summaries and the dashboard)."""
    if text is None or not voice_label:
        return False
    if text.label == "positive":
        return voice_label in NEGATIVE_EMOTIONS
    return text.label == "negative" and voice_label == "happy"


def warm_up() -> None:
    """Load the lexicon now (start-up) rather than on the first utterance."""
    _vader()
