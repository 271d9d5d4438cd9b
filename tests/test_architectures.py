"""Issue 16's model types through every command: XLM-RoBERTa and ELECTRA (with its embedding projection), each
built as a tiny AdapterHub-format model, go through `compress inspect`, `prune`, `compact`, `export --onnx` (with
parity) and `bench` (PyTorch and onnxruntime); a model type without a description is one line naming it.
The outputs' equality with the adapters library is in tests/test_adapterhub_parity.py, masked == compacted in
tests/test_compaction_property.py, export parity on every padding side in tests/test_export.py."""

from __future__ import annotations

import json

import pytest
from transformers import DistilBertConfig, DistilBertModel

from compressor.modeling.descriptions import DESCRIPTIONS, describe, max_positions
from factories import make_model_dir
from test_cli import invoke

NEW_TYPES = [("xlm-roberta", "flex"), ("electra", "classifier")]


@pytest.mark.parametrize("model_type,head", NEW_TYPES, ids=[t for t, _ in NEW_TYPES])
def test_every_command_runs_on_the_new_model_types(tmp_path, model_type, head):
    src = make_model_dir(tmp_path / "model", model_type, "seq_bn", n_adapters=2, fusion="dynamic", head=head)
    r = invoke("inspect", src)
    assert r.exit_code == 0 and "heads" in r.output, r.output
    r = invoke("prune", src, "--method", "magnitude", "--sparsity", "heads=0.25", "--sparsity", "neurons=0.25",
               "--sparsity", "adapters=0.5", "--out", tmp_path / "masks")
    assert r.exit_code == 0, r.output
    r = invoke("compact", src, "--masks", tmp_path / "masks", "--out", tmp_path / "compacted")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "compacted" / "config.json").read_text())["model_type"] == model_type
    r = invoke("export", src, "--masks", tmp_path / "masks", "--onnx", "--out", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "onnx" / "parity.json").read_text())["passed"]
    r = invoke("bench", tmp_path / "compacted", tmp_path / "onnx", "--provider", "torch", "--provider", "cpu",
               "--batch-sizes", "1", "--seq-lens", "8", "--min-time", "0.01", "--warmup", "1", "--threads", "1",
               "--out", tmp_path / "bench")
    assert r.exit_code == 0, r.output
    cells = json.loads((tmp_path / "bench" / "report.json").read_text())["results"]
    ok = {(c["target"], c["provider"]) for c in cells if c["status"] == "ok"}
    assert {c["status"] for c in cells} <= {"ok", "skipped"}  # skipped: the compacted dir has no graph
    assert {("onnx", "cpu"), ("onnx", "torch"), ("compacted", "torch")} <= ok


def test_a_model_type_without_a_description_is_one_line(tmp_path):
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=37,
                              max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(tmp_path / "distil")
    r = invoke("inspect", tmp_path / "distil")
    assert r.exit_code != 0
    assert "model type 'distilbert' is not supported; supported: bert, roberta, xlm-roberta, electra" in r.output
    assert "Traceback" not in r.output


def test_descriptions():
    assert [d.token_types for d in DESCRIPTIONS.values()] == [True, False, False, True]
    assert describe({"model_type": "electra"}).pooler is False
    # RoBERTa-family positions start after the padding index
    assert max_positions({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert max_positions({"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}) == 512
    assert max_positions({"model_type": "distilbert", "max_position_embeddings": 512}) == 512
