"""Corpora -> a flat list of labelled clips.

Three layouts are read (SPEC §4): the RAVDESS subset shipped in ``shared/data`` (``labels.csv``),
the IEMOCAP release tree, and a generic manifest CSV ``path,label,speaker[,text][,group]``.
Loaders return clips with *canonical* emotion names (``neutral``, ``calm``, ``happy``, ``sad``,
``angry``, ``fearful``, ``disgust``, ``surprised``, ``frustrated``, ...); ``apply_label_set`` then
maps them onto a class list (``4class`` or ``8class``) and drops the rest.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

DATASETS = ("ravdess", "iemocap", "manifest")

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "4class": ("neutral", "happy", "sad", "angry"),
    "8class": ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
}

# canonical name -> class name, per label set (anything absent is dropped)
LABEL_MAPS: dict[str, dict[str, str]] = {
    "4class": {"neutral": "neutral", "calm": "neutral", "happy": "happy", "sad": "sad", "angry": "angry"},
    "8class": {name: name for name in LABEL_SETS["8class"]},
}

# raw spellings (IEMOCAP codes, common synonyms) -> canonical name; None = unusable label
ALIASES: dict[str, str | None] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "happy",  # IEMOCAP convention: excited merges into happy
    "excited": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sad": "sad",
    "sadness": "sad",
    "ang": "angry",
    "anger": "angry",
    "fea": "fearful",
    "fear": "fearful",
    "dis": "disgust",
    "disgusted": "disgust",
    "sur": "surprised",
    "surprise": "surprised",
    "fru": "frustrated",
    "xxx": None,
    "oth": None,
}


def canonical_label(raw: str) -> str | None:
    """Normalise one raw label (case-insensitive); None when the label carries no emotion."""
    key = raw.strip().lower()
    return ALIASES.get(key, key) if key else None


@dataclass
class Clip:
    """One labelled utterance. ``group`` is the unit of session-level protocols (IEMOCAP session)."""

    path: str  # absolute path of the audio file
    label: str
    speaker: str
    text: str = ""
    group: str = ""
    extra: dict = field(default_factory=dict)
    # samples [start, end) of the recording at 16 kHz: one utterance of it (``training.cache.
    # utterance_clips``), as the server would cut it; None = the whole recording
    span: tuple[int, int] | None = None
    utterance: int = 0  # index of the span within its recording

    @property
    def id(self) -> str:
        """Unique per utterance: the path, with ``#k`` for the second and later utterances."""
        return self.path if self.utterance == 0 else f"{self.path}#{self.utterance}"


def apply_label_set(clips: list[Clip], label_set: str) -> list[Clip]:
    """Map canonical labels onto ``LABEL_SETS[label_set]``; clips of other emotions are dropped."""
    if label_set not in LABEL_MAPS:
        raise ValueError(f"unknown label set {label_set!r}; choose from {', '.join(LABEL_MAPS)}")
    mapping = LABEL_MAPS[label_set]
    return [replace(c, label=mapping[c.label]) for c in clips if c.label in mapping]


def class_index(clips: list[Clip], label_set: str) -> list[int]:
    classes = LABEL_SETS[label_set]
    return [classes.index(c.label) for c in clips]


# --------------------------------------------------------------------------------------- RAVDESS


def load_ravdess(root: str | Path) -> list[Clip]:
    """``root/labels.csv`` (path relative to ``root``, label, speaker, text, and metadata columns)."""
    root = Path(root).resolve()
    clips = []
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            label = canonical_label(row.pop("label"))
            path, speaker = row.pop("path"), row.pop("speaker")
            text = row.pop("text", "") or ""
            if label is None:
                continue
            clips.append(Clip(str(root / path), label, speaker, text, group=speaker, extra=row))
    return clips


# --------------------------------------------------------------------------------------- IEMOCAP

_EMO_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]")
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s?(.*)$")


def iemocap_speaker(utterance: str) -> tuple[str, str]:
    """``Ses01F_impro01_F000`` -> (speaker ``Ses01_F``, session ``Ses01``)."""
    session = utterance[:5]
    gender = utterance.rsplit("_", 1)[-1][:1]
    return f"{session}_{gender}", session


