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
    x = model_inputs(analysis, ["frames33", "mfcc_seg", "spec_seg"])
    assert x["frames33"].shape == (T, 33)
    assert analysis.transcript.encoder_frames.shape[0] == math.ceil(len(clip) / 320)
    assert len(analysis.text) == len(analysis.transcript.words) == 6
    assert set(analysis.timing_ms) == {"asr", "text"}  # acoustic inputs: computed per model input
    # the decoder's own statistics travel with the transcript (the OpenAI-compatible route reports them)
    tr = analysis.transcript
    assert tr.tokens and all(isinstance(t, int) for t in tr.tokens)
    assert -1.0 < tr.avg_logprob < 0.0 and 0.0 <= tr.no_speech_prob < 0.6


def test_model_inputs_shapes_and_masks(analysis, clip):
    x = model_inputs(analysis)
    n_seg = math.ceil(len(clip) / 48000)
    assert x["mfcc_seg"].shape == (n_seg, 300, 40)
    assert x["spec_seg"].shape == (n_seg, 300, 200)
    assert x["enc_seg"].shape == (n_seg, 150, 384)
    assert x["enc_patches"].shape[0] == x["logmel_patches"].shape[0] == x["patch_mask"].shape[0]
    assert x["words"].shape == (6, 384) and x["words_cm"].shape == (6,)
    # the segments are the frames, cut in order
    mfcc40 = F.compute_acoustic(clip).mfcc40
    assert np.array_equal(x["mfcc_seg"].reshape(-1, 40)[: len(mfcc40)], mfcc40)
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


def test_feature_digest_is_derived_from_the_parts():
    """Every part and knob that changes a feature value changes the digest: the ASR model and how
    it decodes (compute type, beam, language, encoder window), the text encoder, the optional
    pretrained parts and the utterance policy; thread counts do not."""
    from dataclasses import replace

    from app.analysis.analyzer import AnalyzerSpec
    from app.analysis.segmenter import UtterancePolicy
    from app.settings import Settings

    base = AnalyzerSpec(device="cpu")
    digest = base.feature_config().digest()
    assert digest == FeatureConfig().digest() == FeatureConfig.from_settings(Settings()).digest()
    changed = [
        replace(base, compute_type="float16"),
        replace(base, beam_size=5),
        replace(base, language="de"),
        replace(base, encoder_window="full" if base.resolved_encoder_window() == "fitted" else "fitted"),
        replace(base, utterance=UtterancePolicy(end_silence_ms=300)),
        replace(base, utterance=UtterancePolicy(max_s=10.0)),
        replace(base, max_words=50),
    ]
    digests = {s.feature_config().digest() for s in changed}
    assert digest not in digests and len(digests) == len(changed)
    assert replace(base, cpu_threads=7, device="cuda").feature_config().digest() == digest
    # "default" compute type is int8 on every device, so a GPU server keeps the shipped models' digest
    assert FeatureConfig.from_settings(Settings(device="cuda")).asr_compute_type == "int8"
    assert FeatureConfig(word_vectors="glove.txt:0123456789ab").digest() != digest
    assert FeatureConfig(speech_encoder="w2v:0123456789ab").to_dict()["speech_encoder"] == "w2v:0123456789ab"


def test_analyzer_refuses_a_config_naming_other_parts(analyzer):
    from app.analysis.analyzer import Analyzer

    with pytest.raises(ValueError, match="asr_beam_size"):
        Analyzer(analyzer.recognizer, analyzer.text_encoder, config=FeatureConfig(asr_beam_size=5))
