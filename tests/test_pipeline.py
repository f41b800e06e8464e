"""app.analysis.analyzer + app.analysis.inputs: the one path from audio to every model input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.analysis import features as F
from app.analysis.analyzer import FeatureConfig
from app.analysis.audio import decode
from app.analysis.inputs import collate, model_inputs


@pytest.fixture(scope="module")
def clip(fixtures_dir):
    return decode(fixtures_dir / "kids_angry_a01.flac").mono


@pytest.fixture(scope="module")
def analysis(analyzer, clip):
    return analyzer.analyze(clip)


def test_analysis_is_consistent(analysis, clip):
    T = F.n_frames(len(clip))
    assert analysis.acoustic.frames33.shape == (T, 33)
    assert analysis.acoustic.mfcc40.shape == (T, 40)
    assert analysis.acoustic.spectrogram.shape == (T, 200)
    assert analysis.transcript.encoder_frames.shape[0] == math.ceil(len(clip) / 320)
    assert len(analysis.text) == len(analysis.transcript.words) == 6
    assert set(analysis.timing_ms) == {"asr", "text", "features"}


def test_model_inputs_shapes_and_masks(analysis, clip):
    x = model_inputs(analysis)
    n_seg = math.ceil(len(clip) / 48000)
    assert x["mfcc_seg"].shape == (n_seg, 300, 40)
    assert x["spec_seg"].shape == (n_seg, 300, 200)
    assert x["enc_seg"].shape == (n_seg, 150, 384)
    assert x["enc_patches"].shape[0] == x["logmel_patches"].shape[0] == x["patch_mask"].shape[0]
    assert x["words"].shape == (6, 384) and x["words_cm"].shape == (6,)
    # the segments are the frames, cut in order
    assert np.array_equal(
        x["mfcc_seg"].reshape(-1, 40)[: len(analysis.acoustic.mfcc40)], analysis.acoustic.mfcc40
    )
    # frame confidence: a frame inside the first word carries that word's confidence
    first = analysis.transcript.words[0]
    frame = int((first.start + first.end) / 2 / 0.01)
    assert x["frames33_cm"][frame] == pytest.approx(first.confidence)
    # the same rule on the 20-ms encoder frames (cmt-awc's acoustic="encoder" option)
    assert x["encoder_cm"].shape == x["encoder_mask"].shape
    assert x["encoder_cm"][int((first.start + first.end) / 2 / 0.02)] == pytest.approx(first.confidence)
    for name, value in x.items():
        assert value.dtype == np.float32 and np.isfinite(value).all(), name


def test_silence_analyses_without_nan(analyzer):
    a = analyzer.analyze(np.zeros(16000, np.float32))
    x = model_inputs(a)
    assert a.text.is_empty and x["words_mask"].tolist() == [1.0]
    assert all(np.isfinite(v).all() for v in x.values())


def test_collate_pads_with_zeros_and_masks(analysis, analyzer):
    short = analyzer.analyze(analysis.audio[:16000])
    a, b = model_inputs(analysis), model_inputs(short)
    batch = collate([a, b], ["frames33", "frames33_mask", "words", "words_mask"])
    assert batch["frames33"].shape == (2, len(a["frames33"]), 33)
    n = len(b["frames33"])
    assert np.array_equal(batch["frames33"][1, :n], b["frames33"]) and not batch["frames33"][1, n:].any()
    assert batch["frames33_mask"][1].sum() == n


def test_feature_config_digest_is_stable_and_sensitive():
    assert FeatureConfig().digest() == FeatureConfig().digest()
    assert FeatureConfig().digest() != FeatureConfig(chunk_shift_s=0.02).digest()


def test_default_feature_digest_is_pinned():
    """Shipped model cards and the RAVDESS feature cache are keyed by this digest: options added
    later (pretrained parts) must leave it unchanged while they hold their defaults."""
    assert FeatureConfig().digest() == "313dcb849f9227be"
    assert FeatureConfig.for_parts() == FeatureConfig()
    assert FeatureConfig.for_parts(speech_encoder=None, glove="") == FeatureConfig()
    assert not {"speech_encoder", "word_vectors"} & set(FeatureConfig().to_dict())
    assert FeatureConfig(word_vectors="glove.txt:0123456789ab").digest() != FeatureConfig().digest()
    assert FeatureConfig(speech_encoder="w2v:0123456789ab").to_dict()["speech_encoder"] == "w2v:0123456789ab"
