"""Admission control: refuse work early (503 + Retry-After, or 1013 for streams) rather than queue it
past its deadline or run out of memory.

Three mechanisms, all cheap and taken *before* the expensive step they protect:

* ``Slots``: a counter of concurrent WebSocket streams. ``try_acquire`` checks and counts in one
  step (no ``await`` in between), so a burst of connections cannot overshoot the limit; the
  endpoint releases its slot in ``finally``.
* ``ByteBudget``: a process-wide budget of bytes in flight, used twice: upload bytes being read
  (``upload_budget_mb``: reserved from ``Content-Length`` before a byte is read, else counted as the
  chunks arrive) and decoded samples (``decoded_budget_mb``: reserved from the frames x channels x 4
  bytes a WAV/FLAC header declares before decoding, then resized to the decoded array's actual
  size). A reservation larger than the whole budget is granted only when the budget is otherwise
  empty (it runs alone), so any input within the audio limits can be served by an idle server.
* ``WorkEstimator``: the REST work admitted and not yet finished, in seconds of input audio, and an
  EWMA of the measured cost (wall seconds of server work per audio second, measured as busy time
  between request completions divided by the completed audio, so it reflects the real throughput:
  batching, parallel workers and the streams' higher-priority finals included). The estimated wait
  of a new request is ``pending audio s x cost``; beyond ``max_wait_s`` it is shed. A request
  reserves an *estimate* of its audio (the running mean) at admission, replaced by the declared
  duration (header) or the decoded one, so a burst is counted as it arrives. The first request on
  an idle server (nothing pending) is always admitted.

Stream finals are never shed here: only ``/v1/predict`` asks the estimator, and the scheduler
keeps serving FINAL before REST (``app.inference.scheduler``).

Thread-safety: every class guards its state with its own ``threading.Lock``; all methods may be
called from any thread or event loop (the API calls them from the event loop). Nothing blocks:
refusal is immediate. ``Reservation`` and ``Ticket`` objects are owned by one request; their
``release``/``done`` are idempotent.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app import metrics
from app.errors import MemoryBudgetError, OverloadedError

MB = 1024 * 1024


# --- stream slots -------------------------------------------------------------------------------


class Slots:
    """At most ``limit`` holders at once; ``try_acquire`` is atomic (check and count together)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def try_acquire(self) -> bool:
        with self._lock:
            if self._held >= self.limit:
                return False
            self._held += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._held = max(0, self._held - 1)


# --- byte budgets -------------------------------------------------------------------------------


class ByteBudget:
    """``capacity`` bytes shared by concurrent reservations; refusal is immediate (never waits)."""

    def __init__(self, name: str, capacity: int, retry_after_s: float = 1.0) -> None:
        self.name = name
        self.capacity = max(0, int(capacity))
        self.retry_after_s = retry_after_s
        self._used = 0
        self._lock = threading.Lock()
        self._gauge = metrics.BUDGET_BYTES_IN_USE.labels(budget=name)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _fits(self, n: int) -> bool:  # lock held
        return self._used + n <= self.capacity or self._used == 0  # oversize: alone

    def try_take(self, n: int) -> bool:
        """Take ``n`` more bytes if they fit (always when the budget is disabled)."""
        n = max(0, int(n))
        if not self.enabled or n == 0:
            return True
        with self._lock:
            if not self._fits(n):
                return False
            self._used += n
            self._gauge.set(self._used)
            return True

    def give(self, n: int) -> None:
        n = max(0, int(n))
        if not self.enabled or n == 0:
            return
        with self._lock:
            self._used = max(0, self._used - n)
            self._gauge.set(self._used)

    def reserve(self, n: int = 0) -> Reservation:
        """A reservation of ``n`` bytes; raises ``MemoryBudgetError`` when they do not fit."""
        res = Reservation(self)
        res.resize(n)
        return res

    def refusal(self, n: int) -> MemoryBudgetError:
        metrics.ADMISSION_SHED.labels(reason=f"{self.name}_budget").inc()
        whole = (
            " (more than the whole budget: it is served only when nothing else is)"
            if n > self.capacity
            else ""
        )
        return MemoryBudgetError(
            f"{self.name} budget: {n / MB:.1f} MB needed, {max(0, self.capacity - self.used) / MB:.1f} MB of "
            f"{self.capacity / MB:.0f} MB free{whole}; retry later",
            retry_after=self.retry_after_s,
        )


