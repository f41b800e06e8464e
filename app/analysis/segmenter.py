"""What an utterance is: the one definition REST, streaming, the CLI and training share.

``UtterancePolicy`` holds every knob that decides where an utterance starts and ends;
``UtteranceSegmenter`` applies it causally to one channel of a 16-kHz stream, and
``split_utterances`` runs that same segmenter over a whole recording. A file therefore gives the
same spans whether it is uploaded, streamed (at 16 kHz, in any frame size) or cached for training,
and the models are trained on exactly the cut they are served.

States: *idle* (silence; only the last ``pre_pad`` of audio is kept) and *speech*. Silero's
hysteresis decides per 32-ms window: probability >= ``threshold`` is speech, below
``threshold - 0.15`` is silence, in between keeps the current state. An utterance

* starts at the first speech window (its audio begins ``pre_pad`` earlier);
* ends when the silence after the last speech window reaches ``end_silence`` (``end_of_speech``),
  or when it reaches ``max_utterance_s`` (``max_length``; the next utterance starts right there);
* covers ``[start - pre_pad, speech_end + post_pad]``, so its audio is known as soon as
  ``post_pad`` of silence is seen. That is when a ``Candidate`` is emitted: the session may start the
  analysis early (speculatively) and keep it if the end is confirmed with the same audio, which
  takes ``end_silence - post_pad`` off the final's latency. Renewed speech cancels the candidate.

Speech shorter than ``min_speech`` in total (a click, a cough) is discarded, not finalised.
``flush`` ends an utterance in progress with every sample received (stop, disconnect).

Thread-safety: one instance per channel, fed by one task; pure computation apart from the VAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.analysis.audio import SAMPLE_RATE
from app.analysis.vad import WINDOW, StreamingVAD


@dataclass(frozen=True)
class UtterancePolicy:
    """Where utterances start and end (part of the feature identity: it decides what the models see).

    500 ms of silence ends an utterance: shorter pauses fall inside sentences often enough to split
    them; the streaming final still starts ``post_pad`` after the speech when the server is idle.
    15 s caps an utterance so one long turn still gives a result every 15 s.
    """

    threshold: float = 0.5
    end_silence_ms: int = 500
    min_speech_ms: int = 200
    pre_pad_ms: int = 200
    post_pad_ms: int = 150
    max_s: float = 15.0

    @classmethod
    def from_settings(cls, s) -> UtterancePolicy:
        return cls(
            threshold=s.utterance_threshold,
            end_silence_ms=s.utterance_end_silence_ms,
            min_speech_ms=s.utterance_min_speech_ms,
            pre_pad_ms=s.utterance_pre_pad_ms,
            post_pad_ms=s.utterance_post_pad_ms,
            max_s=s.utterance_max_s,
        )

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SegmenterConfig:
    """The policy plus what only a live stream needs (partials, interims, speculation), none of
    which moves an utterance's span."""

    policy: UtterancePolicy = UtterancePolicy()
    partial_every_s: float = 1.0  # 0 = no partials
    interim_every_s: float = 0.0  # 0 = no interim emotions
    speculative: bool = True

    @classmethod
    def from_settings(cls, s, partials: bool = True) -> SegmenterConfig:
        return cls(
            policy=UtterancePolicy.from_settings(s),
            partial_every_s=s.stream_partial_every_s if partials else 0.0,
            interim_every_s=s.stream_interim_every_s,
            speculative=s.stream_speculative_final,
        )


def _ms(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000.0))


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtteranceStart:
    utterance: int
    start: int  # samples, channel time


@dataclass(frozen=True)
class Candidate:
    utterance: int
    start: int
    end: int
    audio: np.ndarray


@dataclass(frozen=True)
class CandidateCancelled:
    utterance: int


@dataclass(frozen=True)
class PartialDue:
    utterance: int
    start: int
    end: int
    audio: np.ndarray


@dataclass(frozen=True)
class InterimDue:
    utterance: int
    start: int
    end: int
    audio: np.ndarray


@dataclass(frozen=True)
class UtteranceEnd:
    utterance: int
    start: int
    end: int
    speech_end: int  # where the speech stopped: latency is measured from the frame holding it
    audio: np.ndarray
    reason: str  # end_of_speech | max_length | stop | disconnect | idle | error


@dataclass(frozen=True)
class UtteranceDiscarded:
    utterance: int
    speech_ms: float


Event = (
    UtteranceStart
    | Candidate
    | CandidateCancelled
    | PartialDue
    | InterimDue
    | UtteranceEnd
    | UtteranceDiscarded
)


