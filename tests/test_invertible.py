"""Invertible adapters (MAD-X language adapters, issue 16): loaded from what AdapterHub writes, run on the
embeddings for the active setup's first() adapter, kept whole through compaction, ONNX export, every command
and `compress inspect`; glow and unknown blocks refused in one line. The parity rows (single setups, fusions,
Stack(lang, task), Stack(task, lang)) are cases in tests/adapterhub_reference.py, run by
test_adapterhub_parity.py; write-back: test_adapterhub_writeback.py; masked == compacted:
test_compaction_property.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

adapters = pytest.importorskip("adapters")

import adapterhub_reference as ref  # noqa: E402
import compressor  # noqa: E402
from compressor.errors import UnsupportedAdapterError  # noqa: E402

logging.getLogger("adapters").setLevel(logging.ERROR)
ATOL = 1e-5
FORMATS = ("full", "split_safetensors")
# parity of every row (single setups, fusions, Stack(lang, task), Stack(task, lang)) runs in
# test_adapterhub_parity.py; this file uses some of them for what parity does not cover
INV_CASES = [c.id for c in ref.CASES if any("inv" in str(spec) for _, spec in c.adapters)]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """case id -> (case, AdapterHub model with its setup active, {format: load_model kwargs})."""
    store = ref.ReferenceStore(tmp_path_factory.mktemp("invertible"))
    keys = ("stack_inv_lang_task", "xlmr_seqcls_stack_inv_lang_fuse2", "electra_stack_inv_lang_task")
    return {key: (ref.CASES_BY_ID[key], store.model(ref.CASES_BY_ID[key]),
                  {fmt: store.saved(ref.CASES_BY_ID[key], fmt) for fmt in FORMATS}) for key in keys}


def _load(spec):
    return compressor.load_model(spec["path"], adapters=spec["adapters"], fusion=spec["fusion"], setup=spec["setup"])


def _out(model, case, inputs):
    with torch.no_grad():
        return ref.output_of(model(**inputs), case)


def test_the_matrix_has_the_rows():
    """Every model type with AdapterHub's invertible adapters, both named configs, Single, Fuse and Stack setups,
    and first() without a block (the block must not run)."""
    cases = [ref.CASES_BY_ID[i] for i in INV_CASES]
    assert {c.arch for c in cases} >= {"bert", "roberta", "xlm-roberta", "electra", "distilbert"}
    assert {"seq_bn_inv", "double_seq_bn_inv"} <= {str(s if isinstance(s, str) else s["base"])
                                                     for c in cases for _, s in c.adapters}
    assert any(c.active.startswith("Stack(lang") for c in cases) and any(c.active == "Stack(task,lang)" for c in cases)
    assert any(c.fusion and c.fusion[0][0] == c.adapters[0][0] for c in cases)  # first() inside a fusion


@pytest.mark.parametrize("key,active", [("stack_inv_lang_task", "lang"), ("stack_task_inv_lang", None),
                                        ("roberta_fuse2_inv_first", "a"), ("fuse2_inv_second", None)])
def test_first_adapter_runs_its_block(tmp_path, key, active):
    """AdapterHub's rule: the block of the active setup's first() adapter runs, or none."""
    case = ref.CASES_BY_ID[key]
    spec = ref.ReferenceStore(tmp_path).saved(case, "full")
    model = _load(spec)
    assert model.compress_manifest["invertible"]["active"] == model.base_model.invertible_adapters.active == active


def test_the_invertible_adapter_matters(stacks):
    """Not vacuous: without its invertible adapter AdapterHub's output moves by far more than the tolerance, and
    so does ours with none active."""
    case, reference, specs = stacks["stack_inv_lang_task"]
    inputs = ref.make_inputs(case.arch, "right")
    expected = ref.reference_outputs(reference, case, inputs)
    block = reference.base_model.invertible_adapters["lang"]
    del reference.base_model.invertible_adapters["lang"]
    try:
        assert ref.max_abs_diff(ref.reference_outputs(reference, case, inputs), expected) > 1e-2
    finally:
        reference.base_model.invertible_adapters["lang"] = block
    model = _load(specs["full"])
    model.base_model.invertible_adapters.active = None
    assert ref.max_abs_diff(_out(model, case, inputs), expected) > 1e-2


def test_adapterhub_glow_fails_on_token_sequences():
    """Why glow is refused: AdapterHub's GLOW block cannot run on [batch, seq, hidden] at all. If this starts
    passing through, AdapterHub fixed it and glow can be matched (then support it)."""
    model = ref._plain_class("bert", "none")(ref.tiny_config("bert"))
    adapters.init(model)
    model.add_adapter("lang", config=adapters.AdapterConfig.load("seq_bn_inv", inv_adapter="glow"))
    model.set_active_adapters("lang")
    with pytest.raises(RuntimeError):
        model.eval()(**ref.make_inputs("bert", "right"))


def _edit_adapter_config(spec, tmp_path, edit):
    """A copy of a split case whose lang adapter's adapter_config.json is edited by `edit(config dict)`."""
    import shutil

    root = Path(spec["path"]).parent
    shutil.copytree(root, tmp_path / "copy")
    path = tmp_path / "copy" / "adapter_lang" / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta["config"])
    path.write_text(json.dumps(meta))
    moved = lambda p: str(tmp_path / "copy" / Path(p).relative_to(root))  # noqa: E731
    return dict(spec, path=moved(spec["path"]), adapters=[moved(p) for p in spec["adapters"]])


