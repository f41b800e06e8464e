"""Alert rules on a session's results: typed rules, and the pure function that evaluates them.

A rule (``EMOTION_ALERT_RULES``, a JSON list) says "``label`` with probability >= ``min_score`` for
``consecutive`` utterances in a row", optionally only for one ``role`` (``roles=agent,customer``) or
one ``channel``::

    [{"name": "angry_customer", "role": "customer", "label": "angry", "min_score": 0.6, "consecutive": 2}]

Semantics of ``step`` (run by the store on every appended result, inside the append's transaction):

* A result the rule does not look at (another role or channel, or no emotion) changes nothing: the
  agent speaking between two angry customer utterances does not break the customer's streak.
* A result it looks at either *hits* (``probabilities[label] >= min_score``) and extends the streak,
  or *misses* and resets it.
* The alert fires on the hit that makes the streak exactly ``consecutive`` long, once per streak:
  hits after it do not fire again until a miss has reset the streak.

The per-rule streaks are the session's *alert state*, a small JSON object stored with the session
(``{rule name: {"count", "seqs", "fired"}}``); a rule missing from it starts from zero, and state of
rules no longer configured is dropped.

Thread-safety: pure functions and immutable models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class AlertRule(BaseModel):
    """One configured rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=RULE_NAME_PATTERN, description="unique; names the alert")
    label: str = Field(min_length=1, description="emotion class, e.g. angry")
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="probability of `label` that counts as a hit")
    consecutive: int = Field(1, ge=1, le=1000, description="hits in a row (of the role/channel) that fire")
    role: str | None = Field(None, description="only results of this role (null: every role)")
    channel: int | None = Field(None, ge=0, description="only results of this channel (null: every channel)")

    def applies_to(self, result: Mapping[str, Any]) -> bool:
        if self.role is not None and result.get("role") != self.role:
            return False
        return self.channel is None or int(result.get("channel", 0) or 0) == self.channel

    def score(self, result: Mapping[str, Any]) -> float | None:
        """Probability of ``label`` in the result's emotion; None when the result has no emotion."""
        emotion = result.get("emotion")
        if not isinstance(emotion, Mapping):
            return None
        probs = emotion.get("probabilities") or {}
        if self.label in probs:
            return float(probs[self.label])
        if emotion.get("label") == self.label and emotion.get("score") is not None:
            return float(emotion["score"])
        return 0.0 if probs or emotion.get("label") else None


class Alert(BaseModel):
    """A fired rule, as stored with the session and sent as an ``alert`` event."""

    session_id: str
    rule: str
    seq: int = Field(description="the result that completed the streak")
    seqs: list[int] = Field(description="the results of the streak, oldest first")
    role: str | None
    channel: int
    label: str
    score: float = Field(description="probability of `label` in the result that fired")
    min_score: float
    consecutive: int
    text: str = Field("", description="transcript of the result that fired")
    at: str = Field(description="ISO-8601 UTC time the alert fired")


def check_unique(rules: Sequence[AlertRule]) -> list[AlertRule]:
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"alert rule names must be unique; repeated: {', '.join(duplicates)}")
    return list(rules)


def _fresh() -> dict[str, Any]:
    return {"count": 0, "seqs": [], "fired": False}


def step(
    rules: Sequence[AlertRule],
    state: Mapping[str, Any],
    result: Mapping[str, Any],
    session_id: str,
    at: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``rules`` on one stored ``result`` (with ``seq``) given the session's alert ``state``.

    Returns the new state and the alerts fired (as JSON dicts); ``at`` is the ISO time they carry.
    """
    new_state: dict[str, Any] = {}
    fired: list[dict[str, Any]] = []
    seq = int(result.get("seq", 0) or 0)
    for rule in rules:
        old = state.get(rule.name)
        current = dict(old) if isinstance(old, Mapping) else _fresh()
        score = rule.score(result) if rule.applies_to(result) else None
        if score is None:  # not this rule's role/channel, or no emotion: the streak is untouched
            new_state[rule.name] = current
            continue
        if score < rule.min_score:
            new_state[rule.name] = _fresh()
            continue
        count = int(current.get("count", 0)) + 1
        seqs = [*current.get("seqs", []), seq][-rule.consecutive :]
        fire = count >= rule.consecutive and not current.get("fired", False)
        new_state[rule.name] = {"count": count, "seqs": seqs, "fired": bool(current.get("fired")) or fire}
        if fire:
            alert = Alert(
                session_id=session_id,
                rule=rule.name,
                seq=seq,
                seqs=seqs,
                role=result.get("role"),
                channel=int(result.get("channel", 0) or 0),
                label=rule.label,
                score=round(score, 4),
                min_score=rule.min_score,
                consecutive=rule.consecutive,
                text=str(result.get("text") or ""),
                at=at,
            )
            fired.append(alert.model_dump())
    return new_state, fired


__all__ = ["Alert", "AlertRule", "check_unique", "step"]
