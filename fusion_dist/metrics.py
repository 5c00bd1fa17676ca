"""Regression metrics identical to the MMSA framework's (SPEC 4.1), under MMSA's own names.

MMSA rounds every value to 4 decimals; we keep full precision, and ``round(x, 4)`` of ours equals
MMSA's on the same predictions. ``Corr`` is ``np.corrcoef`` like MMSA's, so constant predictions
(or constant labels) give ``nan`` rather than a made-up 0: a degenerate model should look degenerate.
``Non0_*`` are ``nan`` when every label is exactly 0 (there is nothing to score). JSON writers must
turn ``nan`` into ``null`` (see ``json_safe``).
"""

from __future__ import annotations

import math

import numpy as np

MOSI_NAMES = ["Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"]
SIMS_NAMES = ["Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"]

# SIMS class bins, half-open (lo, hi]; the outer edges sit just past the clip range.
SIMS_BINS = {
    2: [-1.01, 0.0, 1.01],
    3: [-1.01, -0.1, 0.1, 1.01],
    5: [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01],
}


def _corr(p: np.ndarray, t: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.corrcoef(p, t)[0, 1]) if len(p) > 1 else math.nan


def _acc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if len(a) else math.nan


def _weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's ``f1_score(truth, pred, average="weighted")`` (what MMSA calls), without importing
    scikit-learn and SciPy into every rank: per-class F1 = 2 TP / (2 TP + FP + FN), 0 for a class never
    predicted correctly, averaged with the classes' support in ``truth`` as weights."""
    if not len(truth):
        return math.nan
    classes, support = np.unique(truth, return_counts=True)
    f1 = []
    for c in classes:
        tp = np.sum((pred == c) & (truth == c))
        wrong = np.sum((pred == c) != (truth == c))  # FP + FN
        f1.append(2 * tp / (2 * tp + wrong))
    return float(np.average(f1, weights=support))


def _mosi(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    # np.round is round-half-to-even, as in MMSA.
    def mult(bound: float) -> float:
        return _acc(np.round(np.clip(p, -bound, bound)), np.round(np.clip(t, -bound, bound)))

    nonzero = t != 0
    return {
        "Has0_acc_2": _acc(p >= 0, t >= 0),
        "Has0_F1_score": _weighted_f1(t >= 0, p >= 0),
        "Non0_acc_2": _acc(p[nonzero] > 0, t[nonzero] > 0),
        "Non0_F1_score": _weighted_f1(t[nonzero] > 0, p[nonzero] > 0),
        "Mult_acc_5": mult(2.0),
        "Mult_acc_7": mult(3.0),
        "MAE": float(np.mean(np.abs(p - t))),
        "Corr": _corr(p, t),
    }


def _bin(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """Class index of each value for the half-open bins (edges[i], edges[i+1]]."""
    return np.searchsorted(np.asarray(edges), x, side="left") - 1


def _sims(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    p, t = np.clip(p, -1.0, 1.0), np.clip(t, -1.0, 1.0)
    cls = {k: (_bin(p, e), _bin(t, e)) for k, e in SIMS_BINS.items()}
    return {
        "Mult_acc_2": _acc(*cls[2]),
        "Mult_acc_3": _acc(*cls[3]),
        "Mult_acc_5": _acc(*cls[5]),
        "F1_score": _weighted_f1(cls[2][1], cls[2][0]),
        "MAE": float(np.mean(np.abs(p - t))),
        "Corr": _corr(p, t),
    }


def mmsa_metrics(preds, labels, kind: str) -> dict[str, float]:
    """MMSA metrics of one split. ``kind``: ``"mosi"`` (MOSI/MOSEI, labels in [-3, 3]) or ``"sims"``."""
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    t = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need equally many predictions and labels, got {p.size} and {t.size}")
    if kind == "mosi":
        return _mosi(p, t)
    if kind == "sims":
        return _sims(p, t)
    raise ValueError(f"unknown metric set {kind!r}; expected 'mosi' or 'sims'")


def json_safe(obj):
    """Replace float nan/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
