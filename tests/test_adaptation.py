"""Per-session adaptation (``app.analysis.adaptation``): the math, the shifted model inputs, the
population file, and the streaming session's causal bookkeeping with a fake backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from app.analysis.adaptation import (
    PopulationStats,
    SessionAdapter,
    frame_mean,
    history_shift,
    session_mean,
    shift_for,
)
from app.analysis.inputs import PATCH_ENC_FRAMES, SEGMENT_ENC_FRAMES, model_inputs

D = 6


def population(tau: float = 3.0, seed: int = 0) -> PopulationStats:
    rng = np.random.default_rng(seed)
    return PopulationStats.from_means(rng.normal(size=(20, D)), tau=tau, asr_model="tiny.en")


# --- the equations ------------------------------------------------------------------------------


def test_no_history_is_exactly_the_identity():
    pop = population()
    adapter = SessionAdapter(pop)
    shift = adapter.next_shift()
    assert shift.utterances == 0
    assert shift.shift.dtype == np.float32 and not shift.shift.any()
    assert not history_shift(np.zeros((0, D)), pop.vector, pop.tau).any()


def test_session_mean_is_the_shrunk_running_mean():
    rng = np.random.default_rng(1)
    mu_pop, means = rng.normal(size=D), rng.normal(size=(4, D))
    expected = (means.sum(0) + 2.5 * mu_pop) / (4 + 2.5)
    assert np.allclose(session_mean(means.sum(0), 4, mu_pop, 2.5), expected)
    assert np.allclose(shift_for(means.sum(0), 4, mu_pop, 2.5), mu_pop - expected, atol=1e-6)


def test_shrinkage_limits():
    rng = np.random.default_rng(2)
    mu_pop, m = rng.normal(size=D), rng.normal(size=D)
    # many utterances of one mean: the session mean becomes that mean, whatever tau
    many = shift_for(m * 10_000, 10_000, mu_pop, 3.0)
    assert np.allclose(many, mu_pop - m, atol=1e-3)
    # tau -> infinity: the population wins, no shift; tau = 0: the history alone
    assert np.allclose(shift_for(m, 1, mu_pop, 1e12), 0.0, atol=1e-6)
    assert np.allclose(shift_for(m, 1, mu_pop, 0.0), mu_pop - m, atol=1e-6)
    # one utterance with tau = 3 moves a quarter of the way
    assert np.allclose(shift_for(m, 1, mu_pop, 3.0), (mu_pop - m) / 4, atol=1e-6)


def test_an_utterance_never_sees_its_own_or_later_statistics():
    pop = population()
    rng = np.random.default_rng(3)
    shared = [rng.normal(size=D) for _ in range(3)]

    def shifts(tail):
        adapter, out = SessionAdapter(pop), []
        for m in shared + tail:
            out.append(adapter.next_shift())  # what utterance j is normalised with ...
            adapter.observe(m)  # ... before its own mean joins the state
        return out

    a, b = shifts([rng.normal(size=D) * 5]), shifts([rng.normal(size=D) * -5])
    # the fourth utterance differs between the runs; the shift it and its predecessors get does not
    for x, y in zip(a, b, strict=True):
        assert x.utterances == y.utterances and np.array_equal(x.shift, y.shift)
    assert [s.utterances for s in a] == [0, 1, 2, 3]
    adapter = SessionAdapter(pop)
    for m in shared:
        adapter.observe(m)
    assert np.array_equal(adapter.next_shift().shift, a[3].shift)


def test_observe_refuses_the_wrong_width_and_skips_non_finite_means():
    adapter = SessionAdapter(population())
    with pytest.raises(ValueError):
        adapter.observe(np.zeros(D + 1))
    adapter.observe(np.full(D, np.nan))
    assert adapter.n == 0


def test_frame_mean_rejects_empty_frames():
    with pytest.raises(ValueError):
        frame_mean(np.zeros((0, D)))
    assert np.allclose(frame_mean(np.array([[1.0] * D, [3.0] * D])), 2.0)


# --- the population file ------------------------------------------------------------------------


def test_population_round_trip_and_refusals(tmp_path):
    pop = population(tau=7.0)
    path = pop.save(tmp_path / "adaptation.json")
    again = PopulationStats.load(path)
    assert again.dim == D and again.n == 20 and again.tau == 7.0 and again.asr_model == "tiny.en"
    assert np.allclose(again.vector, pop.vector, atol=1e-6)
    raw = json.loads(path.read_text())
    raw["dim"] = D + 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="dim"):
        PopulationStats.load(path)
    raw["format"] = "something-else/9"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format"):
        PopulationStats.load(path)
    with pytest.raises(FileNotFoundError):
        PopulationStats.load(tmp_path / "missing.json")


def test_shipped_population_matches_the_shipped_frames():
    from pathlib import Path

    pop = PopulationStats.load(Path(__file__).resolve().parents[1] / "models" / "adaptation.json")
    assert pop.dim == 384 and pop.n == 641 and pop.asr_model == "tiny.en"


# --- shifted model inputs -----------------------------------------------------------------------


def fake_analysis(frames: np.ndarray, seconds: float):
    return SimpleNamespace(
        audio=np.zeros(int(seconds * 16000), np.float32),
        transcript=SimpleNamespace(encoder_frames=frames),
        speech_frames=None,
        acoustic=None,
    )


def test_every_encoder_input_is_computed_from_the_shifted_frames():
    seconds = 4.1  # two 3-s segments, the second mostly padding; 5 patches
    rng = np.random.default_rng(4)
    frames = rng.normal(size=(int(seconds * 50), D)).astype(np.float32)
    shift = rng.normal(size=D).astype(np.float32)
    names = ["encoder", "enc_patches", "enc_seg", "seg_mask", "patch_mask"]
    plain = model_inputs(fake_analysis(frames, seconds), names)
    zero = model_inputs(fake_analysis(frames, seconds), names, encoder_shift=np.zeros(D, np.float32))
    moved = model_inputs(fake_analysis(frames, seconds), names, encoder_shift=shift)
    for name in names:  # a zero shift changes nothing
        assert np.array_equal(zero[name], plain[name]), name
    assert np.allclose(moved["encoder"], frames + shift)
    # pooling: each patch of real frames moves by the shift
    real_patches = -(-len(frames) // PATCH_ENC_FRAMES)
    assert np.allclose(moved["enc_patches"][:real_patches], plain["enc_patches"][:real_patches] + shift)
    # segments: real rows move, the zero padding after them stays zero (it is not audio)
    flat, base = moved["enc_seg"].reshape(-1, D), plain["enc_seg"].reshape(-1, D)
    assert np.allclose(flat[: len(frames)], base[: len(frames)] + shift)
    assert not flat[len(frames) :].any() and len(flat) == 2 * SEGMENT_ENC_FRAMES
    assert np.array_equal(moved["seg_mask"], plain["seg_mask"])
    with pytest.raises(ValueError, match="shift"):
        model_inputs(fake_analysis(frames, seconds), ["encoder"], encoder_shift=np.zeros(D + 1))


# --- the offline measurement's histories (training/adaptation.py) --------------------------------


def test_histories_are_other_utterances_of_the_same_speaker_by_kind():
    from training.adaptation import histories

    # two speakers, labels 0..3 twice each; a history never holds its own utterance
    samples = [SimpleNamespace(speaker=f"s{i // 8}", label=i % 4) for i in range(16)]
    units = list(range(16))
    h = histories(samples, units, ks=[1, 3], repeats=4, seed=0)
    again = histories(samples, units, ks=[1, 3], repeats=4, seed=0)
    assert h == again  # seeded: every model and condition sees the same histories
    for (kind, k), rows in h.items():
        assert len(rows) == 4 * len(units)
        for u, hist in rows:
            assert len(hist) == k and u not in hist
            assert all(samples[j].speaker == samples[u].speaker for j in hist)
            same = [samples[j].label == samples[u].label for j in hist]
            if kind == "same":
                assert all(same)
            elif kind == "other":
                assert not any(same)
        if kind == "same" and k == 3:  # one other same-label utterance: drawn with replacement
            assert all(len(set(hist)) == 1 for _, hist in rows)
