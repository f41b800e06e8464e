"""The streaming session: audio frames in, ``partial`` / ``final`` / ``interim`` messages out.

No socket here: ``app.api.stream`` reads the WebSocket and calls ``StreamSession.feed`` /
``wait_capacity`` / ``finish``; the session sends typed messages through the ``emit`` coroutine it
was given. Tests drive it directly with a fake backend.

Flow per binary frame: decode (``PcmDecoder``) -> de-interleave -> resample each channel to 16 kHz
-> that channel's ``UtteranceSegmenter`` (Silero VAD) -> events. That ingest step is CPU work
(~0.3-0.5 ms per 20-ms stereo frame), so it runs in a small shared thread pool
(``stream_ingest_workers``), not on the event loop; a stream's steps stay in order because the
reader awaits each one. The events are then handled on the loop:

* ``UtteranceEnd`` -> a *final job*: the utterance's analysis starts at once (or was already
  started speculatively on a ``Candidate``), and one emitter task awaits the jobs in order,
  appends each result to the store (which assigns ``seq``) and sends the ``final``. Finals are never
  skipped. They run at ``Priority.FINAL`` in the engine's ASR lane, ahead of REST and partial work,
  with queue room of their own (``app.inference.scheduler``): no retry loop is needed.
* ``Candidate`` -> a *speculative* final: the analysis of the same audio starts as soon as
  ``post_pad`` of silence is seen, also at ``Priority.FINAL`` (it *is* the final's analysis ~200 ms
  early in the common case), but only while no final waits in the ASR lane
  (``StreamBackend.asr_idle``), so a guess never takes a batch slot from a confirmed final.
* ``PartialDue`` -> an ASR pass over the utterance so far at ``Priority.PARTIAL``, fed to the
  channel's ``LocalAgreement``; sent as ``partial`` only if the utterance is still open. One pass
  per channel at a time; the lane admits partials only below its low-water mark and sheds queued
  ones first when finals or REST work arrive, and a shed or late pass is counted in
  ``partials_skipped``: partials thin out under load, finals never wait for them.
* ``InterimDue`` -> an emotion estimate of the utterance so far, also at ``Priority.PARTIAL``.

Session timeline: ``open`` reads the session's resume point (``audio_duration_s``: the largest
stored result end) and places the connection's first frame at ``time_offset_s`` = max(that,
``start.audio_offset_s``); every time the session sends or stores is offset by it (see
``app.streaming.protocol``), so a resumed session's times continue.

Lease: the endpoint takes the session's ``SessionLease`` (``app.store.lease``) before ``open``; the
heartbeat renews it every third of its TTL (and the store's ``heartbeat`` every third of
``stream_stale_s``). A renewal that finds another holder calls ``on_lease_lost`` (the endpoint
closes the stream 4009). Every final renews the lease right before it is stored, and is dropped
(neither stored nor sent) when the lease is lost: a successful renewal holds the lease for a whole
TTL, far longer than the append that follows, so a stream that lost its session to a resumed one
never adds results behind its successor's resume point. ``finish`` ends the stored session only
while the lease is still ours, so it never ends its successor's session either.
Roles and words: ``start.roles[channel]`` is each final's ``role`` (stored with the result, and with
the session on open); finals carry ``words`` only with ``start.words`` (the store always keeps them).

Adaptation (``start.adapt``, ``app.analysis.adaptation``): each channel keeps a ``SessionAdapter``
(count and sum of its finals' raw encoder-frame means). A final's analysis first waits until the
channel's previous final has been folded in, then passes the shift of exactly the earlier finals to
the backend (``encoder_shift``) and reports their number (``final.adaptation.utterances``); its own
raw mean joins the state once it is done. So a result depends on earlier finals only, never on
timing; the cost is that an adapting channel's finals are analysed one after another (they overlap
only when utterances queue up). Interims use the state as it is, without waiting. The state lives in
this object only: a resumed session (another connection or replica) starts again from zero.

Back-pressure: ``backlog_s`` is the audio of utterances that ended but whose final is not out
yet. Above ``max_backlog_s`` the reader must stop reading (``wait_capacity``) until the backlog
falls below 80 % of it, so a too-fast client is slowed by TCP flow control instead of losing
audio. Warnings are sent when the client runs ahead of real time, when the backlog passes half
the limit, and when reading is paused.

Thread-safety: a ``StreamSession`` lives on one event loop and is driven by one reader task plus
the tasks it creates itself. Its decoder, resamplers and segmenters are touched only by the ingest
step in the pool, one step at a time per session (``feed`` awaits it; ``finish`` waits for a step
still running before flushing); everything else only from the loop. The ingest pool is
process-wide and created lazily from the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from app import metrics
from app.analysis.adaptation import PopulationStats, SessionAdapter
from app.analysis.audio import SAMPLE_RATE
from app.analysis.segmenter import (
    Candidate,
    CandidateCancelled,
    InterimDue,
    PartialDue,
    SegmenterConfig,
    UtteranceDiscarded,
    UtteranceEnd,
    UtteranceSegmenter,
    UtteranceStart,
)
from app.inference.scheduler import Priority
from app.schemas import Adaptation, Emotion, TextSentiment, WordOut, role_of
from app.store.lease import SessionLease
from app.streaming.audio import ArrivalClock, ChannelResampler, PcmDecoder
from app.streaming.local_agreement import LocalAgreement
from app.streaming.protocol import (
    EndMessage,
    EndStats,
    ErrorMessage,
    FinalMessage,
    InterimMessage,
    PartialMessage,
    ReadyMessage,
    StartMessage,
    StreamSettings,
    WarningMessage,
)

log = logging.getLogger(__name__)

Emit = Callable[[Any], Awaitable[None]]


# --- what the session needs from the service ---------------------------------------------------


@dataclass
class UtteranceOutput:
    text: str
    words: list[WordOut]
    emotion: Emotion | None
    extra: dict[str, Any] = field(default_factory=dict)  # stored with the result (language, timing)
    text_sentiment: TextSentiment | None = None
    frame_mean: np.ndarray | None = None  # raw encoder-frame mean, when analysed with an encoder_shift
    adapted_after: int | None = None  # set by the session: earlier finals in the shift (start.adapt)


class StreamBackend(Protocol):
    """The analysis side of streaming (``ServiceBackend`` adapts ``EmotionService``)."""

    def resolve_models(self, models: Sequence[str] | None) -> list[str]: ...

    async def analyze(
        self,
        audio16k: np.ndarray,
        models: Sequence[str] | None,
        channel: int,
        offset_s: float,
        key: Hashable,
        count_audio: bool = True,
        priority: Priority = Priority.FINAL,
        encoder_shift: np.ndarray | None = None,
    ) -> UtteranceOutput:
        """``encoder_shift`` (passed only by adapting sessions): added to the encoder frames before
        the model inputs; the output then carries the raw ``frame_mean``."""
        ...

    async def transcribe_words(self, audio16k: np.ndarray, key: Hashable) -> list[str]:
        """ASR words of a partial pass (``Priority.PARTIAL``); raises ``QueueFull`` when shed."""
        ...

    def asr_idle(self) -> bool:
        """No final waits for the ASR lane: a speculative final would not delay a confirmed one."""
        ...


def _skippable(exc: BaseException) -> bool:
    """A low-priority pass refused, shed (503) or too late (504): a skip, not a failure."""
    return getattr(exc, "status", None) in (503, 504)


_INGEST_POOL: ThreadPoolExecutor | None = None


def ingest_pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool running the streams' ingest steps (created on first use, from the loop)."""
    global _INGEST_POOL
    if _INGEST_POOL is None:
        _INGEST_POOL = ThreadPoolExecutor(max(1, workers), thread_name_prefix="stream-ingest")
    return _INGEST_POOL


