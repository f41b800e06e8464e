"""Corpus loaders, evaluation protocols and metrics of the ``training`` package (no models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the training extra

from training import metrics as M  # noqa: E402
from training.data import (  # noqa: E402
    LABEL_SETS,
    apply_label_set,
    iemocap_speaker,
    load_dataset,
    load_iemocap,
    load_manifest,
    load_ravdess,
)
from training.protocols import final_split, make_folds, speaker_kfold  # noqa: E402

RAVDESS = Path(__file__).parents[1].parent / "shared/data/ravdess-a01-18"
needs_ravdess = pytest.mark.skipif(
    not (RAVDESS / "labels.csv").is_file(), reason="RAVDESS subset not present"
)


# ------------------------------------------------------------------------------------- fixtures


def _wav(path: Path, seconds: float = 0.2, rate: int = 16000) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    sf.write(path, (0.05 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate)


# (utterance, code) per dialog; Ses01 has both speakers, Ses02 too
IEMOCAP_UTTS = {
    "Session1": {
        "Ses01F_impro01": [
            ("Ses01F_impro01_F000", "neu"),
            ("Ses01F_impro01_M000", "exc"),
            ("Ses01F_impro01_F001", "fru"),
            ("Ses01F_impro01_M001", "xxx"),
        ],
        "Ses01M_script01_1": [("Ses01M_script01_1_F000", "sad"), ("Ses01M_script01_1_M000", "ang")],
    },
    "Session2": {
        "Ses02F_impro02": [
            ("Ses02F_impro02_F000", "hap"),
            ("Ses02F_impro02_M000", "neu"),
            ("Ses02F_impro02_F001", "ang"),
            ("Ses02F_impro02_M001", "sad"),
        ],
    },
}


@pytest.fixture()
def iemocap_root(tmp_path: Path) -> Path:
    root = tmp_path / "IEMOCAP_full_release"
    for session, dialogs in IEMOCAP_UTTS.items():
        for dialog, utts in dialogs.items():
            emo = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            tr = []
            for i, (utt, code) in enumerate(utts):
                start, end = 1.5 * i + 0.25, 1.5 * i + 1.2
                emo += [f"[{start:.4f} - {end:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 3.5000]"]
                emo += ["C-E1:\tNeutral;\t()", "A-E1:\tval 3; act 2; dom  2;\t()", ""]
                tr.append(f"{utt} [{start:08.4f}-{end:08.4f}]: words of {utt.lower()}.")
                _wav(root / session / "sentences" / "wav" / dialog / f"{utt}.wav")
            tr.append("M_nonverbal [001.0000-002.0000]: [LAUGHTER]")
            (root / session / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (root / session / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
            (root / session / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(emo) + "\n")
            (root / session / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(tr) + "\n")
    return root


# -------------------------------------------------------------------------------------- loaders


@needs_ravdess
def test_ravdess_loader_and_label_sets():
    raw = load_ravdess(RAVDESS)
    assert len(raw) == 1080
    assert len({c.speaker for c in raw}) == 18
    assert all(Path(c.path).is_file() for c in raw[:20])
    assert {c.label for c in raw} == set(LABEL_SETS["8class"])
    assert raw[0].text in ("Kids are talking by the door", "Dogs are sitting by the door")
    assert raw[0].group == raw[0].speaker and "gender" in raw[0].extra

    four = load_dataset("ravdess", RAVDESS, "4class")
    # per actor: neutral 4 + calm 8 (-> neutral), happy 8, sad 8, angry 8
    assert len(four) == 18 * 36
    counts = {c: sum(x.label == c for x in four) for c in LABEL_SETS["4class"]}
    assert counts == {"neutral": 216, "happy": 144, "sad": 144, "angry": 144}
    assert len(load_dataset("ravdess", RAVDESS, "8class")) == 1080


def test_iemocap_loader(iemocap_root: Path):
    clips = load_iemocap(iemocap_root)
    by_utt = {c.extra["utterance"]: c for c in clips}
    # xxx has no emotion; fru is kept as a canonical label until a label set is applied
    assert "Ses01F_impro01_M001" not in by_utt
    assert by_utt["Ses01F_impro01_M000"].label == "happy"  # exc merges into happy
    assert by_utt["Ses01F_impro01_F001"].label == "frustrated"
    c = by_utt["Ses01M_script01_1_F000"]
    assert (c.label, c.speaker, c.group) == ("sad", "Ses01_F", "Ses01")
    assert c.text == "words of ses01m_script01_1_f000."
    assert c.extra["vad"] == [2.5, 3.0, 3.5] and c.extra["dialog"] == "Ses01M_script01_1"
    assert Path(c.path).is_file() and c.path.endswith(
        "Session1/sentences/wav/Ses01M_script01_1/Ses01M_script01_1_F000.wav"
    )

    four = load_dataset("iemocap", iemocap_root, "4class")
    assert len(four) == 8  # 10 labelled utterances - xxx - fru
    assert sorted({c.speaker for c in four}) == ["Ses01_F", "Ses01_M", "Ses02_F", "Ses02_M"]
    assert {c.label for c in four} == set(LABEL_SETS["4class"])
    assert iemocap_speaker("Ses05M_script03_2_F012") == ("Ses05_F", "Ses05")


def test_iemocap_skips_missing_wav(iemocap_root: Path):
    (iemocap_root / "Session2/sentences/wav/Ses02F_impro02/Ses02F_impro02_F000.wav").unlink()
    assert "Ses02F_impro02_F000" not in {c.extra["utterance"] for c in load_iemocap(iemocap_root)}


def test_manifest_loader(tmp_path: Path):
    _wav(tmp_path / "audio" / "a.wav")
    _wav(tmp_path / "audio" / "b.wav")
    (tmp_path / "list.csv").write_text(
        "path,label,speaker,text,group,corpus\n"
        "audio/a.wav,Anger,spk1,hello there,g1,demo\n"
        f"{tmp_path / 'audio' / 'b.wav'},neu,spk2,,,demo\n"
        "audio/c.wav,fear,spk2,,,demo\n"
    )
    clips = load_manifest(tmp_path / "list.csv")
    assert [c.label for c in clips] == ["angry", "neutral", "fearful"]
    assert clips[0].path == str((tmp_path / "audio" / "a.wav").resolve())
    assert (clips[0].text, clips[0].group, clips[0].extra) == ("hello there", "g1", {"corpus": "demo"})
    assert clips[1].group == "spk2"  # defaults to the speaker
    assert [c.label for c in apply_label_set(clips, "4class")] == ["angry", "neutral"]
    assert len(load_dataset("manifest", tmp_path / "list.csv", "8class")) == 3

    (tmp_path / "bad.csv").write_text("path,label\nx.wav,angry\n")
    with pytest.raises(ValueError, match="speaker"):
        load_manifest(tmp_path / "bad.csv")


# ------------------------------------------------------------------------------------ protocols


def _check_fold(clips, fold):
    spk = lambda ix: {clips[i].speaker for i in ix}  # noqa: E731
    train, val, test = spk(fold.train), spk(fold.val), spk(fold.test)
    assert not train & test and not val & test and not train & val
    assert set(fold.test_speakers) == test and set(fold.val_speakers) == val
    assert len(fold.train) + len(fold.val) + len(fold.test) == len(clips)


@needs_ravdess
def test_speaker_kfold_on_ravdess():
    clips = load_dataset("ravdess", RAVDESS, "4class")
    folds = make_folds(clips, "speaker-kfold", k=6, seed=0, n_val=2)
    assert len(folds) == 6
    held = [s for f in folds for s in f.test_speakers]
    assert sorted(held) == sorted({c.speaker for c in clips})  # every actor tested exactly once
    for f in folds:
        assert len(f.test_speakers) == 3 and len(f.val_speakers) == 2
        _check_fold(clips, f)
    again = make_folds(clips, "speaker-kfold", k=6, seed=0, n_val=2)
    assert again == folds  # deterministic
    assert make_folds(clips, "speaker-kfold", k=6, seed=1) != folds


@needs_ravdess
def test_balanced_fold_sizes_and_loso():
    clips = load_dataset("ravdess", RAVDESS, "4class")
    sizes = sorted(len(f.test_speakers) for f in speaker_kfold(clips, k=4, seed=3))
    assert sizes == [4, 4, 5, 5]
    loso = make_folds(clips, "loso", seed=0)
    assert len(loso) == 18 and all(len(f.test_speakers) == 1 for f in loso)
    for f in loso:
        _check_fold(clips, f)
    final = final_split(clips, seed=0, n_val=2)
    assert not final.test and len(final.val_speakers) == 2


def test_leave_one_session_out(iemocap_root: Path):
    clips = load_dataset("iemocap", iemocap_root, "4class")
    folds = make_folds(clips, "loso-session", seed=0, n_val=1)
    assert [f.test_groups for f in folds] == [("Ses01",), ("Ses02",)]
    for f in folds:
        assert f.test_speakers == tuple(sorted({c.speaker for c in clips if c.group == f.test_groups[0]}))
        assert len(f.val_speakers) == 1
        _check_fold(clips, f)
    with pytest.raises(ValueError):
        make_folds(clips, "speaker-kfold", k=9)


# -------------------------------------------------------------------------------------- metrics


def test_metrics_imbalanced_case():
    # 4 neutral (all right), 2 happy (1 right): the two metrics differ (SPEC §3 naming)
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 0, 0, 1]
    assert M.accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert M.balanced_accuracy(y_true, y_pred, 2) == pytest.approx((1.0 + 0.5) / 2)
    assert M.per_class_recall(y_true, y_pred, 2).tolist() == [1.0, 0.5]
    assert M.confusion_matrix(y_true, y_pred, 2).tolist() == [[4, 0], [1, 1]]


def test_metrics_absent_class_and_summary(tmp_path: Path):
    y_true = [0, 1, 1, 3]
    y_pred = [0, 1, 2, 2]
    recalls = M.per_class_recall(y_true, y_pred, 4)
    assert np.isnan(recalls[2]) and recalls.tolist()[:2] == [1.0, 0.5] and recalls[3] == 0.0
    assert M.balanced_accuracy(y_true, y_pred, 4) == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # class 2 absent
    s = M.summarize(y_true, y_pred, LABEL_SETS["4class"])
    assert s["accuracy"] == 0.5 and s["per_class_recall"]["sad"] is None
    assert s["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert M.accuracy([], []) != M.accuracy([], [])  # NaN on empty input
    png = M.save_confusion_png(s["confusion_matrix"], LABEL_SETS["4class"], tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
