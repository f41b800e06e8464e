"""Baseline row: logistic regression on mean+std pooled Whisper encoder frames.

Same folds and report format as the neural models. The regularisation strength ``C`` is chosen
per fold on the inner-validation speakers (balanced accuracy), then refitted on train + val.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.analysis.analyzer import FeatureConfig
from training import metrics as M
from training.cache import Sample
from training.protocols import Fold
from training.trainer import CVResult, evaluate_oof, oof_block, protocol_block, run_dir, write_report

MODEL_ID = "baseline"
VARIANT = "logreg-encoder"
C_GRID = (0.01, 0.1, 1.0)
INPUT_NAMES = ("encoder", "encoder_mask")


def _frames(s: Sample) -> np.ndarray:
    return s.inputs["encoder"][s.inputs["encoder_mask"] > 0].astype(np.float64)


def speaker_moments(samples: Sequence[Sample]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per speaker: mean and std of the encoder frames of all that speaker's clips (no labels)."""
    out = {}
    for speaker in sorted({s.speaker for s in samples}):
        x = np.concatenate([_frames(s) for s in samples if s.speaker == speaker])
        out[speaker] = (x.mean(0), x.std(0) + 1e-6)
    return out


def pooled_encoder(samples: Sequence[Sample], speaker_norm: bool = False) -> np.ndarray:
    """(n, 2E): mean and standard deviation of each clip's encoder frames (real frames only).

    ``speaker_norm`` first standardises every frame with its speaker's moments over all of that
    speaker's clips given here, test speakers included: a transductive analysis (it uses the
    unlabelled test clips of a speaker together), reported beside the baseline, never shipped."""
    moments = speaker_moments(samples) if speaker_norm else {}
    rows = []
    for s in samples:
        x = _frames(s)
        if speaker_norm:
            mean, std = moments[s.speaker]
            x = (x - mean) / std
        rows.append(np.concatenate([x.mean(0), x.std(0)]))
    return np.stack(rows)


def _classifier(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
    )


def _proba(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with columns for every class, also those absent from training."""
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    return out


@dataclass
class FoldFit:
    """One fold's classifiers: ``final`` (train + val speakers, C chosen on val) and ``train_only``
    (the training speakers with that C, never fitted on val: what may score the val speakers)."""

    final: Any
    train_only: Any
    c: float


def fit_fold(
    x: np.ndarray,
    y: np.ndarray,
    cx: dict[str, np.ndarray],
    f: Fold,
    n: int,
    seed: int = 0,
    train_conditions: Sequence[str] = (),
) -> FoldFit:
    """Choose C on the fold's inner-validation speakers, then refit on train + val."""
    tr, va = (np.array(ix, np.int64) for ix in (f.train, f.val))
    # training rows: the clean clips plus, per train condition, the same speakers' clips under it
    xtr = np.concatenate([x[tr], *(cx[c][tr] for c in train_conditions)])
    ytr = np.concatenate([y[tr]] * (1 + len(train_conditions)))
    xva = np.concatenate([x[va], *(cx[c][va] for c in train_conditions)])
    yva = np.concatenate([y[va]] * (1 + len(train_conditions)))
    best_c, best_score, best_clf = C_GRID[0], -1.0, None
    if len(va):
        for c in C_GRID:
            clf = _classifier(c, seed).fit(xtr, ytr)
            score = M.balanced_accuracy(yva, _proba(clf, xva, n).argmax(1), n)
            if score > best_score:
                best_c, best_score, best_clf = c, score, clf
    final = _classifier(best_c, seed).fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    return FoldFit(final, best_clf if best_clf is not None else final, best_c)


def cross_validate_baseline(
    samples: Sequence[Sample],
    classes: Sequence[str],
    folds: Sequence[Fold],
    seed: int = 0,
    protocol: str = "speaker-kfold",
    dataset: dict | None = None,
    out_root: str | Path = "runs",
    feature_config: FeatureConfig | None = None,
    speaker_norm: bool = False,
    conditions: dict[str, Sequence[Sample]] | None = None,
    train_conditions: Sequence[str] = (),
) -> CVResult:
    """``conditions``/``train_conditions`` as in ``training.trainer.cross_validate``."""
    from training.trainer import add_conditions

    t0 = time.perf_counter()
    fc = feature_config or FeatureConfig()
    n = len(classes)
    conditions = dict(conditions or {})
    x = pooled_encoder(samples, speaker_norm)
    cx = {name: pooled_encoder(other, speaker_norm) for name, other in conditions.items()}
    y = np.array([s.label for s in samples])
    probs = np.zeros((len(samples), n))
    cond_probs = {name: np.zeros((len(samples), n)) for name in conditions}
    fold_of = np.full(len(samples), -1)
    chosen, seconds = [], []
    for f in folds:
        tf = time.perf_counter()
        te = np.array(f.test, np.int64)
        fitted = fit_fold(x, y, cx, f, n, seed, train_conditions)
        clf, best_c = fitted.final, fitted.c
        probs[te] = _proba(clf, x[te], n)
        for name in conditions:
            cond_probs[name][te] = _proba(clf, cx[name][te], n)
        fold_of[te] = f.index
        chosen.append(best_c)
        seconds.append(time.perf_counter() - tf)
    overall, per_fold = evaluate_oof(samples, probs, folds, classes)
    for pf, c, s in zip(per_fold, chosen, seconds, strict=True):
        pf.update(C=c, train_seconds=round(s, 2))
    report = {
        "model": MODEL_ID,
        "variant": VARIANT + ("-speaker-norm" if speaker_norm else ""),
        "config": {
            "features": "mean+std of Whisper encoder frames",
            "speaker_norm": (
                "frames standardised per speaker over all of its clips (transductive)"
                if speaker_norm
                else "none"
            ),
            "C_grid": list(C_GRID),
            "class_weight": "balanced",
        },
        "overrides": {},
        "train_settings": {"seed": seed},
        "classes": list(classes),
        "dataset": dataset or {},
        "feature_config": fc.to_dict(),
        "feature_config_digest": fc.digest(),
        "protocol": protocol_block(protocol, folds, seed),
        "metrics": overall,
        "folds": per_fold,
        "best_epochs": [],
        "train_seconds": round(time.perf_counter() - t0, 2),
        "device": "cpu",
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "oof": oof_block(samples, probs, fold_of, classes),
    }
    add_conditions(report, samples, cond_probs, folds, classes, train_conditions)
    path = write_report(report, run_dir(out_root, MODEL_ID, VARIANT), classes)
    return CVResult(report, path, probs, [])
