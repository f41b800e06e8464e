"""Feature cache: every clip goes through ``app.analysis.analyzer.Analyzer.analyze`` exactly once.

Layout: ``<root>/<FeatureConfig digest>/<sha256 of the decoded 16-kHz float32 audio>.npz`` holds
``app.analysis.inputs.model_inputs(analysis)``; the ``.json`` beside it holds the transcript (text and
words with start/end/confidence), the duration and the timings. Keys depend on the audio content,
not the file name, so a renamed or duplicated file is a cache hit; a change of any feature knob
changes the digest and therefore the directory. Files are written atomically (temp + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.analysis.analyzer import FeatureConfig
from app.analysis.audio import decode
from app.analysis.inputs import model_inputs
from training.data import Clip

DEFAULT_ROOT = Path("cache")


@dataclass
class Sample:
    """One cached clip, ready for training: its clip record, class index and named inputs."""

    clip: Clip
    label: int
    key: str
    inputs: dict[str, np.ndarray]
    transcript: dict
    duration_s: float

    @property
    def path(self) -> str:
        """Unique per sample (``Clip.id``): a recording with two utterances gives two samples."""
        return self.clip.id

    @property
    def speaker(self) -> str:
        return self.clip.speaker


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    analyze_ms: dict[str, float] = field(default_factory=dict)


def audio_key(audio: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()


def transcript_json(transcript) -> dict:
    return {
        "text": transcript.text,
        "language": transcript.language,
        "words": [
            {"word": w.word, "start": w.start, "end": w.end, "confidence": round(float(w.confidence), 6)}
            for w in transcript.words
        ],
    }


class FeatureCache:
    def __init__(self, root: str | Path = DEFAULT_ROOT, config: FeatureConfig | None = None):
        self.config = config or FeatureConfig()
        self.digest = self.config.digest()
        self.dir = Path(root) / self.digest

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npz", self.dir / f"{key}.json"

    def has(self, key: str) -> bool:
        npz, meta = self.paths(key)
        return npz.is_file() and meta.is_file()

    def read(self, key: str, names: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        npz_path, meta_path = self.paths(key)
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path) as npz:
            wanted = npz.files if names is None else list(names)
            missing = [n for n in wanted if n not in npz.files]
            if missing:
                raise KeyError(f"cache entry {key[:12]} lacks input(s) {missing}; clear {self.dir}")
            inputs = {n: npz[n] for n in wanted}
        return inputs, meta

    def write(self, key: str, inputs: dict[str, np.ndarray], meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        npz_path, meta_path = self.paths(key)
        # numpy's stub also checks a **dict against savez's `allow_pickle: bool` keyword
        _atomic_write(npz_path, lambda fh: np.savez(fh, **inputs), binary=True)  # type: ignore[arg-type]
        _atomic_write(meta_path, lambda fh: json.dump(meta, fh, indent=1), binary=False)


def clip_audio(clip: Clip, condition: str = "clean", condition_seed: int = 0) -> np.ndarray:
    """The 16-kHz mono audio of a clip: its utterance span when it has one, heard under
    ``condition`` (``training.conditions``: "clean" = as recorded, "call" = through a phone call)."""
    from training.conditions import apply_condition

    audio = decode(clip.path).mono
    audio = audio if clip.span is None else audio[clip.span[0] : clip.span[1]]
    return apply_condition(audio, condition, condition_seed)


@dataclass
class SplitStats:
    recordings: int = 0
    utterances: int = 0
    no_speech: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "recordings": self.recordings,
            "utterances": self.utterances,
            "recordings_without_speech": len(self.no_speech),
            "recordings_with_several_utterances": len(self.split),
        }


def utterance_clips(
    clips: Sequence[Clip], config: FeatureConfig, root: str | Path = DEFAULT_ROOT
) -> tuple[list[Clip], SplitStats]:
    """Every utterance of every recording as its own clip, cut by ``app.analysis.segmenter`` with
    the config's policy: exactly the cut ``/v1/predict`` and streaming make, so the models train on
    what they serve. A recording without speech (by that policy) gives no clip; one with several
    utterances gives several, all with its label and speaker. Spans are remembered in
    ``<root>/<digest>/spans.json`` (keyed by path, size and mtime)."""
    from dataclasses import replace

    from app.analysis.segmenter import split_utterances

    index_path = Path(root) / config.digest() / "spans.json"
    index: dict[str, list[list[int]]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    stats, out, dirty = SplitStats(), [], False
    for clip in clips:
        st = os.stat(clip.path)
        key = f"{clip.path}|{st.st_size}|{st.st_mtime_ns}"
        if key not in index:
            index[key] = [
                [s.start, s.end] for s in split_utterances(decode(clip.path).mono, config.utterance)
            ]
            dirty = True
        spans = index[key]
        stats.recordings += 1
        stats.utterances += len(spans)
        if not spans:
            stats.no_speech.append(clip.path)
        elif len(spans) > 1:
            stats.split.append(clip.path)
        out += [replace(clip, span=(a, b), utterance=k) for k, (a, b) in enumerate(spans)]
    if dirty:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(index_path, lambda fh: json.dump(index, fh), binary=False)
    return out, stats


def _atomic_write(path: Path, writer: Callable, binary: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            writer(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


AnalyzerSource = Callable[[], object] | object | None


class _LazyAnalyzer:
    """Builds the Analyzer (ASR + text encoder) only when a clip is not cached."""

    def __init__(self, source: AnalyzerSource, config: FeatureConfig):
        self._source, self._config, self._analyzer = source, config, None

    def get(self):
        if self._analyzer is None:
            if self._source is None:
                from app.analysis.analyzer import Analyzer

                self._analyzer = Analyzer(config=self._config)
            elif hasattr(self._source, "analyze"):
                self._analyzer = self._source
            else:
                self._analyzer = self._source()
            config = getattr(self._analyzer, "config", None)
            if config is not None and config.digest() != self._config.digest():
                raise ValueError(
                    f"the analyzer computes features {config.digest()}, the cache holds {self._config.digest()}"
                )
        return self._analyzer


def prepare(
    clips: Sequence[Clip],
    classes: Sequence[str],
    cache: FeatureCache,
    names: Iterable[str] | None = None,
    analyzer: AnalyzerSource = None,
    progress: bool = True,
    stats: CacheStats | None = None,
    condition: str = "clean",
    condition_seed: int = 0,
) -> list[Sample]:
    """Fill the cache for ``clips`` (analysing only the misses) and load them.

    ``names``: the inputs to keep in memory (None = all; an empty tuple loads nothing but still
    fills the cache). ``analyzer``: an ``Analyzer``, a factory returning one, or None for the
    default one, built lazily on the first miss -- a fully cached run never loads ASR.
    ``condition``/``condition_seed``: analyse each clip as heard under that condition
    (``clip_audio``); the audio is the cache key, so a condition's entries share the digest's
    directory with the clean ones and the samples keep their clips (ids, speakers, labels).
    """
    from tqdm import tqdm

    stats = stats if stats is not None else CacheStats()
    lazy = _LazyAnalyzer(analyzer, cache.config)
    names = None if names is None else tuple(names)
    samples = []
    t0 = time.perf_counter()
    desc = f"features [{cache.digest}]" + ("" if condition == "clean" else f" {condition}")
    bar = tqdm(clips, desc=desc, unit="clip", disable=not progress, leave=False)
    for clip in bar:
        audio = clip_audio(clip, condition, condition_seed)
        key = audio_key(audio)
        if cache.has(key):
            stats.hits += 1
        else:
            stats.misses += 1
            analysis = lazy.get().analyze(audio)
            for k, v in analysis.timing_ms.items():
                stats.analyze_ms[k] = stats.analyze_ms.get(k, 0.0) + float(v)
            written = {
                "key": key,
                "path": clip.id,
                "duration_s": len(audio) / cache.config.sample_rate,
                "feature_config_digest": cache.digest,
                "condition": condition if condition == "clean" else f"{condition}:{condition_seed}",
                "transcript": transcript_json(analysis.transcript),
                "timing_ms": {k: round(float(v), 2) for k, v in analysis.timing_ms.items()},
            }
            cache.write(key, model_inputs(analysis, max_words=cache.config.max_words), written)
        bar.set_postfix(hits=stats.hits, misses=stats.misses, refresh=False)
        if names is not None and not names:
            continue
        inputs, meta = cache.read(key, names)
        samples.append(
            Sample(
                clip,
                list(classes).index(clip.label),
                key,
                inputs,
                meta["transcript"],
                float(meta["duration_s"]),
            )
        )
    stats.seconds += time.perf_counter() - t0
    return samples
