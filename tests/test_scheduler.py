"""The scheduler lanes (``app.inference.scheduler``) and the engine's ASR lane, with fake work.

No ASR and no models: a ``Recorder`` batch function logs each batch and can be held, so the tests
decide what is queued while a worker is busy. Ordering assertions use events, not sleeps; timing
bounds are wide (a loaded 2-core machine can stall for hundreds of ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from app.errors import DeadlineExceededError, NotReadyError, QueueFull
from app.inference.scheduler import Call, Failed, Lane, LaneLimits, Priority, cpu_lane, resolve_max_batch


class Recorder:
    """A batch function that records batches, can be held, and fails payloads named ``"boom"``."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, payloads):
        self.started.set()
        self.release.wait(timeout=30)
        self.batches.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("boom")
        return [Failed(ValueError(p)) if str(p).startswith("bad") else f"done:{p}" for p in payloads]


def held_lane(max_batch=4, limits=None, max_wait_s=0.0) -> tuple[Lane, Recorder]:
    """A lane whose single worker is busy with a held job ``"blocker"`` (the queue is then ours)."""
    rec = Recorder()
    rec.release.clear()
    lane = Lane("test", rec, workers=1, max_batch=max_batch, max_wait_s=max_wait_s, limits=limits)
    lane.blocker = lane.submit("blocker", "blocker", Priority.FINAL)
    assert rec.started.wait(10)
    deadline = time.monotonic() + 10
    while lane.waiting() and time.monotonic() < deadline:
        time.sleep(0.005)
    return lane, rec


def finish(lane: Lane, rec: Recorder, futures) -> list:
    rec.release.set()
    try:
        return [f.result(timeout=20) for f in futures]
    finally:
        lane.shutdown()


# --- batching -------------------------------------------------------------------------------


def test_concurrent_jobs_are_batched_up_to_max_batch():
    lane, rec = held_lane(max_batch=4)
    futures = [lane.submit(f"k{i}", i, Priority.REST) for i in range(10)]
    results = finish(lane, rec, [lane.blocker, *futures])
    assert results[1:] == [f"done:{i}" for i in range(10)]
    sizes = [len(b) for b in rec.batches[1:]]
    assert sizes == [4, 4, 2]  # queued behind the held batch: grouped, never above max_batch
    assert list(lane.stats.sizes) == [1, 4, 4, 2]


def test_lone_job_waits_at_most_max_wait():
    rec = Recorder()
    lane = Lane("test", rec, max_batch=8, max_wait_s=0.05)
    try:
        t0 = time.monotonic()
        assert lane.submit("a", "x").result(timeout=20) == "done:x"
        assert time.monotonic() - t0 < 5
        assert rec.batches == [["x"]]
    finally:
        lane.shutdown()


def test_full_batch_does_not_wait_for_max_wait():
    rec = Recorder()
    lane = Lane("test", rec, max_batch=3, max_wait_s=30.0)
    rec.release.clear()
    try:
        futures = [lane.submit(f"k{i}", i) for i in range(3)]
        t0 = time.monotonic()
        rec.release.set()
        assert [f.result(timeout=20) for f in futures] == ["done:0", "done:1", "done:2"]
        assert time.monotonic() - t0 < 15 and rec.batches == [[0, 1, 2]]
    finally:
        lane.shutdown()


# --- priority and fairness ------------------------------------------------------------------


def test_strict_priority_final_before_rest_before_partial():
    lane, rec = held_lane(max_batch=1, limits=LaneLimits(partial_low_water=10))
    partial = lane.submit("s1", "partial", Priority.PARTIAL)
    rest = lane.submit("r1", "rest", Priority.REST)
    final = lane.submit("s2", "final", Priority.FINAL)
    finish(lane, rec, [lane.blocker, partial, rest, final])
    assert [b[0] for b in rec.batches] == ["blocker", "final", "rest", "partial"]


def test_one_class_per_batch_highest_first_and_small_partial_batches():
    """A batch holds one class (on CPU a batch costs the sum of its items, so a final must not wait
    for REST jobs or partials beside it); partial batches hold at most max_batch // 4."""
    lane, rec = held_lane(max_batch=8, limits=LaneLimits(partial_low_water=10))
    futures = [lane.submit("p", f"partial{i}", Priority.PARTIAL) for i in range(5)]
    futures += [lane.submit("r", f"rest{i}", Priority.REST) for i in range(2)]
    futures += [lane.submit("f", "final0", Priority.FINAL)]
    finish(lane, rec, [lane.blocker, *futures])
    assert rec.batches[1:] == [
        ["final0"],
        ["rest0", "rest1"],
        ["partial0", "partial1"],
        ["partial2", "partial3"],
        ["partial4"],
    ]


