"""Typed compositions (compressor/modeling/compositions.py): the string and manifest forms, AdapterHub's
first() / last(), the units of a Stack, the refusals, and a Stack(lang, Fuse(a, b)) row through the CLI
(inspect, prune, compact, export --onnx with parity). Outputs equal to the adapters library's are in
tests/test_adapterhub_parity.py (the `stack_*` cases), masked == compacted in tests/test_compaction_property.py,
write-back in tests/test_adapterhub_writeback.py."""

from __future__ import annotations

import json

import pytest
import torch

import adapterhub_reference as ref
import compressor
from compressor.errors import UnsupportedAdapterError
from compressor.modeling.compositions import Fuse, Single, Stack, from_json, parse
from compressor.units import iter_units
from factories import make_model_dir
from test_cli import invoke

FUSIONS = {"a,b": ["a", "b"], "topics": ["x", "y", "z"]}


@pytest.mark.parametrize("text,expected,first,last", [
    ("lang", Single("lang"), "lang", "lang"),
    ("a,b", Fuse("a,b", ("a", "b")), "a", "b"),
    ("Stack(lang,task)", Stack(Single("lang"), Single("task")), "lang", "task"),
    ("Stack(lang, topics)", Stack(Single("lang"), Fuse("topics", ("x", "y", "z"))), "lang", "z"),
    ("Stack(lang,Fuse(a,b))", Stack(Single("lang"), Fuse("a,b", ("a", "b"))), "lang", "b"),
])
def test_string_and_manifest_forms(text, expected, first, last):
    comp = parse(text, FUSIONS)
    assert comp == expected and (comp.first(), comp.last()) == (first, last)
    assert parse(str(comp), FUSIONS) == comp  # the manifest's `setup` reads back
    assert from_json(json.loads(json.dumps(comp.to_json()))) == comp


def test_old_manifest_forms_still_load():
    assert from_json(["single", "a"]) == Single("a")
    assert from_json(["fuse", "a,b", ["a", "b"]]) == Fuse("a,b", ("a", "b"))
    assert Stack(Single("l"), Fuse("a,b", ("a", "b"))).adapters() == ["l", "a", "b"]


@pytest.mark.parametrize("text,option", [
    ("Parallel(a,b)", "Parallel"), ("Split(a,b)", "Split"), ("BatchSplit(a,b)", "BatchSplit"),
    ("Average(a,b)", "Average"), ("MultiTask(a,b)", "MultiTask"), ("Stack(a,Stack(b,c))", "Stack"),
    ("Stack(a,Parallel(b,c))", "Stack"), ("Stack(a)", "Stack"), ("Fuse(a,c)", "fusion"),
    ("Stack(a,Fuse(a,b))", "twice"),
])
def test_unsupported_compositions_are_one_line(text, option):
    with pytest.raises(UnsupportedAdapterError, match=option) as e:
        parse(text, FUSIONS)
    assert "\n" not in str(e.value) and "supported" in str(e.value)


def test_unsupported_setup_on_a_model_is_one_line(tmp_path):
    src = make_model_dir(tmp_path / "m", n_adapters=2, fusion=None)
    r = invoke("inspect", src, "--setup", "Parallel(a0,a1)")
    assert r.exit_code != 0 and "the Parallel composition is not supported" in r.output
    assert "Traceback" not in r.output
    with pytest.raises(UnsupportedAdapterError, match="'nope' is neither an adapter nor a fusion"):
        compressor.load_model(src, setup="Stack(a0,nope)")


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    case = ref.CASES_BY_ID["stack_lang_fuse2"]
    return ref.save_case(ref.build_reference(case), case, "full", tmp_path_factory.mktemp("stack"))["path"]


def test_stack_units_and_it_is_not_its_last_child(stack_dir):
    """Every bottleneck of the Stack is a unit (the stacked language adapter too), and the stacked fusion's
    adapters; the stack computes something else than the fusion alone."""
    setup = ref.CASES_BY_ID["stack_lang_fuse2"].setup
    model = compressor.load_model(stack_dir, setup=setup)
    assert model.compress_manifest["setup"] == "Stack(lang,Fuse(a,b))"
    site = model.base_model.encoder.layer[1].output
    assert site.active == Stack(Single("lang"), Fuse("a,b", ("a", "b")))
    keys = {u.key.split("layer.1.output.")[1] for u in iter_units(model) if "layer.1.output." in u.key
            and u.kind != "weights"}
    assert keys == {"adapters.lang::bottleneck", "adapters.a::bottleneck", "adapters.b::bottleneck",
                    "adapter_fusion_layer.a,b::adapters"}
    fused_only = compressor.load_model(stack_dir, setup="a,b")
    inputs = ref.make_inputs("bert", "right")
    with torch.no_grad():
        assert (model(**inputs).logits - fused_only(**inputs).logits).abs().max() > 1e-3


def test_stack_through_the_cli(stack_dir, tmp_path):
    setup = ["--setup", "Stack(lang,Fuse(a,b))"]
    r = invoke("inspect", stack_dir, *setup)
    assert r.exit_code == 0 and "Stack(lang,Fuse(a,b))" in r.output, r.output
    r = invoke("prune", stack_dir, *setup, "--method", "magnitude", "--sparsity", "heads=0.25",
               "--sparsity", "bottleneck=0.5", "--sparsity", "adapters=0.5", "--out", tmp_path / "masks")
    assert r.exit_code == 0, r.output
    r = invoke("compact", stack_dir, *setup, "--masks", tmp_path / "masks", "--out", tmp_path / "compacted")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "compacted" / "compress_manifest.json").read_text())
    assert manifest["setup"] == "Stack(lang,Fuse(a,b))"
    assert [site["active"][0] for layer in manifest["layers"] for site in layer["sites"].values()
            if site["active"]] == ["stack", "stack"]
    r = invoke("export", stack_dir, *setup, "--masks", tmp_path / "masks", "--onnx", "--out", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["passed"] and {c["padding"] for c in parity["checks"]} >= {"right", "left", "random"}


@pytest.mark.parametrize("case_id", ["par_bn_options", "stack_par_bn_task"])
def test_parallel_adapter_exports_with_parity(tmp_path, case_id):
    """A parallel bottleneck adapter (both sites, gating, ln_after, a learned scaling; and stacked before a
    Houlsby adapter), half its bottleneck and heads pruned: the graph matches the masked model on right-, left-
    and randomly padded rows."""
    from compressor.masks import MaskSet
    from compressor.units import fingerprint
    from exporters.onnx_export import ExportConfig, export_onnx

    case = ref.CASES_BY_ID[case_id]
    src = ref.save_case(ref.build_reference(case), case, "full", tmp_path / "model")["path"]
    model = compressor.load_model(src, setup=case.setup)
    masks = {}
    for unit in iter_units(model):
        if unit.kind in ("heads", "bottleneck"):
            keep = torch.ones(unit.shape, dtype=torch.bool)
            keep[: unit.size // 2] = False
            masks[unit.key] = keep
    assert any(".adapters.par" in k or ".adapters.a" in k for k in masks)
    result = export_onnx(model, tmp_path / "out", MaskSet(masks, fingerprint(model)), ExportConfig())
    parity = json.loads((result.out / "parity.json").read_text())
    checks = [c for c in parity["checks"] if c["target"] == "model.onnx"]
    assert parity["passed"] and {c["padding"] for c in checks} == {"right", "left", "random"}
