"""Command line: ``python -m training {cache,evaluate,train,export,baseline,ensemble,calibrate,
train-defaults,adapt,adaptation-stats}``.

Run ``python -m training <command> --help`` for every option. Outputs: run reports under
``runs/<model>-<variant>-<timestamp>/`` (report.json + confusion.png), shipped models under
``models/`` for tiny.en and ``models/<subdir>/`` for another named ASR model (<id>.onnx + <id>.json
card, ensemble.json, adaptation.json, RESULTS.md). ``train-defaults`` runs the shipped recipe
(``training/recipe.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# Spinning OpenMP workers made 2-thread training 10x slower whenever another process held a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.adaptation import add_adapt_arguments, add_population_arguments
from training.data import DATASETS, LABEL_SETS, load_dataset
from training.models import MODEL_IDS, model_classes
from training.protocols import PROTOCOLS, make_folds

log = logging.getLogger("training")

DEFAULT_DATA = "../shared/data/ravdess-a01-18"

# The papers' own figures, for context only (other corpus and protocol than ours: never compare
# them as equals). Keys: model -> variant (or "*") -> (accuracy, balanced_accuracy, where).
PAPER_FIGURES: dict[str, dict[str, tuple[float, float, str]]] = {
    "cmt-awc": {
        "base-nocross": (
            73.4,
            75.7,
            "IEMOCAP 4-class, 5-fold CV (paper 000 Tab. I; its UA = accuracy, WA = balanced)",
        ),
        "base": (74.7, 76.9, "IEMOCAP 4-class, 5-fold CV (paper 000 Tab. I)"),
        "sa-correction": (75.4, 77.5, "IEMOCAP 4-class, 5-fold CV (paper 000 Tab. I, method 1)"),
        "sdpa-correction": (75.3, 77.2, "IEMOCAP 4-class, 5-fold CV (paper 000 Tab. I, method 2)"),
    },
    "ca-mser": {"*": (69.80, 71.05, "IEMOCAP 4-class, leave-one-session-out 5 folds (paper 002 Tab. 1)")},
    "adf": {
        "F-I": (79.27, 77.85, "IEMOCAP 4-class, 10-fold CV 8:1:1 (paper 003 Tab. 1)"),
        "F-II": (80.01, 78.98, "IEMOCAP 4-class, 10-fold CV 8:1:1 (paper 003 Tab. 1)"),
        "F-III": (80.51, 79.22, "IEMOCAP 4-class, 10-fold CV 8:1:1 (paper 003 Tab. 1)"),
    },
    "3m-ser": {
        "layernorm": (80.66, 79.96, "IEMOCAP 4-class, SERVER's split (paper 004, with LayerNorm)"),
        "no-layernorm": (76.81, 75.35, "IEMOCAP 4-class, SERVER's split (paper 004, without LayerNorm)"),
    },
}

# --variant for models whose config has no ``variant`` field: name -> config overrides
VARIANT_FIELDS: dict[str, dict[str, dict]] = {
    "adf": {f: {"fusion": f} for f in ("F-I", "F-II", "F-III")},
    "ca-mser": {"co-attention": {"co_attention": True}, "concat": {"co_attention": False}},
    "3m-ser": {"layernorm": {"layer_norm": True}, "no-layernorm": {"layer_norm": False}},
}


# --acoustic: the paper's own acoustic front end, or pretrained Whisper encoder frames from the same ASR
# pass in its place (SPEC §2). 3m-ser's default audio already IS encoder frames (pooled per 0.96-s
# patch); its paper front end is VGGish trained from scratch here.
ACOUSTIC_OVERRIDES: dict[str, dict[str, dict]] = {
    "cmt-awc": {"paper": {"acoustic": "frames33"}, "whisper": {"acoustic": "encoder"}},
    "ca-mser": {
        "paper": {"features": ["mfcc", "spec", "enc"]},
        # the encoder branch alone, each 3-s segment weighted by its real duration (a short last
        # segment of mostly padding would otherwise count as much as a full one)
        "whisper": {"features": ["enc"], "segment_weighting": "duration"},
    },
    "adf": {"paper": {"acoustic": "waveform"}, "whisper": {"acoustic": "encoder"}},
    "3m-ser": {"paper": {"audio": "vggish"}, "whisper": {"audio": "encoder"}},
}


def paper_figure(model: str, variant: str) -> tuple[float, float, str] | None:
    figures = PAPER_FIGURES.get(model, {})
    # the paper's figure is for its own front end; a variant on Whisper frames gets it as context
    variant = "-".join(p for p in variant.split("-") if p not in ("encoder", "enc"))
    return (
        figures.get(variant)
        or figures.get(variant.split("-")[0] if model == "adf" else "")
        or figures.get("*")
    )


# ------------------------------------------------------------------------------------ arguments


def _parse_value(raw: str, default):
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(default, (int, float, str)) and default is not None:
        return type(default)(raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def model_overrides(
    model_id: str, variant: str | None, pairs: list[str], acoustic: str | None = None
) -> dict:
    """``--acoustic``, ``--variant`` and ``--set key=value`` -> config overrides, typed like the
    config fields (later ones win)."""
    _, cfg_cls = model_classes(model_id)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg_cls)}
    out = dict(ACOUSTIC_OVERRIDES[model_id][acoustic]) if acoustic else {}
    if variant:
        if "variant" in defaults:
            out["variant"] = variant
        elif variant in VARIANT_FIELDS.get(model_id, {}):
            out.update(VARIANT_FIELDS[model_id][variant])
        else:
            choices = ", ".join(VARIANT_FIELDS.get(model_id, {})) or "none (use --set)"
            raise SystemExit(f"{model_id} has no variant {variant!r}; choose from {choices}")
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        if key not in defaults:
            raise SystemExit(f"{model_id} has no config field {key!r}; fields: {', '.join(defaults)}")
        out[key] = _parse_value(raw, defaults[key])
    return out


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default=DEFAULT_DATA, help=f"corpus directory, or manifest CSV (default: {DEFAULT_DATA})"
    )
    g.add_argument("--dataset", choices=DATASETS, default="ravdess", help="corpus layout (default: ravdess)")
    g.add_argument(
        "--labels", choices=tuple(LABEL_SETS), default="4class", help="label set (default: 4class)"
    )
    g.add_argument("--cache-dir", default="cache", help="feature cache root (default: cache)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument(
        "--condition-seed",
        type=int,
        default=0,
        help="seed of the call-audio condition (training/conditions.py; default: 0)",
    )
    g = p.add_argument_group(
        "pretrained parts (SPEC §2; each changes the feature digest: cache directory and model cards)"
    )
    g.add_argument(
        "--speech-encoder",
        metavar="DIR",
        help="wav2vec2 ONNX directory made by python -m training.speech_encoder_export: ca-mser's enc_seg "
        "becomes wav2vec2 frames per 3-s segment (default: Whisper encoder frames); serve with "
        "EMOTION_SPEECH_ENCODER=DIR",
    )
    g.add_argument(
        "--glove",
        metavar="FILE",
        help="GloVe text file ('word v1 ... vD' lines): adf's words_static becomes GloVe vectors (default: "
        "the text encoder's input embeddings); serve with EMOTION_GLOVE_PATH=FILE",
    )
    g.add_argument(
        "--text-model",
        metavar="DIR",
        help="text encoder directory (model.onnx + tokenizer.json, e.g. a BERT exported by python -m "
        "training.text_encoder_export --model-dir BERT_DIR --out DIR): the words inputs of every text model "
        "(default: the bundled MiniLM); serve with EMOTION_TEXT_MODEL=DIR",
    )
    g.add_argument(
        "--asr-model",
        metavar="NAME|DIR",
        help="ASR model by name (tiny.en, base: app/analysis/asr_models.py) or a faster-whisper directory: "
        "words, confidences and Whisper encoder frames (default: tiny.en); serve with EMOTION_ASR_MODEL",
    )
    g.add_argument(
        "--encoder-window",
        choices=["fitted", "full"],
        default=None,
        help="Whisper encoder window: fitted to the utterance (default) or the full 30 s; serve with "
        "EMOTION_ASR_ENCODER_WINDOW",
    )


def _add_protocol(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="speaker-kfold",
        help="speaker-kfold (k folds of whole speakers), loso (leave one speaker out), loso-session "
        "(leave one session/group out) (default: speaker-kfold)",
    )
    g.add_argument(
        "--folds", type=int, default=6, help="k of speaker-kfold (default: 6 = 3 RAVDESS actors per fold)"
    )
    g.add_argument(
        "--val-speakers",
        type=int,
        default=2,
        help="training speakers held out per fold for epoch selection (default: 2)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the folds, weight init and shuffling (default: 0)"
    )
    g.add_argument("--out", default="runs", help="root directory of run reports (default: runs)")
    g.add_argument(
        "--test-conditions",
        default="clean",
        metavar="LIST",
        help="comma-separated conditions the held-out speakers are tested under: clean, call "
        "(training/conditions.py; call features are cached like clean ones) (default: clean)",
    )
    g.add_argument(
        "--train-conditions",
        default="clean",
        metavar="LIST",
        help="conditions the training speakers' clips are used under: clean, or clean,call "
        "(call-audio augmentation: each training clip also as call audio; the shipped model too) "
        "(default: clean)",
    )


def _conditions(text: str) -> list[str]:
    from training.conditions import CONDITIONS

    names = [c.strip() for c in (text or "clean").split(",") if c.strip()]
    bad = [c for c in names if c not in CONDITIONS]
    if bad or "clean" not in names:
        raise SystemExit(f"conditions must include clean and be among {', '.join(CONDITIONS)}: got {text!r}")
    return names


def _add_training(p: argparse.ArgumentParser, need_model: bool = True) -> None:
    g = p.add_argument_group("model and optimisation (defaults: the model module's TRAIN_DEFAULTS)")
    if need_model:
        g.add_argument("--model", required=True, choices=MODEL_IDS, help="model id")
        g.add_argument(
            "--variant",
            help="paper variant: cmt-awc base-nocross|base|sa-correction|sdpa-correction; adf F-I|F-II|F-III; "
            "ca-mser co-attention|concat; 3m-ser layernorm|no-layernorm (default: the model's own default)",
        )
        g.add_argument(
            "--acoustic",
            choices=("paper", "whisper"),
            help="acoustic front end: the paper's (cmt-awc frames33, ca-mser MFCC+spectrogram+encoder, adf "
            "SincNet on the waveform, 3m-ser VGGish) or pretrained Whisper encoder frames from the same ASR "
            "pass (cmt-awc acoustic=encoder, ca-mser features=enc with duration weighting, adf "
            "acoustic=encoder, 3m-ser audio=encoder) (default: the model config's default)",
        )
        g.add_argument(
            "--set",
            dest="sets",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="set a model config field, repeatable (e.g. --set dropout=0.3)",
        )
    g.add_argument("--epochs", type=int, help="maximum epochs per fit")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--batch-size", type=int, help="batch size")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feature noise + time masking + waveform noise while training (training/augment.py) "
        "(default: the model's TRAIN_DEFAULTS)",
    )
    g.add_argument(
        "--members",
        type=int,
        help="train this many copies with consecutive seeds and average their probabilities "
        "(one exported model; default: the model's TRAIN_DEFAULTS, else 1)",
    )
    g.add_argument(
        "--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda (default: auto)"
    )
    g.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = all usable cores (default: 0)"
    )


def _add_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--combine",
        choices=("mean", "weighted"),
        default="weighted",
        help="mean of probabilities, or a weighted mean whose weights each test fold gets from the "
        "other folds' out-of-fold predictions (leave-one-fold-out; default: weighted)",
    )


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models-dir", default="models", help="where <id>.onnx and <id>.json go (default: models)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Feature cache, speaker-independent cross-validation, ONNX export and model cards "
        "for the four SER models (see training/__main__.py for the output layout).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log every epoch (default: one line per fold)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text)

    p = command("cache", "fill the feature cache (ASR + features) for a corpus")
    _add_data(p)
    p.add_argument(
        "--condition",
        choices=("clean", "call"),
        default="clean",
        help="analyse the clips as recorded (clean) or through a simulated phone call (call: 8-kHz "
        "band, G.711 mu-law, noise at 10-20 dB SNR, level +-10 dB; training/conditions.py)",
    )

    p = command("evaluate", "cross-validate one model and write a run report (no export)")
    _add_data(p)
    _add_protocol(p)
    _add_training(p)

    p = command("train", "cross-validate one model, then train the final model and export it")
    _add_data(p)
    _add_protocol(p)
    _add_training(p)
    _add_export(p)

    p = command(
        "export",
        "train the final model on all speakers and export ONNX + card (epoch count from --report, "
        "else from an inner validation split)",
    )
    _add_data(p)
    _add_protocol(p)
    _add_training(p)
    _add_export(p)
    p.add_argument(
        "--report",
        help="CV run report (dir or report.json): its median best epoch and metrics go to the card",
    )

    p = command("baseline", "logistic regression on pooled Whisper encoder frames, same folds")
    _add_data(p)
    _add_protocol(p)
    p.add_argument(
        "--speaker-norm",
        action="store_true",
        help="analysis only: standardise encoder frames per speaker over all its clips, test speakers "
        "included (transductive; RAVDESS speakers have balanced emotions, a real caller need not)",
    )

    p = command("ensemble", "combine the out-of-fold probabilities of several run reports")
    p.add_argument("reports", nargs="+", help="run directories or report.json files (same clips and folds)")
    _add_combine(p)
    p.add_argument("--out", default="runs", help="root directory of run reports (default: runs)")
    p.add_argument(
        "--publish",
        metavar="MODELS_DIR",
        help="also write MODELS_DIR/ensemble.json and MODELS_DIR/RESULTS.md, as train-defaults does; every "
        "member's card in MODELS_DIR must have been exported from the given report (same variant, feature "
        "digest and CV metrics); a baseline report is listed in RESULTS.md, not combined",
    )

    p = command(
        "calibrate",
        "temperature-scale every member out-of-fold, compare ensemble combiners on every test condition "
        "and pick the one with the best worst-condition balanced accuracy (training/combine.py)",
    )
    p.add_argument(
        "reports",
        nargs="+",
        help="member run directories or report.json files (a baseline is listed, not combined)",
    )
    p.add_argument(
        "--conditions",
        default="clean,call",
        metavar="LIST",
        help="conditions every report was tested under (default: clean,call)",
    )
    p.add_argument("--out", default="runs", help="root directory of run reports (default: runs)")
    p.add_argument(
        "--publish",
        metavar="MODELS_DIR",
        help="write each member card's calibration block, MODELS_DIR/ensemble.json (weights, combiner, "
        "temperature, per-condition metrics) and MODELS_DIR/RESULTS.md; every member card must have been "
        "exported from the given report",
    )

    p = command(
        "train-defaults",
        "the shipped recipe (training/recipe.py): cache clean + call, baselines, CV and export of every "
        "model on clean + call audio, calibrate and publish; models/ for tiny.en, models/base/ for base",
    )
    _add_data(p)
    p.add_argument("--out", default="runs", help="root directory of run reports (default: runs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all usable cores")
    p.add_argument(
        "--models-dir",
        default=None,
        help="where the models go (default: models/<the ASR model's subdirectory>, app/analysis/asr_models.py)",
    )
    p.add_argument(
        "--models", nargs="+", choices=MODEL_IDS, default=list(MODEL_IDS), help="models to run (default: all)"
    )
    p = command(
        "adapt", "per-session adaptation after k utterances, on the CV folds (training/adaptation.py)"
    )
    _add_data(p)
    _add_protocol(p)
    _add_training(p, need_model=False)
    add_adapt_arguments(p)

    p = command("adaptation-stats", "population statistics for per-session adaptation (adaptation.json)")
    _add_data(p)
    add_population_arguments(p)
    return parser


# ------------------------------------------------------------------------------------- commands


class Context:
    """Loaded corpus + cache shared by the commands."""

    def __init__(self, args):
        from app.analysis.analyzer import AnalyzerSpec
        from training.cache import FeatureCache, utterance_clips

        self.args = args
        self.recordings = load_dataset(args.dataset, args.data, args.labels)
        self.classes = LABEL_SETS[args.labels]
        # the server's analyzer with the parts asked for, on CPU; hashing the parts' files (the
        # digest keys the cache) loads nothing
        self.spec = AnalyzerSpec(
            asr_model=args.asr_model or "",
            device="cpu",
            text_model=args.text_model or "",
            speech_encoder=args.speech_encoder or "",
            glove_path=args.glove or "",
            encoder_window=getattr(args, "encoder_window", None) or AnalyzerSpec.encoder_window,
        )
        self.config = self.spec.feature_config()
        self.cache = FeatureCache(args.cache_dir, self.config)
        # one clip per utterance, cut as the server cuts them
        self.clips, self.split_stats = utterance_clips(self.recordings, self.config, args.cache_dir)
        log.info("utterances: %s", self.split_stats.to_dict())

    def analyzer(self):
        """The Analyzer for cache misses (built on the first miss)."""
        return self.spec.build()

    def samples(self, names, condition: str = "clean"):
        from training.cache import CacheStats, prepare

        stats = CacheStats()
        out = prepare(
            self.clips,
            self.classes,
            self.cache,
            names,
            analyzer=self.analyzer,
            progress=not self.args.no_progress,
            stats=stats,
            condition=condition,
            condition_seed=self.args.condition_seed,
        )
        log.info(
            "cache %s (%s): %d hits, %d analysed, %.0f s",
            self.cache.dir,
            condition,
            stats.hits,
            stats.misses,
            stats.seconds,
        )
        return out

    def condition_samples(self, names) -> tuple[dict, list[str]]:
        """The other conditions' samples (same clips, same order) the protocol asks for, and the
        ones training uses (``--test-conditions``, ``--train-conditions``)."""
        a = self.args
        test = _conditions(getattr(a, "test_conditions", "clean"))
        train = _conditions(getattr(a, "train_conditions", "clean"))
        wanted = [c for c in dict.fromkeys(test + train) if c != "clean"]
        return {c: self.samples(names, c) for c in wanted}, [c for c in train if c != "clean"]

    def folds(self):
        a = self.args
        return make_folds(self.clips, a.protocol, a.folds, a.seed, a.val_speakers)

    def dataset(self, samples):
        from training.trainer import dataset_block

        block = dataset_block(self.args.dataset, self.args.data, self.args.labels, samples, self.classes)
        block["segmentation"] = (
            self.split_stats.to_dict()
        )  # recordings -> utterances (app.analysis.segmenter)
        return block


def _settings(args, model_id: str):
    from training.trainer import make_settings

    return make_settings(
        model_id,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        augment=args.augment,
        members=args.members,
    )


def _model_samples(ctx: Context, model_id: str, overrides: dict):
    from training.trainer import model_input_names

    return ctx.samples(model_input_names(model_id, len(ctx.classes), overrides))


# config field that must equal the width (last axis) of an input: the data decides it, e.g. 768-d
# wav2vec2 frames for ca-mser, 300-d GloVe vectors for adf, 768-d BERT vectors for the text models
DATA_DIMS: dict[str, dict[str, str]] = {
    "cmt-awc": {"words": "text_dim", "encoder": "frames_dim"},
    "ca-mser": {"enc_seg": "enc_dim"},
    "adf": {"words_static": "word_dim", "encoder": "enc_dim"},
    "3m-ser": {"enc_patches": "enc_dim", "words": "text_dim"},
}


def data_dims(model_id: str, overrides: dict, samples) -> dict:
    """``overrides`` plus the input widths of ``samples`` where they differ from the config defaults
    (the defaults fit the default features); a ``--set`` that contradicts the data is an error."""
    if not samples:
        return overrides
    _, cfg_cls = model_classes(model_id)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg_cls)}
    out = dict(overrides)
    for name, key in DATA_DIMS.get(model_id, {}).items():
        x = samples[0].inputs.get(name)
        if x is None or key not in defaults:
            continue
        width = int(x.shape[-1])
        if key in out:
            if int(out[key]) != width:
                raise SystemExit(f"{model_id}: --set {key}={out[key]}, but the {name} features are {width}-d")
        elif width != defaults[key]:
            out[key] = width
            log.info("%s: %s=%d from the %s features", model_id, key, width, name)
    return out


def stamp_features(report: dict, config) -> None:
    """Put the feature config the samples were computed with into a run report (the trainer
    records the default one) and rewrite its report.json."""
    if report.get("feature_config_digest") == config.digest():
        return
    report["feature_config"] = config.to_dict()
    report["feature_config_digest"] = config.digest()
    if report.get("_path"):
        Path(report["_path"]).write_text(
            json.dumps({k: v for k, v in report.items() if k != "_path"}, indent=1)
        )


def run_cv(ctx: Context, model_id: str, overrides: dict, samples=None):
    from training.trainer import cross_validate, model_input_names

    samples = samples if samples is not None else _model_samples(ctx, model_id, overrides)
    overrides = data_dims(model_id, overrides, samples)
    conditions, train_conditions = ctx.condition_samples(
        model_input_names(model_id, len(ctx.classes), overrides)
    )
    a = ctx.args
    res = cross_validate(
        model_id,
        samples,
        ctx.classes,
        ctx.folds(),
        _settings(a, model_id),
        overrides,
        a.protocol,
        ctx.dataset(samples),
        a.out,
        conditions=conditions,
        train_conditions=train_conditions,
    )
    stamp_features(res.report, ctx.config)
    _print_result(res.report)
    return res, samples


def run_export(ctx: Context, model_id: str, overrides: dict, samples, cv_report: dict | None):
    from training.export import export_model
    from training.trainer import model_input_names, train_final

    a = ctx.args
    overrides = data_dims(model_id, overrides, samples)
    conditions, train_conditions = ctx.condition_samples(
        model_input_names(model_id, len(ctx.classes), overrides)
    )
    # the shipped model trains on what its CV folds trained on: clean clips (+ their call audio)
    train_samples = list(samples) + [s for c in train_conditions for s in conditions[c]]
    epochs = None
    if cv_report and cv_report.get("best_epochs"):
        epochs = max(1, int(sorted(cv_report["best_epochs"])[len(cv_report["best_epochs"]) // 2]))
    result, how = train_final(
        model_id, train_samples, len(ctx.classes), _settings(a, model_id), overrides, epochs, a.val_speakers
    )
    how.update(
        seconds=round(result.seconds, 2),
        train_settings=_settings(a, model_id).to_dict(),
        train_conditions=["clean", *train_conditions],
    )
    if cv_report:
        how["epochs_from"] = (
            "median best epoch of the CV folds (each chosen on its inner-validation speakers)"
        )
    card = export_model(
        model_id,
        result.model,
        result.config,
        ctx.classes,
        samples,
        a.models_dir,
        ctx.dataset(samples),
        cv_report,
        how,
        feature_config=ctx.config,
    )
    print(
        f"exported {Path(a.models_dir) / card['onnx']} (parity max diff {card['parity']['max_abs_diff']:.2e})"
    )
    return card, result


def _print_result(report: dict) -> None:
    m = report["metrics"]
    extra = "".join(
        f"  {name}: balanced_accuracy {c['metrics']['balanced_accuracy']:.4f}"
        for name, c in report.get("conditions", {}).items()
    )
    train = "+".join(report.get("train_conditions", ["clean"]))
    print(
        f"{report['model']:>9} {report['variant']:<18} [train {train}] clean: accuracy {m['accuracy']:.4f}  "
        f"balanced_accuracy {m['balanced_accuracy']:.4f}{extra}  ({report['train_seconds'] / 60:.1f} min)  -> {report.get('_path', '')}"
    )


def cmd_cache(args) -> None:
    ctx = Context(args)
    ctx.samples((), condition=args.condition)
    print(f"cached {len(ctx.clips)} {args.condition} clips under {ctx.cache.dir}")


def cmd_evaluate(args) -> None:
    run_cv(Context(args), args.model, model_overrides(args.model, args.variant, args.sets, args.acoustic))


def cmd_train(args) -> None:
    ctx = Context(args)
    overrides = model_overrides(args.model, args.variant, args.sets, args.acoustic)
    res, samples = run_cv(ctx, args.model, overrides)
    run_export(ctx, args.model, overrides, samples, res.report)


def cmd_export(args) -> None:
    from training.trainer import load_report

    ctx = Context(args)
    overrides = model_overrides(args.model, args.variant, args.sets, args.acoustic)
    report = load_report(args.report) if args.report else None
    run_export(ctx, args.model, overrides, _model_samples(ctx, args.model, overrides), report)


def cmd_baseline(args):
    from training.baseline import INPUT_NAMES, cross_validate_baseline

    ctx = Context(args)
    samples = ctx.samples(INPUT_NAMES)
    conditions, train_conditions = ctx.condition_samples(INPUT_NAMES)
    res = cross_validate_baseline(
        samples,
        ctx.classes,
        ctx.folds(),
        args.seed,
        args.protocol,
        ctx.dataset(samples),
        args.out,
        feature_config=ctx.config,
        speaker_norm=getattr(args, "speaker_norm", False),
        conditions=conditions,
        train_conditions=train_conditions,
    )
    _print_result(res.report)
    return res


def cmd_ensemble(args):
    from training.trainer import ensemble_reports, load_report

    reports = [load_report(r) for r in args.reports]
    baselines = [r for r in reports if r["model"] == "baseline"]
    members = [r for r in reports if r["model"] != "baseline"]
    res = ensemble_reports(members, args.out, combine=args.combine)
    _print_result(res.report)
    if args.publish:
        publish_results(Path(args.publish), baselines, members, res.report)
        print(f"wrote {args.publish}/ensemble.json and {args.publish}/RESULTS.md")
    return res


def member_cards(models_dir: Path, members: list[dict]) -> list[dict]:
    """The cards in ``models_dir`` of the members' run reports, refusing a card exported from another run."""
    cards = []
    for r in members:
        path = models_dir / f"{r['model']}.json"
        card = json.loads(path.read_text()) if path.is_file() else {}
        cv = card.get("cv_metrics", {})
        same = (
            card.get("variant") == r["variant"]
            and card.get("feature_config_digest") == r["feature_config_digest"]
            and all(cv.get(k) == r["metrics"][k] for k in ("n", "accuracy", "balanced_accuracy"))
        )
        if not same:
            raise SystemExit(
                f"{path} was not exported from run {r.get('_path', '?')} (variant, feature digest or CV "
                "metrics differ): export it with python -m training export --report RUN, or pass its own run"
            )
        r["_final_seconds"] = card.get("training", {}).get("seconds", 0.0)
        cards.append(card)
    return cards


