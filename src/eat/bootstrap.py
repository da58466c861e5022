"""Paired bootstrap of a metric drop: how far a model may fall below a reference on rows drawn like these.

The exact paired bound of :func:`eat.bench.drop_upper_bound` holds for accuracy only (a drop in accuracy is a
count of discordant rows). Matthews correlation, F1, Pearson and Spearman are not sums over rows, so their drop is
bounded by resampling the calibration rows with replacement (the *same* rows for both models: paired) and taking
the ``confidence`` quantile of the resampled drops (a percentile bootstrap: approximate, not exact, and too
optimistic on a few dozen rows; the tuner says which bound it used).
"""

from __future__ import annotations

import numpy as np

from .tasks import Task

BOOTSTRAP_SAMPLES = 1000


def _resampled_scores(task: Task, labels: np.ndarray, predicted: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The primary metric (percent) of ``predicted`` on every resample: index (S, N) row numbers -> (S,).

    Vectorised where the metric allows it (accuracy, binary F1 / Matthews, Pearson); else one call per resample."""
    y, p = labels[index], predicted[index]  # (S, N)
    name = task.primary_metric
    if name == "accuracy":
        return 100.0 * (y == p).mean(1)
    if name == "pearson":
        y, p = y - y.mean(1, keepdims=True), p - p.mean(1, keepdims=True)
        denominator = np.sqrt((y * y).sum(1) * (p * p).sum(1))
        r = np.divide((y * p).sum(1), denominator, out=np.zeros(len(y)), where=denominator > 0)
        return 100.0 * r
    binary = set(np.unique(labels).tolist()) <= {0, 1}
    if name in ("f1", "matthews") and binary:
        tp = ((y == 1) & (p == 1)).sum(1).astype(np.float64)
        fp = ((y == 0) & (p == 1)).sum(1).astype(np.float64)
        fn = ((y == 1) & (p == 0)).sum(1).astype(np.float64)
        tn = ((y == 0) & (p == 0)).sum(1).astype(np.float64)
        if name == "f1":
            denominator = 2 * tp + fp + fn
            return 100.0 * np.divide(2 * tp, denominator, out=np.zeros(len(y)), where=denominator > 0)
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return 100.0 * np.divide(tp * tn - fp * fn, denominator, out=np.zeros(len(y)), where=denominator > 0)
    return np.array([task.primary(labels[rows], predicted[rows]) for rows in index])


def bootstrap_indices(rows: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, rows) row numbers drawn with replacement (seeded: the same resamples for every comparison)."""
    return np.random.default_rng(seed).integers(0, rows, size=(samples, rows))


def paired_bootstrap_drop(task: Task, labels, reference, predicted, confidence: float,
                          index: np.ndarray | None = None) -> dict[str, float]:
    """The drop of the task's primary metric (points) from ``reference`` predictions (N,) to ``predicted`` (N,):
    ``drop`` on these rows and ``upper``, its one-sided ``confidence`` upper bound by paired percentile bootstrap
    (``index``: (S, N) resampled row numbers, default :func:`bootstrap_indices`)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    labels, reference, predicted = np.asarray(labels), np.asarray(reference), np.asarray(predicted)
    if index is None:
        index = bootstrap_indices(len(labels))
    drops = (_resampled_scores(task, labels, reference, index)
             - _resampled_scores(task, labels, predicted, index))  # (S,)
    drop = task.primary(labels, reference) - task.primary(labels, predicted)
    return {"drop": float(drop), "upper": float(np.quantile(drops, confidence)), "samples": int(len(index))}


__all__ = ["paired_bootstrap_drop", "bootstrap_indices", "BOOTSTRAP_SAMPLES"]
