"""Calibrated members and a robust ensemble combiner, chosen across test conditions (pure functions).

Input: the run reports of the members (``python -m training evaluate/train ... --test-conditions
clean,call``), each holding out-of-fold probabilities for the clean clips (``oof``) and for every
other condition (``conditions[name]["oof"]``), on the same clips and folds.

1. **Member calibration.** Every member's probabilities are temperature-scaled
   (``training.calibration``); each fold's temperature is fitted on the OTHER folds' out-of-fold
   predictions of all conditions pooled, so no fold calibrates itself; the shipped temperature is
   fitted on all folds.
2. **Combiners** on the calibrated members, each scored per condition:
   ``mean`` (equal weights), ``log-linear`` (equal-weight geometric mean, renormalised),
   ``constrained`` (weighted mean, every weight >= 0.15 on a 0.05 grid, fitted on all conditions
   pooled), ``constrained-log-linear`` (the same weights in a geometric mean) and ``weighted`` (the
   previous rule: any weights on a 0.1 grid, fitted on clean predictions only). Fitted weights are
   chosen leave-one-fold-out (a fold is scored with weights fitted on the other folds); the
   shipped weights are fitted on all folds. Fitting maximises balanced accuracy; ties go to the
   weights nearest equal.
3. **Choice**: the combiner with the best WORST-CONDITION balanced accuracy; any combiner within
   ``TIE`` of it that fits fewer numbers wins (order of ``COMBINERS``), because differences that
   small are noise on 18 speakers (models/EXPERIMENTS.md) and unfitted rules transfer better.
4. The chosen combination gets its own temperature, fitted the same out-of-fold way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training import metrics as M
from training.calibration import ece, out_of_fold_temperature

# simplest first: the tie-break order
COMBINERS = ("mean", "log-linear", "constrained", "constrained-log-linear", "weighted")
MIN_WEIGHT = 0.15
TIE = 0.01
_FLOOR = 1e-12


@dataclass
class OOF:
    """Out-of-fold probabilities of several members on the same clips: (members, conditions, clips,
    classes), with labels and folds per clip."""

    probs: np.ndarray
    y: np.ndarray
    fold_of: np.ndarray
    members: list[str]
    conditions: list[str]
    paths: list[str]


def gather(reports: Sequence[dict], conditions: Sequence[str]) -> OOF:
    """Stack the reports' out-of-fold probabilities (clean = ``oof``, others = ``conditions``)."""
    classes = reports[0]["classes"]
    paths = sorted(reports[0]["oof"])
    for r in reports:
        if r["classes"] != classes or sorted(r["oof"]) != paths:
            raise ValueError(f"report {r['model']}/{r['variant']} covers other clips or classes")
        for c in conditions:
            if c != "clean" and c not in r.get("conditions", {}):
                raise ValueError(
                    f"report {r['model']}/{r['variant']} has no {c!r} predictions: rerun it with "
                    f"--test-conditions clean,{c}"
                )

    def block(r: dict, c: str) -> dict:
        return r["oof"] if c == "clean" else r["conditions"][c]["oof"]

    probs = np.array(
        [[[block(r, c)[p]["probabilities"] for p in paths] for c in conditions] for r in reports]
    )
    first = reports[0]["oof"]
    y = np.array([classes.index(first[p]["label"]) for p in paths])
    fold_of = np.array([first[p]["fold"] for p in paths])
    return OOF(probs, y, fold_of, [r["model"] for r in reports], list(conditions), paths)


def mix(probs: np.ndarray, w: np.ndarray, method: str) -> np.ndarray:
    """(members, ..., classes) probabilities and member weights -> combined probabilities."""
    w = np.asarray(w, np.float64) / np.sum(w)
    if method == "log-linear":
        z = np.einsum("m,m...c->...c", w, np.log(np.maximum(probs, _FLOOR)))
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return np.einsum("m,m...c->...c", w, probs)


def weight_grid(n: int, steps: int, min_weight: float = 0.0) -> np.ndarray:
    rows = [w for w in itertools.product(range(steps + 1), repeat=n) if sum(w) == steps]
    grid = np.array(rows, np.float64) / steps
    return grid[(grid >= min_weight - 1e-9).all(axis=1)]


def fit_weights(
    probs: np.ndarray, y: np.ndarray, grid: np.ndarray, method: str, n_classes: int
) -> np.ndarray:
    """The grid row maximising balanced accuracy of ``mix`` over ``probs`` (members, rows, classes);
    ties: nearest the equal weights."""
    scores = np.array([M.balanced_accuracy(y, mix(probs, w, method).argmax(-1), n_classes) for w in grid])
    distance = np.abs(grid - 1.0 / grid.shape[1]).sum(1)
    return grid[np.lexsort((distance, -scores))[0]]


def _spec(name: str, n_members: int) -> tuple[str, np.ndarray | None, str]:
    """combiner -> (method, grid or None for equal weights, conditions it is fitted on)."""
    if name == "mean":
        return "mean", None, ""
    if name == "log-linear":
        return "log-linear", None, ""
    if name == "constrained":
        return "mean", weight_grid(n_members, 20, MIN_WEIGHT), "all"
    if name == "constrained-log-linear":
        return "log-linear", weight_grid(n_members, 20, MIN_WEIGHT), "all"
    if name == "weighted":
        return "mean", weight_grid(n_members, 10), "clean"
    raise ValueError(f"unknown combiner {name!r}; choose from {', '.join(COMBINERS)}")


