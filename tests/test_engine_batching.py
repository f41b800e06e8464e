"""Dynamic batching of model requests and ONNX model runners (no ASR, no HTTP); the scheduler lanes
that replaced the fair ASR pool are tested in ``tests/test_scheduler.py``.

Timing assertions use wide margins (a loaded 2-core machine can stall for hundreds of ms); the
ordering assertions use events, not sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from app.errors import DeadlineExceededError, QueueFull
from app.inference.batching import DynamicBatcher
from app.inference.engine import ModelCard, ModelLoadError, ModelRunner, choose_providers
from tests.serving_helpers import CLASSES, MODEL_INPUTS, write_dummy_models


class BlockingRunner:
    """A batch function that records batches and can be held until released."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.release.wait(timeout=30)
        self.batches.append(list(items))
        return [i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


# --- DynamicBatcher --------------------------------------------------------------------------


def test_results_match_items_and_batch_size_is_respected():
    runner = BlockingRunner()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=4, max_wait_s=0.05, max_queue=100)
        b.start()
        runner.release.clear()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(runner.started.wait, 10)  # batch [0] is running and held
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0)
        runner.release.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return results, b

    results, b = run(main())
    assert results == [i * 10 for i in range(11)]
    assert all(1 <= len(batch) <= 4 for batch in runner.batches)
    assert sorted(x for batch in runner.batches for x in batch) == list(range(11))
    # the 10 requests queued behind the held batch were grouped (4 + 4 + 2), not run one by one
    assert len(runner.batches) == 4
    assert b.stats.items == 11


def test_full_batch_runs_without_waiting_for_max_wait():
    runner = BlockingRunner()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=3, max_wait_s=30.0, max_queue=10)
        b.start()
        t0 = time.monotonic()
        out = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(3))), 20)
        elapsed = time.monotonic() - t0
        await b.stop()
        return out, elapsed

    out, elapsed = run(main())
    assert out == [0, 10, 20]
    assert runner.batches == [[0, 1, 2]]
    assert elapsed < 15  # far below max_wait (30 s): a full batch does not wait


def test_max_wait_counts_from_the_first_queued_request():
    runner = BlockingRunner()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=10, max_wait_s=2.0, max_queue=10)
        b.start()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(1.2)
        t_second = time.monotonic()
        second = await b.submit(2)
        waited = time.monotonic() - t_second
        await first
        await b.stop()
        return second, waited

    second, waited = run(main())
    assert second == 20
    assert runner.batches == [[1, 2]]  # one batch: the second joined the first's
    # Counted from the second request it would wait 2 s; from the first, about 0.8 s.
    assert waited < 1.8


def test_single_request_runs_after_max_wait():
    runner = BlockingRunner()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=8, max_wait_s=0.01, max_queue=10)
        b.start()
        out = await asyncio.wait_for(b.submit(7), 20)
        await b.stop()
        return out

    assert run(main()) == 70
    assert runner.batches == [[7]]


def test_queue_full_raises_at_once():
    runner = BlockingRunner()
    runner.release.clear()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=1, max_wait_s=0.0, max_queue=2, retry_after_s=3)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(runner.started.wait, 10)  # item 0 left the queue and is running
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await b.submit(3)
        runner.release.set()
        done = await asyncio.gather(running, *queued)
        await b.stop()
        return info.value, done

    exc, done = run(main())
    assert exc.status == 503 and exc.code == "queue_full" and exc.retry_after == 3
    assert done == [0, 10, 20]


