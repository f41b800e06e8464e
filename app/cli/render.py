"""Human-readable text for ``emotion-server predict`` and ``stream``: pure functions, no I/O.

Everything here maps data (an utterance result, a partial, a predict response line, counters) and
a :class:`Style` (colour, Unicode, terminal width) to strings, so the exact output is unit-tested.
The writers that put these strings on a terminal (carriage-return status lines, the progress bar)
live in ``app.cli.output``.

Results are read as plain dicts in the v2 shape (``role``, ``emotion.score``,
``emotion.ranking``, ``text_sentiment``) and v1 dicts are tolerated: only ``start``, ``end`` and
``emotion.label`` / ``emotion.probabilities`` are relied on; every v2 field may be absent or null.

Thread-safety: pure functions and a plain accumulator (:class:`Summary`, one per file or session,
used by one thread).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

# Labels counted as negative in summaries (the contract's list; any model's classes may appear).
NEGATIVE_LABELS = frozenset({"angry", "sad", "fearful", "disgust"})

# ANSI SGR colour per label: hue follows valence so a scrolling call reads at a glance.
LABEL_COLOURS = {
    "angry": "31",  # red
    "sad": "34",  # blue
    "fearful": "35",  # magenta
    "disgust": "33",  # yellow
    "happy": "32",  # green
    "surprised": "36",  # cyan
    "calm": "36",
}
SENTIMENT_COLOURS = {"negative": "31", "positive": "32"}
DIM, BOLD, CYAN, RED = "2", "1", "36", "31"

LABEL_WIDTH = 7  # len("neutral"): labels of the 4-class set line up; longer ones just push right
BAR_WIDTH = 10  # one block per 0.1 of score
WHO_WIDTH = 10  # len("[customer]")


@dataclass(frozen=True)
class Style:
    """How text may be drawn on the stream it goes to."""

    color: bool = False
    unicode: bool = True
    width: int | None = None  # terminal columns, for the lines that must not wrap (partials, progress)


def color_allowed(tty: bool, env: Mapping[str, str]) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set to anything non-empty (no-color.org)
    nor on ``TERM=dumb``."""
    return tty and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


def style_for(stream: TextIO, env: Mapping[str, str] | None = None) -> Style:
    """The style for text written to ``stream`` (a terminal or not, its encoding, its width)."""
    env = os.environ if env is None else env
    tty = is_tty(stream)
    encoding = getattr(stream, "encoding", None)  # None: an in-memory text stream takes anything
    try:
        "▇█░–…·".encode(encoding or "utf-8")
        unicode = True
    except (UnicodeEncodeError, LookupError):
        unicode = False
    width = None
    if tty:
        try:
            width = os.get_terminal_size(stream.fileno()).columns or 80  # a fresh pty reports 0
        except (OSError, ValueError, AttributeError):
            width = 80
    return Style(color=color_allowed(tty, env), unicode=unicode, width=width)


def default_format(tty: bool) -> str:
    """``--format`` when not given: text for a person at a terminal, JSON lines for a pipe or file."""
    return "text" if tty else "json"


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- pieces ---------------------------------------------------------------------------------------


def paint(text: str, sgr: str | None, style: Style) -> str:
    if not style.color or not sgr or not text:
        return text
    return f"\x1b[{sgr}m{text}\x1b[0m"


def _padded(text: str, width: int, sgr: str | None, style: Style) -> str:
    """``text`` painted, then padded to ``width`` outside the colour codes."""
    return paint(text, sgr, style) + " " * max(0, width - len(text))


def fmt_clock(seconds: float) -> str:
    """``00:12.3`` (minutes:seconds.tenths); ``1:02:03.4`` from one hour."""
    tenths = max(0, round(float(seconds) * 10))  # round once, so 59.96 s is 01:00.0, not 00:60.0
    minutes, rest = divmod(tenths, 600)
    hours, minutes = divmod(minutes, 60)
    sec = f"{rest // 10:02d}.{rest % 10}"
    return f"{hours}:{minutes:02d}:{sec}" if hours else f"{minutes:02d}:{sec}"


def fmt_span(start: float, end: float, style: Style) -> str:
    dash = "–" if style.unicode else "-"
    return f"{fmt_clock(start)}{dash}{fmt_clock(end)}"


def score_bar(score: float, style: Style, width: int = BAR_WIDTH) -> str:
    """``▇`` per tenth of ``score`` (rounded), padded to ``width`` so the text after it lines up."""
    n = min(width, max(0, round(score * width))) if math.isfinite(score) else 0
    return ("▇" if style.unicode else "#") * n + " " * (width - n)