def _rows(oof: OOF, probs: np.ndarray, mask: np.ndarray, fit_on: str) -> tuple[np.ndarray, np.ndarray]:
    """(members, conditions, clips, C) -> (members, rows, C) and labels, for the clips in ``mask``
    and the conditions ``fit_on`` names ("all" or one condition)."""
    conds = range(len(oof.conditions)) if fit_on == "all" else [oof.conditions.index(fit_on)]
    x = np.concatenate([probs[:, c][:, mask] for c in conds], axis=1)
    return x, np.concatenate([oof.y[mask]] * len(conds))


def evaluate_combiner(oof: OOF, calibrated: np.ndarray, name: str, n_classes: int) -> dict:
    """Out-of-fold combined probabilities (conditions, clips, C), per-fold weights, shipped weights."""
    method, grid, fit_on = _spec(name, len(oof.members))
    n = len(oof.members)
    if grid is None:
        w = np.full(n, 1.0 / n)
        return {"method": method, "probs": mix(calibrated, w, method), "weights": w, "fold_weights": {}}
    out = np.zeros(calibrated.shape[1:])
    fold_weights = {}
    for f in sorted(set(oof.fold_of.tolist())):
        held = oof.fold_of == f
        x, y = _rows(oof, calibrated, ~held, fit_on)
        w = fit_weights(x, y, grid, method, n_classes)
        out[:, held] = mix(calibrated[:, :, held], w, method)
        fold_weights[int(f)] = [round(float(v), 3) for v in w]
    x, y = _rows(oof, calibrated, np.ones(len(oof.y), bool), fit_on)
    w = fit_weights(x, y, grid, method, n_classes)
    return {"method": method, "probs": out, "weights": w, "fold_weights": fold_weights}


def condition_metrics(probs: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict:
    m = M.summarize(y, probs.argmax(-1), classes)
    m["ece"] = ece(probs, y)
    return m


def calibrate_members(oof: OOF) -> tuple[np.ndarray, list[dict]]:
    """Calibrated member probabilities (same shape) and, per member, its temperatures."""
    out = np.zeros_like(oof.probs)
    info = []
    n_cond = len(oof.conditions)
    folds = np.tile(oof.fold_of, n_cond)
    ys = np.tile(oof.y, n_cond)
    for m in range(len(oof.members)):
        flat = oof.probs[m].reshape(-1, oof.probs.shape[-1])  # conditions stacked along the rows
        cal, per_fold, t = out_of_fold_temperature(flat, ys, folds)
        out[m] = cal.reshape(oof.probs[m].shape)
        info.append({"temperature": round(t, 4), "fold_temperatures": per_fold})
    return out, info


def ensemble_temperature(oof: OOF, probs: np.ndarray) -> tuple[np.ndarray, dict[int, float], float]:
    n_cond = len(oof.conditions)
    flat = probs.reshape(-1, probs.shape[-1])
    cal, per_fold, t = out_of_fold_temperature(flat, np.tile(oof.y, n_cond), np.tile(oof.fold_of, n_cond))
    return cal.reshape(probs.shape), per_fold, t


def choose(scores: dict[str, float], tie: float = TIE) -> str:
    """The combiner with the best worst-condition score; within ``tie`` of it, the simplest."""
    best = max(scores.values())
    return next(name for name in COMBINERS if name in scores and scores[name] >= best - tie)


def analyse(reports: Sequence[dict], conditions: Sequence[str], combiners: Sequence[str] = COMBINERS) -> dict:
    """Everything the ``calibrate`` command reports and publishes (JSON-ready)."""
    classes = reports[0]["classes"]
    oof = gather(reports, conditions)
    calibrated, temps = calibrate_members(oof)
    members = []
    for m, r in enumerate(reports):
        entry = {"model": r["model"], "variant": r["variant"], "run": r.get("_path", ""), **temps[m]}
        entry["train_conditions"] = r.get("train_conditions", ["clean"])
        for c, cond in enumerate(oof.conditions):
            raw = condition_metrics(oof.probs[m, c], oof.y, classes)
            cal = condition_metrics(calibrated[m, c], oof.y, classes)
            entry[cond] = {
                "accuracy": raw["accuracy"],
                "balanced_accuracy": raw["balanced_accuracy"],
                "ece": raw["ece"],
                "ece_calibrated": cal["ece"],
            }
        members.append(entry)
    results = {}
    for name in combiners:
        ev = evaluate_combiner(oof, calibrated, name, len(classes))
        per = {
            cond: condition_metrics(ev["probs"][c], oof.y, classes) for c, cond in enumerate(oof.conditions)
        }
        results[name] = {
            "method": ev["method"],
            "weights": [round(float(v), 3) for v in ev["weights"]],
            "fold_weights": ev["fold_weights"],
            "worst_balanced_accuracy": min(p["balanced_accuracy"] for p in per.values()),
            **per,
            "_probs": ev["probs"],
        }
    chosen = choose({k: v["worst_balanced_accuracy"] for k, v in results.items()})
    probs, fold_t, t = ensemble_temperature(oof, results[chosen]["_probs"])
    final = {cond: condition_metrics(probs[c], oof.y, classes) for c, cond in enumerate(oof.conditions)}
    for v in results.values():
        v.pop("_probs")
    return {
        "classes": classes,
        "conditions": list(oof.conditions),
        "members": members,
        "combiners": results,
        "chosen": chosen,
        "rule": f"best worst-condition balanced accuracy; within {TIE} of it the simplest of {', '.join(COMBINERS)}",
        "ensemble": {
            "combiner": chosen,
            "method": results[chosen]["method"],
            "weights": results[chosen]["weights"],
            "temperature": round(t, 4),
            "fold_temperatures": fold_t,
            **final,
        },
        "_calibrated_probs": probs,
        "_oof": oof,
    }
