"""app.analysis.decoding: isolated decoder processes (crash, timeout, memory limit, busy) and a seeded,
bounded fuzz run of the decoder (tests/fuzz_decode.py) plus the stored corpus of crafted files."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from app.analysis import audio as A
from app.analysis import decoding as D
from app.errors import DecoderBusyError, status_and_code
from tests import fuzz_decode

CORPUS = fuzz_decode.CORPUS
GOOD = fuzz_decode.FIXTURES / "kids_angry_a01.flac"


# Jobs for the worker processes: module-level so that they pickle by name.
def _misbehaving_job(raw: bytes, channels, limits):
    if raw.startswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if raw.startswith(b"HANG"):
        time.sleep(600)  # the worker's alarm ends the process
    if raw.startswith(b"HOG"):
        np.ones(8 * 1024**3 // 8)  # 8 GB: beyond RLIMIT_AS
    if raw.startswith(b"WRONG"):
        return np.zeros((5, 10), np.float64), 16000, 5  # inconsistent with the request
    return D._decode_job(raw, channels, limits)


class MisbehavingPool(D.DecodePool):
    job = staticmethod(_misbehaving_job)


@pytest.fixture
def pool():
    p = MisbehavingPool(workers=1, memory_mb=1024, timeout_s=2.0)
    yield p
    p.close()


def _good(pool) -> None:
    out = pool.decode(GOOD.read_bytes())
    assert out.samples.shape[0] == 1 and out.duration_s > 3


def test_isolated_decode_matches_in_process():
    data = GOOD.read_bytes()
    p = D.DecodePool(workers=1)
    try:
        isolated = p.decode(data, "separate")
    finally:
        p.close()
    local = A.decode_local(data, "separate")
    assert isolated.samples.dtype == np.float32
    assert np.array_equal(isolated.samples, local.samples)
    assert (isolated.source_rate, isolated.source_channels) == (local.source_rate, local.source_channels)


def test_decode_isolates_bytes_and_not_paths(monkeypatch):
    calls = []

    class Stub:
        def decode(self, source, channels, limits):
            calls.append(source)
            return A.decode_local(source, channels, limits)

    monkeypatch.setattr(D, "default_pool", lambda: Stub())
    A.decode(GOOD.read_bytes())
    A.decode(GOOD)  # a trusted path (training data): decoded here
    A.decode(GOOD.read_bytes(), isolate=False)
    assert len(calls) == 1
    A.decode(GOOD, isolate=True)
    assert len(calls) == 2


def test_dead_worker_is_a_422_and_is_replaced(pool):
    _good(pool)
    with pytest.raises(A.DecoderCrashedError) as exc:
        pool.decode(b"CRASH" + b"\0" * 100)
    assert status_and_code(exc.value) == (422, "undecodable_audio")
    _good(pool)  # a fresh worker took the slot
    assert pool.stats["crashes"] == 1 and pool.stats["started"] == 2


def test_hanging_decoder_times_out(pool):
    t0 = time.monotonic()
    with pytest.raises(A.DecodeTimeoutError) as exc:
        pool.decode(b"HANG")
    assert status_and_code(exc.value) == (422, "decode_timeout")
    assert time.monotonic() - t0 < 2.0 + D._GRACE_S
    _good(pool)


def test_memory_limit_is_a_413(pool):
    with pytest.raises(A.DecodeMemoryError) as exc:
        pool.decode(b"HOG")
    assert status_and_code(exc.value) == (413, "audio_too_large")
    _good(pool)


def test_worker_output_is_checked(pool):
    with pytest.raises(A.CorruptAudioError):
        pool.decode(b"WRONG")


def test_no_free_worker_is_503_busy(pool):
    held = pool._acquire()  # the only worker is busy
    try:
        pool.timeout_s = 0.2
        with pytest.raises(DecoderBusyError) as exc:
            pool.decode(GOOD.read_bytes())
        assert status_and_code(exc.value) == (503, "decoder_busy") and exc.value.retry_after
    finally:
        pool._release(held)


def test_concurrent_callers_share_the_workers():
    p = D.DecodePool(workers=2, timeout_s=30.0)
    data = GOOD.read_bytes()
    results, errors = [], []

    def call():
        try:
            results.append(p.decode(data).samples.shape)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        p.close()
    assert not errors and len(set(results)) == 1 and len(results) == 6
    assert p.stats["started"] <= 2


def test_shared_pool_lifecycle():
    D.shutdown()
    a = D.configure(workers=1, memory_mb=1024)
    assert D.default_pool() is a and D.configure(workers=1, memory_mb=1024) is a
    b = D.configure()  # a new configuration replaces (and closes) the old pool
    assert b is not a and D.default_pool() is b
    assert a.decode(GOOD.read_bytes()).duration_s > 3  # a closed pool hands over to the current one
    D.shutdown()
    assert A.decode(GOOD.read_bytes()).duration_s > 3  # lazily recreated
    D.shutdown()


def test_pool_settings_are_validated():
    with pytest.raises(ValueError):
        D.DecodePool(workers=0)
    with pytest.raises(ValueError):
        D.DecodePool(memory_mb=100)


# --- the crafted files and the fuzz run ----------------------------------------------------------


def _expected() -> dict[str, str]:
    return json.loads((CORPUS / "expected.json").read_text())


@pytest.fixture(scope="module")
def fuzz_pool():
    p = D.DecodePool(workers=1, memory_mb=1024, timeout_s=10.0)
    yield p
    p.close()


@pytest.mark.parametrize("name", sorted(_expected()))
def test_corpus(fuzz_pool, name):
    data = (CORPUS / name).read_bytes()
    assert len(data) <= 16_000
    got = fuzz_decode.outcome(fuzz_pool, data)
    assert got == _expected()[name]
    # the frame checks, not the isolation, stop these files: no worker died
    assert got not in ("DecoderCrashedError", "DecodeTimeoutError")


def test_the_file_that_crashed_the_server_is_refused_precisely(fuzz_pool):
    with pytest.raises(A.CorruptAudioError) as exc:
        fuzz_pool.decode((CORPUS / "m4a_pce38_packet4.m4a").read_bytes())
    assert status_and_code(exc.value) == (422, "undecodable_audio")
    assert "38 channels" in str(exc.value)
    assert fuzz_pool.stats["crashes"] == 0


@pytest.mark.parametrize("name", ["wav_bps0.wav", "wav_fmt_tag_ffff.wav"])
def test_wav_without_a_decoder_is_415(fuzz_pool, name):
    with pytest.raises(A.UndecodableAudioError) as exc:
        fuzz_pool.decode((CORPUS / name).read_bytes())
    assert exc.value.status == 415


def test_fuzz_decoder(fuzz_pool):
    report = fuzz_decode.run(n=400, seed=1, pool=fuzz_pool)
    assert not report["failures"], report["failures"][:10]
    assert report["cases"] >= 400
    assert report["outcomes"].get("ok", 0) > 50  # the mutations are not all rejected up front
    assert sum(report["outcomes"].values()) == report["cases"]
    print("fuzz:", json.dumps({k: report[k] for k in ("cases", "seconds", "outcomes", "crashes")}))
