"""GLUE metrics in numpy (scipy / scikit-learn are not dependencies; the tests check we agree with them)."""

from __future__ import annotations

import numpy as np

from .tasks import TaskSpec


def compute_metrics(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict:
    """{metric: float} for the metrics `spec` lists. Regression reads logits[:, 0]; classification the argmax."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    if spec.is_regression:
        preds = logits[:, 0] if logits.ndim == 2 else logits
    else:
        preds = logits.argmax(-1) if logits.ndim == 2 else logits
    fns = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews, "pearson": pearson,
           "spearmanr": spearman}
    return {name: float(fns[name](preds, labels)) for name in spec.metrics}


def accuracy(preds, labels) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(labels) else 0.0


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of class `positive`; 0 when it is never predicted nor present (sklearn's zero_division=0)."""
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = np.sum(p & y)
    denom = np.sum(p) + np.sum(y)
    return float(2 * tp / denom) if denom else 0.0


def matthews(preds, labels) -> float:
    """Multi-class Matthews correlation from the confusion matrix (sklearn's formula); 0 when undefined."""
    preds, labels = np.asarray(preds).astype(np.int64), np.asarray(labels).astype(np.int64)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (idx[:n], idx[n:]), 1)
    t, p = cm.sum(1), cm.sum(0)
    cov_tp = np.trace(cm) * n - t @ p
    cov_pp, cov_tt = n * n - p @ p, n * n - t @ t
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp else 0.0


def pearson(x, y) -> float:
    """Pearson r; nan when either side is constant (as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom else float("nan")


def spearman(x, y) -> float:
    """Spearman rho: Pearson of the ranks, ties sharing their average rank."""
    return pearson(_ranks(x), _ranks(y))


def _ranks(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # groups of equal values: each gets the mean of the 1-based positions it spans
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks
