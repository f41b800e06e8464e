"""Writers for the command line: results on stdout, one redrawn status line, the stream printer.

* :class:`StatusLine` keeps one transient line (a partial transcript, a progress bar) at the bottom
  of a terminal with carriage returns; on anything but a terminal it writes nothing.
* :class:`StreamPrinter` turns ``WS /v1/stream`` messages into JSON lines (every message, as
  received) or text (finals as utterance lines, partials on the status line, a summary at the end).
* :class:`Progress` is the ``predict`` progress bar on stderr.

The strings come from ``app.cli.render``; this module only decides where and when they go.
Thread-safety: none; each object belongs to the one event loop (or thread) of one command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from app.cli.render import (
    Style,
    Summary,
    default_format,
    is_tty,
    partial_line,
    progress_line,
    style_for,
    summary_lines,
    utterance_line,
)

CLEAR_LINE = "\r\x1b[K"  # back to column 0, erase to the end of the line


class StatusLine:
    """One line redrawn in place; ``clear()`` before anything else is written to the same terminal."""

    def __init__(self, stream: TextIO, enabled: bool):
        self.stream = stream
        self.enabled = enabled
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write(CLEAR_LINE + text)
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()
            self.shown = False


class StreamPrinter:
    """``on_message`` for ``stream_audio`` / ``stream_mic``; call ``finish()`` once it returns."""

    def __init__(self, fmt: str, out: TextIO, err: TextIO, style: Style, tty: bool):
        self.fmt = fmt
        self.out, self.err, self.style = out, err, style
        self.status = StatusLine(out, enabled=tty)  # partials only where a line can be redrawn
        self.summary = Summary()
        self.show_channel = False
        self.interim: dict[tuple[int, int], Mapping[str, Any]] = {}
        self.ended = False

    @classmethod
    def for_terminal(cls, fmt: str | None, out: TextIO | None = None, err: TextIO | None = None):
        out = out or sys.stdout
        tty = is_tty(out)
        return cls(fmt or default_format(tty), out, err or sys.stderr, style_for(out), tty)

    def _print(self, line: str, stream: TextIO | None = None) -> None:
        self.status.clear()
        stream = stream or self.out
        stream.write(line + "\n")
        stream.flush()

    def __call__(self, msg: dict) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps(msg) + "\n")
            self.out.flush()
            return
        kind = msg.get("type")
        key = (msg.get("channel", 0), msg.get("utterance", 0))
        if kind == "ready":
            channels = int(msg.get("channels") or 1)
            self.show_channel = channels > 1
            models = ", ".join(msg.get("models") or [])
            plural = "s" if channels != 1 else ""
            self._print(f"session {msg.get('session_id')}  ({channels} channel{plural}; models: {models})")
        elif kind == "partial":
            line = partial_line(
                msg, self.style, show_channel=self.show_channel, emotion=self.interim.get(key)
            )
            self.status.show(line)
        elif kind == "interim":
            if msg.get("emotion"):
                self.interim[key] = msg["emotion"]
        elif kind == "final":
            self.interim.pop(key, None)
            self.summary.add(msg, show_channel=self.show_channel)
            self._print(utterance_line(msg, self.style, show_channel=self.show_channel))
        elif kind == "warning":
            self._print(f"warning: {msg.get('code')}: {msg.get('detail')}", self.err)
        elif kind == "error":
            self._print(f"error: {msg.get('error')}: {msg.get('detail')}", self.err)
        elif kind == "end":
            self.ended = True
            for line in summary_lines(
                self.summary, self.style, f"session {msg.get('session_id', '')}".strip()
            ):
                self._print(line)

    def finish(self) -> None:
        """After the run: clear a pending partial; summarise what arrived if no ``end`` did (a dropped
        connection, Ctrl-C)."""
        if self.fmt != "text":
            return
        self.status.clear()
        if not self.ended and self.summary.total.utterances:
            for line in summary_lines(self.summary, self.style, "summary (no end message)"):
                self._print(line)


class Progress:
    """``predict``'s bar on stderr; only on a terminal. ``out`` is cleared around result lines when it
    shares the terminal."""

    def __init__(self, total: int, err: TextIO, enabled: bool):
        self.total, self.done, self.failed = total, 0, 0
        self.style = style_for(err)
        self.status = StatusLine(err, enabled)
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        self.status.show(text)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.draw()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self.draw()

    def draw(self) -> None:
        self.status.show(
            progress_line(self.done, self.total, self.failed, time.monotonic() - self.t0, self.style)
        )

    def write_above(self, stream: TextIO, text: str) -> None:
        """Write result text without tearing the bar: clear it, write, flush, redraw."""
        shown = self.status.shown
        self.status.clear()
        stream.write(text)
        stream.flush()
        if shown:
            self.draw()

    def close(self) -> None:
        self.status.clear()
