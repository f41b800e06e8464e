"""The one scheduler for blocking work: priority classes, per-client fairness, batching, bounded queues.

A ``Lane`` owns a fixed set of worker threads and one queue. Every job carries a ``Priority`` and a
client *key* (one per REST request or stream). A worker takes jobs in strict class order
(``FINAL`` before ``REST`` before ``PARTIAL``), round-robin across keys within a class and FIFO
within a key, and fills a batch of up to ``max_batch`` jobs of the highest class waiting (one class
per batch; partial batches at most ``max_batch // 4``: on CPU a batch costs the sum of its items,
so a final must not wait for partials batched beside it). It waits
for a full batch at most ``max_wait_s`` after the oldest queued job arrived, so batches grow with
load by themselves and a lone job is barely delayed.

Two lanes serve the engine (``app.inference.engine``):

* the **ASR lane** batches utterances across requests and streams: one ``transcribe_batch`` call
  for the whole batch, then ``finish_batch`` for the jobs that want a full analysis;
* the **CPU lane** (``max_batch`` 1) runs other blocking work (decoding, VAD of uploads) with the
  same queue, priority and fairness rules.

Admission (``LaneLimits``), so that finals are never refused for room that lower classes hold:

* ``FINAL`` jobs are admitted while fewer than ``max_queue`` FINAL + REST jobs wait;
* ``REST`` jobs only while fewer than ``max_queue - final_reserve`` do (the last ``final_reserve``
  slots are the finals' own);
* ``PARTIAL`` jobs (streaming partials and interims) are counted apart: admitted only while fewer
  than ``partial_low_water`` jobs of any class wait, and shed (failed with ``QueueFull``) as soon as
  FINAL/REST work alone fills the queue past that mark: a partial that would run late is useless.

A refused job raises ``QueueFull`` (the API answers 503 + Retry-After). A job still queued at its
deadline is dropped without running and fails with ``DeadlineExceededError``; a job whose caller
gave up (its future cancelled) leaves the queue at once. A batch that raises fails only its own
jobs' futures (a ``Failed`` item fails only that job); the worker keeps running.

Thread-safety: ``submit``, ``run``, ``waiting`` and ``shutdown`` may be called from any thread or
event loop; the queue is guarded by one re-entrant lock (future callbacks may re-enter it). The
batch function runs on the lane's worker threads, several at once when ``workers > 1``, so it must
be thread-safe. Metrics are prometheus objects (thread-safe).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from app import metrics
from app.errors import DeadlineExceededError, NotReadyError, QueueFull

log = logging.getLogger(__name__)

_anonymous = itertools.count()


PARTIAL_BATCH_DIVISOR = 4  # partial batches are at most max_batch // 4 (2 on CPU, 8 on CUDA)


class Priority(IntEnum):
    """Scheduling class; a lower value is served first (strictly)."""

    FINAL = 0  # a stream's utterance result (speculative ones included): real-time latency
    REST = 1  # a /v1/predict utterance or upload decoding/VAD: a client is waiting, but not live
    PARTIAL = 2  # streaming partial / interim passes: nice to have, shed first

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Failed:
    """A batch function's result for one item that failed: only that job's future gets ``error``."""

    error: BaseException


@dataclass(frozen=True)
class LaneLimits:
    """Queue bounds of one lane (see the module docstring for the admission rules)."""

    max_queue: int = 256
    final_reserve: int = 32
    partial_low_water: int = 4
    retry_after_s: float = 1.0
    default_timeout_s: float = 120.0

    @property
    def rest_limit(self) -> int:
        """FINAL + REST jobs waiting beyond which REST jobs are refused (at least 1)."""
        return max(1, self.max_queue - max(0, self.final_reserve))


@dataclass(eq=False)
class Job:
    payload: Any
    key: Hashable
    priority: Priority
    future: Future
    enqueued_at: float  # time.monotonic()
    deadline: float


@dataclass
class LaneStats:
    """Counters for tests and logs (the Prometheus metrics carry the same information)."""

    batches: int = 0
    items: int = 0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))
    rejected: int = 0
    shed: int = 0
    expired: int = 0


def new_key() -> str:
    """A key of its own: the job is scheduled like a separate client."""
    return f"anon-{next(_anonymous)}"


class FairQueue:
    """Per-class round-robin queues of ``Job``s. Not thread-safe: the owning ``Lane`` locks it."""

    def __init__(self) -> None:
        self._classes: dict[Priority, OrderedDict[Hashable, deque[Job]]] = {
            p: OrderedDict() for p in Priority
        }
        self._counts: dict[Priority, int] = dict.fromkeys(Priority, 0)

    def __len__(self) -> int:
        return sum(self._counts.values())

    def count(self, priority: Priority) -> int:
        return self._counts[priority]

    def push(self, job: Job) -> None:
        self._classes[job.priority].setdefault(job.key, deque()).append(job)
        self._counts[job.priority] += 1

    def pop(self, only: Priority | None = None) -> Job | None:
        """The next job (of class ``only``, if given): highest class first, round-robin across keys,
        FIFO within a key."""
        for priority in Priority:
            if only is not None and priority != only:
                continue
            queues = self._classes[priority]
            if not queues:
                continue
            key, jobs = next(iter(queues.items()))
            job = jobs.popleft()
            if jobs:
                queues.move_to_end(key)  # this client goes to the back of its class
            else:
                del queues[key]
            self._counts[priority] -= 1
            return job
        return None

    def remove(self, job: Job) -> bool:
        jobs = self._classes[job.priority].get(job.key)
        if not jobs or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._classes[job.priority][job.key]
        self._counts[job.priority] -= 1
        return True

    def jobs(self, priority: Priority | None = None) -> list[Job]:
        classes = Priority if priority is None else (priority,)
        return [j for p in classes for jobs in self._classes[p].values() for j in jobs]

    def oldest_enqueued(self) -> float | None:
        """Arrival time of the oldest waiting job (the head of each key's FIFO is its oldest)."""
        heads = [jobs[0].enqueued_at for q in self._classes.values() for jobs in q.values()]
        return min(heads) if heads else None

    def clear(self) -> list[Job]:
        out = self.jobs()
        for p in Priority:
            self._classes[p].clear()
            self._counts[p] = 0
        return out


BatchFn = Callable[[list[Any]], Sequence[Any]]


class Lane:
    """Worker threads serving one ``FairQueue`` in batches of ``run_batch(payloads) -> results``."""

    def __init__(
        self,
        name: str,
        run_batch: BatchFn,
        *,
        workers: int = 1,
        max_batch: int = 1,
        max_wait_s: float = 0.0,
        limits: LaneLimits | None = None,
        batch_size_metric=None,
    ):
        self.name = name
        self.run_batch = run_batch
        self.workers = max(1, workers)
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.limits = limits or LaneLimits()
        self.stats = LaneStats()
        self._batch_metric = batch_size_metric
        self._queue = FairQueue()
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._legacy_depth = metrics.QUEUE_DEPTH.labels(queue=name)
        self._legacy_wait = metrics.QUEUE_WAIT.labels(queue=name)
        self._depth = {p: metrics.LANE_QUEUE_DEPTH.labels(lane=name, priority=p.label) for p in Priority}
        self._wait = {p: metrics.LANE_QUEUE_WAIT.labels(lane=name, priority=p.label) for p in Priority}
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-lane-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    # --- submitting --------------------------------------------------------------------------

    def waiting(self, priority: Priority | None = None) -> int:
        """Jobs queued (not yet taken by a worker), of one class or of all."""
        with self._cond:
            return len(self._queue) if priority is None else self._queue.count(priority)

    def __len__(self) -> int:
        return self.waiting()

    def submit(
        self,
        key: Hashable | None,
        payload: Any,
        priority: Priority = Priority.REST,
        timeout_s: float | None = None,
    ) -> Future:
        """Queue one job; raises ``QueueFull`` (refused) or ``NotReadyError`` (shut down) at once."""
        timeout = self.limits.default_timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        future: Future = Future()
        job = Job(payload, new_key() if key is None else key, Priority(priority), future, now, now + timeout)
        with self._cond:
            if self._closed:
                raise NotReadyError("the server is shutting down")
            self._admit(job.priority)
            self._queue.push(job)
            if job.priority != Priority.PARTIAL:
                self._shed_partials()
            self._publish_depth()
            self._cond.notify()
        future.add_done_callback(lambda f: self._forget(job) if f.cancelled() else None)
        return future

    async def run(
        self,
        key: Hashable | None,
        payload: Any,
        priority: Priority = Priority.REST,
        timeout_s: float | None = None,
    ) -> Any:
        """``submit`` and await the result; at the deadline a job not yet started is withdrawn."""
        timeout = self.limits.default_timeout_s if timeout_s is None else timeout_s
        future = asyncio.wrap_future(self.submit(key, payload, priority, timeout))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"{self.name}: no result within {timeout:.3g} s") from None

    def _admit(self, priority: Priority) -> None:
        """Raise ``QueueFull`` when this class may not queue another job (lock held)."""
        lim, q = self.limits, self._queue
        major = q.count(Priority.FINAL) + q.count(Priority.REST)
        if priority == Priority.FINAL:
            full, limit = major >= lim.max_queue, lim.max_queue
        elif priority == Priority.REST:
            full, limit = major >= lim.rest_limit, lim.rest_limit
        else:
            full, limit = len(q) >= lim.partial_low_water, lim.partial_low_water
        if full:
            self.stats.rejected += 1
            metrics.LANE_REFUSED.labels(lane=self.name, priority=priority.label, reason="queue_full").inc()
            raise QueueFull(
                f"{self.name}: {len(q)} jobs queued ({priority.label} limit {limit}); retry later",
                retry_after=lim.retry_after_s,
            )

    def _shed_partials(self) -> None:
        """Fail queued partials, oldest first, while the queue is past the low-water mark (lock held)."""
        excess = len(self._queue) - self.limits.partial_low_water
        for job in self._queue.jobs(Priority.PARTIAL)[: max(0, excess)]:
            self._queue.remove(job)
            self.stats.shed += 1
            metrics.LANE_REFUSED.labels(lane=self.name, priority=job.priority.label, reason="shed").inc()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    QueueFull(
                        f"{self.name}: shed for higher-priority work", retry_after=self.limits.retry_after_s
                    )
                )

    def _forget(self, job: Job) -> None:
        """The caller cancelled: free the job's slot now rather than when a worker reaches it."""
        with self._cond:
            if self._queue.remove(job):
                self._publish_depth()

    def _publish_depth(self) -> None:
        for p in Priority:
            self._depth[p].set(self._queue.count(p))
        self._legacy_depth.set(len(self._queue))

    # --- working -----------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Drop queued jobs past their deadline without running them (lock held)."""
        for job in [j for j in self._queue.jobs() if now >= j.deadline]:
            self._queue.remove(job)
            self.stats.expired += 1
            metrics.LANE_REFUSED.labels(lane=self.name, priority=job.priority.label, reason="deadline").inc()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(DeadlineExceededError(f"{self.name}: deadline passed in queue"))

    def _wait_for_work(self) -> bool:
        """Block until a batch is due (full, or the oldest job waited ``max_wait_s``); False on shutdown."""
        while True:
            if self._closed:
                return False
            now = time.monotonic()
            self._expire(now)
            oldest = self._queue.oldest_enqueued()
            if oldest is None:
                self._cond.wait()
                continue
            remaining = oldest + self.max_wait_s - now
            if len(self._queue) >= self.max_batch or remaining <= 0:
                return True
            self._cond.wait(remaining)

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            batch: list[Job] = []
            while not batch:
                if not self._wait_for_work():
                    return None
                # One class per batch: a batch's cost grows with its size on CPU, so a final must
                # not wait for partials batched beside it; partial batches stay small so that a
                # final arriving meanwhile waits little.
                first = self._queue.pop()
                limit = self.max_batch
                while first is not None and not first.future.set_running_or_notify_cancel():
                    first = self._queue.pop()
                if first is not None:
                    batch.append(first)
                    if first.priority == Priority.PARTIAL:
                        limit = max(1, self.max_batch // PARTIAL_BATCH_DIVISOR)
                while batch and len(batch) < limit:
                    job = self._queue.pop(only=batch[0].priority)
                    if job is None:
                        break
                    if job.future.set_running_or_notify_cancel():
                        batch.append(job)
                self._publish_depth()
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        start = time.monotonic()
        for job in batch:
            self._wait[job.priority].observe(start - job.enqueued_at)
            self._legacy_wait.observe(start - job.enqueued_at)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.sizes.append(len(batch))
        if self._batch_metric is not None:
            self._batch_metric.observe(len(batch))
        try:
            results = list(self.run_batch([job.payload for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(batch)}")
        except BaseException as exc:  # delivered to this batch's callers; the worker goes on
            log.exception("%s: batch of %d failed", self.name, len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Failed):
                job.future.set_exception(result.error)
            else:
                job.future.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        """Fail queued jobs (``NotReadyError``) and stop the threads after their current batch."""
        with self._cond:
            self._closed = True
            for job in self._queue.clear():
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(NotReadyError("the server is shutting down"))
            self._publish_depth()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout=30)


# --- the CPU lane's batch function ------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A CPU-lane payload: ``fn(*args)``."""

    fn: Callable[..., Any]
    args: tuple = ()


def call_each(calls: list[Call]) -> list[Any]:
    """Run each call on its own; one raising fails only its own job."""
    out: list[Any] = []
    for call in calls:
        try:
            out.append(call.fn(*call.args))
        except Exception as exc:
            out.append(Failed(exc))
    return out


def cpu_lane(name: str = "cpu", *, workers: int = 1, limits: LaneLimits | None = None) -> Lane:
    """An unbatched fair lane for blocking calls (``lane.run(key, Call(fn, args), priority)``)."""
    return Lane(name, call_each, workers=workers, max_batch=1, max_wait_s=0.0, limits=limits)


def resolve_max_batch(configured: int, cuda: bool) -> int:
    """``asr_max_batch`` 0 = auto: 32 on CUDA (a GPU is idle below that), 8 on CPU (CTranslate2's
    gain flattens out there while the batch's latency keeps growing)."""
    if configured > 0:
        return configured
    return 32 if cuda else 8
