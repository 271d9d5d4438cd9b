"""Paired comparison of two models on the same examples (`compress eval --against`): the difference of their
metrics with a bootstrap confidence interval, how often their predictions agree, and how far their output
distributions are apart (fidelity, on unlabeled text).

Everything takes numpy arrays of predictions or logits, in example order, the same examples for both models:

- `paired_bootstrap(metric, pred_a, pred_b, labels, B, seed)` -> (diff, lo, hi): diff = metric(a) - metric(b) on
  all examples; (lo, hi) the percentile interval of that difference over B resamples of the example indices
  with replacement, the same resample for both models (so what they share cancels). A metric that is not a mean
  over examples (F1, Matthews, Pearson) is recomputed on each resample.
- `agreement(pred_a, pred_b)`: the share of examples with the same predicted label.
- `mean_kl(ref_logits, cand_logits)`: the mean over examples of KL(softmax(ref) || softmax(cand)), in nats.
- `regression_agreement(a, b)`: for regression outputs, the Pearson correlation and the mean absolute
  difference of the predictions (KL and label agreement do not apply).

Vectorised numpy: B = 1000 resamples of MRPC's 408 dev examples take milliseconds.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np

from .data.metrics import spearman as _spearman

CONFIDENCE = 0.95
RESAMPLES = 1000
_CHUNK_CELLS = 2_000_000  # resampled indices held at once (16 MB of int64)


# ----------------------------------------------------------------------------------------------- batched metrics
# Each takes predictions and labels of shape [R, n] (R resamples of n examples) and returns [R] values, with the
# conventions of compressor.data.metrics (which they equal on one row; tests/test_paired_eval.py checks it).

def _accuracy(preds, labels):
    return (preds == labels).mean(-1)


def _f1(preds, labels, positive: int = 1):
    p, y = preds == positive, labels == positive
    tp = (p & y).sum(-1)
    denom = p.sum(-1) + y.sum(-1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _matthews(preds, labels):
    classes = np.unique(np.concatenate([labels.ravel(), preds.ravel()]))
    k = len(classes)
    p_idx, y_idx = np.searchsorted(classes, preds), np.searchsorted(classes, labels)
    rows, n = preds.shape
    flat = (np.arange(rows)[:, None] * k * k + y_idx * k + p_idx).ravel()
    cm = np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k).astype(np.float64)
    t, p = cm.sum(2), cm.sum(1)
    cov_tp = np.trace(cm, axis1=1, axis2=2) * n - (t * p).sum(-1)
    cov_pp, cov_tt = n * n - (p * p).sum(-1), n * n - (t * t).sum(-1)
    denom = cov_tt * cov_pp
    return np.where(denom > 0, cov_tp / np.sqrt(np.where(denom > 0, denom, 1.0)), 0.0)


def _pearson(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    denom = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.clip((x * y).sum(-1) / denom, -1.0, 1.0), np.nan)


def _spearman_rows(x, y):  # ranks with ties per row: a loop (1000 rows of STS-B's 1,500 take well under a second)
    return np.array([_spearman(a, b) for a, b in zip(x, y)])


BATCHED_METRICS = {"accuracy": _accuracy, "f1": _f1, "matthews_correlation": _matthews, "pearson": _pearson,
                   "spearmanr": _spearman_rows}

Metric = Union[str, Callable]


def _batched(metric: Metric) -> Callable:
    """A metric over [R, n] rows: a name in BATCHED_METRICS, or any `fn(preds, labels) -> float`, applied per row."""
    if isinstance(metric, str):
        try:
            return BATCHED_METRICS[metric]
        except KeyError:
            raise ValueError(f"unknown metric {metric!r}; one of {', '.join(BATCHED_METRICS)}") from None
    if getattr(metric, "batched", False):
        return metric
    return lambda preds, labels: np.array([metric(p, y) for p, y in zip(preds, labels)], dtype=np.float64)


# ----------------------------------------------------------------------------------------------- the statistics

def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = 0):
    """The resampled example indices, [rows, n] chunks of the [resamples, n] matrix drawn with
    numpy.random.default_rng(seed): the same for every metric and model given n, resamples and seed."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        yield rng.integers(0, n, size=(rows, n))
        done += rows


