"""A fixed pool of worker threads for CPU-heavy blocking work (decode, VAD, ASR), fair across clients.

The ASR stage costs far more than everything else, and the machine has few cores. A fixed
number of threads (``workers``; each CTranslate2 call uses its own intra-op threads) bounds the
CPU it takes. Jobs carry a *key* (one per request or stream): workers take jobs round-robin
across keys and FIFO within a key, so a 10-minute upload split into 20 utterances does not make a
3-second request wait behind all of them. The queue is bounded (``QueueFull`` beyond
``max_queue`` waiting jobs), and a job still waiting at its deadline is dropped, not run.

Thread-safety: ``submit`` and ``run`` may be called from any thread / event loop; the internal
queue is guarded by one lock. Jobs run on the pool's threads, so they must be thread-safe with
respect to each other (the Analyzer, decoder and VAD are).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from app import metrics
from app.errors import DeadlineExceededError, NotReadyError, QueueFull

log = logging.getLogger(__name__)

_anonymous = itertools.count()


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple
    future: Future
    enqueued_at: float
    deadline: float


class FairWorkPool:
    def __init__(
        self,
        workers: int = 1,
        max_queue: int = 256,
        name: str = "asr",
        default_timeout_s: float = 120.0,
        retry_after_s: float = 1.0,
    ):
        self.name = name
        self.workers = max(1, workers)
        self.max_queue = max(1, max_queue)
        self.default_timeout_s = default_timeout_s
        self.retry_after_s = retry_after_s
        self._queues: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._pending = 0
        self._cond = threading.Condition()
        self._closed = False
        self._wait_hist = metrics.QUEUE_WAIT.labels(queue=name)
        self._depth = metrics.QUEUE_DEPTH.labels(queue=name)
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def new_key() -> str:
        """A key of its own: the job is scheduled like a separate client."""
        return f"anon-{next(_anonymous)}"

    def __len__(self) -> int:
        with self._cond:
            return self._pending

    def submit(
        self, key: Hashable | None, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None
    ) -> Future:
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise NotReadyError("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(
                    f"{self.name}: {self._pending} jobs queued (limit {self.max_queue}); retry later",
                    retry_after=self.retry_after_s,
                )
            key = self.new_key() if key is None else key
            self._queues.setdefault(key, deque()).append(_Job(fn, args, future, now, now + timeout))
            self._pending += 1
            self._depth.set(self._pending)
            self._cond.notify()
        return future

    async def run(
        self, key: Hashable | None, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None
    ) -> Any:
        """``submit`` and await the result from asyncio; on timeout the job is cancelled if not started."""
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        future = asyncio.wrap_future(self.submit(key, fn, *args, timeout_s=timeout))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"{self.name}: no result within {timeout:.3g} s") from None

    def _take(self) -> _Job | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed and not self._pending:
                return None
            key, jobs = next(iter(self._queues.items()))
            job = jobs.popleft()
            if jobs:
                self._queues.move_to_end(key)  # round-robin: this client goes to the back
            else:
                del self._queues[key]
            self._pending -= 1
            self._depth.set(self._pending)
            return job

    def _work(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up while the job was queued
            started = time.monotonic()
            self._wait_hist.observe(started - job.enqueued_at)
            if started >= job.deadline:
                job.future.set_exception(DeadlineExceededError(f"{self.name}: deadline passed in queue"))
                continue
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # delivered to the caller, never kills the worker
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        """Fail queued jobs and stop the threads after their current job."""
        with self._cond:
            self._closed = True
            for jobs in self._queues.values():
                for job in jobs:
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(NotReadyError("the server is shutting down"))
            self._queues.clear()
            self._pending = 0
            self._depth.set(0)
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout=30)