class Reservation:
    """Bytes one request holds in a ``ByteBudget``; ``resize`` grows (or refuses) and shrinks."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.size = 0
        self._released = False

    def resize(self, n: int) -> None:
        """Hold exactly ``n`` bytes; raises ``MemoryBudgetError`` (holding what it held) if growth does not fit."""
        n = max(0, int(n))
        if self._released:
            raise RuntimeError("resize of a released reservation")
        if n > self.size:
            if not self.budget.try_take(n - self.size):
                raise self.budget.refusal(n)
        else:
            self.budget.give(self.size - n)
        self.size = n

    def grow(self, n: int) -> None:
        self.resize(self.size + n)

    def release(self) -> None:
        if not self._released:
            self.budget.give(self.size)
            self.size, self._released = 0, True


# --- queued-work estimator -----------------------------------------------------------------------


class WorkEstimator:
    """Admitted REST work (audio seconds) and the measured cost per audio second (EWMA)."""

    def __init__(
        self,
        max_wait_s: float,
        initial_cost: float = 0.25,
        initial_audio_s: float = 5.0,
        alpha: float = 0.2,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_wait_s = float(max_wait_s)  # <= 0: never shed
        self.cost = float(initial_cost)  # seconds of work per audio second
        self.mean_audio_s = float(initial_audio_s)  # what a request is assumed to carry before it is known
        self.alpha = float(alpha)
        self.retry_after_s = float(retry_after_s)
        self.clock = clock
        self.shed = 0
        self._pending_s = 0.0  # audio seconds of admitted, unfinished requests
        self._active = 0  # requests doing work (decoding or analysing)
        self._busy_s = 0.0  # busy wall time since the last sample
        self._mark = clock()
        self._lock = threading.Lock()

    # lock held
    def _tick(self) -> None:
        now = self.clock()
        if self._active > 0:
            self._busy_s += now - self._mark
        self._mark = now

    @property
    def pending_s(self) -> float:
        with self._lock:
            return self._pending_s

    def estimated_wait_s(self) -> float:
        """Seconds a request admitted now would wait for the work ahead of it."""
        with self._lock:
            return self._pending_s * self.cost

    def admit(self) -> Ticket:
        """A ticket for one request, or ``OverloadedError`` (503) when the estimated wait is too long."""
        with self._lock:
            wait = self._pending_s * self.cost
            metrics.ADMISSION_ESTIMATED_WAIT.set(wait)
            if self.max_wait_s > 0 and self._pending_s > 0 and wait > self.max_wait_s:
                self.shed += 1
                metrics.ADMISSION_SHED.labels(reason="estimated_wait").inc()
                retry = min(60.0, max(self.retry_after_s, wait - self.max_wait_s))
                raise OverloadedError(
                    f"the server is overloaded: about {wait:.0f} s of queued work (limit {self.max_wait_s:.0f} s); "
                    "retry later",
                    retry_after=retry,
                )
            ticket = Ticket(self, self.mean_audio_s)
            self._pending_s += ticket.audio_s
            return ticket

    def _update(self, ticket: Ticket, audio_s: float) -> None:
        with self._lock:
            self._pending_s = max(0.0, self._pending_s - ticket.audio_s + audio_s)
            ticket.audio_s = audio_s

    def _start(self, ticket: Ticket) -> None:
        with self._lock:
            self._tick()
            self._active += 1
            ticket.active = True

    def _done(self, ticket: Ticket, completed: bool) -> None:
        with self._lock:
            self._tick()
            self._pending_s = max(0.0, self._pending_s - ticket.audio_s)
            if ticket.active:
                self._active -= 1
            if completed and ticket.known and ticket.audio_s > 0:
                sample = min(100.0, max(1e-4, self._busy_s / ticket.audio_s))
                self.cost += self.alpha * (sample - self.cost)
                self.mean_audio_s += self.alpha * (ticket.audio_s - self.mean_audio_s)
                self._busy_s = 0.0
            if self._active == 0 and self._pending_s < 1e-9:
                self._pending_s = 0.0


class Ticket:
    """One admitted request's share of the pending work; ``done`` (idempotent) removes it."""

    def __init__(self, estimator: WorkEstimator, audio_s: float) -> None:
        self.estimator = estimator
        self.audio_s = audio_s
        self.known = False
        self.active = False
        self._done = False

    def set_audio(self, audio_s: float, decoded: bool = True) -> None:
        """The request's audio duration: declared by its header, or ``decoded`` (then its work ran
        and ``done`` takes a cost sample)."""
        if not self._done:
            self.estimator._update(self, max(0.0, float(audio_s)))
            self.known = self.known or decoded

    def start(self) -> None:
        """Work on this request begins (its busy time now counts towards the cost measurement)."""
        if not self._done and not self.active:
            self.estimator._start(self)

    def done(self, completed: bool = True) -> None:
        """Finished; a cost sample when ``completed`` and the decoded duration is known."""
        if not self._done:
            self._done = True
            self.estimator._done(self, completed)