def emotion_of(result: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(label, score) of a v2 or v1 result; score from ``probabilities`` when v1 has no ``score``."""
    emotion = result.get("emotion") or {}
    label = emotion.get("label")
    if label is None:
        return None, None
    score = emotion.get("score")
    if score is None:
        score = (emotion.get("probabilities") or {}).get(label)
    return label, None if score is None else float(score)


def who_of(result: Mapping[str, Any], show_channel: bool) -> str | None:
    """The speaker tag: the v2 ``role`` when set, else ``ch<N>`` when channels matter, else none."""
    role = result.get("role")
    if role:
        return str(role)
    if show_channel and result.get("channel") is not None:
        return f"ch{result['channel']}"
    return None


def sentiment_of(result: Mapping[str, Any]) -> str | None:
    sentiment = result.get("text_sentiment")
    return sentiment.get("label") if isinstance(sentiment, Mapping) else None


# --- lines ----------------------------------------------------------------------------------------


def utterance_line(result: Mapping[str, Any], style: Style, *, show_channel: bool = False) -> str:
    """One analysed utterance (REST segment, streaming ``final``, stored result), e.g.
    ``00:12.3–00:15.0  [customer]  angry   0.71  ▇▇▇▇▇▇▇    "I have been waiting"  (text: negative)``.
    """
    parts = [paint(fmt_span(result.get("start", 0.0), result.get("end", 0.0), style), DIM, style)]
    who = who_of(result, show_channel)
    if who is not None:
        parts.append(_padded(f"[{who}]", WHO_WIDTH, CYAN, style))
    label, score = emotion_of(result)
    if label is None:
        parts.append("-".ljust(LABEL_WIDTH))
    else:
        colour = LABEL_COLOURS.get(label)
        head = _padded(label, LABEL_WIDTH, colour, style)
        if score is not None:
            bar = score_bar(score, style)
            head += f" {score:.2f}  " + _padded(bar.rstrip(), len(bar), colour, style)
        parts.append(head)
    line = "  ".join(parts)
    text = (result.get("text") or "").strip()
    if text:
        line += f' "{text}"'
    sentiment = sentiment_of(result)
    if sentiment:
        line += "  (text: " + paint(sentiment, SENTIMENT_COLOURS.get(sentiment), style) + ")"
    return line


def partial_line(
    msg: Mapping[str, Any],
    style: Style,
    *,
    show_channel: bool = False,
    emotion: Mapping[str, Any] | None = None,
) -> str:
    """A ``partial`` (the hypothesis so far), drawn over itself with a carriage return, so it is cut
    to the terminal width (a wrapped line could not be overwritten); the unconfirmed tail is dimmed.
    ``emotion``: the latest ``interim`` emotion of the same utterance, shown as ``~label``."""
    head = fmt_span(msg.get("start", 0.0), msg.get("end", 0.0), style)
    who = who_of(msg, show_channel)
    prefix_plain = head + (f"  [{who}]".ljust(WHO_WIDTH + 2) if who else "")
    prefix = paint(head, DIM, style) + ("  " + _padded(f"[{who}]", WHO_WIDTH, CYAN, style) if who else "")
    label = (emotion or {}).get("label")
    if label:
        prefix_plain += f"  ~{label}"
        prefix += "  " + paint(f"~{label}", LABEL_COLOURS.get(label), style)
    confirmed = (msg.get("confirmed") or "").strip()
    unconfirmed = (msg.get("unconfirmed") or "").strip()
    text = " ".join(t for t in (confirmed, unconfirmed) if t)
    lead = ""
    room = None if style.width is None else style.width - 1 - len(prefix_plain) - 4  # 2 spaces, 2 quotes
    if room is not None and len(text) > room:
        # keep the end: the newest words are the ones still being revised
        lead = ("…" if style.unicode else "...") if room > 3 else ""
        keep = max(0, room - len(lead))
        text = text[len(text) - keep :] if keep else ""
    n_tail = min(len(unconfirmed), len(text))  # the unconfirmed words are the end of `text`
    body = lead + text[: len(text) - n_tail] + paint(text[len(text) - n_tail :], DIM, style)
    return f'{prefix}  "{body}"'


def count_summary(counts: Mapping[str, int]) -> str:
    """``angry 2, neutral 1``: most frequent first, ties by name."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class LabelTally:
    utterances: int = 0
    speech_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, label: str | None, duration_s: float) -> None:
        self.utterances += 1
        self.speech_s += duration_s
        if label is not None:
            self.counts[label] = self.counts.get(label, 0) + 1
            self.seconds[label] = self.seconds.get(label, 0.0) + duration_s

    @property
    def dominant(self) -> str | None:
        """The label of most utterances; ties go to more speech time, then to the name."""
        if not self.counts:
            return None
        return min(self.counts, key=lambda k: (-self.counts[k], -self.seconds[k], k))

    @property
    def negative_share(self) -> float | None:
        labelled = sum(self.counts.values())
        if not labelled:
            return None
        return sum(v for k, v in self.counts.items() if k in NEGATIVE_LABELS) / labelled


