"""LocalAgreement-2: the stable prefix of a transcript that is being re-decoded as audio grows.

Each partial pass transcribes the whole utterance so far. A word is *confirmed* once two
consecutive hypotheses agree on it and on every word before it (Machacek et al., 2023,
"Turning Whisper into Real-Time Transcription System"). Confirmed words are never taken back: if a
later hypothesis disagrees with them, the confirmed prefix simply stops growing (the final pass of
the utterance, which is authoritative, may still differ).

Thread-safety: one instance per (channel, utterance); not shared.
"""

from __future__ import annotations

import re

_NON_WORD = re.compile(r"[^\w']+")


def normalize(word: str) -> str:
    """Comparison form: lower case, punctuation dropped ("Door." == "door")."""
    return _NON_WORD.sub("", word.lower())


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if normalize(x) != normalize(y):
            break
        n += 1
    return n


class LocalAgreement:
    """Feed successive hypotheses (lists of words); read ``confirmed`` and ``unconfirmed``."""

    def __init__(self) -> None:
        self.confirmed: list[str] = []
        self.unconfirmed: list[str] = []
        self._previous: list[str] | None = None

    def update(self, words: list[str]) -> tuple[list[str], list[str]]:
        words = [w for w in words if normalize(w)] or []
        k = len(self.confirmed)
        agrees_with_confirmed = _common_prefix(words, self.confirmed) == k
        if self._previous is not None and agrees_with_confirmed:
            n = _common_prefix(self._previous, words)
            if n > k:
                # Keep the newest spelling of the newly agreed words (later passes see more context).
                self.confirmed = self.confirmed + words[k:n]
        self._previous = words
        self.unconfirmed = words[len(self.confirmed) :] if len(words) > len(self.confirmed) else []
        return list(self.confirmed), list(self.unconfirmed)

    @property
    def confirmed_text(self) -> str:
        return " ".join(self.confirmed)

    @property
    def unconfirmed_text(self) -> str:
        return " ".join(self.unconfirmed)
