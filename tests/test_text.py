"""app.analysis.text: word vectors from the bundled ONNX MiniLM, empty transcripts, parity with torch."""

from __future__ import annotations

import numpy as np
import pytest

from app.analysis.text import TextEncoder

WORDS = ["Kids", "are", "talking", "by", "the", "door!"]


@pytest.fixture(scope="module")
def encoder(analyzer):
    return analyzer.text_encoder


def test_one_vector_per_word(encoder):
    f = encoder.encode(WORDS, [0.4, 1, 1, 1, 1, 0.9])
    assert f.contextual.shape == f.static.shape == (6, 384)
    assert f.confidence.tolist() == pytest.approx([0.4, 1, 1, 1, 1, 0.9])
    assert np.isfinite(f.contextual).all() and not f.is_empty
    # context matters: the same word in two sentences gets two different contextual vectors
    g = encoder.encode(["Dogs", "are", "sitting", "by", "the", "door"])
    assert not np.allclose(f.contextual[1], g.contextual[1], atol=1e-3)
    assert np.allclose(f.static[1], g.static[1], atol=1e-6)  # ...but the same static one


def test_empty_transcript_is_a_single_zero_word(encoder):
    for words in ([], [" "]):
        f = encoder.encode(words)
        assert f.is_empty and len(f) == 1
        assert not f.contextual.any() and f.confidence.tolist() == [0.0]


def test_long_transcripts_are_split_not_truncated(encoder):
    words = ["talking"] * 400
    f = encoder.encode(words)
    assert f.contextual.shape == (400, 384) and np.abs(f.contextual[-1]).sum() > 0


def test_int8_onnx_matches_the_float_model():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from training.text_encoder_export import default_model_dir

    enc = TextEncoder()
    model = transformers.AutoModel.from_pretrained(str(default_model_dir()), local_files_only=True).eval()
    encoding = enc.tokenizer.encode(WORDS, is_pretokenized=True)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([encoding.ids])).last_hidden_state[0].numpy()
    ids = np.array(encoding.word_ids)
    reference = np.stack([hidden[ids == i].mean(0) for i in range(len(WORDS))])
    ours = enc.encode(WORDS).contextual
    cos = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > 0.98, cos


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        TextEncoder(tmp_path)
