"""Admission control units (app/inference/admission.py): stream slots, byte budgets, the queued-work
estimator and header sniffing. Deterministic: a fake clock, no sleeps, no models."""

from __future__ import annotations

import struct
import threading

import pytest

from app.errors import MemoryBudgetError, OverloadedError
from app.inference.admission import MB, Admission, ByteBudget, Slots, WorkEstimator, sniff
from tests.serving_helpers import ANGRY, wav_bytes


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- slots ----------------------------------------------------------------------------------


def test_slots_admit_exactly_the_limit_under_concurrent_acquires():
    slots = Slots(5)
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def grab():
        barrier.wait()
        results.append(slots.try_acquire())

    threads = [threading.Thread(target=grab) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5 and slots.held == 5
    slots.release()
    assert slots.try_acquire() and not slots.try_acquire()
    for _ in range(10):  # over-release never goes negative
        slots.release()
    assert slots.held == 0


# --- byte budgets ------------------------------------------------------------------------------


def test_budget_reserve_resize_and_release():
    budget = ByteBudget("test", 100)
    a = budget.reserve(60)
    assert budget.used == 60
    with pytest.raises(MemoryBudgetError) as exc:
        budget.reserve(50)
    assert exc.value.status == 503 and exc.value.retry_after and exc.value.code == "memory_budget"
    assert budget.used == 60  # a refused reservation holds nothing
    b = budget.reserve(40)
    with pytest.raises(MemoryBudgetError):
        a.resize(61)  # growth that does not fit: keeps what it had
    assert a.size == 60 and budget.used == 100
    a.resize(10)  # shrinking always works
    assert budget.used == 50
    a.grow(5)
    assert budget.used == 55
    a.release()
    a.release()  # idempotent
    b.release()
    assert budget.used == 0


def test_budget_oversize_runs_alone():
    budget = ByteBudget("test", 100)
    small = budget.reserve(1)
    with pytest.raises(MemoryBudgetError, match="whole budget"):
        budget.reserve(500)
    small.release()
    big = budget.reserve(500)  # nothing else in flight: admitted alone
    with pytest.raises(MemoryBudgetError):
        budget.reserve(1)
    big.release()
    assert budget.used == 0


def test_disabled_budget_admits_everything():
    budget = ByteBudget("test", 0)
    res = budget.reserve(10**12)
    assert budget.used == 0
    res.release()


def test_admission_from_settings():
    from app.settings import Settings

    s = Settings(
        stream_max_streams=3,
        upload_budget_mb=2,
        decoded_budget_mb=4,
        admission_max_wait_s=500,
        request_timeout_s=30,
    )
    adm = Admission.from_settings(s)
    assert adm.streams.limit == 3
    assert adm.upload.capacity == 2 * MB and adm.decoded.capacity == 4 * MB
    assert adm.work.max_wait_s == 30  # capped at the request timeout


# --- the estimator -----------------------------------------------------------------------------


def test_idle_server_always_admits_and_burst_is_counted_at_admission():
    clock = FakeClock()
    est = WorkEstimator(max_wait_s=10.0, initial_cost=0.5, initial_audio_s=4.0, clock=clock)
    tickets = []
    with pytest.raises(OverloadedError) as exc:
        for _ in range(100):  # nothing completes: each admission adds the assumed 4 s
            tickets.append(est.admit())
    # wait = pending x cost: admitted while 4 k x 0.5 <= 10, i.e. k <= 5, so 6 are admitted
    assert len(tickets) == 6
    assert exc.value.status == 503 and exc.value.retry_after >= 1
    assert est.shed == 1
    for t in tickets:
        t.done(completed=False)
    assert est.pending_s == 0.0
    assert est.admit() is not None  # idle again


def test_huge_first_request_is_admitted_when_nothing_is_pending():
    est = WorkEstimator(max_wait_s=1.0, initial_cost=10.0, clock=FakeClock())
    t = est.admit()
    t.set_audio(10_000.0)
    with pytest.raises(OverloadedError):
        est.admit()
    t.done()
    est.admit()


def test_cost_ewma_tracks_measured_throughput():
    clock = FakeClock()
    est = WorkEstimator(max_wait_s=0, initial_cost=1.0, alpha=0.5, clock=clock)  # 0 = never shed
    for _ in range(20):  # each request: 10 s of audio served in 2 s of busy time -> 0.2 s per audio s
        t = est.admit()
        clock.t += 5.0  # reading the upload: not busy (work not started)
        t.start()
        t.set_audio(10.0)
        clock.t += 2.0
        t.done()
        clock.t += 30.0  # idle gap: not counted
    assert est.cost == pytest.approx(0.2, rel=0.01)
    assert est.mean_audio_s == pytest.approx(10.0, rel=0.01)


def test_cost_under_concurrency_is_throughput_not_latency():
    clock = FakeClock()
    est = WorkEstimator(max_wait_s=0, initial_cost=1.0, alpha=0.3, clock=clock)
    # 4 requests of 10 s each run at once and finish 1 s apart: throughput 10 audio s per busy second
    for _ in range(10):
        tickets = [est.admit() for _ in range(4)]
        for t in tickets:
            t.start()
            t.set_audio(10.0)
        for t in tickets:
            clock.t += 1.0
            t.done()
    assert est.cost == pytest.approx(0.1, rel=0.05)


def test_abandoned_and_undecoded_requests_are_not_cost_samples():
    clock = FakeClock()
    est = WorkEstimator(max_wait_s=0, initial_cost=0.3, clock=clock)
    t = est.admit()
    t.start()
    t.set_audio(100.0, decoded=False)  # only declared by its header, then decoding failed
    clock.t += 50.0
    t.done()
    assert est.cost == 0.3
    t.done()  # idempotent
    assert est.pending_s == 0.0


def test_estimated_wait_sheds_with_retry_after_and_counts():
    clock = FakeClock()
    est = WorkEstimator(max_wait_s=20.0, initial_cost=0.5, retry_after_s=1.0, clock=clock)
    big = est.admit()
    big.set_audio(100.0)  # 50 s of work ahead of anyone else
    assert est.estimated_wait_s() == pytest.approx(50.0)
    with pytest.raises(OverloadedError) as exc:
        est.admit()
    assert 1.0 <= exc.value.retry_after <= 60.0 and exc.value.retry_after == pytest.approx(30.0)
    assert est.shed == 1
    big.done()
    est.admit()


# --- header sniffing -----------------------------------------------------------------------------


def test_sniff_wav_and_flac():
    import numpy as np

    wav = wav_bytes(np.zeros((48000, 2), np.float32), rate=24000)
    d = sniff(wav)
    assert d is not None and (d.frames, d.channels, d.sample_rate) == (48000, 2, 24000)
    assert d.decoded_bytes == 48000 * 2 * 4 and d.duration_s == pytest.approx(2.0)
    flac = sniff(ANGRY.read_bytes())
    assert flac is not None and flac.channels == 1 and 2.0 < flac.duration_s < 10.0


def test_sniff_wav_cannot_declare_more_frames_than_its_bytes():
    header = b"RIFF" + struct.pack("<I", 0) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 192000, 192000 * 4, 4, 16)
    header += b"data" + struct.pack("<I", 0x7FFFFFF0)
    d = sniff(header + bytes(4000))
    assert d is not None and d.frames == 1000


def test_sniff_flac_declaring_ten_minutes_at_192k():
    data = bytearray(ANGRY.read_bytes())
    rate = 192000
    bits = (rate << 44) | (1 << 41) | (15 << 36) | (600 * rate)  # stereo, 16 bits, 10 min
    data[18:26] = bits.to_bytes(8, "big")
    d = sniff(bytes(data))
    assert d is not None and d.channels == 2 and d.sample_rate == rate
    assert d.decoded_bytes == 600 * rate * 2 * 4


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RIFF",
        b"RIFF\0\0\0\0WAVE",
        b"fLaC",
        b"fLaC\0\0\0\x22" + bytes(10),
        b"OggS" + bytes(100),
        bytes(1000),
    ],
)
def test_sniff_unknown_or_truncated_is_none(data):
    assert sniff(data) is None