class _Buffer:
    """Growable float32 buffer addressed by absolute sample positions."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE, dtype=np.float32)
        self.start = 0  # absolute position of _data[0]
        self._n = 0

    @property
    def end(self) -> int:
        return self.start + self._n

    def append(self, x: np.ndarray) -> None:
        need = self._n + len(x)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), dtype=np.float32)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : need] = x
        self._n = need

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        return self._data[a - self.start : max(a, b) - self.start].copy()

    def drop_before(self, pos: int) -> None:
        k = min(max(0, pos - self.start), self._n)
        if k:
            self._data[: self._n - k] = self._data[k : self._n]
            self._n -= k
            self.start += k


class UtteranceSegmenter:
    def __init__(self, config: SegmenterConfig, vad: StreamingVAD | None = None):
        self.cfg = config
        policy = config.policy
        self.threshold = policy.threshold
        self.vad = vad or StreamingVAD()
        self.neg_threshold = max(policy.threshold - 0.15, 0.01)
        self.end_silence = _ms(policy.end_silence_ms)
        self.post_pad = min(_ms(policy.post_pad_ms), self.end_silence)
        self.pre_pad = _ms(policy.pre_pad_ms)
        self.min_speech = _ms(policy.min_speech_ms)
        self.max_len = max(int(policy.max_s * SAMPLE_RATE), 4 * WINDOW)
        self.partial_every = int(config.partial_every_s * SAMPLE_RATE)
        self.interim_every = int(config.interim_every_s * SAMPLE_RATE)
        self.buffer = _Buffer()
        self.vad_pos = 0  # samples judged by the VAD
        self.in_speech = False
        self.next_index = 0
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self.utt_start = 0  # audio start (pre-pad included)
        self.speech_start = 0
        self.speech_end = 0  # end of the last speech window
        self.silent = False  # inside a run of silence windows
        self.candidate = False
        self.last_partial = 0
        self.last_interim = 0

    @property
    def utterance(self) -> int:
        return self.next_index - 1

    @property
    def received(self) -> int:
        return self.buffer.end

    def feed(self, audio16k: np.ndarray) -> list[Event]:
        self.buffer.append(audio16k)
        events: list[Event] = []
        for prob in self.vad.feed(audio16k):
            w_start = self.vad_pos
            self.vad_pos += WINDOW
            self._window(float(prob), w_start, self.vad_pos, events)
        return events

    def _window(self, p: float, w_start: int, w_end: int, events: list[Event]) -> None:
        cfg = self.cfg
        if not self.in_speech:
            if p >= self.threshold:
                self._begin(max(self.buffer.start, w_start - self.pre_pad), w_start, w_end, events)
            else:
                self.buffer.drop_before(w_end - self.pre_pad)  # idle: keep only the pre-roll
            return
        if p >= self.threshold or (p >= self.neg_threshold and not self.silent):
            self.speech_end, self.silent = w_end, False
            if self.candidate:
                self.candidate = False
                events.append(CandidateCancelled(self.utterance))
        else:
            self.silent = True
        silence = w_end - self.speech_end
        speech = self.speech_end - self.speech_start
        if silence >= self.end_silence:
            self._end(self.speech_end + self.post_pad, self.speech_end, "end_of_speech", events)
            self.buffer.drop_before(w_end - self.pre_pad)
            return
        if w_end - self.utt_start >= self.max_len:
            self._end(w_end, w_end, "max_length", events, force=True)
            self.buffer.drop_before(w_end)
            self._begin(w_end, w_end, w_end, events)  # speech goes on: next utterance at once
            return
        if cfg.speculative and not self.candidate and silence >= self.post_pad and speech >= self.min_speech:
            self.candidate = True
            end = self.speech_end + self.post_pad
            events.append(
                Candidate(self.utterance, self.utt_start, end, self.buffer.slice(self.utt_start, end))
            )
        if not self.silent and self.partial_every and w_end - self.last_partial >= self.partial_every:
            self.last_partial = w_end
            events.append(
                PartialDue(self.utterance, self.utt_start, w_end, self.buffer.slice(self.utt_start, w_end))
            )
        if not self.silent and self.interim_every and w_end - self.last_interim >= self.interim_every:
            self.last_interim = w_end
            events.append(
                InterimDue(self.utterance, self.utt_start, w_end, self.buffer.slice(self.utt_start, w_end))
            )

    def _begin(self, utt_start: int, speech_start: int, w_end: int, events: list[Event]) -> None:
        self._reset_utterance()
        self.in_speech = True
        self.utt_start, self.speech_start, self.speech_end = utt_start, speech_start, w_end
        self.last_partial = self.last_interim = utt_start
        self.next_index += 1
        events.append(UtteranceStart(self.utterance, utt_start))

    def _end(self, end: int, speech_end: int, reason: str, events: list[Event], force: bool = False) -> None:
        speech = speech_end - self.speech_start
        if not force and speech < self.min_speech:
            if self.candidate:
                events.append(CandidateCancelled(self.utterance))
            events.append(UtteranceDiscarded(self.utterance, speech * 1000.0 / SAMPLE_RATE))
        else:
            audio = self.buffer.slice(self.utt_start, end)
            events.append(UtteranceEnd(self.utterance, self.utt_start, end, speech_end, audio, reason))
        self.in_speech = False
        self._reset_utterance()

    def flush(self, reason: str = "stop") -> list[Event]:
        """End the utterance in progress with all audio received (nothing received is lost)."""
        events: list[Event] = []
        if self.in_speech:
            if self.silent:  # already in trailing silence: the same audio a normal end would take
                end = min(self.speech_end + self.post_pad, self.buffer.end)
                speech_end = self.speech_end
            else:
                end = speech_end = self.buffer.end
            self._end(end, speech_end, reason, events)
        return events


# --- a whole recording -------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One utterance of a recording: samples ``[start, end)`` at 16 kHz."""

    start: int
    end: int
    reason: str = "end_of_speech"

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def split_utterances(audio16k: np.ndarray, policy: UtterancePolicy | None = None) -> list[Span]:
    """The utterances of a whole 16-kHz mono recording, exactly as a stream of it would end them
    (its end is a ``stop``). Speech shorter than ``min_speech_ms`` gives none."""
    seg = UtteranceSegmenter(SegmenterConfig(policy or UtterancePolicy(), 0.0, 0.0, False))
    audio16k = np.asarray(audio16k, dtype=np.float32).reshape(-1)
    events: list[Event] = []
    step = 30 * SAMPLE_RATE  # the buffer holds one utterance at most: feed it in pieces
    for i in range(0, len(audio16k), step):
        events += seg.feed(audio16k[i : i + step])
    events += seg.flush("stop")
    return [Span(e.start, e.end, e.reason) for e in events if isinstance(e, UtteranceEnd)]