def publish_results(models_dir: Path, baselines: list[dict], members: list[dict], ensemble: dict) -> None:
    """ensemble.json + RESULTS.md from run reports whose models are already exported in ``models_dir``
    (e.g. after retraining one model with ``train``), refusing a card exported from another run."""
    cards = member_cards(models_dir, members)
    write_ensemble_card(models_dir, ensemble, cards)
    write_results(models_dir / "RESULTS.md", baselines + members + [ensemble])


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def calibration_table(analysis: dict, baselines: list[dict]) -> list[str]:
    """Markdown: per member and combiner, balanced accuracy and ECE per condition."""
    conds = analysis["conditions"]
    head = " | ".join(f"{c} balanced_accuracy | {c} ECE (raw -> calibrated)" for c in conds)
    lines = [f"| model | variant | trained on | {head} | temperature |", "|---" * (4 + 2 * len(conds)) + "|"]
    for b in baselines:
        cells = []
        for c in conds:
            m = b["metrics"] if c == "clean" else b["conditions"][c]["metrics"]
            cells += [f"{m['balanced_accuracy']:.4f}", f"{m.get('ece', float('nan')):.3f}"]
        train = "+".join(b.get("train_conditions", ["clean"]))
        lines.append(f"| baseline | {b['variant']} | {train} | " + " | ".join(cells) + " | - |")
    for m in analysis["members"]:
        cells = []
        for c in conds:
            cells += [
                f"{m[c]['balanced_accuracy']:.4f}",
                f"{m[c]['ece']:.3f} -> {m[c]['ece_calibrated']:.3f}",
            ]
        train = "+".join(m["train_conditions"])
        lines.append(
            f"| {m['model']} | {m['variant']} | {train} | "
            + " | ".join(cells)
            + f" | {m['temperature']:.3f} |"
        )
    for name, r in analysis["combiners"].items():
        mark = " (**chosen**)" if name == analysis["chosen"] else ""
        cells = []
        for c in conds:
            cells += [f"{r[c]['balanced_accuracy']:.4f}", f"{r[c]['ece']:.3f}"]
        w = ", ".join(f"{x:.2f}" for x in r["weights"])
        lines.append(f"| ensemble | {name}{mark} (weights {w}) | - | " + " | ".join(cells) + " | - |")
    e = analysis["ensemble"]
    cells = []
    for c in conds:
        cells += [f"{e[c]['balanced_accuracy']:.4f}", f"{e[c]['ece']:.3f}"]
    lines.append(
        f"| ensemble | {e['combiner']} + ensemble temperature (shipped) | - | "
        + " | ".join(cells)
        + f" | {e['temperature']:.3f} |"
    )
    return lines