@dataclass
class Summary:
    """Counts per label for one file or session, overall and per speaker (role or channel)."""

    total: LabelTally = field(default_factory=LabelTally)
    by_who: dict[str, LabelTally] = field(default_factory=dict)

    def add(self, result: Mapping[str, Any], *, show_channel: bool = False) -> None:
        label, _ = emotion_of(result)
        duration = max(0.0, float(result.get("end", 0.0)) - float(result.get("start", 0.0)))
        self.total.add(label, duration)
        who = who_of(result, show_channel)
        if who is not None:
            self.by_who.setdefault(who, LabelTally()).add(label, duration)

    def extend(self, results: Iterable[Mapping[str, Any]], *, show_channel: bool = False) -> Summary:
        for r in results:
            self.add(r, show_channel=show_channel)
        return self


def _tally_text(t: LabelTally, style: Style) -> str:
    noun = "utterance" if t.utterances == 1 else "utterances"
    parts = [f"{t.utterances} {noun}, {t.speech_s:.1f} s of speech"]
    if t.counts:
        parts.append(count_summary(t.counts))
        dominant = t.dominant or ""
        parts.append("dominant " + paint(dominant, LABEL_COLOURS.get(dominant) or BOLD, style))
    share = t.negative_share
    if share is not None:
        parts.append(f"negative {share:.0%}")
    sep = "  ·  " if style.unicode else "  |  "
    return sep.join(parts)


def summary_lines(summary: Summary, style: Style, title: str = "summary") -> list[str]:
    """``summary: 3 utterances, 9.4 s of speech  ·  angry 2, neutral 1  ·  dominant angry  ·
    negative 67%``, then one indented line per speaker when there are two or more."""
    lines = [paint(f"{title}:", BOLD, style) + " " + _tally_text(summary.total, style)]
    if len(summary.by_who) > 1:
        for who in sorted(summary.by_who):
            tag = _padded(f"[{who}]", WHO_WIDTH, CYAN, style)
            lines.append(f"  {tag}  {_tally_text(summary.by_who[who], style)}")
    return lines


# --- predict ----------------------------------------------------------------------------------------


def error_line(path: str, error: str, detail: str, style: Style) -> str:
    return paint(f"{path}: error {error}", RED, style) + f": {detail}"


def predict_text(line: Mapping[str, Any], style: Style) -> list[str]:
    """The text block of one ``predict`` result line (the /v1/predict response plus ``file``, or
    ``{"file", "error", "detail"}``): a header, one line per utterance, the file's summary."""
    path = str(line.get("file", "?"))
    if "error" in line:
        return [error_line(path, str(line["error"]), str(line.get("detail", "")), style)]
    segments = list(line.get("segments") or [])
    show_channel = len({s.get("channel", 0) for s in segments}) > 1
    head = f"{path}  ({line.get('duration_s', 0.0):.1f} s"
    if line.get("language"):
        head += f", {line['language']}"
    head += ")"
    label, score = emotion_of(line)
    if label is not None:
        overall = label if score is None else f"{label} {score:.2f}"
        head += "  overall " + paint(overall, LABEL_COLOURS.get(label), style)
    out = [paint(head, BOLD, style) if label is None else head]
    if not segments:
        out.append("  (no speech)")
    out += ["  " + utterance_line(s, style, show_channel=show_channel) for s in segments]
    if segments:
        summary = Summary().extend(segments, show_channel=show_channel)
        out += ["  " + s for s in summary_lines(summary, style)]
    return out


def progress_line(done: int, total: int, failed: int, elapsed_s: float, style: Style) -> str:
    """``[████████░░░░░░░░░░░░] 2/5 files  1 failed  00:12.3``, fitted to the terminal width."""
    tail = f" {done}/{total} files" + (f"  {failed} failed" if failed else "") + f"  {fmt_clock(elapsed_s)}"
    width = 20 if style.width is None else max(5, min(30, style.width - 1 - len(tail) - 2))
    filled = 0 if total <= 0 else min(width, done * width // total)
    full, empty = ("█", "░") if style.unicode else ("#", "-")
    return f"[{full * filled}{empty * (width - filled)}]" + tail