def test_round_robin_across_keys_within_a_class():
    lane, rec = held_lane(max_batch=1)
    futures = [lane.submit("long", f"long{i}", Priority.REST) for i in range(4)]
    futures += [lane.submit("short", f"short{i}", Priority.REST) for i in range(2)]
    finish(lane, rec, [lane.blocker, *futures])
    order = [b[0] for b in rec.batches[1:]]
    # the short request's jobs interleave with the long one's instead of waiting behind all four
    assert order == ["long0", "short0", "long1", "short1", "long2", "long3"]


# --- bounded queue, reservation, shedding ---------------------------------------------------


def test_bounded_queue_raises_queue_full_with_retry_after():
    limits = LaneLimits(max_queue=4, final_reserve=1, partial_low_water=2, retry_after_s=3)
    lane, rec = held_lane(max_batch=8, limits=limits)
    futures = [lane.submit(f"r{i}", f"rest{i}", Priority.REST) for i in range(3)]
    with pytest.raises(QueueFull) as info:
        lane.submit("r9", "rest9", Priority.REST)  # REST stops at max_queue - final_reserve
    assert info.value.status == 503 and info.value.retry_after == 3
    futures.append(lane.submit("s", "final", Priority.FINAL))  # the reserved slot
    with pytest.raises(QueueFull):
        lane.submit("s", "final2", Priority.FINAL)  # max_queue reached
    assert lane.stats.rejected == 2
    finish(lane, rec, [lane.blocker, *futures])


def test_partials_never_take_room_that_finals_need():
    limits = LaneLimits(max_queue=3, final_reserve=1, partial_low_water=2)
    lane, rec = held_lane(max_batch=8, limits=limits)
    partials = [lane.submit(f"p{i}", f"partial{i}", Priority.PARTIAL) for i in range(2)]
    with pytest.raises(QueueFull):  # below the low-water mark only
        lane.submit("p9", "partial9", Priority.PARTIAL)
    finals = [lane.submit(f"s{i}", f"final{i}", Priority.FINAL) for i in range(3)]  # all admitted
    # the finals pushed the queue past the low-water mark: queued partials were shed, oldest first
    for p in partials:
        with pytest.raises(QueueFull, match="shed"):
            p.result(timeout=5)
    assert lane.stats.shed == 2 and lane.waiting(Priority.PARTIAL) == 0
    assert finish(lane, rec, finals) == ["done:final0", "done:final1", "done:final2"]


# --- deadlines, cancellation, failures ------------------------------------------------------


def test_deadline_drops_a_queued_job_without_running_it():
    lane, rec = held_lane(max_batch=1)
    expiring = lane.submit("a", "late", Priority.REST, timeout_s=0.01)
    queued = lane.submit("b", "ok", Priority.REST)
    time.sleep(0.05)
    rec.release.set()
    with pytest.raises(DeadlineExceededError):
        expiring.result(timeout=10)
    assert queued.result(timeout=10) == "done:ok"
    lane.shutdown()
    assert [b[0] for b in rec.batches] == ["blocker", "ok"]  # "late" never ran
    assert lane.stats.expired == 1


def test_async_run_times_out_and_withdraws_the_job():
    lane, rec = held_lane(max_batch=1)

    async def main():
        with pytest.raises(DeadlineExceededError):
            await lane.run("a", "late", Priority.REST, timeout_s=0.05)
        return lane.waiting()

    try:
        assert asyncio.run(main()) == 0  # the cancelled job left the queue at once
    finally:
        finish(lane, rec, [lane.blocker])
    assert [b[0] for b in rec.batches] == ["blocker"]


def test_failing_batch_fails_only_its_jobs_and_the_lane_keeps_running():
    lane, rec = held_lane(max_batch=2)
    doomed = [lane.submit("a", "boom", Priority.REST), lane.submit("b", "x", Priority.REST)]
    rec.release.set()
    for f in doomed:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=10)
    mixed = [lane.submit("a", "bad1", Priority.REST), lane.submit("b", "fine", Priority.REST)]
    with pytest.raises(ValueError):
        mixed[0].result(timeout=10)  # a Failed item fails only its own job
    assert finish(lane, rec, [mixed[1]]) == ["done:fine"]


