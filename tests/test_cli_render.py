"""The CLI's text mode: exact strings from ``app.cli.render`` for v2 and v1 results, colour rules,
and ``StreamPrinter`` fed a recorded message sequence (terminal and pipe)."""

from __future__ import annotations

import io
import json

import pytest

from app.cli.output import CLEAR_LINE, StreamPrinter
from app.cli.render import (
    Style,
    Summary,
    color_allowed,
    default_format,
    fmt_clock,
    partial_line,
    predict_text,
    progress_line,
    score_bar,
    style_for,
    summary_lines,
    utterance_line,
)

PLAIN = Style()
COLOR = Style(color=True)

V2 = {
    "seq": 3,
    "channel": 1,
    "role": "customer",
    "start": 12.34,
    "end": 15.02,
    "text": "I have been waiting for an hour",
    "emotion": {
        "label": "angry",
        "score": 0.71,
        "ranking": [{"label": "angry", "score": 0.71}, {"label": "neutral", "score": 0.17}],
        "probabilities": {"angry": 0.71, "happy": 0.04, "neutral": 0.17, "sad": 0.08},
        "per_model": {},
    },
    "text_sentiment": {"label": "negative", "compound": -0.42, "source": "vader"},
}
# v1: no role, score, ranking nor text_sentiment; the score is read from the probabilities
V1 = {
    "channel": 0,
    "start": 0.5,
    "end": 3.2,
    "text": "Kids are talking by the door",
    "emotion": {
        "label": "neutral",
        "probabilities": {"angry": 0.2, "happy": 0.1, "neutral": 0.55, "sad": 0.15},
    },
}


def test_utterance_line_v2_exact():
    assert utterance_line(V2, PLAIN) == (
        '00:12.3–00:15.0  [customer]  angry   0.71  ▇▇▇▇▇▇▇    "I have been waiting for an hour"'
        "  (text: negative)"
    )


def test_utterance_line_v1_exact_and_channel_tag():
    assert (
        utterance_line(V1, PLAIN)
        == '00:00.5–00:03.2  neutral 0.55  ▇▇▇▇▇▇     "Kids are talking by the door"'
    )
    assert utterance_line(V1, PLAIN, show_channel=True).startswith(
        "00:00.5–00:03.2  [ch0]       neutral 0.55"
    )
    # a role wins over the channel tag; null v2 fields are the same as absent ones
    nulls = {**V1, "role": None, "text_sentiment": None, "emotion": {**V1["emotion"], "score": None}}
    assert utterance_line(nulls, PLAIN) == utterance_line(V1, PLAIN)


def test_utterance_line_without_emotion_or_text():
    line = utterance_line({"start": 1.0, "end": 2.0, "text": "", "emotion": None}, PLAIN)
    assert line == "00:01.0–00:02.0  -      "


def test_colour_codes_only_when_asked():
    coloured = utterance_line(V2, COLOR)
    assert "\x1b[31mangry\x1b[0m   0.71" in coloured  # label red, padding outside the colour
    assert "(text: \x1b[31mnegative\x1b[0m)" in coloured
    assert "\x1b[" not in utterance_line(V2, PLAIN)
    assert "\x1b[" not in "".join(summary_lines(Summary().extend([V2, V1]), PLAIN))


@pytest.mark.parametrize(
    "tty, env, expected",
    [
        (True, {}, True),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value disables colour
        (True, {"TERM": "dumb"}, False),
        (False, {}, False),
    ],
)
def test_color_allowed(tty, env, expected):
    assert color_allowed(tty, env) is expected


