"""Issue 16's model types through every command: XLM-RoBERTa and ELECTRA (with its embedding projection), each
built as a tiny AdapterHub-format model, and mBERT (BERT with mBERT's vocabulary) and DistilBERT (its own block),
built and saved by the adapters library, go through `compress inspect`, `prune`, `compact`, `export --onnx` (with
parity) and `bench` (PyTorch and onnxruntime); a model type without a description is one line naming it.
The outputs' equality with the adapters library is in tests/test_adapterhub_parity.py, masked == compacted in
tests/test_compaction_property.py, export parity on every padding side in tests/test_export.py (and below for
mBERT and DistilBERT, with one fused attention node per layer at its own head count)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

import adapterhub_reference as ref
from compressor.modeling.descriptions import DESCRIPTIONS, describe, max_positions
from factories import make_model_dir
from test_cli import invoke

# (model type, head, the adapterhub_reference case it is saved from by the adapters library; None: factories)
NEW_TYPES = [("xlm-roberta", "flex", None), ("electra", "classifier", None), ("bert", "flex", "mbert_flex_fuse2"),
             ("distilbert", "flex", "distilbert_flex_fuse2"), ("bert", "-", "stack_par_bn_task")]


def _reference_dir(case_id, root):
    case = ref.CASES_BY_ID[case_id]
    return ref.save_case(ref.build_reference(case), case, "full", root)["path"]


@pytest.mark.parametrize("model_type,head,case", NEW_TYPES, ids=[c or t for t, _, c in NEW_TYPES])
def test_every_command_runs_on_the_new_model_types(tmp_path, model_type, head, case):
    if case is None:
        src = make_model_dir(tmp_path / "model", model_type, "seq_bn", n_adapters=2, fusion="dynamic", head=head)
    else:
        src = _reference_dir(case, tmp_path / "model")
    # AdapterHub's save_pretrained does not record an active Stack: the user names it
    setup = ["--setup", ref.CASES_BY_ID[case].active] if case and case.startswith("stack") else []
    r = invoke("inspect", src, *setup)
    assert r.exit_code == 0 and "heads" in r.output, r.output
    r = invoke("prune", src, *setup, "--method", "magnitude", "--sparsity", "heads=0.25", "--sparsity", "neurons=0.25",
               "--sparsity", "adapters=0.5", "--out", tmp_path / "masks")
    assert r.exit_code == 0, r.output
    r = invoke("compact", src, *setup, "--masks", tmp_path / "masks", "--out", tmp_path / "compacted",
               *(["--adapterhub"] if case else []))  # written back and verified (test below: loaded by adapters)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "compacted" / "config.json").read_text())["model_type"] == model_type
    r = invoke("export", src, *setup, "--masks", tmp_path / "masks", "--onnx", "--out", tmp_path / "onnx")
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
    config = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=64)
    DebertaV2Model(config).save_pretrained(tmp_path / "deberta")
    r = invoke("inspect", tmp_path / "deberta")
    assert r.exit_code != 0
    assert ("model type 'deberta-v2' is not supported; supported: bert, roberta, xlm-roberta, electra, distilbert"
            in r.output)
    assert "Traceback" not in r.output


@pytest.mark.parametrize("case", ["mbert_seq_bn", "distilbert_flex_fuse2"])
def test_export_fuses_one_attention_node_per_layer_at_its_head_count(tmp_path, case):
    """Layer 0 keeps 3 of 4 heads (the fused node's hidden size is their width 24, not the model's 32, which 3
    does not divide), layer 1 keeps 1: each layer is one fused Attention node with its own num_heads, and the
    graph matches the masked model on right-, left- and randomly padded rows."""
    import compressor
    from compressor.masks import MaskSet
    from compressor.units import fingerprint, iter_units
    from exporters.onnx_export import ExportConfig, export_onnx
    from exporters.optimize import attention_nodes_per_layer

    model = compressor.load_model(_reference_dir(case, tmp_path / "model"))
    masks = {}
    for unit in iter_units(model):
        if unit.kind == "heads":
            keep = torch.ones(unit.shape, dtype=torch.bool)
            keep[: 1 if ".layer.0." in unit.key else 3] = False
            masks[unit.key] = keep
    result = export_onnx(model, tmp_path / "out", MaskSet(masks, fingerprint(model)), ExportConfig())
    assert result.heads == [3, 1]
    assert attention_nodes_per_layer(result.out / "model.onnx") == {0: [3], 1: [1]}
    parity = json.loads((result.out / "parity.json").read_text())
    checks = [c for c in parity["checks"] if c["target"] == "model.onnx"]
    assert parity["passed"] and {c["padding"] for c in checks} == {"right", "left", "random"}


@pytest.mark.parametrize("case", ["distilbert_flex_fuse2", "distilbert_seqcls_fuse2_static"])
def test_pruned_distilbert_written_back_loads_in_adapters(tmp_path, case):
    """DistilBERT's base weights go back under transformers' names (q_lin ... output_layer_norm), the FFN width
    under `hidden_dim`, pruned heads as `pruned_heads` (layer 0 loses all four: one stays, silenced); the
    adapters library loads the directory and computes the compacted model's outputs."""
    import compressor
    from compressor.api import compact_to_dir
    from compressor.masks import MaskSet
    from compressor.units import fingerprint, iter_units

    src = _reference_dir(case, tmp_path / "model")
    model = compressor.load_model(src)
    gen = torch.Generator().manual_seed(0)
    masks = {}
    for unit in iter_units(model):
        if unit.kind == "heads":
            masks[unit.key] = torch.tensor([False] * 4 if ".layer.0." in unit.key else [True, False, True, False])
        elif unit.kind in ("neurons", "bottleneck"):
            keep = torch.rand(unit.shape, generator=gen) < 0.6
            keep[0] = True
            masks[unit.key] = keep
    compacted = compact_to_dir(model, MaskSet(masks, fingerprint(model)), tmp_path / "out", adapterhub=True,
                               source=src)
    written = tmp_path / "out" / "adapterhub"
    config = json.loads((written / "config.json").read_text())
    assert config["pruned_heads"] == {"0": [1, 2, 3], "1": [1, 3]} and config["hidden_dim"] < 37
    theirs = ref.reload_reference(ref.CASES_BY_ID[case], "full", dict(path=str(written)))  # the adapters library
    for padding in ref.PADDINGS:
        inputs = ref.make_inputs("distilbert", padding)
        with torch.no_grad():
            got, ours = ref.reloaded_outputs(theirs, ref.CASES_BY_ID[case], inputs), compacted(**inputs).logits
        assert ref.max_abs_diff(got, ours) <= 1e-5


def test_descriptions():
    assert [d.token_types for d in DESCRIPTIONS.values()] == [True, False, False, True, False]
    assert describe("distilbert").ffn_size_field == "hidden_dim" and describe("distilbert").pooler is False
    assert describe({"model_type": "electra"}).pooler is False
    # RoBERTa-family positions start after the padding index
    assert max_positions({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert max_positions({"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}) == 512
    assert max_positions({"model_type": "distilbert", "max_position_embeddings": 512}) == 512