# --- the session -------------------------------------------------------------------------------


@dataclass
class _FinalJob:
    channel: int
    utterance: int
    start: int  # samples (16 kHz, channel time)
    end: int
    speech_end: int
    reason: str
    audio: np.ndarray
    task: asyncio.Task

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


@dataclass
class _Spec:
    """A speculative analysis started on a ``Candidate``."""

    start: int
    end: int
    task: asyncio.Task


@dataclass
class Counters:
    utterances: int = 0
    discarded: int = 0
    finals: int = 0
    stored: int = 0
    partials_sent: int = 0
    partials_skipped: int = 0
    speculative_used: int = 0
    speculative_wasted: int = 0
    max_backlog_s: float = 0.0
    paused_reading_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


class StreamSession:
    def __init__(
        self,
        *,
        session_id: str,
        start: StartMessage,
        settings,
        backend: StreamBackend,
        store,
        emit: Emit,
        models: list[str] | None = None,
        announced_models: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        segmenter_factory: Callable[[int], UtteranceSegmenter] | None = None,
        ingest: Executor | None = None,
        lease: SessionLease | None = None,
        on_lease_lost: Callable[[], None] | None = None,
        population: PopulationStats | None = None,
    ):
        self.session_id = session_id
        self.start_msg = start
        self.settings = settings
        self.backend = backend
        self.store = store
        self._emit = emit
        self.models = models  # as requested: passed to every analysis
        self.announced_models = announced_models if announced_models is not None else (models or [])
        self.clock = clock
        self.key = f"stream-{session_id}-{id(self)}"  # fair-scheduling key in the ASR lane
        self._ingest = ingest or ingest_pool(int(getattr(settings, "stream_ingest_workers", 2)))
        self._ingest_step: Future | None = None  # the step in the pool, awaited by feed()
        self.channels = start.channels
        self.decoder = PcmDecoder(start.encoding, start.channels)
        self.resamplers = [ChannelResampler(start.sample_rate) for _ in range(self.channels)]
        self.arrivals = ArrivalClock(start.sample_rate)
        cfg = SegmenterConfig.from_settings(settings, partials=start.partials)
        make = segmenter_factory or (lambda _c: UtteranceSegmenter(cfg))
        self.segmenters = [make(c) for c in range(self.channels)]
        self.max_backlog_s = float(settings.stream_max_backlog_s)
        self.counters = Counters()

        self._agreements: dict[tuple[int, int], LocalAgreement] = {}
        self._open: dict[int, int | None] = dict.fromkeys(range(self.channels))  # channel -> utterance
        self._spec: dict[tuple[int, int], _Spec] = {}
        self._low_tasks: set[asyncio.Task] = set()
        self._low_busy: set[int] = set()  # channels with a partial/interim pass running
        self._jobs: asyncio.Queue[_FinalJob | None] = asyncio.Queue()
        self._emitter: asyncio.Task | None = None
        self._backlog_s = 0.0
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._outbox: list[WarningMessage] = []  # warnings raised in sync code, sent by feed()
        self._first_arrival: float | None = None
        self._warned_fast = False
        self._warned_behind = False
        self._client_gone = False
        self._store_ok = True
        self._finished = False
        self._heartbeat: asyncio.Task | None = None
        self.lease = lease
        self._on_lease_lost = on_lease_lost
        self.time_offset_s = 0.0  # session time of this connection's first frame (set by open)
        self.resumed_after_seq = 0  # the session's last_seq when this connection opened it
        # per-session adaptation (start.adapt): one running state per channel, in memory only
        self.adapters: list[SessionAdapter] | None = None
        if start.adapt:
            if population is None:
                raise ValueError("start.adapt needs the population statistics")
            self.adapters = [SessionAdapter(population) for _ in range(self.channels)]
        # per channel: the task that folds the latest final into its adapter (see _analysis_task)
        self._folded: dict[int, asyncio.Task] = {}

    # --- messages ----------------------------------------------------------------------------

    async def emit(self, message) -> None:
        """Send a message; once the client is gone, keep working (results are still stored)."""
        if self._client_gone:
            return
        try:
            await self._emit(message)
        except Exception:  # the socket closed under us: the disconnect path takes over
            self._client_gone = True

    def mark_client_gone(self) -> None:
        self._client_gone = True

    def stream_settings(self) -> StreamSettings:
        s = self.settings
        return StreamSettings(
            max_frame_bytes=s.stream_max_frame_bytes,
            max_message_bytes=s.stream_max_message_bytes,
            max_utterance_s=s.utterance_max_s,
            end_silence_ms=s.utterance_end_silence_ms,
            partial_every_s=s.stream_partial_every_s if self.start_msg.partials else 0.0,
            interim_every_s=s.stream_interim_every_s,
            max_backlog_s=s.stream_max_backlog_s,
            idle_timeout_s=s.stream_idle_timeout_s,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or re-open) the stored session, place this connection on its timeline, send ``ready``."""
        roles = {"roles": self.start_msg.roles} if self.start_msg.roles is not None else {}
        view = await self.store.open_session(
            self.session_id, self.start_msg.metadata, source="stream", **roles
        )
        view = view or {}
        resume_point = float(view.get("audio_duration_s") or 0.0)
        self.time_offset_s = round(max(resume_point, float(self.start_msg.audio_offset_s or 0.0)), 3)
        self.resumed_after_seq = int(view.get("last_seq") or 0)
        beat = getattr(self.store, "heartbeat", None)
        stale_s = float(getattr(self.settings, "stream_stale_s", 0) or 0)
        periods = []
        if beat is not None and stale_s > 0:  # keeps the stored session from being swept as stale
            periods.append(stale_s / 3)
        else:
            beat = None
        if self.lease is not None:  # keeps other replicas' streams off this session
            periods.append(self.lease.ttl_s / 3)
        if periods:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat(beat, max(0.2, min(periods))), name=f"heartbeat-{self.session_id}"
            )
        self._emitter = asyncio.get_running_loop().create_task(
            self._emit_finals(), name=f"finals-{self.session_id}"
        )
        m = self.start_msg
        await self.emit(
            ReadyMessage(
                session_id=self.session_id,
                sample_rate=m.sample_rate,
                encoding=m.encoding,
                channels=m.channels,
                models=self.announced_models,
                settings=self.stream_settings(),
                resume_offset_s=self.time_offset_s,
                last_seq=self.resumed_after_seq,
            )
        )

    def _t(self, samples: int) -> float:
        """Session time (s) of a sample index of this connection (16 kHz channel time)."""
        return round(self.time_offset_s + samples / SAMPLE_RATE, 3)

    @property
    def backlog_s(self) -> float:
        return self._backlog_s

    @property
    def received_s(self) -> float:
        return self.arrivals.received_s

    async def feed(self, data: bytes, arrival: float | None = None) -> None:
        """One binary frame. Raises ``InvalidAudioFrame`` for unusable content."""
        arrival = self.clock() if arrival is None else arrival
        n_frames, events = await self._off_loop(self._ingest_frame, data)
        if n_frames == 0:
            return
        if self._first_arrival is None:
            self._first_arrival = arrival
        self.arrivals.add(n_frames, arrival)
        for c, channel_events in events:
            self._handle(c, channel_events)
        await self._send_outbox()
        await self._check_pace(arrival)

    async def _off_loop(self, fn, *args):
        """Run an ingest step in the pool; steps of one session never overlap (the caller awaits)."""
        step = self._ingest.submit(fn, *args)
        self._ingest_step = step
        return await asyncio.wrap_future(step)

    def _ingest_frame(self, data: bytes) -> tuple[int, list[tuple[int, list]]]:
        """(input frames decoded, segmenter events per channel) of one binary frame. Pool thread."""
        frames = self.decoder.decode(data)
        if len(frames) == 0:
            return 0, []
        events = []
        for c in range(self.channels):
            audio16k = self.resamplers[c](frames[:, c])
            if len(audio16k):
                events.append((c, self.segmenters[c].feed(audio16k)))
        return len(frames), events

    def _ingest_flush(self, reason: str) -> list[tuple[int, list]]:
        """The resamplers' tails and every segmenter's pending utterance. Pool thread."""
        events = []
        for c in range(self.channels):
            tail = self.resamplers[c](np.zeros(0, dtype=np.float32), last=True)
            channel_events = self.segmenters[c].feed(tail) if len(tail) else []
            events.append((c, channel_events + self.segmenters[c].flush(reason)))
        return events

    async def _check_pace(self, now: float) -> None:
        ahead = self.received_s - (now - (self._first_arrival or now))
        slack = float(self.settings.stream_realtime_slack_s)
        if ahead > slack and not self._warned_fast:
            self._warned_fast = True
            await self.emit(
                WarningMessage(
                    code="client_too_fast",
                    detail=f"audio arrives {ahead:.1f} s ahead of real time; the server works at its own pace "
                    f"and stops reading beyond {self.max_backlog_s:.0f} s of backlog (nothing is dropped)",
                    backlog_s=round(self._backlog_s, 3),
                )
            )
        elif ahead < slack / 2:
            self._warned_fast = False

    async def wait_capacity(self) -> None:
        """Return when the reader may read the next frame (backlog below the limit)."""
        if self._backlog_s <= self.max_backlog_s:
            return
        await self.emit(
            WarningMessage(
                code="backpressure",
                detail=f"{self._backlog_s:.1f} s of audio await analysis (limit {self.max_backlog_s:.0f} s): "
                "the server stops reading until it catches up",
                backlog_s=round(self._backlog_s, 3),
            )
        )
        t0 = self.clock()
        while self._backlog_s > 0.8 * self.max_backlog_s:
            self._capacity.clear()
            await self._capacity.wait()
        self.counters.paused_reading_s += self.clock() - t0

    async def finish(self, reason: str = "stop") -> EndStats:
        """Flush every channel, wait for every final, end the stored session.

        ``reason`` (stop | disconnect | idle | error) is recorded on the utterances cut short. Safe
        to call once; the ``end`` message is sent by the caller (only after a ``stop``).
        """
        if self._finished:
            return self.stats()
        self._finished = True
        step = self._ingest_step
        if step is not None and not step.done():  # a feed() cancelled mid-step: let it end first
            await asyncio.wait([asyncio.wrap_future(step)])
        for c, events in await self._off_loop(self._ingest_flush, reason):
            self._handle(c, events)
        await self._send_outbox()
        for task in list(self._low_tasks):
            task.cancel()
        if self._emitter is not None:
            await self._jobs.put(None)
            await self._emitter
        for spec in self._spec.values():  # candidates never confirmed (flush confirmed the rest)
            spec.task.cancel()
        self._spec.clear()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if not await self._still_leased():
            log.warning(
                "stream %s: another stream holds the session now; leaving it open for that stream",
                self.session_id,
            )
            return self.stats()
        try:
            await self.store.close_session(self.session_id)
        except Exception as exc:
            log.warning("stream %s: could not end the stored session: %s", self.session_id, exc)
        return self.stats()

    async def _still_leased(self) -> bool:
        """True unless another stream took the lease over (a store error counts as still ours)."""
        if self.lease is None:
            return True
        try:
            return await self.lease.renew()
        except Exception as exc:
            log.debug("stream %s: lease check failed: %s", self.session_id, exc)
            return not self.lease.lost

    async def _beat(self, beat, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            if beat is not None:
                try:
                    await beat(self.session_id)
                except Exception as exc:  # the store is down: results warn on their own
                    log.debug("stream %s: heartbeat failed: %s", self.session_id, exc)
            if self.lease is not None:
                try:
                    held = await self.lease.renew()
                except Exception as exc:  # the store is down: keep streaming, try again next beat
                    log.debug("stream %s: lease renewal failed: %s", self.session_id, exc)
                    continue
                if not held:
                    log.warning("stream %s: lease taken over by another stream", self.session_id)
                    self._lease_lost()
                    return

    def _lease_lost(self) -> None:
        callback, self._on_lease_lost = self._on_lease_lost, None  # once
        if callback is not None:
            callback()

    def stats(self) -> EndStats:
        c = self.counters
        return EndStats(
            audio_s=round(self.received_s, 3),
            utterances=c.utterances,
            finals=c.finals,
            stored=c.stored,
            partials_sent=c.partials_sent,
            partials_skipped=c.partials_skipped,
            max_backlog_s=round(c.max_backlog_s, 3),
            paused_reading_s=round(c.paused_reading_s, 3),
        )

    def end_message(self, stats: EndStats) -> EndMessage:
        return EndMessage(session_id=self.session_id, stats=stats)

    # --- segmenter events --------------------------------------------------------------------

    def _handle(self, channel: int, events) -> None:
        for ev in events:
            if isinstance(ev, UtteranceStart):
                self._open[channel] = ev.utterance
                self._agreements[(channel, ev.utterance)] = LocalAgreement()
            elif isinstance(ev, Candidate):
                self._speculate(channel, ev)
            elif isinstance(ev, CandidateCancelled):
                spec = self._spec.pop((channel, ev.utterance), None)
                if spec is not None:
                    spec.task.cancel()
                    self.counters.speculative_wasted += 1
            elif isinstance(ev, PartialDue):
                self._low_priority(channel, ev, self._partial)
            elif isinstance(ev, InterimDue):
                self._low_priority(channel, ev, self._interim)
            elif isinstance(ev, UtteranceEnd):
                self._end_utterance(channel, ev)
            elif isinstance(ev, UtteranceDiscarded):
                self._open[channel] = None
                self._agreements.pop((channel, ev.utterance), None)
                self.counters.discarded += 1

    def _analysis_task(self, channel: int, audio: np.ndarray, start: int) -> asyncio.Task:
        """A final's analysis at ``Priority.FINAL`` (the lane keeps room for it: no retry).

        Adapting, the utterance is shifted with the statistics of exactly the channel's earlier
        finals: it first waits for the fold of the latest final ended before it (``_folded``, taken
        now, before this utterance can become final), so the result never depends on timing, and
        never on its own or later audio."""
        offset_s = self.time_offset_s + start / SAMPLE_RATE  # unrounded: word times as /v1/predict gives them
        if self.adapters is None:
            coro = self.backend.analyze(
                audio, self.models, channel, offset_s, self.key, priority=Priority.FINAL
            )
        else:
            coro = self._adapted(channel, audio, offset_s, self._folded.get(channel))
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_retrieve)
        return task

    async def _adapted(
        self, channel: int, audio: np.ndarray, offset_s: float, previous: asyncio.Task | None
    ) -> UtteranceOutput:
        assert self.adapters is not None
        if previous is not None:
            await asyncio.wait([previous])
        shift = self.adapters[channel].next_shift()
        out = await self.backend.analyze(
            audio,
            self.models,
            channel,
            offset_s,
            self.key,
            priority=Priority.FINAL,
            encoder_shift=shift.shift,
        )
        out.adapted_after = shift.utterances
        return out

    def _fold_later(self, channel: int, task: asyncio.Task) -> None:
        """Once this FINAL's analysis is done, add its raw frame mean to the channel's statistics."""
        adapter = self.adapters[channel] if self.adapters is not None else None
        if adapter is None:
            return

        async def fold() -> None:
            await asyncio.wait([task])
            if task.cancelled() or task.exception() is not None:
                return  # a failed utterance adds nothing; the count in later finals says so
            out = task.result()
            if out.frame_mean is not None:
                adapter.observe(out.frame_mean)

        self._folded[channel] = asyncio.get_running_loop().create_task(fold())

    def _speculate(self, channel: int, ev: Candidate) -> None:
        if not self.backend.asr_idle():
            return
        task = self._analysis_task(channel, ev.audio, ev.start)
        self._spec[(channel, ev.utterance)] = _Spec(ev.start, ev.end, task)

    def _end_utterance(self, channel: int, ev: UtteranceEnd) -> None:
        self._open[channel] = None
        self._agreements.pop((channel, ev.utterance), None)
        self.counters.utterances += 1
        spec = self._spec.pop((channel, ev.utterance), None)
        if spec is not None and (spec.start, spec.end) == (ev.start, ev.end):
            task = spec.task  # same audio: the speculative analysis is this final's analysis
            self.counters.speculative_used += 1
        else:
            if spec is not None:
                spec.task.cancel()
                self.counters.speculative_wasted += 1
            task = self._analysis_task(channel, ev.audio, ev.start)
        self._fold_later(channel, task)
        job = _FinalJob(channel, ev.utterance, ev.start, ev.end, ev.speech_end, ev.reason, ev.audio, task)
        self._backlog_s += job.duration_s
        self.counters.max_backlog_s = max(self.counters.max_backlog_s, self._backlog_s)
        self._jobs.put_nowait(job)
        if not self._warned_behind and self._backlog_s > 0.5 * self.max_backlog_s:
            self._warned_behind = True
            self._outbox.append(
                WarningMessage(
                    code="falling_behind",
                    detail=f"{self._backlog_s:.1f} s of audio await analysis; finals are delayed",
                    backlog_s=round(self._backlog_s, 3),
                )
            )

    async def _send_outbox(self) -> None:
        while self._outbox:
            await self.emit(self._outbox.pop(0))

    # --- finals ------------------------------------------------------------------------------

    async def _emit_finals(self) -> None:
        while True:
            job = await self._jobs.get()
            if job is None:
                return
            try:
                await self._final(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one utterance stop the others
                log.exception("stream %s: final of utterance %d failed", self.session_id, job.utterance)
            finally:
                self._backlog_s = max(0.0, self._backlog_s - job.duration_s)
                if self._backlog_s <= 0.25 * self.max_backlog_s:
                    self._warned_behind = False
                self._capacity.set()

    async def _final(self, job: _FinalJob) -> None:
        try:
            out = await job.task
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = getattr(exc, "code", "analysis_failed")
            await self.emit(
                ErrorMessage(
                    error=str(code),
                    detail=f"channel {job.channel} utterance {job.utterance} "
                    f"({job.start / SAMPLE_RATE:.2f}-{job.end / SAMPLE_RATE:.2f} s) could not be analysed: {exc}",
                )
            )
            return
        if not await self._still_leased():
            # Another stream resumed this session (this one stalled past its lease): that stream
            # analyses this audio again from the resume point it read; storing here would add it twice.
            log.warning("stream %s: lease lost; utterance %d not stored", self.session_id, job.utterance)
            self._lease_lost()
            return
        start_s, end_s = self._t(job.start), self._t(job.end)
        # result shape v2: the start message's ``roles`` name the channels; the store keeps the
        # words always, the final carries them only when the start message asked (``words``)
        role = role_of(self.start_msg.roles, job.channel)
        result = {
            "channel": job.channel,
            "role": role,
            "utterance": job.utterance,
            "start": start_s,
            "end": end_s,
            "text": out.text,
            "words": [w.model_dump() for w in out.words],
            "emotion": out.emotion.model_dump() if out.emotion is not None else None,
            "text_sentiment": out.text_sentiment.model_dump() if out.text_sentiment is not None else None,
            "reason": job.reason,
            "source": "stream",
            **out.extra,
        }
        adaptation = Adaptation(utterances=out.adapted_after) if out.adapted_after is not None else None
        if adaptation is not None:
            result["adaptation"] = adaptation.model_dump()
        seq = None
        try:
            seq = await self.store.append_result(self.session_id, result)
            self.counters.stored += 1
        except Exception as exc:
            log.warning("stream %s: storing a result failed: %s", self.session_id, exc)
            if self._store_ok:
                self._store_ok = False
                await self.emit(
                    WarningMessage(code="store_failed", detail=f"results are not being stored: {exc}")
                )
        arrived = self.arrivals.arrival_of(job.speech_end)
        latency_ms = (self.clock() - arrived) * 1000.0 if arrived is not None else 0.0
        self.counters.finals += 1
        self.counters.latencies_ms.append(latency_ms)
        if arrived is not None:
            metrics.STREAM_FINAL_LATENCY.observe(latency_ms / 1000.0)
        await self.emit(
            FinalMessage(
                seq=seq,
                session_id=self.session_id,
                channel=job.channel,
                role=role,
                utterance=job.utterance,
                start=start_s,
                end=end_s,
                text=out.text,
                words=out.words if self.start_msg.words else None,
                emotion=out.emotion,
                text_sentiment=out.text_sentiment,
                reason=job.reason,
                latency_ms=round(latency_ms, 1),
                adaptation=adaptation,
            )
        )

    # --- partials and interims (low priority, may be skipped) --------------------------------

    def _low_priority(self, channel: int, ev, fn) -> None:
        """One partial/interim pass per channel at a time, at ``Priority.PARTIAL``; a pass the ASR
        lane refuses, sheds or drops late is a skip (partials thin out under load)."""
        is_partial = isinstance(ev, PartialDue)
        if channel in self._low_busy:
            if is_partial:
                self.counters.partials_skipped += 1
            return
        self._low_busy.add(channel)

        async def run() -> None:
            try:
                await fn(channel, ev)
            except Exception as exc:
                if is_partial and _skippable(exc):
                    self.counters.partials_skipped += 1
                elif not _skippable(exc):  # a lost partial is harmless; log it
                    log.info("stream %s: low-priority pass failed: %s", self.session_id, exc)

        def done(task: asyncio.Task) -> None:
            self._low_busy.discard(channel)
            if task.cancelled() and is_partial:
                self.counters.partials_skipped += 1

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(done)
        self._low_tasks.add(task)
        task.add_done_callback(self._low_tasks.discard)

    async def _partial(self, channel: int, ev: PartialDue) -> None:
        words = await self.backend.transcribe_words(ev.audio, self.key)
        agreement = self._agreements.get((channel, ev.utterance))
        if agreement is None or self._open.get(channel) != ev.utterance:
            self.counters.partials_skipped += 1  # the utterance ended meanwhile: its final says it all
            return
        agreement.update(words)
        self.counters.partials_sent += 1
        await self.emit(
            PartialMessage(
                session_id=self.session_id,
                channel=channel,
                utterance=ev.utterance,
                start=self._t(ev.start),
                end=self._t(ev.end),
                confirmed=agreement.confirmed_text,
                unconfirmed=agreement.unconfirmed_text,
            )
        )

    async def _interim(self, channel: int, ev: InterimDue) -> None:
        # adapting: the statistics as they are now (an estimate need not wait for earlier finals)
        shift = {} if self.adapters is None else {"encoder_shift": self.adapters[channel].next_shift().shift}
        out = await self.backend.analyze(
            ev.audio,
            self.models,
            channel,
            self.time_offset_s + ev.start / SAMPLE_RATE,
            self.key,
            count_audio=False,
            priority=Priority.PARTIAL,
            **shift,
        )
        if self._open.get(channel) != ev.utterance:
            return
        await self.emit(
            InterimMessage(
                session_id=self.session_id,
                channel=channel,
                utterance=ev.utterance,
                start=self._t(ev.start),
                end=self._t(ev.end),
                emotion=out.emotion,
            )
        )


# --- the real backend --------------------------------------------------------------------------


def _retrieve(task: asyncio.Task) -> None:
    """Retrieve a final analysis' exception so that an unused speculative failure is not logged."""
    if not task.cancelled():
        task.exception()


