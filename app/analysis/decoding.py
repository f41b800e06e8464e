"""Isolated decoding of untrusted audio: a small pool of decoder processes.

FFmpeg (PyAV) and libsndfile are C libraries; a crafted file can make them crash (SIGSEGV), loop or
allocate without bound. ``DecodePool.decode`` runs ``audio.decode_local`` in a worker process so
that none of this can take the server down:

* **one job per worker at a time**: the pool is ``workers`` slots, each a ``ProcessPoolExecutor``
  with a single worker process (``forkserver`` start method where available, else ``spawn``; the
  server has threads, so no ``fork``). A caller holds a slot for its whole call, so a worker that
  dies only ever fails the call that killed it; its executor (``BrokenProcessPool``) is discarded
  and a fresh one is started lazily by the next caller of that slot.
* **memory**: each worker sets ``RLIMIT_AS`` to ``memory_mb`` before it imports the decoders; an
  allocation beyond it fails (``MemoryError`` -> ``DecodeMemoryError``, 413) or kills the worker.
* **time**: each job arms ``alarm(timeout_s)`` in the worker (default action: terminate, which
  also stops C code that never returns to Python); the caller waits ``timeout_s`` plus a grace
  period and then kills the worker itself.
* **typed errors**: a worker that dies -> ``DecoderCrashedError`` (422 ``undecodable_audio``); past
  the time limit -> ``DecodeTimeoutError`` (422 ``decode_timeout``); no free slot within
  ``timeout_s`` -> ``DecoderBusyError`` (503 + Retry-After); workers that cannot even start ->
  ``DecoderUnavailableError`` (503). Every new worker answers a ping before it gets a job, so a
  death during a job is the job's doing, not a broken installation.
* **bounded output**: the worker resamples to 16 kHz (so at most ``max_seconds`` x 16000 x
  ``max_channels`` float32 come back, pickled), and the caller checks shape, dtype, channel count,
  duration and finiteness again before building the ``Audio``.

Workers are recycled after ``RECYCLE_AFTER`` jobs and after a ``MemoryError``. The pool is created
lazily (``default_pool``, ``configure``, ``pool_for(settings)``) and shut down at interpreter exit
or by ``shutdown()``.

This module imports only the standard library at import time: a new worker unpickles its
initializer from here, and sets its limits before numpy, PyAV and libsndfile are loaded.

Thread-safety: ``DecodePool`` is safe to share between threads (a queue of slots; each slot is used
by one thread at a time). The module-level default pool is guarded by a lock.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.analysis.audio import Audio, AudioLimits, ChannelMode

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 3072  # 600 s of 192-kHz stereo is 0.9 GB as float32; decoding briefly holds ~2x
DEFAULT_TIMEOUT_S = 60.0
MIN_MEMORY_MB = 512  # the interpreter, numpy, PyAV and libsndfile take ~250 MB of address space
RECYCLE_AFTER = 256  # jobs per worker process, against heap fragmentation
START_TIMEOUT_S = 60.0  # a new worker must answer its ping within this
_GRACE_S = 5.0  # the caller's wait beyond timeout_s before it kills the worker itself
_SAMPLE_RATE = 16000  # audio.SAMPLE_RATE (not imported here: see the module docstring)


# --- the worker side (runs in the decoder processes) ------------------------------------------


def _init_worker(memory_mb: int) -> None:
    """Limits first, then the heavy imports (which happen when the first job is unpickled)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; it shuts the pool down
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # one decode per process: no BLAS thread pools to reserve
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _ping() -> int:
    import av  # noqa: F401  (load every decoder now, not during the first job)
    import soundfile  # noqa: F401
    import soxr  # noqa: F401

    import app.analysis.audio  # noqa: F401

    return os.getpid()


def _decode_job(raw: bytes, channels: ChannelMode, limits: AudioLimits):
    """The default job: ``audio.decode_local``, returned as (samples, source_rate, source_channels)."""
    from app.analysis import audio

    out = audio.decode_local(raw, channels, limits)
    return out.samples, int(out.source_rate), int(out.source_channels)