def test_adapterhub_v1_nested_config_reads_the_same(stacks, tmp_path):
    """adapter-transformers v1 wrote `invertible_adapter: {block_type, reduction_factor, non_linearity}`; the
    adapters library reads it as inv_adapter / inv_adapter_reduction_factor, and so do we."""
    case, reference, specs = stacks["stack_inv_lang_task"]

    def to_v1(config):
        config["invertible_adapter"] = dict(block_type=config.pop("inv_adapter"), non_linearity="relu",
                                            reduction_factor=config.pop("inv_adapter_reduction_factor"))

    model = _load(_edit_adapter_config(specs["split_safetensors"], tmp_path, to_v1))
    inputs = ref.make_inputs(case.arch, "left")
    assert ref.max_abs_diff(_out(model, case, inputs), ref.reference_outputs(reference, case, inputs)) <= ATOL


@pytest.mark.parametrize("value,needle", [("real_nvp", "inv_adapter='real_nvp'"), ("glow", "glow"),
                                          ({"x": 1}, "inv_adapter=")])
def test_unsupported_inv_adapter_is_one_line(stacks, tmp_path, value, needle):
    _, _, specs = stacks["stack_inv_lang_task"]
    spec = _edit_adapter_config(specs["split_safetensors"], tmp_path, lambda c: c.update(inv_adapter=value))
    with pytest.raises(UnsupportedAdapterError, match="inv_adapter") as info:
        _load(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_compaction_keeps_it_whole_and_reloads(stacks, tmp_path):
    """Not a unit: masks never name it; compaction copies it; the compacted directory reloads it, active."""
    from compressor.compaction import compact, save_compacted
    from compressor.masks import masked_copy
    from compressor.pruning import prune
    from compressor.units import iter_units

    case, _, specs = stacks["xlmr_seqcls_stack_inv_lang_fuse2"]
    model = _load(specs["full"])
    assert not any("invertible" in u.key for u in iter_units(model))
    masks = prune(model, "random", dict(heads=0.5, neurons=0.5, bottleneck=0.5, adapters=0.5), seed=2)
    compacted = compact(model, masks)
    reloaded = compressor.load_model(save_compacted(compacted, tmp_path / "c"))
    assert reloaded.compress_manifest["invertible"]["active"] == "lang"
    own, back = model.base_model.invertible_adapters.state_dict(), reloaded.base_model.invertible_adapters.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    for padding in ("right", "left"):
        inputs = ref.make_inputs(case.arch, padding)
        expected = _out(masked_copy(model, masks), case, inputs)
        assert ref.max_abs_diff(_out(compacted, case, inputs), expected) <= ATOL
        assert ref.max_abs_diff(_out(reloaded, case, inputs), _out(compacted, case, inputs)) == 0
    from compressor.errors import ModelLoadError
    from compressor.modeling.loading import MANIFEST_FILE

    manifest = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    manifest["invertible"]["adapters"]["lang"]["widths"] = ["8", 8]
    (tmp_path / "c" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="invertible.adapters.lang"):
        compressor.load_model(tmp_path / "c")


@pytest.mark.parametrize("key", ["electra_stack_inv_lang_task"])  # XLM-R: test_every_command_runs_on_a_mad_x_stack
def test_export_parity_on_every_padding(stacks, tmp_path, key):
    """model.onnx == the masked model on right-, left- and randomly padded rows; one fused attention per layer
    (ELECTRA: the block runs embedding_size wide, before the embedding projection)."""
    from compressor.pruning import prune
    from exporters.onnx_export import ExportConfig, export_onnx
    from exporters.optimize import attention_nodes_per_layer

    case, _, specs = stacks[key]
    model = _load(specs["full"])
    masks = prune(model, "random", dict(heads=0.25, neurons=0.5, bottleneck=0.5), seed=1)
    result = export_onnx(model, tmp_path / "out", masks, ExportConfig(seed=0))
    parity = json.loads((result.out / "parity.json").read_text())
    checks = [c for c in parity["checks"] if c["target"] == "model.onnx"]
    assert parity["passed"] and {c["padding"] for c in checks} == {"right", "left", "random"}
    assert all(c["max_abs_diff"] <= 1e-4 for c in checks)
    assert sorted(attention_nodes_per_layer(result.out / "model.onnx")) == [0, 1]
    reloaded = compressor.load_model(result.out)  # the compacted model beside the graph keeps its block
    assert reloaded.compress_manifest["invertible"]["active"] == model.compress_manifest["invertible"]["active"]


def test_inspect_shows_it(stacks):
    from typer.testing import CliRunner

    from compressor.cli import app

    _, _, specs = stacks["stack_inv_lang_task"]
    spec = specs["split_safetensors"]
    args = ["inspect", spec["path"], "--setup", spec["setup"]]
    for d in spec["adapters"]:
        args += ["--adapter", d]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "invertible" in line)
    # 32 features: F 16 -> 8 -> 16 and G 16 -> 8 -> 16 (reduction factor 2)
    assert "lang" in line and "nice" in line and "8/8" in line


