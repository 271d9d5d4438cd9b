"""Dev-set metrics of an exported graph: how much accuracy int8 quantization costs (`--quantize int8 --data`)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from .runtime import make_session


def onnx_dev_metrics(path, data, batch_size: int = 32) -> dict:
    """Run the ONNX model at `path` over `data.dev_set` (a training.TaskContext) and score it with the task's
    metrics."""
    from compressor.data import compute_metrics

    session = make_session(path, "cpu")
    wanted = {i.name for i in session.get_inputs()}
    logits, labels = [], []
    for batch in DataLoader(data.dev_set, batch_size=batch_size, shuffle=False, collate_fn=data.collate):
        feeds = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in wanted}
        logits.append(session.run(None, feeds)[0])
        labels.append(batch["labels"].numpy())
    return compute_metrics(data.spec, np.concatenate(logits), np.concatenate(labels))


def int8_accuracy(fp32_path, int8_path, data) -> dict:
    """Dev metrics of the fp32 and int8 graphs and their difference (int8 - fp32), per metric."""
    fp32, int8 = onnx_dev_metrics(fp32_path, data), onnx_dev_metrics(int8_path, data)
    return dict(fp32=fp32, int8=int8, change={k: int8[k] - fp32[k] for k in fp32})