def paired_bootstrap(metric: Metric, pred_a, pred_b, labels, B: int = RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple:
    """(diff, lo, hi): diff = metric(pred_a, labels) - metric(pred_b, labels) on all examples; [lo, hi] the
    `confidence` percentile interval of the difference over B paired resamples of the example indices (with
    replacement, seeded by `seed`). `metric`: a name in BATCHED_METRICS or fn(preds, labels) -> float.
    Resamples where the metric is undefined (Pearson of a constant) are left out."""
    pred_a, pred_b, labels = np.asarray(pred_a), np.asarray(pred_b), np.asarray(labels)
    n = len(labels)
    if not len(pred_a) == len(pred_b) == n:
        raise ValueError(f"{len(pred_a)} and {len(pred_b)} predictions for {n} labels")
    if n == 0:
        raise ValueError("no examples to compare")
    if B < 1:
        raise ValueError(f"the number of bootstrap resamples must be >= 1, got {B}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    fn = _batched(metric)
    diff = float(fn(pred_a[None], labels[None])[0] - fn(pred_b[None], labels[None])[0])
    diffs = np.concatenate([fn(pred_a[idx], labels[idx]) - fn(pred_b[idx], labels[idx])
                            for idx in bootstrap_indices(n, B, seed)])
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return diff, float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return diff, float(lo), float(hi)


def within_noise(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] contains 0: the data cannot tell the two models apart."""
    return bool(lo <= 0.0 <= hi)


def agreement(pred_a, pred_b) -> float:
    """The share of examples on which the two predicted labels are the same."""
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    if len(pred_a) != len(pred_b):
        raise ValueError(f"{len(pred_a)} and {len(pred_b)} predictions")
    return float(np.mean(pred_a == pred_b)) if len(pred_a) else float("nan")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_per_example(ref_logits, cand_logits) -> np.ndarray:
    """KL(softmax(ref) || softmax(cand)) per example (row), in nats."""
    log_p, log_q = _log_softmax(ref_logits), _log_softmax(cand_logits)
    if log_p.shape != log_q.shape:
        raise ValueError(f"logits of shapes {log_p.shape} and {log_q.shape}")
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def mean_kl(ref_logits, cand_logits) -> float:
    """The mean over examples of KL(softmax(ref) || softmax(cand)), in nats: 0 when the distributions agree."""
    kl = kl_per_example(ref_logits, cand_logits)
    return float(kl.mean()) if len(kl) else float("nan")


def regression_agreement(pred_a, pred_b) -> dict:
    """For regression outputs: the Pearson correlation of the two models' predictions and their mean absolute
    difference."""
    a, b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    return {"correlation": float(_pearson(a[None], b[None])[0]) if len(a) else float("nan"),
            "mean_abs_diff": float(np.abs(a - b).mean()) if len(a) else float("nan")}


# ----------------------------------------------------------------------------------------------- on a task

def predictions(logits, regression: bool) -> np.ndarray:
    """The predicted labels (argmax) or, for regression, the first output."""
    logits = np.asarray(logits)
    if regression:
        return logits[:, 0] if logits.ndim == 2 else logits
    return logits.argmax(-1) if logits.ndim == 2 else logits


def output_agreement(cand_logits, ref_logits, regression: bool) -> dict:
    """How alike two models' outputs are, labels unused. Classification: `agreement` (predicted labels) and
    `mean_kl` (KL(ref || cand) of the softmaxes); regression: `correlation` and `mean_abs_diff` of the
    predictions. Plus `examples`."""
    cand, ref = predictions(cand_logits, regression), predictions(ref_logits, regression)
    if regression:
        out = regression_agreement(cand, ref)
    else:
        out = {"agreement": agreement(cand, ref), "mean_kl": mean_kl(ref_logits, cand_logits)}
    return dict(out, examples=int(len(cand)))


def compare(spec, cand_logits, ref_logits, labels, B: int = RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> dict:
    """Two models on the same labelled examples of the task `spec` (a data.TaskSpec): `candidate` and `reference`
    metrics, `differences` (per metric of the task: candidate, reference, difference = candidate - reference, its
    `low` / `high` bootstrap interval and `within_noise`) and `agreement` (output_agreement)."""
    from .data import compute_metrics

    regression = spec.is_regression
    cand_pred, ref_pred = predictions(cand_logits, regression), predictions(ref_logits, regression)
    labels = np.asarray(labels)
    cand, ref = compute_metrics(spec, cand_logits, labels), compute_metrics(spec, ref_logits, labels)
    rows = []
    for name in spec.metrics:
        diff, lo, hi = paired_bootstrap(name, cand_pred, ref_pred, labels, B=B, seed=seed, confidence=confidence)
        rows.append(dict(metric=name, candidate=cand[name], reference=ref[name], difference=diff, low=lo, high=hi,
                         within_noise=within_noise(lo, hi)))
    return dict(candidate=cand, reference=ref, differences=rows,
                agreement=output_agreement(cand_logits, ref_logits, regression),
                bootstrap=dict(resamples=int(B), seed=int(seed), confidence=confidence, interval="percentile",
                               examples=int(len(labels))))


def fidelity(cand_logits, ref_logits, regression: bool, source: Optional[str] = None) -> dict:
    """output_agreement on unlabeled texts, with where they came from."""
    return dict(output_agreement(cand_logits, ref_logits, regression), source=source)


# ----------------------------------------------------------------------------------------------- unlabeled texts

def read_texts(path, columns=None) -> list:
    """The texts of a fidelity file, as tuples (one text, or a pair): a .txt file holds one per line (a tab
    between the two texts of a pair); a CSV / TSV / JSONL file holds them in `columns` (comma-separated names,
    default "text"). Labels are not read."""
    from pathlib import Path

    from .data.readers import USER_SUFFIXES, _read_text, _read_user_rows
    from .errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--fidelity-data {path}: no such file")
    if path.suffix.lower() == ".txt":
        texts = [tuple(line.split("\t", 1)) for line in _read_text(path).splitlines() if line.strip()]
        if len({len(t) for t in texts}) > 1:
            raise DataError(f"--fidelity-data {path}: some lines hold a pair (a tab), others one text")
        if not texts:
            raise DataError(f"--fidelity-data {path} has no text")
        return texts
    if path.suffix.lower() not in USER_SUFFIXES:
        raise DataError(f"--fidelity-data {path}: unsupported file type {path.suffix!r}; use .txt or one of "
                        f"{', '.join(USER_SUFFIXES)}")
    header, rows = _read_user_rows(path)
    names = [c.strip() for c in (columns.split(",") if isinstance(columns, str) else columns or ["text"])
             if c.strip()]
    missing = [c for c in names if c not in header]
    if missing or len(names) not in (1, 2):
        raise DataError(f"--fidelity-data {path} has no column {', '.join(map(repr, missing or names))}; its "
                        f"columns are {header}: name the text column(s) with --fidelity-columns")
    if isinstance(rows[0][1], dict):
        return [tuple("" if r.get(c) is None else str(r.get(c)) for c in names) for _, r in rows]
    index = [header.index(c) for c in names]
    return [tuple(r[i] for i in index) for _, r in rows]
