"""Dynamic batching of concurrent requests for one model.

A ``DynamicBatcher`` queues requests and runs them in batches: a batch starts as soon as it holds
``max_batch_size`` requests, or when the oldest queued request has waited ``max_wait_s`` (the wait
is counted from the first queued request, so a steady trickle cannot postpone a batch forever).
While one batch runs, new requests queue up and form the next batch, so batches grow with load
by themselves. The queue is bounded: a request that finds it full fails at once with ``QueueFull``
(the API answers 503 + Retry-After). Every request has a deadline; one still queued at its
deadline is dropped without being run and its caller gets ``DeadlineExceededError``.

Thread-safety: a batcher belongs to the asyncio event loop that ``start``s it; ``submit`` must be
awaited from that loop (it is not thread-safe). The batch function runs in ``executor`` (one
batch at a time per batcher), so it must be safe to call from a worker thread; it is never called
concurrently by the same batcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app import metrics
from app.errors import DeadlineExceededError, NotReadyError, QueueFull

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["BatchStats", "DynamicBatcher", "QueueFull", "DeadlineExceededError"]


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued_at: float  # time.monotonic()
    deadline: float


@dataclass
class BatchStats:
    """Counters for tests and logs (the Prometheus metrics carry the same information)."""

    batches: int = 0
    items: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes
    expired: int = 0
    rejected: int = 0


class DynamicBatcher(Generic[T, R]):
    """Batches ``submit``ted items for ``run_batch(items) -> results`` (same length and order)."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        default_timeout_s: float = 120.0,
        executor: Executor | None = None,
        retry_after_s: float = 1.0,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.default_timeout_s = default_timeout_s
        self.executor = executor
        self.retry_after_s = retry_after_s
        self.stats = BatchStats()
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._depth = metrics.QUEUE_DEPTH.labels(queue=name)

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the task; queued requests fail with ``NotReadyError`` (the server is going away)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(NotReadyError("the server is shutting down"))
        self._depth.set(0)

    def __len__(self) -> int:
        return len(self._queue)

    # --- requests ----------------------------------------------------------------------------

    async def submit(self, item: T, timeout_s: float | None = None) -> R:
        """Queue ``item`` and wait for its result, at most ``timeout_s`` (default: the batcher's)."""
        if not self.running:
            raise NotReadyError(f"model {self.name} is not running", retry_after=self.retry_after_s)
        self._prune()
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"model {self.name}: {len(self._queue)} requests queued (limit {self.max_queue}); retry later",
                retry_after=self.retry_after_s,
            )
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, now, now + timeout))
        self._depth.set(len(self._queue))
        assert self._wakeup is not None  # made by start(), and self.running was checked above
        self._wakeup.set()
        try:
            # wait_for cancels the future on timeout: the batching loop then skips the item.
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"model {self.name}: no result within {timeout:.3g} s") from None

    # --- batching loop -----------------------------------------------------------------------

    def _prune(self) -> None:
        """Drop requests whose caller has gone (timed out or cancelled)."""
        if any(p.future.done() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.future.done())
            self._depth.set(len(self._queue))

    async def _next_batch(self) -> list[_Pending[T]]:
        wakeup = self._wakeup
        assert wakeup is not None  # start() makes it before it starts the loop that calls this
        while True:
            self._prune()
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            # Wait for a full batch, but never beyond max_wait after the oldest request arrived.
            while len(self._queue) < self.max_batch_size:
                remaining = self._queue[0].enqueued_at + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                self._prune()
                if not self._queue:
                    break
            batch: list[_Pending[T]] = []
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch_size:
                p = self._queue.popleft()
                if p.future.done():
                    continue
                if now >= p.deadline:  # normally caught by wait_for already; kept for clock edges
                    self.stats.expired += 1
                    p.future.set_exception(
                        DeadlineExceededError(f"model {self.name}: deadline passed in queue")
                    )
                    continue
                batch.append(p)
            self._depth.set(len(self._queue))
            if batch:
                return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait_hist = metrics.QUEUE_WAIT.labels(queue=self.name)
        size_hist = metrics.BATCH_SIZE.labels(model=self.name)
        time_hist = metrics.INFERENCE_SECONDS.labels(model=self.name)
        while True:
            batch = await self._next_batch()
            start = time.monotonic()
            for p in batch:
                wait_hist.observe(start - p.enqueued_at)
            size_hist.observe(len(batch))
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes = (self.stats.sizes + [len(batch)])[-1000:]
            try:
                results: Any = await loop.run_in_executor(
                    self.executor, self.run_batch, [p.item for p in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"model {self.name}: {len(results)} results for a batch of {len(batch)}"
                    )
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(NotReadyError("the server is shutting down"))
                raise
            except Exception as exc:  # the batch fails, the batcher goes on
                log.exception("model %s: batch of %d failed", self.name, len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                time_hist.observe(time.monotonic() - start)
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
