"""Per-session adaptation: causal running normalisation of Whisper encoder frames, shrunk to the
population (issue 11 item 5). Pure numpy; no labels, no future audio.

Notation, per stream channel: utterance ``i`` has encoder frames ``X_i`` (T_i, D) and frame mean
``m_i = mean_t X_i[t]``. The population ``mu_pop`` is the mean of the ``m_i`` of the utterances the
emotion models were trained on (``PopulationStats``, ``adaptation.json`` beside the models). Before
utterance ``j`` the channel has seen ``n = j`` final utterances and keeps ``S = sum_{i<j} m_i``:

    mu_s(n)  = (S + tau * mu_pop) / (n + tau)          # shrinkage: tau utterances of prior weight
    shift    = mu_pop - mu_s(n)
    X_j'     = X_j + shift = X_j - mu_s(n) + mu_pop

So ``n = 0`` gives ``shift = 0`` exactly (the identity), and ``n >> tau`` removes the speaker's and
channel's own mean, replacing it with the population's. Utterance ``j`` is normalised with the stats
of utterances ``< j`` only; its raw ``m_j`` joins ``S`` after its result is final (``SessionAdapter
.observe``). Every model input derived from encoder frames (``encoder``, ``enc_patches`` and the
Whisper ``enc_seg``: ``app.analysis.inputs``) is computed from the shifted frames, before pooling or
padding, so the shift is exact for every model.

Why the mean only: a mean shift is what a new microphone, line or voice mostly does to encoder
frames; a per-dimension scale from a handful of utterances is too noisy to estimate (and a caller
who stays in one emotion would have that emotion's spread removed too).

Thread-safety: ``PopulationStats`` is immutable; a ``SessionAdapter`` belongs to one stream (its
event loop) and is not locked. The functions are pure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "emotion-adaptation/1"
FILE_NAME = "adaptation.json"
DEFAULT_TAU = 3.0


# ---------------------------------------------------------------------------------- pure math


def frame_mean(frames: np.ndarray) -> np.ndarray:
    """``m_i``: the (D,) mean of one utterance's (T, D) encoder frames, in float64."""
    frames = np.asarray(frames)
    if frames.ndim != 2 or len(frames) == 0:
        raise ValueError(f"expected (T, D) frames with T >= 1, got shape {frames.shape}")
    return frames.astype(np.float64).mean(axis=0)


def session_mean(total: np.ndarray, n: int, mu_pop: np.ndarray, tau: float) -> np.ndarray:
    """``mu_s = (S + tau * mu_pop) / (n + tau)``; with ``tau = 0`` and ``n = 0`` it is ``mu_pop``."""
    if n < 0 or tau < 0:
        raise ValueError(f"n and tau must be >= 0, got n={n}, tau={tau}")
    if n == 0:
        return np.asarray(mu_pop, np.float64)
    return (np.asarray(total, np.float64) + tau * np.asarray(mu_pop, np.float64)) / (n + tau)


def shift_for(total: np.ndarray, n: int, mu_pop: np.ndarray, tau: float) -> np.ndarray:
    """The (D,) float32 vector added to every frame of the next utterance: ``mu_pop - mu_s``
    (exactly zero when ``n = 0``)."""
    if n == 0:
        return np.zeros(len(mu_pop), np.float32)
    return (np.asarray(mu_pop, np.float64) - session_mean(total, n, mu_pop, tau)).astype(np.float32)


def history_shift(means: np.ndarray | list[np.ndarray], mu_pop: np.ndarray, tau: float) -> np.ndarray:
    """``shift_for`` from a list of past utterance means (the offline evaluation's form)."""
    arr = np.asarray(means, np.float64).reshape(-1, len(mu_pop))
    return shift_for(arr.sum(axis=0), len(arr), mu_pop, tau)


# ---------------------------------------------------------------------------- population stats


@dataclass(frozen=True)
class PopulationStats:
    """``mu_pop`` (mean of per-utterance encoder-frame means over the training utterances), its
    width, how many utterances it averages, and the shrinkage strength ``tau`` (in utterances).

    ``asr_model`` / ``feature_config_digest`` say which frames it describes (the server refuses a
    file made for another ASR model); ``source`` is free-form provenance."""

    mean: tuple[float, ...]
    n: int
    tau: float = DEFAULT_TAU
    asr_model: str = ""
    feature_config_digest: str = ""
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.mean or not all(math.isfinite(v) for v in self.mean):
            raise ValueError("population mean must be a non-empty vector of finite numbers")
        if self.n < 1 or not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"need n >= 1 and a finite tau >= 0, got n={self.n}, tau={self.tau}")

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def vector(self) -> np.ndarray:
        return np.asarray(self.mean, np.float64)

    @classmethod
    def from_means(cls, means: np.ndarray, tau: float = DEFAULT_TAU, **extra: Any) -> PopulationStats:
        """From (N, D) per-utterance frame means."""
        means = np.asarray(means, np.float64)
        if means.ndim != 2 or len(means) == 0:
            raise ValueError(f"expected (N, D) utterance means, got shape {means.shape}")
        return cls(mean=tuple(float(v) for v in means.mean(axis=0)), n=len(means), tau=float(tau), **extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "whisper encoder frames: mean of per-utterance frame means",
            "dim": self.dim,
            "n": self.n,
            "tau": self.tau,
            "asr_model": self.asr_model,
            "feature_config_digest": self.feature_config_digest,
            "source": self.source,
            "mean": [round(v, 7) for v in self.mean],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PopulationStats:
        """Raises ``FileNotFoundError`` when absent, ``ValueError`` when malformed."""
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        mean = tuple(float(v) for v in raw["mean"])
        if int(raw.get("dim", len(mean))) != len(mean):
            raise ValueError(f"{path}: dim {raw.get('dim')} but {len(mean)} mean values")
        return cls(
            mean=mean,
            n=int(raw["n"]),
            tau=float(raw.get("tau", DEFAULT_TAU)),
            asr_model=str(raw.get("asr_model", "")),
            feature_config_digest=str(raw.get("feature_config_digest", "")),
            source=dict(raw.get("source") or {}),
        )


# ----------------------------------------------------------------------------- session state


@dataclass(frozen=True)
class FrameShift:
    """What the next utterance is normalised with: the shift and how many utterances made it."""

    shift: np.ndarray  # (D,) float32, added to every encoder frame
    utterances: int


class SessionAdapter:
    """One stream channel's state: ``n`` final utterances and the sum ``S`` of their frame means."""

    def __init__(self, population: PopulationStats):
        self.population = population
        self._mu_pop = population.vector
        self.n = 0
        self.total = np.zeros(population.dim, np.float64)

    def next_shift(self) -> FrameShift:
        """The shift for the next utterance, from the utterances observed so far only."""
        return FrameShift(shift_for(self.total, self.n, self._mu_pop, self.population.tau), self.n)

    def observe(self, mean: np.ndarray) -> None:
        """Add a FINAL utterance's raw (unshifted) frame mean ``m_i``."""
        mean = np.asarray(mean, np.float64).reshape(-1)
        if mean.shape != (self.population.dim,):
            raise ValueError(f"utterance mean has {mean.size} values, the population {self.population.dim}")
        if not np.isfinite(mean).all():
            return  # one broken utterance must not poison the rest of the session
        self.total = self.total + mean
        self.n += 1