# --- header sniffing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """What an audio header declares: frames, channels, sample rate (all > 0)."""

    frames: int
    channels: int
    sample_rate: int

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the float32 samples a decoder materialises at the source rate."""
        return self.frames * self.channels * 4

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def _wav(data: bytes, total: int) -> Declared | None:
    # RIFF/WAVE (or RF64: its ds64 chunk carries the 64-bit sizes)
    if len(data) < 12 or data[8:12] != b"WAVE" or data[:4] not in (b"RIFF", b"RF64"):
        return None
    pos, channels, rate, block, ds64_data = 12, 0, 0, 0, None
    for _ in range(64):  # a bounded number of chunks
        if pos + 8 > len(data):
            return None
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"ds64" and body + 16 <= len(data):
            ds64_data = struct.unpack_from("<Q", data, body + 8)[0]
        elif cid == b"fmt " and body + 16 <= len(data):
            _fmt, channels, rate, _bps, block = struct.unpack_from("<HHIIH", data, body)
        elif cid == b"data":
            if size == 0xFFFFFFFF:  # RF64's placeholder, or a streamed WAV of unknown length
                if ds64_data is None:
                    return None
                size = ds64_data
            if channels <= 0 or rate <= 0 or block <= 0:
                return None
            frames = min(size, total - body) // block  # PCM: no more frames than the bytes hold
            return Declared(frames, channels, rate) if frames > 0 else None
        pos = body + size + (size & 1)
    return None


def _flac(data: bytes) -> Declared | None:
    # "fLaC", then the STREAMINFO metadata block: rate (20 bits), channels-1 (3), bps-1 (5), total samples (36)
    if len(data) < 4 + 4 + 18 or data[:4] != b"fLaC" or (data[4] & 0x7F) != 0:
        return None
    info = data[8 : 8 + 18]
    bits = int.from_bytes(info[10:18], "big")
    rate = bits >> 44
    channels = ((bits >> 41) & 0x7) + 1
    frames = bits & ((1 << 36) - 1)
    if rate <= 0 or frames <= 0:  # frames 0 = unknown
        return None
    return Declared(frames, channels, rate)


def sniff(data: bytes | bytearray | memoryview) -> Declared | None:
    """What a WAV or FLAC header declares, or None (other formats, or a header that does not say).

    Pure Python on the first bytes, bounded work: safe in the server process (the decoding itself
    runs isolated). The declaration is only used to refuse early; the decoder enforces the limits.
    """
    head = bytes(data[: 64 * 1024])
    try:
        return _wav(head, len(data)) or _flac(head)
    except struct.error:
        return None


# --- the bundle an app holds ------------------------------------------------------------------


class Admission:
    """The admission state of one app (one per process in production): stream slots, budgets, work."""

    def __init__(
        self,
        max_streams: int,
        upload_budget_bytes: int,
        decoded_budget_bytes: int,
        max_wait_s: float,
        retry_after_s: float = 1.0,
        initial_cost: float = 0.25,
    ) -> None:
        self.streams = Slots(max_streams)
        self.upload = ByteBudget("upload", upload_budget_bytes, retry_after_s)
        self.decoded = ByteBudget("decoded", decoded_budget_bytes, retry_after_s)
        self.work = WorkEstimator(max_wait_s, initial_cost=initial_cost, retry_after_s=retry_after_s)

    @classmethod
    def from_settings(cls, settings) -> Admission:
        wait = float(settings.admission_max_wait_s)
        if wait > 0:
            wait = min(wait, float(settings.request_timeout_s))
        return cls(
            max_streams=settings.stream_max_streams,
            upload_budget_bytes=int(settings.upload_budget_mb * MB),
            decoded_budget_bytes=int(settings.decoded_budget_mb * MB),
            max_wait_s=wait,
            retry_after_s=float(settings.retry_after_s),
            initial_cost=float(settings.admission_initial_cost),
        )


def of_app(app) -> Admission:
    """``app.state.admission`` (created from ``app.state.settings`` if the app was built without it)."""
    admission = getattr(app.state, "admission", None)
    if admission is None:
        admission = app.state.admission = Admission.from_settings(app.state.settings)
    return admission