def test_a_type_without_invertible_adapters_refuses_in_one_line(stacks, monkeypatch):
    """A description with `embeddings=None` (AdapterHub has no invertible adapters for the type) refuses them."""
    import dataclasses

    from compressor.modeling import descriptions

    monkeypatch.setitem(descriptions.DESCRIPTIONS, "bert",
                        dataclasses.replace(descriptions.DESCRIPTIONS["bert"], embeddings=None))
    _, _, specs = stacks["stack_inv_lang_task"]
    with pytest.raises(UnsupportedAdapterError, match="inv_adapter is not supported for model type 'bert'"):
        _load(specs["full"])


def test_every_command_runs_on_a_mad_x_stack(stacks, tmp_path):
    """inspect, prune, compact --adapterhub, export --onnx and bench on Stack(lang, Fuse(a, b)) with lang's block."""
    from test_cli import invoke

    _, _, specs = stacks["xlmr_seqcls_stack_inv_lang_fuse2"]
    src, setup = specs["full"]["path"], ["--setup", specs["full"]["setup"]]
    r = invoke("inspect", src, *setup)
    assert r.exit_code == 0 and "invertible adapter on the embeddings: lang" in r.output, r.output
    r = invoke("prune", src, *setup, "--method", "magnitude", "--sparsity", "heads=0.25", "--sparsity", "neurons=0.25",
               "--sparsity", "bottleneck=0.5", "--out", tmp_path / "masks")
    assert r.exit_code == 0, r.output
    r = invoke("compact", src, *setup, "--masks", tmp_path / "masks", "--out", tmp_path / "compacted", "--adapterhub")
    assert r.exit_code == 0, r.output
    r = invoke("export", src, *setup, "--masks", tmp_path / "masks", "--onnx", "--out", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    r = invoke("bench", tmp_path / "compacted", tmp_path / "onnx", "--provider", "torch", "--provider", "cpu",
               "--batch-sizes", "1", "--seq-lens", "8", "--min-time", "0.01", "--warmup", "1", "--threads", "1",
               "--out", tmp_path / "bench")
    assert r.exit_code == 0, r.output
    cells = json.loads((tmp_path / "bench" / "report.json").read_text())["results"]
    assert {("onnx", "cpu"), ("compacted", "torch")} <= {(c["target"], c["provider"]) for c in cells
                                                        if c["status"] == "ok"}
