"""GloVe word vectors from a local text file (app.analysis.word_vectors): adf's paper-faithful words_static.

A tiny GloVe file is written by each test: parsing and lookup rules, the analyzer and model
inputs, the feature digest, a training run of adf through the CLI, and serving the trained model.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from app.analysis.analyzer import Analyzer, FeatureConfig
from app.analysis.word_vectors import WordVectors, candidates
from tests import pretrained_support as S

DIM = 6
# the words of both RAVDESS sentences except "by" (out of vocabulary on purpose)
VOCAB = ("kids", "are", "talking", "the", "door", "dogs", "sitting")


def _glove(path, words=VOCAB, dim=DIM, seed=0, header=False, newline="\n"):
    rng = np.random.default_rng(seed)
    table = {w: rng.normal(size=dim).astype(np.float32) for w in words}
    lines = [f"{len(words)} {dim}"] if header else []
    lines += [w + " " + " ".join(f"{v:.6f}" for v in vec) for w, vec in table.items()]
    path.write_text(newline.join(lines) + newline)
    return {w: np.array([float(f"{v:.6f}") for v in vec], np.float32) for w, vec in table.items()}


@pytest.fixture()
def glove(tmp_path):
    path = tmp_path / "glove.tiny.6d.txt"
    return path, _glove(path)


def test_glove_file_lookup_rules(tmp_path):
    path = tmp_path / "vectors.txt"
    table = _glove(path, words=("kids", "door", "u.s.", "Paris", "don't"), header=True, newline="\r\n")
    wv = WordVectors(path)
    assert wv.dim == DIM and len(wv) == 5  # the word2vec-style header line is skipped
    got = wv.lookup(["Kids", "door!", "U.S.", "Paris,", "don\u2019t", "unknown", "", "  "])
    expected = [table["kids"], table["door"], table["u.s."], table["Paris"], table["don't"]]
    np.testing.assert_array_equal(got[:5], np.stack(expected))
    assert got.dtype == np.float32 and not got[5:].any()  # out of vocabulary and empty words: zeros
    assert candidates("Door.") == ["door", "door.", "Door"]

    # no header; a repeated word keeps its first vector; a line with too few values reads as zeros
    plain = tmp_path / "plain.txt"
    plain.write_text("door 1 2 3\ndoor 4 5 6\nbroken 7\n")
    wv = WordVectors(plain)
    assert wv.dim == 3 and wv.lookup(["door"]).tolist() == [[1, 2, 3]] and not wv.lookup(["broken"]).any()

    for bad in ("", "\n", "justaword\n"):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(ValueError):
            WordVectors(tmp_path / "bad.txt")


def test_load_is_memoised_and_identity_follows_content(glove):
    path, _ = glove
    first = WordVectors.load(path)
    assert WordVectors.load(str(path)) is first  # indexed (and hashed) once per process
    assert first.identity.startswith("glove.tiny.6d.txt:") and first.identity == WordVectors.identity_of(path)
    _glove(path, seed=1)
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    second = WordVectors.load(path)
    assert second is not first and second.identity != first.identity


def test_analyzer_takes_words_static_from_glove(analyzer, glove, fixtures_dir):
    from app.analysis.audio import decode
    from app.analysis.inputs import model_inputs
    from app.settings import Settings

    path, table = glove
    wv = WordVectors.load(path)
    rec = S.memo_recognizer(analyzer)
    with_glove = Analyzer(rec, analyzer.text_encoder, word_vectors=wv)
    plain = Analyzer(rec, analyzer.text_encoder)
    audio = decode(fixtures_dir / "kids_angry_a01.flac").mono

    a, b = with_glove.analyze(audio), plain.analyze(audio)
    x, y = model_inputs(a), model_inputs(b)
    words = [w.word for w in a.transcript.words]
    assert [w.lower().strip("!.,") for w in words] == ["kids", "are", "talking", "by", "the", "door"]
    expected = np.stack([table.get(w.lower().strip("!.,"), np.zeros(DIM, np.float32)) for w in words])
    np.testing.assert_array_equal(x["words_static"], expected)  # "by" is not in the file: zeros
    assert y["words_static"].shape == (6, 384)  # the default: the text encoder's input embeddings
    for name in set(x) - {"words_static"}:  # nothing else changes
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)

    silence = model_inputs(with_glove.analyze(np.zeros(16000, np.float32)))
    assert silence["words_static"].shape == (1, DIM) and not silence["words_static"].any()

    # the digest names the file; the default digest is untouched; settings give the same config
    cfg = with_glove.config
    assert cfg.word_vectors == wv.identity and cfg.digest() != FeatureConfig().digest()
    assert plain.config.digest() == FeatureConfig().digest() == "e5fa9553902d4820"
    assert FeatureConfig.for_parts(glove=path) == cfg
    assert FeatureConfig.from_settings(Settings(glove_path=str(path))) == cfg
    with pytest.raises(ValueError, match="feature config"):
        Analyzer(rec, analyzer.text_encoder, config=FeatureConfig(), word_vectors=wv)


@pytest.mark.skipif(not (S.RAVDESS / "labels.csv").is_file(), reason="RAVDESS subset not present")
def test_adf_trains_with_glove_and_is_served_only_with_it(analyzer, glove, tmp_path, monkeypatch):
    from training import __main__ as cli

    path, _ = glove
    manifest = S.write_manifest(tmp_path)
    filler = Analyzer(S.memo_recognizer(analyzer), analyzer.text_encoder, word_vectors=WordVectors.load(path))
    digest = S.fill_cache(manifest, tmp_path / "cache", filler)

    def no_analysis(self):
        raise AssertionError("the CLI must find every clip in the cache filled with the same GloVe file")

    monkeypatch.setattr(cli.Context, "analyzer", no_analysis)
    tiny = dict(
        sinc_filters=8,
        sinc_kernel=33,
        conv_channels=[8, 8],
        audio_dense=[16, 16],
        text_lstm=8,
        text_filters=4,
        text_dense=[16],
        fusion_seg=8,
        fusion_dim=16,
        fusion_hidden=16,
    )
    card, report = S.train_cli("adf", manifest, tmp_path, tiny, ["--glove", str(path)])
    assert (
        card["feature_config_digest"] == report["feature_config_digest"] == digest != FeatureConfig().digest()
    )
    assert card["feature_config"]["word_vectors"] == WordVectors.load(path).identity
    assert card["config"]["word_dim"] == DIM  # the model's width follows the data (384 by default)
    spec = {i["name"]: i["shape"] for i in card["inputs"]}
    assert spec["words_static"] == ["batch", "words", DIM]

    # served when the server is configured with the same part, refused (naming it) without it
    S.assert_served_only_with(
        tmp_path, analyzer, monkeypatch, "adf", {"glove_path": str(path)}, digest, "word_vectors=glove.tiny"
    )
