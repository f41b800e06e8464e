"""Speaker-independent evaluation protocols.

Every fold holds out whole speakers (or sessions) for testing and carves an inner validation
split of *training* speakers for early stopping and best-epoch selection, so the test fold never
influences training. All splits are deterministic functions of the clip list and the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from training.data import Clip

PROTOCOLS = ("speaker-kfold", "loso", "loso-session")


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[int, ...]  # indices into the clip list
    val: tuple[int, ...]
    test: tuple[int, ...]
    test_speakers: tuple[str, ...]
    val_speakers: tuple[str, ...]
    test_groups: tuple[str, ...] = ()

    def describe(self) -> dict:
        d = asdict(self)
        for key in ("train", "val", "test"):
            d[f"n_{key}"] = len(d.pop(key))
        return d


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


def _pick_val_speakers(speakers: Sequence[str], n_val: int, seed: int, fold: int) -> list[str]:
    """``n_val`` speakers drawn from ``speakers`` (the training speakers), deterministically."""
    pool = sorted(set(speakers))
    n_val = min(n_val, len(pool) - 1) if len(pool) > 1 else 0
    if n_val <= 0:
        return []
    picked = _rng(seed, 1, fold + 1).choice(len(pool), size=n_val, replace=False)
    return sorted(pool[i] for i in picked)


def _make_fold(index: int, clips: Sequence[Clip], test_speakers: set[str], n_val: int, seed: int) -> Fold:
    train_speakers = sorted({c.speaker for c in clips} - test_speakers)
    val_speakers = set(_pick_val_speakers(train_speakers, n_val, seed, index))
    train, val, test = [], [], []
    for i, c in enumerate(clips):
        if c.speaker in test_speakers:
            test.append(i)
        elif c.speaker in val_speakers:
            val.append(i)
        else:
            train.append(i)
    groups = sorted({clips[i].group for i in test})
    return Fold(
        index,
        tuple(train),
        tuple(val),
        tuple(test),
        tuple(sorted(test_speakers)),
        tuple(sorted(val_speakers)),
        tuple(groups),
    )


def speaker_kfold(clips: Sequence[Clip], k: int, seed: int = 0, n_val: int = 2) -> list[Fold]:
    """k folds of whole speakers: speakers are shuffled by ``seed`` and dealt into k folds whose
    sizes differ by at most one speaker."""
    speakers = sorted({c.speaker for c in clips})
    if not 2 <= k <= len(speakers):
        raise ValueError(f"speaker k-fold needs 2 <= k <= {len(speakers)} speakers, got k={k}")
    order = [speakers[i] for i in _rng(seed, 0).permutation(len(speakers))]
    chunks = np.array_split(np.arange(len(order)), k)
    return [_make_fold(f, clips, {order[i] for i in chunk}, n_val, seed) for f, chunk in enumerate(chunks)]


def leave_one_speaker_out(clips: Sequence[Clip], seed: int = 0, n_val: int = 2) -> list[Fold]:
    speakers = sorted({c.speaker for c in clips})
    return [_make_fold(f, clips, {s}, n_val, seed) for f, s in enumerate(speakers)]


def leave_one_session_out(clips: Sequence[Clip], seed: int = 0, n_val: int = 2) -> list[Fold]:
    """One fold per group (IEMOCAP session): all speakers of the session are held out together."""
    groups = sorted({c.group for c in clips})
    folds = []
    for f, g in enumerate(groups):
        held = {c.speaker for c in clips if c.group == g}
        folds.append(_make_fold(f, clips, held, n_val, seed))
    return folds


def make_folds(clips: Sequence[Clip], protocol: str, k: int = 6, seed: int = 0, n_val: int = 2) -> list[Fold]:
    if protocol == "speaker-kfold":
        return speaker_kfold(clips, k, seed, n_val)
    if protocol == "loso":
        return leave_one_speaker_out(clips, seed, n_val)
    if protocol == "loso-session":
        return leave_one_session_out(clips, seed, n_val)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def final_split(clips: Sequence[Clip], seed: int = 0, n_val: int = 2) -> Fold:
    """No test fold: every speaker trains except ``n_val`` inner-validation speakers
    (used to choose the epoch count of the shipped model)."""
    return _make_fold(-1, clips, set(), n_val, seed)
