"""Dev-set metrics of an exported graph: how much accuracy a variant costs (`--data` with int8, fp16: every
variant registered with `scored = True` in exporters/variants.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from .runtime import make_session


def onnx_logits(graph, dataset, collate_fn, batch_size: int = 32) -> tuple:
    """(logits, labels) of the ONNX model `graph` (a path, or an onnxruntime session) over `dataset`, in order,
    in batches of `batch_size` padded by `collate_fn`; only the inputs the session declares are fed. A path runs
    on the CPU execution provider."""
    session = make_session(graph, "cpu") if isinstance(graph, (str, Path)) else graph
    wanted = {i.name for i in session.get_inputs()}
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        feeds = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in wanted}
        logits.append(session.run(None, feeds)[0])
        labels.append(batch["labels"].numpy())
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,))
    return np.concatenate(logits), np.concatenate(labels)


def onnx_dev_metrics(path, data, batch_size: int = 32) -> dict:
    """Run the ONNX model at `path` over `data.dev_set` (a training.TaskContext) and score it with the task's
    metrics."""
    from compressor.data import compute_metrics

    logits, labels = onnx_logits(path, data.dev_set, data.collate, batch_size)
    return compute_metrics(data.spec, logits, labels)


def variant_accuracy(fp32_path, variant_paths: dict, data) -> dict:
    """Per variant (name -> graph path): dev metrics of the fp32 graph, of the variant and their difference
    (variant - fp32), as {name: {"fp32": ..., name: ..., "change": ...}}. The fp32 graph is scored once."""
    if not variant_paths:
        return {}
    fp32 = onnx_dev_metrics(fp32_path, data)
    out = {}
    for name, path in variant_paths.items():
        got = onnx_dev_metrics(path, data)
        out[name] = {"fp32": fp32, name: got, "change": {k: got[k] - fp32[k] for k in fp32}}
    return out


def int8_accuracy(fp32_path, int8_path, data) -> dict:
    """Dev metrics of the fp32 and int8 graphs and their difference (int8 - fp32), per metric."""
    return variant_accuracy(fp32_path, {"int8": int8_path}, data)["int8"]
