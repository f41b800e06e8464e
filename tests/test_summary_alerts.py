"""The call summary and the alert rules as pure functions, on constructed results with numbers
computed by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import pytest

from app.store.alerts import AlertRule, check_unique, step
from app.store.summary import disagrees, summarize

P = ("angry", "happy", "neutral", "sad")


def r(seq, channel, role, start, end, probs, compound=None, text_label=None, text="words"):
    probabilities = dict(zip(P, probs, strict=True))
    label = max(probabilities, key=probabilities.__getitem__)
    out = {
        "seq": seq,
        "channel": channel,
        "role": role,
        "start": start,
        "end": end,
        "text": text,
        "emotion": {"label": label, "score": probabilities[label], "probabilities": probabilities},
        "text_sentiment": None,
    }
    if compound is not None:
        out["text_sentiment"] = {"compound": compound, "source": "vader"}
        if text_label:
            out["text_sentiment"]["label"] = text_label
    return out


# seq ch role      start end   angry happy neutral sad   label    text compound
CALL = [
    r(1, 0, "agent", 0.0, 2.0, (0.1, 0.2, 0.6, 0.1), 0.5),  # neutral  +0.5 positive
    r(2, 1, "customer", 2.5, 4.5, (0.7, 0.1, 0.1, 0.1), -0.6),  # angry    -0.6 negative
    r(3, 1, "customer", 5.0, 6.0, (0.2, 0.1, 0.2, 0.5), 0.4),  # sad      +0.4 positive -> disagrees
    r(4, 0, "agent", 6.5, 8.0, (0.0, 0.8, 0.2, 0.0), -0.3),  # happy    -0.3 negative -> disagrees
    r(5, 1, "customer", 8.5, 10.0, (0.9, 0.0, 0.1, 0.0)),  # angry    (no text sentiment)
    r(6, 1, "customer", 10.5, 12.5, (0.1, 0.2, 0.6, 0.1), 0.0),  # neutral   0.0 neutral
    r(7, 1, "customer", 13.0, 14.0, (0.0, 0.6, 0.4, 0.0), 0.7),  # happy    +0.7 positive
]


def test_summary_per_role_by_hand():
    s = summarize(list(reversed(CALL)), roles=["agent", "customer"], session_id="call")  # order: by seq
    assert s.session_id == "call" and s.roles == ["agent", "customer"]
    assert list(s.by_role) == ["agent", "customer"]
    assert s.utterances == 7 and s.speech_s == 11.0  # 2 + 2 + 1 + 1.5 + 1.5 + 2 + 1

    c = s.by_role["customer"]  # seqs 2, 3, 5, 6, 7
    assert c.role == "customer" and c.channels == [1] and c.utterances == 5
    assert c.speech_s == 7.5  # 2 + 1 + 1.5 + 2 + 1
    # angry (.7+.2+.9+.1+0)/5, happy (.1+.1+0+.2+.6)/5, neutral (.1+.2+.1+.6+.4)/5, sad (.1+.5+0+.1+0)/5
    assert c.mean_probabilities == {"angry": 0.38, "happy": 0.2, "neutral": 0.28, "sad": 0.14}
    assert c.label == "angry"
    # a third of 5 is 1 utterance: seq 7 minus seq 2
    assert c.trend == {"angry": -0.7, "happy": 0.5, "neutral": 0.3, "sad": -0.1}
    assert c.negative_share == 0.6  # angry, sad, angry of 5
    assert c.text_sentiment_mean == 0.125  # (-0.6 + 0.4 + 0.0 + 0.7) / 4: seq 5 has none
    assert c.disagreements == 1 and c.disagreement_seqs == [3]  # positive text, sad voice

    a = s.by_role["agent"]  # seqs 1, 4
    assert a.utterances == 2 and a.speech_s == 3.5 and a.channels == [0]
    assert a.mean_probabilities == {"angry": 0.05, "happy": 0.5, "neutral": 0.4, "sad": 0.05}
    assert a.label == "happy"
    assert a.trend is None  # fewer than 3 utterances
    assert a.negative_share == 0.0
    assert a.text_sentiment_mean == 0.1  # (0.5 - 0.3) / 2
    assert a.disagreements == 1 and a.disagreement_seqs == [4]  # negative text, happy voice

    o = s.overall
    assert o.role is None and o.channels == [0, 1] and o.utterances == 7
    # angry 2.0/7, happy 2.0/7, neutral 2.2/7, sad 0.8/7
    assert o.mean_probabilities == {"angry": 0.2857, "happy": 0.2857, "neutral": 0.3143, "sad": 0.1143}
    assert o.label == "neutral"
    # a third of 7 is 2: mean(seq 6, 7) - mean(seq 1, 2) = (.05,.4,.5,.05) - (.4,.15,.35,.1)
    assert o.trend == {"angry": -0.35, "happy": 0.25, "neutral": 0.15, "sad": -0.05}
    assert o.negative_share == 0.4286  # 3 / 7
    assert o.text_sentiment_mean == 0.1167  # 0.7 / 6
    assert o.disagreements == 2 and o.disagreement_seqs == [3, 4]
    assert s.negative_labels == ["angry", "disgust", "fearful", "sad"]


def test_summary_without_roles_groups_by_channel_and_copes_without_sentiment():
    plain = [{k: v for k, v in x.items() if k not in ("role", "text_sentiment")} for x in CALL]
    plain.append({"seq": 8, "channel": 0, "start": 15.0, "end": 15.5, "text": "", "emotion": None})
    s = summarize(plain)
    assert s.roles is None and list(s.by_role) == ["channel_0", "channel_1"]
    ch0 = s.by_role["channel_0"]
    assert ch0.role is None and ch0.utterances == 3  # seq 8 counts as an utterance ...
    assert ch0.mean_probabilities == {
        "angry": 0.05,
        "happy": 0.5,
        "neutral": 0.4,
        "sad": 0.05,
    }  # ... not here
    assert ch0.trend is None  # 2 utterances with an emotion
    assert ch0.text_sentiment_mean is None and ch0.disagreements == 0
    assert s.by_role["channel_1"].mean_probabilities["angry"] == 0.38


def test_summary_of_nothing_and_silent_roles():
    s = summarize([], roles=["agent", "customer"])
    assert s.utterances == 0 and s.overall.label is None and s.overall.negative_share is None
    assert s.by_role["customer"].utterances == 0 and s.by_role["customer"].mean_probabilities == {}


def test_text_sentiment_label_from_compound_when_absent():
    assert disagrees("positive", "angry") and disagrees("negative", "happy")
    assert (
        not disagrees("negative", "sad")
        and not disagrees("neutral", "angry")
        and not disagrees(None, "happy")
    )
    # compound 0.05 is positive by VADER's convention; the voice says sad
    s = summarize([r(1, 0, None, 0, 1, (0.1, 0.1, 0.1, 0.7), 0.05)])
    assert s.overall.disagreement_seqs == [1]
    # an explicit label wins over the compound
    s = summarize([r(1, 0, None, 0, 1, (0.1, 0.1, 0.1, 0.7), 0.05, text_label="neutral")])
    assert s.overall.disagreements == 0


ANGRY_CUSTOMER = AlertRule(
    name="angry_customer", role="customer", label="angry", min_score=0.6, consecutive=2
)


def angry(seq, role, p):
    rest = (1.0 - p) / 3
    return r(seq, 1 if role == "customer" else 0, role, seq, seq + 0.5, (p, rest, rest, rest))


def run_rules(rules, results):
    state: dict = {}
    fired = []
    for res in results:
        state, alerts = step(rules, state, res, "s1", "2026-01-01T00:00:00.000Z")
        fired.append([(a["rule"], a["seq"], a["seqs"]) for a in alerts])
    return state, fired


def test_rule_fires_after_n_consecutive_not_before_and_once_per_streak():
    no_emotion = {"seq": 7, "channel": 1, "role": "customer", "emotion": None}
    _, fired = run_rules(
        [ANGRY_CUSTOMER],
        [
            angry(1, "customer", 0.7),  # 1 in a row
            angry(2, "agent", 0.9),  # another role: neither counts nor breaks the streak
            angry(3, "customer", 0.65),  # 2 in a row: fires
            angry(4, "customer", 0.8),  # 3: the streak already fired
            angry(5, "customer", 0.3),  # a miss resets
            angry(6, "customer", 0.9),  # 1
            no_emotion,  # no emotion: ignored
            angry(8, "customer", 0.6),  # 2 (the threshold itself counts): fires again
        ],
    )
    assert fired == [
        [],
        [],
        [("angry_customer", 3, [1, 3])],
        [],
        [],
        [],
        [],
        [("angry_customer", 8, [6, 8])],
    ]


def test_alert_content_and_state_shape():
    state, alerts = step([ANGRY_CUSTOMER], {}, angry(1, "customer", 0.7), "s1", "T")
    assert alerts == [] and state == {"angry_customer": {"count": 1, "seqs": [1], "fired": False}}
    state, alerts = step([ANGRY_CUSTOMER], state, {**angry(2, "customer", 0.7), "text": "hm"}, "s1", "T")
    assert alerts == [
        {
            "session_id": "s1",
            "rule": "angry_customer",
            "seq": 2,
            "seqs": [1, 2],
            "role": "customer",
            "channel": 1,
            "label": "angry",
            "score": 0.7,
            "min_score": 0.6,
            "consecutive": 2,
            "text": "hm",
            "at": "T",
        }
    ]
    # state of a rule no longer configured is dropped; a new rule starts from zero
    other = AlertRule(name="sad_any", label="sad", min_score=0.5)
    state, alerts = step([other], state, r(3, 0, "agent", 3, 4, (0.1, 0.1, 0.1, 0.7)), "s1", "T")
    assert list(state) == ["sad_any"] and [a["rule"] for a in alerts] == ["sad_any"]


def test_channel_rule_and_validation():
    rule = AlertRule(name="ch1_sad", channel=1, label="sad", min_score=0.5, consecutive=1)
    sad_ch1 = r(1, 1, None, 0, 1, (0.1, 0.1, 0.1, 0.7))
    sad_ch0 = r(2, 0, None, 1, 2, (0.1, 0.1, 0.1, 0.7))
    _, fired = run_rules([rule], [sad_ch0, sad_ch1])
    assert fired == [[], [("ch1_sad", 1, [1])]]
    with pytest.raises(ValueError):
        check_unique([rule, rule])
    with pytest.raises(ValueError):
        AlertRule(name="x", label="angry", consecutive=0)
    with pytest.raises(ValueError):
        AlertRule(name="bad name", label="angry")