def cmd_calibrate(args):
    from training.combine import analyse
    from training.trainer import load_report, run_dir

    reports = [load_report(r) for r in args.reports]
    baselines = [r for r in reports if r["model"] == "baseline"]
    members = [r for r in reports if r["model"] != "baseline"]
    conditions = _conditions(args.conditions)
    analysis = analyse(members, conditions)
    out = run_dir(args.out, "calibration", "+".join(m["model"] for m in members))
    (out / "report.json").write_text(json.dumps(_json_ready(analysis), indent=1))
    table = calibration_table(analysis, baselines)
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"chosen: {analysis['chosen']} ({analysis['rule']}) -> {out}")
    if args.publish:
        publish_calibrated(Path(args.publish), baselines, members, analysis, table, str(out / "report.json"))
        print(f"wrote {args.publish}: member calibration, ensemble.json, RESULTS.md")
    return analysis


def publish_calibrated(
    models_dir: Path,
    baselines: list[dict],
    members: list[dict],
    analysis: dict,
    table: list[str],
    source: str,
) -> None:
    """Member cards' ``calibration``, ensemble.json with the chosen combiner, RESULTS.md."""
    from training.trainer import ensemble_reports

    cards = member_cards(models_dir, members)
    for card, m in zip(cards, analysis["members"], strict=True):
        card["calibration"] = {
            "method": "temperature scaling: softmax(log p / T), applied by the server",
            "temperature": m["temperature"],
            "fitted_on": "out-of-fold predictions of every fold, conditions "
            + ", ".join(analysis["conditions"]),
            "cv_metrics_by_condition": {c: m[c] for c in analysis["conditions"]},
            "report": source,
        }
        (models_dir / f"{card['id']}.json").write_text(json.dumps(card, indent=1))
    e = analysis["ensemble"]
    chosen = analysis["combiners"][analysis["chosen"]]
    # the ensemble run report on the clean clips (plain mean; its metrics are replaced below)
    ens = ensemble_reports(members, "runs", combine="mean")
    ens.report["variant"] = f"{analysis['chosen']}-" + "+".join(r["model"] for r in members)
    ens.report["config"] = {
        "combination": f"{analysis['chosen']} of temperature-calibrated members ({analysis['rule']}); "
        "fitted weights chosen leave-one-fold-out",
        "weights": e["weights"],
        "fold_weights": chosen["fold_weights"],
    }
    ens.report["metrics"] = e["clean"]
    path = write_ensemble_card(models_dir, ens.report, cards)
    card = json.loads(path.read_text())
    card["combiner"] = {"method": e["method"], "temperature": e["temperature"], "name": analysis["chosen"]}
    card["cv_metrics_by_condition"] = {c: e[c] for c in analysis["conditions"]}
    card["calibration_report"] = source
    path.write_text(json.dumps(card, indent=1))
    write_results(models_dir / "RESULTS.md", baselines + members + [ens.report])
    text = (models_dir / "RESULTS.md").read_text()
    text += (
        "\n## Clean and call audio, calibration, combiner\n\n"
        "Same folds. `call` = every held-out clip through `training/conditions.py` (8-kHz band 300-3400 Hz, G.711 "
        "mu-law, pink/brown/speech-shaped noise at 10-20 dB SNR, level +-10 dB; seed 0), analysed by the same "
        "`app` path. ECE: 15 equal-width bins, top label, pooled out-of-fold; calibrated = each fold scaled with a "
        "temperature fitted on the other folds (both conditions pooled). Ensemble rows combine the calibrated "
        "members; fitted weights are chosen leave-one-fold-out.\n\n" + "\n".join(table) + "\n"
    )
    (models_dir / "RESULTS.md").write_text(text)