def test_shutdown_fails_queued_jobs_and_refuses_new_ones():
    lane, rec = held_lane(max_batch=1)
    queued = lane.submit("a", "x", Priority.REST)
    rec.release.set()
    lane.shutdown()
    assert lane.blocker.result(timeout=10) == "done:blocker"
    if queued.exception(timeout=10) is not None:  # unless the worker took it before shutdown
        assert isinstance(queued.exception(), NotReadyError)
    with pytest.raises(NotReadyError):
        lane.submit("a", "y")


# --- the CPU lane (what FairWorkPool did) ---------------------------------------------------


def test_cpu_lane_runs_calls_fairly_and_propagates_exceptions():
    lane = cpu_lane("test-cpu")
    gate = threading.Event()
    order: list[str] = []

    def fail():
        raise ValueError("bad")

    async def main():
        with pytest.raises(ValueError):
            await lane.run(None, Call(fail))
        return await lane.run(None, Call(sum, ([1, 2],)))

    try:
        blocker = lane.submit("x", Call(gate.wait, (10,)))
        time.sleep(0.05)
        futures = [lane.submit("long", Call(order.append, (f"long{i}",))) for i in range(3)]
        futures += [lane.submit("short", Call(order.append, ("short0",)))]
        futures += [lane.submit("stream", Call(order.append, ("final",)), Priority.FINAL)]
        gate.set()
        for f in [blocker, *futures]:
            f.result(timeout=10)
        assert order == ["final", "long0", "short0", "long1", "long2"]
        assert asyncio.run(main()) == 3
    finally:
        lane.shutdown()


def test_resolve_max_batch():
    assert resolve_max_batch(0, cuda=False) == 8 and resolve_max_batch(0, cuda=True) == 32
    assert resolve_max_batch(5, cuda=True) == 5


# --- the engine's ASR lane with a fake analyzer ---------------------------------------------


@dataclass
class FakeTranscript:
    text: str


@dataclass
class FakeAnalysis:
    transcript: FakeTranscript
    timing_ms: dict


class BatchAnalyzer:
    """Implements the analyzer's batch stages; records the size of every call."""

    def __init__(self, delay_s: float = 0.05):
        from app.analysis.analyzer import FeatureConfig

        self.config = FeatureConfig()
        self.delay_s = delay_s
        self.transcribe_sizes: list[int] = []
        self.finish_sizes: list[int] = []

    def transcribe_batch(self, audios, timed=None):
        self.transcribe_sizes.append(len(audios))
        time.sleep(self.delay_s)  # the batch's cost: later jobs queue up meanwhile
        return [FakeTranscript(f"len{len(a)}") for a in audios]

    def finish_batch(self, audios, transcripts):
        self.finish_sizes.append(len(audios))
        return [FakeAnalysis(t, {"asr": 1.0}) for t in transcripts]


def test_engine_batches_analyses_and_transcriptions_across_clients(tmp_path):
    from app.inference.engine import Engine
    from tests.serving_helpers import make_settings

    analyzer = BatchAnalyzer()
    settings = make_settings(tmp_path, models=["adf"], warmup=False, asr_max_batch=8, asr_max_wait_ms=20)

    async def main():
        engine = Engine(settings, analyzer=analyzer)
        await engine.start()
        engine.input_names = ()  # fake analyses carry no features: batching, not inputs, is tested here
        try:
            full = [
                engine.analyze(np.zeros(1600 * (i + 1), np.float32), key=f"c{i}", priority=Priority.REST)
                for i in range(6)
            ]
            asr = [engine.transcribe(np.zeros(800, np.float32), key="s", priority=Priority.FINAL)]
            return await asyncio.gather(*full, *asr), list(engine.asr_lane.stats.sizes)
        finally:
            await engine.stop()

    results, sizes = asyncio.run(main())
    assert [r.transcript.text for r in results[:6]] == [f"len{1600 * (i + 1)}" for i in range(6)]
    assert results[6] == FakeTranscript("len800")  # transcribe-only: no finish stage
    assert max(analyzer.transcribe_sizes) > 1 and sum(analyzer.transcribe_sizes) == 7
    assert sum(analyzer.finish_sizes) == 6 and sizes == analyzer.transcribe_sizes