def _read_transcripts(path: Path) -> dict[str, str]:
    texts = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            m = _TRANSCRIPT_LINE.match(line.strip())
            if m:
                texts[m.group(1)] = m.group(2).strip()
    return texts


def load_iemocap(root: str | Path) -> list[Clip]:
    """IEMOCAP release tree: ``SessionN/dialog/EmoEvaluation/*.txt`` gives utterance labels,
    ``SessionN/dialog/transcriptions`` the text, ``SessionN/sentences/wav/<dialog>/<utt>.wav`` the audio."""
    root = Path(root).resolve()
    clips, missing = [], 0
    for session_dir in sorted(root.glob("Session*")):
        for emo_file in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
            dialog = emo_file.stem
            texts = _read_transcripts(session_dir / "dialog" / "transcriptions" / f"{dialog}.txt")
            for line in emo_file.read_text(errors="replace").splitlines():
                m = _EMO_LINE.match(line.strip())
                if not m:
                    continue
                start, end, utt, code, vad = m.groups()
                label = canonical_label(code)
                if label is None:
                    continue
                wav = session_dir / "sentences" / "wav" / dialog / f"{utt}.wav"
                if not wav.is_file():
                    missing += 1
                    continue
                speaker, session = iemocap_speaker(utt)
                extra = {
                    "utterance": utt,
                    "dialog": dialog,
                    "code": code,
                    "start": float(start),
                    "end": float(end),
                    "vad": [float(v) for v in vad.split(",") if v.strip()],
                }
                clips.append(Clip(str(wav), label, speaker, texts.get(utt, ""), group=session, extra=extra))
    if missing:
        log.warning("IEMOCAP: %d labelled utterances have no wav file and were skipped", missing)
    return clips


# -------------------------------------------------------------------------------------- manifest


def load_manifest(csv_path: str | Path) -> list[Clip]:
    """CSV with columns ``path,label,speaker`` and optionally ``text``, ``group``; other columns go
    to ``extra``. Relative paths are relative to the CSV file."""
    csv_path = Path(csv_path).resolve()
    clips = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "speaker"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: manifest lacks column(s) {', '.join(sorted(missing))}")
        for row in reader:
            label = canonical_label(row.pop("label"))
            path = Path(row.pop("path"))
            speaker = row.pop("speaker")
            text = row.pop("text", "") or ""
            group = row.pop("group", "") or speaker
            if label is None:
                continue
            path = path if path.is_absolute() else csv_path.parent / path
            clips.append(Clip(str(path), label, speaker, text, group=group, extra=row))
    return clips


def load_dataset(kind: str, location: str | Path, label_set: str = "4class") -> list[Clip]:
    """Load a corpus and map it onto a label set. ``location``: a directory (ravdess, iemocap), or
    the manifest CSV (a directory is taken to hold ``manifest.csv``)."""
    location = Path(location)
    if kind == "ravdess":
        clips = load_ravdess(location)
    elif kind == "iemocap":
        clips = load_iemocap(location)
    elif kind == "manifest":
        clips = load_manifest(location / "manifest.csv" if location.is_dir() else location)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {', '.join(DATASETS)}")
    clips = apply_label_set(clips, label_set)
    if not clips:
        raise ValueError(f"no usable {label_set} clips found in {location}")
    return clips


DATASET_LICENCES = {
    "ravdess": {
        "name": "RAVDESS (speech, actors 01-18)",
        "licence": "CC BY-NC-SA 4.0",
        "citation": (
            "Livingstone SR, Russo FA (2018) The Ryerson Audio-Visual Database of Emotional Speech and "
            "Song (RAVDESS). PLoS ONE 13(5): e0196391. https://doi.org/10.1371/journal.pone.0196391"
        ),
        "terms": "Models trained on RAVDESS inherit its non-commercial (NC) and share-alike (SA) terms.",
    },
    "iemocap": {
        "name": "IEMOCAP",
        "licence": "IEMOCAP release licence (USC SAIL; research use)",
        "citation": "Busso C. et al. (2008) IEMOCAP: Interactive emotional dyadic motion capture database.",
        "terms": "Subject to the IEMOCAP licence agreement.",
    },
    "manifest": {"name": "custom manifest", "licence": "see the corpus", "citation": "", "terms": ""},
}