def cmd_train_defaults(args) -> None:
    from app.analysis.asr_models import ASR_MODELS
    from training import recipe

    t0 = time.perf_counter()
    common = ["--data", args.data, "--dataset", args.dataset, "--labels", args.labels]
    common += ["--cache-dir", args.cache_dir, "--condition-seed", str(args.condition_seed)]
    for flag, value in (
        ("--asr-model", args.asr_model),
        ("--text-model", args.text_model),
        ("--speech-encoder", args.speech_encoder),
        ("--glove", args.glove),
        ("--encoder-window", args.encoder_window),
    ):
        if value:
            common += [flag, value]
    if args.no_progress:
        common.append("--no-progress")
    models_dir = args.models_dir
    if models_dir is None:
        spec = ASR_MODELS.get(args.asr_model or "tiny.en")
        models_dir = str(Path("models") / spec.emotion_models_subdir) if spec else "models"
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    recipe.run(main, common, args.models, models_dir, args.out, args.threads)
    print(f"wrote {models_dir} ({(time.perf_counter() - t0) / 60:.1f} min in all)")


def write_ensemble_card(models_dir: Path, report: dict, cards: list[dict]) -> Path:
    m = report["metrics"]
    card = {
        "id": "ensemble",
        "variant": report["variant"],
        "combination": report["config"]["combination"],
        "members": [
            {"id": c["id"], "variant": c["variant"], "onnx": c["onnx"], "sha256": c["sha256"], "weight": w}
            for c, w in zip(cards, report["config"]["weights"], strict=True)
        ],
        "fold_weights": report["config"].get("fold_weights", {}),
        "classes": report["classes"],
        "feature_config": report["feature_config"],
        "feature_config_digest": report["feature_config_digest"],
        "training_data": cards[0]["training_data"],
        "protocol": report["protocol"],
        "cv_metrics": {
            k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "per_class_recall", "confusion_matrix")
        },
        "date": report["created"],
    }
    path = models_dir / "ensemble.json"
    path.write_text(json.dumps(card, indent=1))
    return path