class ServiceBackend:
    """``StreamBackend`` over ``app.service.EmotionService``."""

    def __init__(self, service):
        self.service = service

    def resolve_models(self, models: Sequence[str] | None) -> list[str]:
        ids, _ = self.service.resolve_models(models)
        return ids  # the models in every ``per_model``; the ensemble is the top level (shape v2)

    def _low_timeout(self, priority: Priority) -> float | None:
        """Partial/interim results are stale after a few seconds: do not wait for them longer."""
        if priority != Priority.PARTIAL:
            return None
        return float(self.service.settings.asr_partial_timeout_s)

    async def analyze(
        self,
        audio16k,
        models,
        channel,
        offset_s,
        key,
        count_audio=True,
        priority=Priority.FINAL,
        encoder_shift=None,
    ) -> UtteranceOutput:
        kwargs = dict(
            channel=channel,
            offset_s=offset_s,
            key=key,
            count_audio=count_audio,
            priority=priority,
            timeout_s=self._low_timeout(priority),
        )
        mean = None
        if encoder_shift is None:
            r = await self.service.analyze_utterance(audio16k, models, **kwargs)
        else:
            adapted = await self.service.analyze_adapted(audio16k, models, encoder_shift, **kwargs)
            r, mean = adapted.result, adapted.frame_mean
        return UtteranceOutput(
            frame_mean=mean,
            text=r.text,
            words=list(r.words),
            emotion=r.emotion,
            extra={"language": r.language, "timing_ms": r.timing_ms.model_dump()},
            text_sentiment=r.text_sentiment,
        )

    async def transcribe_words(self, audio16k, key) -> list[str]:
        transcript = await self.service.transcribe(
            audio16k, key=key, priority=Priority.PARTIAL, timeout_s=self._low_timeout(Priority.PARTIAL)
        )
        return [w.word for w in transcript.words] if transcript.words else transcript.text.split()

    def asr_idle(self) -> bool:
        lane = getattr(self.service.engine, "asr_lane", None)
        return lane is None or lane.waiting(Priority.FINAL) == 0