def _guarded(job, raw: bytes, channels: ChannelMode, limits: AudioLimits, timeout_s: float):
    """Run ``job`` under the time limit, mapping whatever it raises to an ``AudioError``."""
    import signal

    from app.analysis import audio

    signal.alarm(max(1, math.ceil(timeout_s)))  # SIGALRM's default action ends the process
    try:
        return job(raw, channels, limits)
    except audio.AudioError:
        raise
    except MemoryError:
        raise audio.DecodeMemoryError("decoding this file needs more memory than a decoder may use") from None
    except Exception as exc:  # anything else the decoders throw is about this input
        raise audio.CorruptAudioError(
            f"the audio decoder failed on this file ({type(exc).__name__})"
        ) from None
    finally:
        signal.alarm(0)


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class _Slot:
    """One worker process (lazily started), used by one caller at a time."""

    __slots__ = ("executor", "jobs")

    def __init__(self) -> None:
        self.executor: ProcessPoolExecutor | None = None
        self.jobs = 0


class DecodePool:
    """``workers`` isolated decoder processes with a memory limit and a per-job timeout."""

    # what a worker runs, under its time limit: (raw, channels, limits) -> (samples, source_rate,
    # source_channels); a module-level function (pickled by name). Tests substitute one that crashes.
    job = staticmethod(_decode_job)

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_method: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        if memory_mb and memory_mb < MIN_MEMORY_MB:
            raise ValueError(f"decode workers need at least {MIN_MEMORY_MB} MB (0 = no limit)")
        if timeout_s <= 0:
            raise ValueError("the decode timeout must be positive")
        self.workers = int(workers)
        self.memory_mb = int(memory_mb)
        self.timeout_s = float(timeout_s)
        self._ctx = multiprocessing.get_context(start_method or _default_start_method())
        self._free: queue.LifoQueue[_Slot] = queue.LifoQueue()  # LIFO: a warm worker first
        for _ in range(self.workers):
            self._free.put(_Slot())
        self._closed = False
        self._stats_lock = threading.Lock()
        self.stats = {"jobs": 0, "crashes": 0, "timeouts": 0, "memory": 0, "started": 0}

    @property
    def config(self) -> tuple[int, int, float]:
        return self.workers, self.memory_mb, self.timeout_s

    # --- public ------------------------------------------------------------------------------

    def decode(
        self,
        source: bytes | bytearray | memoryview | str | os.PathLike,
        channels: ChannelMode = "mix",
        limits: AudioLimits | None = None,
    ) -> Audio:
        """``audio.decode`` in a worker process; same result, same errors, plus the pool's own."""
        from app.analysis import audio

        limits = limits if limits is not None else audio.AudioLimits()
        if self._closed:  # replaced by ``configure``: hand over to the current pool
            return default_pool().decode(source, channels, limits)
        raw = audio.load_bytes(source)
        slot = self._acquire()
        try:
            samples, rate, n_channels = self._run(slot, raw, channels, limits)
        finally:
            self._release(slot)
        return _checked(samples, rate, n_channels, channels, limits)

    def close(self) -> None:
        """Stop the idle workers now and the busy ones when their job ends. Idempotent."""
        self._closed = True
        while True:
            try:
                slot = self._free.get_nowait()
            except queue.Empty:
                return
            self._discard(slot, kill=False)

    # --- slots -------------------------------------------------------------------------------

    def _acquire(self) -> _Slot:
        try:
            return self._free.get(timeout=self.timeout_s)
        except queue.Empty:
            from app.errors import DecoderBusyError

            raise DecoderBusyError(
                f"all {self.workers} audio decoders stayed busy for {self.timeout_s:.0f} s; retry later"
            ) from None

    def _release(self, slot: _Slot) -> None:
        if self._closed:
            self._discard(slot, kill=False)
        else:
            self._free.put(slot)

    def _executor(self, slot: _Slot) -> ProcessPoolExecutor:
        if slot.executor is not None:
            return slot.executor
        executor = ProcessPoolExecutor(
            max_workers=1, mp_context=self._ctx, initializer=_init_worker, initargs=(self.memory_mb,)
        )
        try:
            executor.submit(_ping).result(timeout=START_TIMEOUT_S)
        except Exception as exc:
            _kill(executor)
            log.error("an audio decoder process failed to start: %r", exc)
            from app.errors import DecoderUnavailableError

            raise DecoderUnavailableError("the audio decoder processes cannot start") from exc
        self._count("started")
        slot.executor, slot.jobs = executor, 0
        return executor

    def _discard(self, slot: _Slot, kill: bool) -> None:
        executor, slot.executor, slot.jobs = slot.executor, None, 0
        if executor is None:
            return
        if kill:
            _kill(executor)
        else:
            executor.shutdown(wait=False, cancel_futures=True)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # --- one job -----------------------------------------------------------------------------

    def _run(self, slot: _Slot, raw: bytes, channels: ChannelMode, limits: AudioLimits):
        from app.analysis import audio

        try:
            future = self._executor(slot).submit(_guarded, self.job, raw, channels, limits, self.timeout_s)
        except (BrokenProcessPool, RuntimeError):  # the idle worker died (killed from outside)
            self._discard(slot, kill=True)
            future = self._executor(slot).submit(_guarded, self.job, raw, channels, limits, self.timeout_s)
        self._count("jobs")
        t0 = time.monotonic()
        try:
            result = future.result(timeout=self.timeout_s + _GRACE_S)
        except FutureTimeoutError:
            self._discard(slot, kill=True)
            self._count("timeouts")
            raise audio.DecodeTimeoutError(self._timeout_message()) from None
        except BrokenProcessPool:
            elapsed = time.monotonic() - t0
            self._discard(slot, kill=True)
            if elapsed >= self.timeout_s:  # the worker's own alarm fired
                self._count("timeouts")
                raise audio.DecodeTimeoutError(self._timeout_message()) from None
            self._count("crashes")
            log.warning("an audio decoder process died on a %d-byte input; replaced", len(raw))
            raise audio.DecoderCrashedError(
                "the audio decoder crashed on this file: it is malformed or deliberately crafted"
            ) from None
        except (audio.DecodeMemoryError, MemoryError):
            self._discard(slot, kill=False)  # a fresh worker: its heap may be fragmented now
            self._count("memory")
            raise audio.DecodeMemoryError(self._memory_message()) from None
        slot.jobs += 1
        if slot.jobs >= RECYCLE_AFTER:
            self._discard(slot, kill=False)
        return result

    def _timeout_message(self) -> str:
        return f"decoding this file took longer than {self.timeout_s:.0f} s; it is malformed or too complex"

    def _memory_message(self) -> str:
        return f"decoding this file needs more than the {self.memory_mb} MB a decoder may use"


