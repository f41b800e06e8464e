"""The call summary: per role (or per channel) aggregates of a session's results, by a pure function.

``summarize(results, roles)`` reads stored results (shape v2: ``seq``, ``channel``, ``role``,
``start``, ``end``, ``text``, ``emotion {label, probabilities}``, ``text_sentiment {label,
compound}``) and returns a ``CallSummary``. Results are grouped by ``role``; a result without a role
is grouped by channel (key ``channel_<n>``). ``overall`` is every result together. Per group:

* ``utterances``: results in the group; ``speech_s``: sum of their ``end - start``.
* ``mean_probabilities``: mean over the utterances that have an emotion (each utterance counts once,
  as in the session's running ``emotion`` aggregate); ``label``: its argmax.
* ``trend``: mean probabilities of the last third of those utterances minus those of the first third
  (a third = ``n // 3`` utterances, in ``seq`` order); null below 3 utterances.
* ``negative_share``: share of those utterances whose label is negative (``NEGATIVE_LABELS``).
* ``text_sentiment_mean``: mean VADER ``compound`` over utterances that carry ``text_sentiment``
  (null when none does: a result without text, or a server without text sentiment).
* ``disagreements``: utterances where text and voice disagree (text positive and voice negative, or
  text negative and voice ``happy``); ``disagreement_seqs`` lists them so they are easy to find.

Numbers are rounded to 4 decimals (``speech_s`` to 3). Thread-safety: pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

NEGATIVE_LABELS = frozenset({"angry", "sad", "fearful", "disgust"})
POSITIVE_VOICE = "happy"
# VADER's own convention for its compound score
COMPOUND_POSITIVE, COMPOUND_NEGATIVE = 0.05, -0.05


class GroupSummary(BaseModel):
    role: str | None = Field(description="the role (null: grouped by channel, or `overall`)")
    channels: list[int]
    utterances: int
    speech_s: float = Field(description="sum of utterance durations (audio seconds)")
    mean_probabilities: dict[str, float] = Field(description="mean over utterances with an emotion")
    label: str | None = Field(description="argmax of mean_probabilities")
    trend: dict[str, float] | None = Field(
        description="mean probabilities of the last third of utterances minus the first third; "
        "null below 3 utterances"
    )
    negative_share: float | None = Field(description="share of utterances whose label is negative")
    text_sentiment_mean: float | None = Field(description="mean VADER compound of the transcripts")
    disagreements: int = Field(description="utterances whose text sentiment and voice disagree")
    disagreement_seqs: list[int] = Field(description="their seq numbers")


class CallSummary(BaseModel):
    session_id: str | None = None
    utterances: int
    speech_s: float
    roles: list[str] | None = Field(None, description="the session's roles (index = channel)")
    by_role: dict[str, GroupSummary] = Field(
        description="per role; results without a role are grouped as `channel_<n>`"
    )
    overall: GroupSummary
    negative_labels: list[str] = Field(description="labels counted as negative")


def _emotion(result: Mapping[str, Any]) -> tuple[str | None, dict[str, float]]:
    emotion = result.get("emotion")
    if not isinstance(emotion, Mapping):
        return None, {}
    probs = {str(k): float(v) for k, v in (emotion.get("probabilities") or {}).items()}
    label = emotion.get("label") or (max(probs, key=probs.__getitem__) if probs else None)
    return (str(label) if label else None), probs


def _sentiment(result: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(label, compound) of the result's text sentiment; (None, None) without one."""
    ts = result.get("text_sentiment")
    if not isinstance(ts, Mapping) or ts.get("compound") is None:
        return None, None
    compound = float(ts["compound"])
    label = ts.get("label")
    if not label:
        label = (
            "positive"
            if compound >= COMPOUND_POSITIVE
            else "negative"
            if compound <= COMPOUND_NEGATIVE
            else "neutral"
        )
    return str(label), compound


def disagrees(text_label: str | None, voice_label: str | None) -> bool:
    """Text positive while the voice is negative, or text negative while the voice is happy."""
    if text_label == "positive":
        return voice_label in NEGATIVE_LABELS
    if text_label == "negative":
        return voice_label == POSITIVE_VOICE
    return False


def _mean(rows: Sequence[dict[str, float]], keys: Iterable[str]) -> dict[str, float]:
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}


def _group(results: Sequence[Mapping[str, Any]], role: str | None) -> GroupSummary:
    labelled: list[tuple[str, dict[str, float]]] = []
    compounds: list[float] = []
    disagreeing: list[int] = []
    speech = 0.0
    for r in results:
        speech += max(0.0, float(r.get("end", 0.0) or 0.0) - float(r.get("start", 0.0) or 0.0))
        label, probs = _emotion(r)
        if label is not None:
            labelled.append((label, probs))
        text_label, compound = _sentiment(r)
        if compound is not None:
            compounds.append(compound)
        if disagrees(text_label, label):
            disagreeing.append(int(r.get("seq", 0) or 0))
    keys = sorted({k for _, p in labelled for k in p})
    rows = [p for _, p in labelled]
    mean = _mean(rows, keys) if rows else {}
    trend = None
    third = len(rows) // 3
    if third >= 1:
        first, last = _mean(rows[:third], keys), _mean(rows[-third:], keys)
        trend = {k: round(last[k] - first[k], 4) for k in keys}
    negative = sum(1 for label, _ in labelled if label in NEGATIVE_LABELS)
    return GroupSummary(
        role=role,
        channels=sorted({int(r.get("channel", 0) or 0) for r in results}),
        utterances=len(results),
        speech_s=round(speech, 3),
        mean_probabilities={k: round(v, 4) for k, v in mean.items()},
        label=max(mean, key=mean.__getitem__) if mean else None,
        trend=trend,
        negative_share=round(negative / len(labelled), 4) if labelled else None,
        text_sentiment_mean=round(sum(compounds) / len(compounds), 4) if compounds else None,
        disagreements=len(disagreeing),
        disagreement_seqs=disagreeing,
    )


def group_key(result: Mapping[str, Any]) -> str:
    role = result.get("role")
    return str(role) if role else f"channel_{int(result.get('channel', 0) or 0)}"


def summarize(
    results: Iterable[Mapping[str, Any]],
    roles: Sequence[str] | None = None,
    session_id: str | None = None,
) -> CallSummary:
    """The call summary of ``results`` (any order; sorted by ``seq``). Every role in ``roles`` gets a
    group, with zero utterances when it never spoke; other groups follow in name order."""
    ordered = sorted(results, key=lambda r: int(r.get("seq", 0) or 0))
    groups: dict[str, list[Mapping[str, Any]]] = {role: [] for role in roles or ()}
    for r in ordered:
        groups.setdefault(group_key(r), []).append(r)
    named = list(roles or ())
    keys = named + sorted(k for k in groups if k not in named)
    overall = _group(ordered, None)
    return CallSummary(
        session_id=session_id,
        utterances=overall.utterances,
        speech_s=overall.speech_s,
        roles=list(roles) if roles is not None else None,
        by_role={
            k: _group(groups[k], None if k.startswith("channel_") and k not in named else k) for k in keys
        },
        overall=overall,
        negative_labels=sorted(NEGATIVE_LABELS),
    )


__all__ = ["NEGATIVE_LABELS", "CallSummary", "GroupSummary", "disagrees", "summarize"]