class FakeTTY(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no fd")


def test_style_for_terminal_and_pipe():
    assert style_for(FakeTTY(), {}) == Style(color=True, unicode=True, width=80)
    assert style_for(FakeTTY(), {"NO_COLOR": "x"}).color is False
    assert style_for(io.StringIO(), {}) == Style(color=False, unicode=True, width=None)
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert style_for(ascii_out, {}).unicode is False
    assert default_format(True) == "text" and default_format(False) == "json"


def test_ascii_fallback():
    line = utterance_line(V2, Style(unicode=False))
    assert line.startswith('00:12.3-00:15.0  [customer]  angry   0.71  #######    "I have')


@pytest.mark.parametrize(
    "seconds, text", [(0, "00:00.0"), (12.34, "00:12.3"), (59.96, "01:00.0"), (3725.4, "1:02:05.4")]
)
def test_fmt_clock(seconds, text):
    assert fmt_clock(seconds) == text


def test_score_bar_rounds_and_pads():
    assert score_bar(0.71, PLAIN) == "▇" * 7 + " " * 3
    assert score_bar(1.0, PLAIN) == "▇" * 10 and score_bar(0.0, PLAIN) == " " * 10
    assert score_bar(float("nan"), PLAIN) == " " * 10


def test_summary_counts_dominant_negative_share_and_speakers():
    agent_sad = {**V2, "role": "agent", "start": 20.0, "end": 24.0, "emotion": {"label": "sad", "score": 0.6}}
    second_angry = {**V2, "start": 30.0, "end": 31.0}
    summary = Summary().extend([V2, agent_sad, second_angry])
    assert summary_lines(summary, PLAIN) == [
        "summary: 3 utterances, 7.7 s of speech  ·  angry 2, sad 1  ·  dominant angry  ·  negative 100%",
        "  [agent]     1 utterance, 4.0 s of speech  ·  sad 1  ·  dominant sad  ·  negative 100%",
        "  [customer]  2 utterances, 3.7 s of speech  ·  angry 2  ·  dominant angry  ·  negative 100%",
    ]
    # one speaker (or none): no per-speaker lines; a tie in counts goes to more speech time
    tie = Summary().extend([V1, {**V1, "start": 4.0, "end": 4.5, "emotion": {"label": "happy"}}])
    assert summary_lines(tie, PLAIN, "x.wav") == [
        "x.wav: 2 utterances, 3.2 s of speech  ·  happy 1, neutral 1  ·  dominant neutral  ·  negative 0%"
    ]


def test_partial_line_dims_the_unconfirmed_tail_and_fits_the_terminal():
    msg = {
        "type": "partial",
        "channel": 0,
        "start": 1.0,
        "end": 2.5,
        "confirmed": "I have been",
        "unconfirmed": "waiting for",
    }
    assert partial_line(msg, PLAIN) == '00:01.0–00:02.5  "I have been waiting for"'
    assert partial_line(msg, COLOR, emotion={"label": "angry"}) == (
        '\x1b[2m00:01.0–00:02.5\x1b[0m  \x1b[31m~angry\x1b[0m  "I have been \x1b[2mwaiting for\x1b[0m"'
    )
    narrow = partial_line(msg, Style(width=30))
    assert narrow == '00:01.0–00:02.5  "…iting for"' and len(narrow) <= 29  # the newest words stay


def test_predict_text_block_and_error():
    line = {"file": "a.wav", "duration_s": 3.7, "language": "en", "emotion": V1["emotion"], "segments": [V1]}
    assert predict_text(line, PLAIN) == [
        "a.wav  (3.7 s, en)  overall neutral 0.55",
        '  00:00.5–00:03.2  neutral 0.55  ▇▇▇▇▇▇     "Kids are talking by the door"',
        "  summary: 1 utterance, 2.7 s of speech  ·  neutral 1  ·  dominant neutral  ·  negative 0%",
    ]
    no_speech = {"file": "s.wav", "duration_s": 1.0, "language": "en", "emotion": None, "segments": []}
    assert predict_text(no_speech, PLAIN) == ["s.wav  (1.0 s, en)", "  (no speech)"]
    err = {"file": "b.wav", "error": "unsupported_audio", "detail": "not audio"}
    assert predict_text(err, PLAIN) == ["b.wav: error unsupported_audio: not audio"]


def test_progress_line():
    assert progress_line(2, 5, 1, 12.34, PLAIN) == "[████████░░░░░░░░░░░░] 2/5 files  1 failed  00:12.3"
    ascii_narrow = progress_line(5, 5, 0, 3, Style(unicode=False, width=40))
    assert ascii_narrow == "[" + "#" * 18 + "] 5/5 files  00:03.0" and len(ascii_narrow) < 40


# --- StreamPrinter --------------------------------------------------------------------------------

MESSAGES = [
    {"type": "ready", "session_id": "s1", "channels": 1, "models": ["adf", "3m-ser"]},
    {
        "type": "partial",
        "channel": 0,
        "utterance": 0,
        "start": 0.5,
        "end": 1.5,
        "confirmed": "",
        "unconfirmed": "Kids",
    },
    {
        "type": "interim",
        "channel": 0,
        "utterance": 0,
        "start": 0.5,
        "end": 1.5,
        "emotion": {"label": "angry"},
    },
    {
        "type": "partial",
        "channel": 0,
        "utterance": 0,
        "start": 0.5,
        "end": 2.0,
        "confirmed": "Kids",
        "unconfirmed": "are",
    },
    {"type": "warning", "code": "client_too_fast", "detail": "slow down"},
    {**V1, "type": "final", "seq": 1, "utterance": 0},
    {"type": "end", "session_id": "s1", "stats": {}},
]


def feed(printer: StreamPrinter, messages=MESSAGES) -> None:
    for m in messages:
        printer(m)
    printer.finish()


def test_stream_printer_text_on_a_pipe_has_no_partials():
    out, err = io.StringIO(), io.StringIO()
    feed(StreamPrinter("text", out, err, PLAIN, tty=False))
    assert out.getvalue().splitlines() == [
        "session s1  (1 channel; models: adf, 3m-ser)",
        '00:00.5–00:03.2  neutral 0.55  ▇▇▇▇▇▇     "Kids are talking by the door"',
        "session s1: 1 utterance, 2.7 s of speech  ·  neutral 1  ·  dominant neutral  ·  negative 0%",
    ]
    assert err.getvalue() == "warning: client_too_fast: slow down\n"


def test_stream_printer_text_on_a_terminal_redraws_partials():
    out = io.StringIO()
    feed(StreamPrinter("text", out, io.StringIO(), PLAIN, tty=True))
    text = out.getvalue()
    assert CLEAR_LINE + '00:00.5–00:01.5  "Kids"' in text
    # the interim emotion shows on the next partial of the same utterance
    assert (
        CLEAR_LINE + '00:00.5–00:02.0  ~angry  "Kids are"' + CLEAR_LINE + "00:00.5–00:03.2  neutral" in text
    )
    assert text.endswith("negative 0%\n")


def test_stream_printer_summarises_when_no_end_came():
    out = io.StringIO()
    feed(StreamPrinter("text", out, io.StringIO(), PLAIN, tty=False), MESSAGES[:-1])
    assert out.getvalue().splitlines()[-1].startswith("summary (no end message): 1 utterance")


def test_stream_printer_json_prints_every_message():
    out = io.StringIO()
    feed(StreamPrinter("json", out, io.StringIO(), COLOR, tty=True))
    assert [json.loads(line) for line in out.getvalue().splitlines()] == MESSAGES