def _kill(executor: ProcessPoolExecutor) -> None:
    """Stop an executor whose worker may hang or be dead: kill its process, then shut it down."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        try:
            process.kill()
        except Exception:  # already gone
            pass
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            process.join(timeout=2.0)
        except Exception:
            pass


def _checked(samples, rate, n_channels, channels: ChannelMode, limits: AudioLimits) -> Audio:
    """Re-validate what a worker sent back before anyone uses it (bounded, finite float32)."""
    import numpy as np

    from app.analysis import audio

    ok = (
        isinstance(samples, np.ndarray)
        and samples.dtype == np.float32
        and samples.ndim == 2
        and isinstance(n_channels, int)
        and 1 <= n_channels <= limits.max_channels
        and samples.shape[0] == (1 if channels == "mix" else n_channels)
        and 0 < samples.shape[1] <= math.ceil(limits.max_seconds * _SAMPLE_RATE) + _SAMPLE_RATE // 100
        and isinstance(rate, int)
        and limits.min_sample_rate <= rate <= limits.max_sample_rate
    )
    if not ok or not np.isfinite(samples).all():
        raise audio.CorruptAudioError("the audio decoder returned inconsistent samples")
    return audio.Audio(samples=np.ascontiguousarray(samples), source_rate=rate, source_channels=n_channels)


# --- the shared pool --------------------------------------------------------------------------

_default: DecodePool | None = None
_default_lock = threading.Lock()


def configure(
    workers: int | None = None, memory_mb: int | None = None, timeout_s: float | None = None
) -> DecodePool:
    """The shared pool with this configuration (``None`` = default); replaces it when it differs."""
    global _default
    config = (
        DEFAULT_WORKERS if workers is None else int(workers),
        DEFAULT_MEMORY_MB if memory_mb is None else int(memory_mb),
        DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s),
    )
    with _default_lock:
        if _default is not None and _default.config == config:
            return _default
        old, _default = _default, DecodePool(*config)
        pool = _default
    if old is not None:
        old.close()
    return pool


def default_pool() -> DecodePool:
    """The shared pool, created (not started: workers start on first use) with defaults if needed."""
    with _default_lock:
        pool = _default
    return pool if pool is not None else configure()


def pool_for(settings) -> DecodePool:
    """The shared pool configured from ``Settings`` (``decode_workers``, ``decode_memory_mb``)."""
    return configure(
        workers=getattr(settings, "decode_workers", None),
        memory_mb=getattr(settings, "decode_memory_mb", None),
    )


def shutdown() -> None:
    """Stop the shared pool's workers (a later call starts a new pool). Registered at exit."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


atexit.register(shutdown)
