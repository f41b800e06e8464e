"""Named model inputs: one Analysis -> a dict of arrays; several -> one padded batch.

Every model's ONNX graph names the inputs it reads from this one vocabulary, so the engine only
has to feed ``session.get_inputs()`` from the batch, and training builds its tensors with the very
same functions. Arrays are per utterance without a batch axis; ``collate`` pads the first axis
with zeros (masks are 1.0 for real steps, 0.0 for padding).

| name            | shape          | used by          | what                                          |
|-----------------|----------------|------------------|-----------------------------------------------|
| frames33        | (T, 33)        | cmt-awc          | MFCC-20, CQT-12, F0 at 10 ms                  |
| frames33_cm     | (T,)           | cmt-awc          | confidence of the word covering each frame    |
| frames33_mask   | (T,)           | cmt-awc          |                                               |
| words           | (W, D)         | cmt-awc, 3m-ser  | contextual vector per ASR word                |
| words_static    | (W, D)         | adf              | static vector per word (GloVe or substitute)+ |
| words_cm        | (W,)           | cmt-awc          | ASR confidence per word                       |
| words_mask      | (W,)           | all text models  |                                               |
| mfcc_seg        | (S, 300, 40)   | ca-mser          | HTK MFCC-40 per 3-s segment                   |
| spec_seg        | (S, 300, 200)  | ca-mser          | linear spectrogram per 3-s segment            |
| enc_seg         | (S, 150, E)    | ca-mser          | wav2vec2 or Whisper frames per 3-s segment+   |
| seg_mask        | (S,)           | ca-mser          |                                               |
| waveform        | (N,)           | adf              | raw 16-kHz samples (chunked inside the graph) |
| waveform_mask   | (N,)           | adf              |                                               |
| enc_patches     | (P, E)         | 3m-ser           | encoder frames mean-pooled per 0.96 s         |
| logmel_patches  | (P, 96, 64)    | 3m-ser (VGGish)  | VGGish log-mel patches                        |
| patch_mask      | (P,)           | 3m-ser           | one per 0.96-s patch (both patch kinds)       |
| encoder         | (Te, E)        | baseline         | Whisper encoder frames                        |
| encoder_cm      | (Te,)          | cmt-awc (option) | confidence of the word covering each frame    |
| encoder_mask    | (Te,)          | baseline         |                                               |

+ Pretrained parts (SPEC §2): ``words_static`` holds ``Analysis.word_vectors`` (a local GloVe file,
``app.analysis.word_vectors``) when the analyzer has one, else the text encoder's input-embedding vectors
(the GloVe substitute); ``enc_seg`` holds ``Analysis.speech_frames`` (wav2vec2 run on each 3-s
segment, ``app.analysis.speech_encoder``) when the analyzer has a speech encoder, else the Whisper encoder
frames cut into 3-s segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from app.analysis import features as F

SEGMENT_FRAMES = 300  # 3 s at 10 ms
SEGMENT_ENC_FRAMES = 150  # 3 s at 50 frames/s
ENCODER_HOP_S = 0.02  # Whisper encoder frames: 50 per second
PATCH_ENC_FRAMES = 48  # 0.96 s at 50 frames/s (one VGGish patch)


def model_inputs(analysis, max_words: int = 100) -> dict[str, np.ndarray]:
    """All named inputs for one analysed utterance (see the table above)."""
    ac, tx, tr = analysis.acoustic, analysis.text, analysis.transcript
    T = ac.frames33.shape[0]
    W = min(len(tx), max_words)
    n_seg = max(1, math.ceil(len(analysis.audio) / (F.SAMPLE_RATE * 3.0)))
    enc = tr.encoder_frames.astype(np.float32, copy=False)
    logmel = ac.logmel_patches
    patches = _pool(enc, PATCH_ENC_FRAMES, len(logmel))  # same patch grid as the VGGish log-mel
    ones = np.ones
    return {
        "frames33": ac.frames33,
        "frames33_cm": F.frame_confidence(tr.words, T),
        "frames33_mask": ones(T, np.float32),
        "words": tx.contextual[:W],
        "words_static": _static_words(analysis)[:W],
        "words_cm": tx.confidence[:W],
        "words_mask": ones(W, np.float32),
        "mfcc_seg": _segments(ac.mfcc40, SEGMENT_FRAMES, n_seg),
        "spec_seg": _segments(ac.spectrogram, SEGMENT_FRAMES, n_seg),
        "enc_seg": _enc_segments(analysis, enc, n_seg),
        "seg_mask": ones(n_seg, np.float32),
        "waveform": analysis.audio.astype(np.float32, copy=False),
        "waveform_mask": ones(len(analysis.audio), np.float32),
        "enc_patches": patches,
        "logmel_patches": logmel,
        "patch_mask": ones(len(patches), np.float32),
        "encoder": enc,
        "encoder_cm": F.frame_confidence(tr.words, len(enc), ENCODER_HOP_S),
        "encoder_mask": ones(len(enc), np.float32),
    }


def _static_words(analysis) -> np.ndarray:
    vectors = getattr(analysis, "word_vectors", None)
    return analysis.text.static if vectors is None else vectors


def _enc_segments(analysis, enc: np.ndarray, n_seg: int) -> np.ndarray:
    """(n_seg, 150, E): the speech encoder's own per-segment frames when it ran, else the Whisper
    encoder frames cut into 3-s segments."""
    frames = getattr(analysis, "speech_frames", None)
    if frames is None:
        return _segments(enc, SEGMENT_ENC_FRAMES, n_seg)
    if frames.shape[:2] != (n_seg, SEGMENT_ENC_FRAMES):
        raise ValueError(
            f"speech frames {frames.shape} do not match {n_seg} segments of {SEGMENT_ENC_FRAMES}"
        )
    return frames.astype(np.float32, copy=False)


def _segments(x: np.ndarray, length: int, n_seg: int) -> np.ndarray:
    """(T, D) -> (n_seg, length, D): consecutive 3-s segments, the last one zero-padded."""
    out = np.zeros((n_seg, length) + x.shape[1:], np.float32)
    flat = out.reshape(n_seg * length, *x.shape[1:])
    n = min(len(x), n_seg * length)
    flat[:n] = x[:n]
    return out


def _pool(x: np.ndarray, size: int, n: int) -> np.ndarray:
    """Mean-pool ``n`` consecutive blocks of ``size`` frames (a short last block is averaged as is)."""
    out = np.zeros((n, x.shape[1]), np.float32)
    for i in range(n):
        block = x[i * size : (i + 1) * size]
        if len(block):
            out[i] = block.mean(axis=0)
    return out


def collate(
    samples: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Stack per-utterance inputs into a batch, zero-padding the first axis to the longest."""
    names = list(names) if names is not None else list(samples[0])
    batch = {}
    for name in names:
        arrays = [s[name] for s in samples]
        longest = max(a.shape[0] for a in arrays)
        out = np.zeros((len(arrays), longest) + arrays[0].shape[1:], dtype=np.float32)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        batch[name] = out
    return batch
