"""`--quantize int8 --variant fp16 --data`: the export scores the fp32 graph and each scored variant (int8, fp16)
on the task's dev split."""

from __future__ import annotations

import copy

import pytest

import compressor
from compressor.training import TaskContext, TrainConfig
from compressor.training.heads import ensure_head
from exporters import ExportConfig, export_onnx
from factories import make_model_dir
from task_factories import signal_task, tiny_tokenizer


def test_int8_export_reports_dev_accuracy_of_both_graphs(tmp_path):
    ctx = TaskContext.build(signal_task(n_train=16, n_dev=48), tiny_tokenizer(tmp_path / "tok"), TrainConfig())
    model = ensure_head(compressor.load_model(make_model_dir(tmp_path / "m", "bert", "seq_bn", 2, "dynamic")), ctx.spec)
    result = export_onnx(model, tmp_path / "out", config=ExportConfig(quantize="int8", variants=["fp16"], seed=0),
                         eval_data=ctx)
    acc = result.int8["accuracy"]
    assert set(acc) == {"fp32", "int8", "change"}
    # the fp32 graph scores what the PyTorch model scores (parity holds to 1e-4)
    assert acc["fp32"]["accuracy"] == pytest.approx(ctx.evaluate(copy.deepcopy(model))["accuracy"])
    assert acc["change"]["accuracy"] == pytest.approx(acc["int8"]["accuracy"] - acc["fp32"]["accuracy"])
    assert 0.0 <= acc["int8"]["accuracy"] <= 1.0
    half = result.variants["fp16"]["accuracy"]
    assert set(half) == {"fp32", "fp16", "change"} and half["fp32"] == acc["fp32"]
    assert half["change"]["accuracy"] == pytest.approx(half["fp16"]["accuracy"] - half["fp32"]["accuracy"])
    text = (tmp_path / "out" / "export.md").read_text()
    assert "| accuracy |" in text and "synthetic:signal" in text
    assert "| metric | fp32 | int8 | change |" in text and "| metric | fp32 | fp16 | change |" in text