def test_deadline_drops_queued_request_without_running_it():
    runner = BlockingRunner()
    runner.release.clear()

    async def main():
        b = DynamicBatcher("t", runner, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(runner.started.wait, 10)
        with pytest.raises(DeadlineExceededError):
            await b.submit(1, timeout_s=0.05)
        runner.release.set()
        await running
        ok = await b.submit(2)  # the batcher keeps serving
        await b.stop()
        return ok

    assert run(main()) == 20
    assert [x for batch in runner.batches for x in batch] == [0, 2]  # 1 never ran


def test_failing_batch_fails_its_requests_only():
    calls = []

    def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return list(items)

    async def main():
        b = DynamicBatcher("t", flaky, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        b.start()
        with pytest.raises(RuntimeError):
            await b.submit(1)
        out = await b.submit(2)
        await b.stop()
        return out

    assert run(main()) == 2


# --- ModelRunner and cards ------------------------------------------------------------------


def _fake_inputs(rng, batch_len=5):
    # every name of the model_inputs vocabulary, with plausible ranks
    shapes = {
        "frames33": (batch_len, 33),
        "frames33_cm": (batch_len,),
        "frames33_mask": (batch_len,),
        "words": (3, 8),
        "words_static": (3, 8),
        "words_cm": (3,),
        "words_mask": (3,),
        "mfcc_seg": (1, 4, 40),
        "spec_seg": (1, 4, 20),
        "enc_seg": (1, 4, 8),
        "seg_mask": (1,),
        "waveform": (batch_len * 10,),
        "waveform_mask": (batch_len * 10,),
        "enc_patches": (2, 8),
        "logmel_patches": (2, 4, 6),
        "patch_mask": (2,),
        "encoder": (6, 8),
        "encoder_cm": (6,),
        "encoder_mask": (6,),
    }
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def test_runner_feeds_declared_inputs_and_returns_normalised_probabilities(tmp_path):
    write_dummy_models(tmp_path)
    rng = np.random.default_rng(0)
    for mid in MODEL_INPUTS:
        card = ModelCard.load(tmp_path, mid)
        runner = ModelRunner(card, ["CPUExecutionProvider"], 1, CLASSES)
        assert runner.provider == "CPUExecutionProvider"
        assert set(runner.input_names) == set(MODEL_INPUTS[mid])
        samples = [_fake_inputs(rng, n) for n in (5, 9, 2)]  # different lengths: padding exercised
        probs = runner.run(samples)
        assert len(probs) == 3
        for p in probs:
            assert p.shape == (4,) and abs(p.sum() - 1.0) < 1e-9 and (p >= 0).all()
        # batched == one at a time, up to padding effects on means; the first (longest) is exact
        alone = runner.run(samples[1:2])[0]
        np.testing.assert_allclose(alone, probs[1], atol=1e-5)


def test_runner_reorders_classes_to_the_service_order(tmp_path):
    write_dummy_models(tmp_path, ids=["adf"])
    rng = np.random.default_rng(1)
    sample = _fake_inputs(rng)
    card = ModelCard.load(tmp_path, "adf")
    base = ModelRunner(card, ["CPUExecutionProvider"], 1, CLASSES).run([sample])[0]
    flipped = tuple(reversed(CLASSES))
    other = ModelRunner(card, ["CPUExecutionProvider"], 1, flipped).run([sample])[0]
    np.testing.assert_allclose(other, base[::-1])


def test_runner_rejects_a_class_set_mismatch(tmp_path):
    write_dummy_models(tmp_path, ids=["adf"])
    with pytest.raises(ModelLoadError):
        ModelRunner(ModelCard.load(tmp_path, "adf"), ["CPUExecutionProvider"], 1, ("a", "b", "c", "d"))


def test_card_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no card"):
        ModelCard.load(tmp_path, "adf")
    write_dummy_models(tmp_path, ids=["adf"])
    (tmp_path / "adf.onnx").unlink()
    with pytest.raises(ModelLoadError, match="no ONNX"):
        ModelCard.load(tmp_path, "adf")
    write_dummy_models(tmp_path, ids=["adf"])
    card = json.loads((tmp_path / "adf.json").read_text())
    card["classes"] = ["one"]
    (tmp_path / "adf.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="classes"):
        ModelCard.load(tmp_path, "adf")


def test_engine_refuses_tampered_model_and_foreign_features(tmp_path):
    from app.inference.engine import Engine
    from tests.serving_helpers import make_settings

    class FakeAnalyzer:
        from app.analysis.analyzer import FeatureConfig

        config = FeatureConfig()

    settings = make_settings(tmp_path, models=["adf"], warmup=False)
    (settings.model_dir / "adf.onnx").write_bytes((settings.model_dir / "adf.onnx").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        Engine(settings, analyzer=FakeAnalyzer())._load()

    write_dummy_models(settings.model_dir, ids=["adf"], digest="0123456789abcdef")
    with pytest.raises(ModelLoadError, match="features"):
        Engine(settings, analyzer=FakeAnalyzer())._load()

    write_dummy_models(settings.model_dir, ids=["adf"])
    engine = Engine(settings, analyzer=FakeAnalyzer())
    engine._load()
    assert engine.classes == CLASSES and engine.runners["adf"].provider == "CPUExecutionProvider"


def test_choose_providers():
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError):
        choose_providers("tpu")


def test_engine_batches_concurrent_utterances(tmp_path):
    """Through the real engine: concurrent requests for a model share batches, results unchanged."""
    from app.analysis.analyzer import FeatureConfig
    from app.inference.engine import Engine
    from tests.serving_helpers import make_settings

    class FakeAnalyzer:
        config = FeatureConfig()

    settings = make_settings(
        tmp_path, models=["adf", "cmt-awc"], warmup=False, max_batch_size=4, max_batch_wait_ms=50
    )
    sample = _fake_inputs(np.random.default_rng(3))

    async def main():
        engine = Engine(settings, analyzer=FakeAnalyzer())
        await engine.start()
        try:
            alone = await engine.infer("adf", sample)
            together = await asyncio.gather(*(engine.infer("adf", sample) for _ in range(10)))
            other = await engine.infer("cmt-awc", sample)
            return alone, together, other, list(engine.batchers["adf"].stats.sizes)
        finally:
            await engine.stop()

    alone, together, other, sizes = run(main())
    assert sizes[0] == 1 and sum(sizes[1:]) == 10
    assert max(sizes) == 4  # grouped, and never above max_batch_size
    for p in together:
        np.testing.assert_allclose(p, alone, atol=1e-6)
    assert other.shape == (4,) and not np.allclose(other, alone)