def write_results(path: Path, reports: list[dict]) -> Path:
    """models/RESULTS.md: one row per run report, with the paper's own figure for context."""
    first = reports[0]
    held = "; ".join(
        f"fold {h['fold'] + 1}: {', '.join(h['test_speakers'])}" for h in first["protocol"]["held_out"]
    )
    ds = first["dataset"]
    lines = [
        "# Results",
        "",
        f"Data: {ds.get('kind')} `{ds.get('location')}`, {ds.get('labels')} ({', '.join(first['classes'])}), "
        f"{ds.get('n_clips')} clips from {ds.get('n_speakers')} speakers.",
        f"Protocol: {first['protocol']['name']}, {first['protocol']['n_folds']} folds, seed {first['protocol']['seed']}; "
        f"held-out speakers per fold: {held}. Each fold picks its best epoch on 2 inner-validation training speakers.",
        "`accuracy` = correct / all; `balanced_accuracy` = mean per-class recall (SPEC §3), both on pooled "
        "out-of-fold predictions.",
        "",
        "| model | variant | trained on | accuracy | balanced_accuracy | paper's figure (accuracy / balanced_accuracy, their data and protocol) | training minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        m = r["metrics"]
        fig = paper_figure(r["model"], r["variant"])
        fig_txt = f"{fig[0]:.2f} / {fig[1]:.2f} ({fig[2]})" if fig else "-"
        minutes = (r.get("train_seconds", 0.0) + r.get("_final_seconds", 0.0)) / 60
        train = "+".join(r.get("train_conditions", ["clean"])) if r["model"] != "ensemble" else "-"
        lines.append(
            f"| {r['model']} | {r['variant']} | {train} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | {fig_txt} | {minutes:.1f} |"
        )
    lines += [
        "",
        "Training minutes: cross-validation (all folds) plus the final fit, on this machine's device "
        f"({first.get('device', 'cpu')}). The papers' figures are on IEMOCAP, not RAVDESS: context, not a comparison.",
    ]
    if ds.get("kind") == "ravdess":
        lines.append(
            "Models trained on RAVDESS inherit its CC BY-NC-SA 4.0 licence (Livingstone & Russo 2018, PLoS ONE "
            "13(5): e0196391): non-commercial use only."
        )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def cmd_adapt(args) -> None:
    from training.adaptation import run

    if args.model == "baseline":
        run(Context(args), args, None, None)
        return
    overrides = model_overrides(args.model, args.variant, args.sets, args.acoustic)
    run(
        Context(args),
        args,
        overrides,
        _settings(args, args.model),
        lambda s: data_dims(args.model, overrides, s),
    )


def cmd_adaptation_stats(args) -> None:
    from training.adaptation import write_population

    write_population(Context(args), args)


COMMANDS = {
    "cache": cmd_cache,
    "evaluate": cmd_evaluate,
    "train": cmd_train,
    "export": cmd_export,
    "baseline": cmd_baseline,
    "ensemble": cmd_ensemble,
    "calibrate": cmd_calibrate,
    "train-defaults": cmd_train_defaults,
    "adapt": cmd_adapt,
    "adaptation-stats": cmd_adaptation_stats,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
