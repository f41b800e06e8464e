"""app.analysis.inputs.INPUTS: the one registry of model inputs, and on-demand input computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from app.analysis import features as F
from app.analysis import inputs as I
from app.analysis.analyzer import Analysis
from app.analysis.asr import Transcript, Word
from app.analysis.text import TextFeatures

# the functions that compute the four acoustic features (the expensive part of model_inputs)
FEATURE_FUNCTIONS = (
    "_frames33_from",
    "_mfcc_htk40_from_frames",
    "_spectrogram_from_frames",
    "_vggish_logmel",
)
ENCODER_FAMILY = ("encoder", "encoder_cm", "enc_seg", "enc_patches", "words", "words_static", "waveform")


def _analysis(seconds: float = 4.3, n_words: int = 3, seed: int = 0) -> Analysis:
    """A synthetic analysis (no ASR run): noisy tones, a few timed words, random encoder frames."""
    rng = np.random.default_rng(seed)
    n = int(seconds * F.SAMPLE_RATE)
    t = np.arange(n) / F.SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)
    words = [Word(f"w{i}", 0.5 + i, 1.2 + i, 0.3 + 0.2 * i) for i in range(n_words)]
    encoder = rng.standard_normal((math.ceil(n / 320), 16)).astype(np.float32)
    transcript = Transcript(" ".join(w.word for w in words), "en", words, [], encoder, duration_s=seconds)
    text = TextFeatures(
        [w.word for w in words],
        rng.standard_normal((n_words, 12)).astype(np.float32),
        rng.standard_normal((n_words, 10)).astype(np.float32),
        np.array([w.confidence for w in words], np.float32),
    )
    return Analysis(audio=audio, transcript=transcript, text=text)


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return _analysis()


@pytest.fixture(scope="module")
def everything(analysis) -> dict[str, np.ndarray]:
    return I.model_inputs(analysis)


@pytest.fixture
def feature_calls(monkeypatch) -> dict[str, int]:
    """Counts calls of the acoustic feature functions (still computing them)."""
    calls = dict.fromkeys(FEATURE_FUNCTIONS, 0)
    for name in FEATURE_FUNCTIONS:
        real = getattr(F, name)

        def counted(*args, _name=name, _real=real):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(F, name, counted)
    return calls


def _declared_inputs() -> dict[tuple, tuple[str, ...]]:
    """Input names of every variant of the four models that selects inputs."""
    from training.models.adf import MODALITIES
    from training.models.ca_mser import FEATURES
    from training.models.cmt_awc import ACOUSTIC_INPUTS, VARIANTS
    from training.models.three_m_ser import AUDIO_FRONTENDS
    from training.trainer import model_input_names

    configs = [
        ("cmt-awc", dict(variant=v, acoustic=a, sa_correct_audio=c))
        for v, a, c in itertools.product(VARIANTS, ACOUSTIC_INPUTS, (True, False))
    ]
    configs += [
        ("ca-mser", dict(features=f))
        for k in range(1, len(FEATURES) + 1)
        for f in itertools.combinations(FEATURES, k)
    ]
    configs += [("adf", dict(modality=m)) for m in MODALITIES]
    configs += [("3m-ser", dict(audio=a)) for a in AUDIO_FRONTENDS]
    return {(mid, tuple(sorted(o.items()))): model_input_names(mid, 4, o) for mid, o in configs}


# --- the registry ------------------------------------------------------------------------------


def test_registry_covers_exactly_what_the_models_declare_and_each_model_reads_its_masks():
    declared = _declared_inputs()
    assert set().union(*declared.values()) == set(I.INPUTS)
    for key, names in declared.items():
        assert set(I.inputs_for(names)) == set(names), key


def test_specs_are_consistent():
    for name, spec in I.INPUTS.items():
        assert spec.name == name
        assert isinstance(spec.axes[0], str) and spec.sequence == spec.axes[0]
        assert spec.rank == len(spec.axes) + 1
        assert spec.width == (spec.axes[-1] if len(spec.axes) > 1 else None)
        assert spec.dtype == np.float32
        if spec.mask is not None:
            mask = I.INPUTS[spec.mask]
            assert mask.mask is None and len(mask.axes) == 1 and spec.mask in I.MASKS
            # logmel_patches keeps the axis name shipped graphs have; its length is patch_mask's
            assert mask.sequence == spec.sequence or name == "logmel_patches"
        # what training standardises or perturbs is a feature, never a mask or a confidence
        if spec.continuous or spec.augment == "frames":
            assert spec.width is not None and spec.mask is not None
        assert spec.augment in (None, "frames", "waveform")
        assert spec.real_rows is None or len(spec.axes) == 3
    assert {n for n, s in I.INPUTS.items() if s.augment == "frames"} <= {
        n for n, s in I.INPUTS.items() if s.continuous
    }


def test_module_docstring_table_is_the_registry():
    assert I.table() in I.__doc__


def test_training_and_export_derive_from_the_registry():
    from training.augment import FRAME_INPUTS, WAVEFORM_INPUTS
    from training.export import dynamic_axes
    from training.trainer import CONTINUOUS_INPUTS

    assert set(CONTINUOUS_INPUTS) == {n for n, s in I.INPUTS.items() if s.continuous}
    assert set(FRAME_INPUTS) == {
        "frames33", "mfcc_seg", "spec_seg", "enc_seg", "enc_patches", "logmel_patches", "encoder"
    }  # fmt: skip
    assert WAVEFORM_INPUTS == ("waveform",)
    axes = dynamic_axes(["frames33", "words_mask", "logmel_patches", "patch_mask"])
    assert axes["frames33"] == {0: "batch", 1: "frames"}
    assert axes["words_mask"] == {0: "batch", 1: "words"}
    assert axes["logmel_patches"][1] == "logmel_patches" and axes["patch_mask"][1] == "patches"
    assert axes["probabilities"] == {0: "batch"}


def test_inputs_for_adds_masks_in_registry_order_and_refuses_unknown_names():
    assert I.inputs_for(["words", "frames33"]) == ("frames33", "frames33_mask", "words", "words_mask")
    assert I.inputs_for(["logmel_patches", "enc_patches"]) == ("enc_patches", "logmel_patches", "patch_mask")
    assert I.inputs_for([]) == ()
    with pytest.raises(KeyError, match="nonsense"):
        I.inputs_for(["words", "nonsense"])


# --- model_inputs --------------------------------------------------------------------------------


def test_arrays_match_their_specs(everything):
    assert list(everything) == list(I.INPUTS)
    for name, x in everything.items():
        spec = I.INPUTS[name]
        assert x.dtype == spec.dtype and x.ndim == len(spec.axes), name
        for size, axis in zip(x.shape[1:], spec.axes[1:], strict=True):
            assert isinstance(axis, str) or size == axis, name
        if spec.mask is not None:
            assert len(x) == len(everything[spec.mask]), name
        assert np.isfinite(x).all(), name
    for name in I.MASKS:
        assert np.all(everything[name] == 1.0)


@pytest.mark.parametrize(
    "names",
    [
        ["frames33"],
        ["words_mask", "frames33_cm"],
        ["mfcc_seg", "seg_mask"],
        ["spec_seg"],
        ["logmel_patches", "enc_patches", "patch_mask"],
        list(ENCODER_FAMILY),
        list(reversed(I.INPUTS)),
    ],
)
def test_requested_inputs_only_and_equal_to_the_all_inputs_call(analysis, everything, names):
    x = I.model_inputs(analysis, names=names)
    assert list(x) == names
    for n in names:
        assert x[n].dtype == everything[n].dtype and np.array_equal(x[n], everything[n]), n
        assert np.array_equal(I.INPUTS[n].compute(analysis), everything[n]), n


def test_unknown_name_is_refused(analysis):
    with pytest.raises(KeyError, match="nonsense"):
        I.model_inputs(analysis, names=["words", "nonsense"])


def test_encoder_family_computes_no_acoustic_feature(analysis, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an acoustic feature was computed")

    for name in ("_frames", "_magnitude", "_preemphasis", *FEATURE_FUNCTIONS):
        monkeypatch.setattr(F, name, fail)
    names = I.inputs_for(ENCODER_FAMILY)
    assert "patch_mask" in names and "seg_mask" in names
    x = I.model_inputs(analysis, names=names)
    assert set(x) == set(names)
    # and the shared counts did not need the features either
    assert len(x["enc_patches"]) == len(x["patch_mask"]) and len(x["enc_seg"]) == 2
    with pytest.raises(AssertionError, match="acoustic feature"):
        I.model_inputs(analysis, names=["frames33"])


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["frames33", "frames33_cm", "frames33_mask"], {"_frames33_from": 1}),
        (["mfcc_seg", "seg_mask"], {"_mfcc_htk40_from_frames": 1}),
        (["spec_seg"], {"_spectrogram_from_frames": 1}),
        (["logmel_patches", "patch_mask"], {"_vggish_logmel": 1}),
        (None, dict.fromkeys(FEATURE_FUNCTIONS, 1)),  # all of them, each computed once
    ],
)
def test_only_the_features_the_inputs_need_are_computed_once(analysis, feature_calls, names, expected):
    I.model_inputs(analysis, names=names)
    assert feature_calls == {**dict.fromkeys(FEATURE_FUNCTIONS, 0), **expected}


def test_acoustic_already_in_the_analysis_is_used_as_is(everything, feature_calls):
    a = _analysis()
    a.acoustic = F.compute_acoustic(a.audio)
    for k in feature_calls:
        feature_calls[k] = 0
    x = I.model_inputs(a)
    assert not any(feature_calls.values())
    assert all(np.array_equal(x[n], everything[n]) for n in I.INPUTS)


def test_max_words_and_short_or_silent_audio():
    a = _analysis(seconds=0.3, n_words=3)
    x = I.model_inputs(a, names=["words", "words_cm", "words_mask", "patch_mask"], max_words=2)
    assert x["words"].shape == (2, 12) and x["words_mask"].tolist() == [1.0, 1.0]
    assert len(x["patch_mask"]) == 1 == len(I.model_inputs(a, names=["logmel_patches"])["logmel_patches"])
    silent = _analysis(seconds=1.0)
    silent.audio[:] = 0.0
    assert all(np.isfinite(v).all() for v in I.model_inputs(silent).values())
