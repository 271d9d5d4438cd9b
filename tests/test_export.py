"""ONNX export (docs/design.md invariants 2 and 4, and the traps list): parity of onnxruntime with the masked model
on right-, left- and randomly padded rows; one fused Attention node per layer with that layer's kept heads;
optimum loads the export directory; sparse, int8 and fp16 variants; bad inputs are one-line errors with nothing
left behind. The variant registry itself: tests/test_variants.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.errors import ParityError
from compressor.masks import MaskSet
from exporters import onnx_export, verify
from exporters.onnx_export import ExportConfig, export_onnx
from exporters.optimize import attention_nodes_per_layer
from factories import make_model_dir

runner = CliRunner()


def every_kind_masks(model, seed: int = 0) -> MaskSet:
    """Every mask kind at once: layer 0 loses all heads, layer 1 keeps one; the first fusion keeps one adapter,
    the others two; bottleneck, FFN neurons and 75% of single weights pruned at random."""
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet.full(model)
    fusions = 0
    for key, mask in masks.masks.items():
        kind = masks.kind_of(key)
        if kind == "heads":
            mask[:] = False
            if ".layer.1." in key:
                mask[1] = True
        elif kind == "adapters":
            mask[:] = False
            mask[: 1 if fusions == 0 else 2] = True
            fusions += 1
        elif kind in ("bottleneck", "neurons"):
            mask.copy_(torch.rand(mask.shape, generator=gen) < 0.6)
            mask[0] = True
        elif kind == "weights":
            mask.copy_(torch.rand(mask.shape, generator=gen) < 0.25)
    return masks


CASES = [("bert", "seq_bn", "classifier"), ("bert", "double_seq_bn", "flex"), ("roberta", "seq_bn", None),
         ("roberta", "double_seq_bn", "classifier"), ("xlm-roberta", "seq_bn", "flex"),
         ("electra", "double_seq_bn", "classifier")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def exported(request, tmp_path_factory):
    model_type, adapter, head = request.param
    root = tmp_path_factory.mktemp("export")
    src = make_model_dir(root / "model", model_type, adapter, n_adapters=3, fusion="dynamic", head=head)
    model = compressor.load_model(src)
    masks = every_kind_masks(model)
    result = export_onnx(model, root / "out", masks, ExportConfig(sparse=True, quantize="int8", variants=["fp16"]),
                         tokenizer_dir=src)
    return request.param, model, masks, result


def test_parity_on_every_padding_side(exported):
    _, _, _, result = exported
    parity = json.loads((result.out / "parity.json").read_text())
    assert parity["passed"] and parity["atol"] == 1e-4
    graph_checks = [c for c in parity["checks"] if c["target"] == "model.onnx"]
    assert {c["padding"] for c in graph_checks} == {"right", "left", "random"}
    assert len({(c["batch"], c["seq"]) for c in graph_checks}) >= 2
    assert len({c["batch"] for c in graph_checks}) >= 2 and len({c["seq"] for c in graph_checks}) >= 2
    assert all(c["max_abs_diff"] <= 1e-4 and c["shape"] == c["reference_shape"] for c in graph_checks)
    assert {"compacted (PyTorch)", "model.onnx", "model.sparse.onnx", "model.int8.onnx",
            "model.fp16.onnx"} <= set(parity["worst"])
    # what each target was held to: atol, fp16's stated tolerance, int8 recorded only
    targets = parity["targets"]
    assert targets["model.onnx"]["tolerance"] == targets["model.sparse.onnx"]["tolerance"] == 1e-4
    assert targets["model.fp16.onnx"] == dict(tolerance=1e-2, held=True, provider="cpu", passed=True,
                                              worst=parity["worst"]["model.fp16.onnx"])
    assert targets["model.int8.onnx"]["held"] is False and targets["model.int8.onnx"]["tolerance"] is None
    assert all(c["atol"] is None and c["ok"] for c in parity["checks"] if c["target"] == "model.int8.onnx")


def test_one_fused_attention_per_layer_with_its_heads(exported):
    _, _, _, result = exported
    assert result.heads == [0, 1]  # layer 0 lost every head, layer 1 kept one of four
    assert attention_nodes_per_layer(result.out / "model.onnx") == {1: [1]}
    assert "| 1 | 1 | 1 | 1 | yes |" in (result.out / "export.md").read_text()


def test_residual_layer_norms_stay_unfused_in_the_file_and_in_plain_sessions(exported, tmp_path):
    """The deploy graph keeps its residual LayerNorms unfused (the faster form on the CPU), their addition written
    as Sum, which onnxruntime's load-time SkipLayerNormFusion does not match: a plain CPU session, default
    options, runs them unfused too (tests/test_plain_session.py checks the rest: outputs, the GPU form)."""
    import onnxruntime as ort

    _, _, _, result = exported

    def ops(path):
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    assert "SkipLayerNormalization" not in ops(result.out / "model.onnx")
    assert ops(result.out / "model.onnx").count("LayerNormalization") >= 4
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(result.out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" not in ops(options.optimized_model_filepath)
    assert ops(options.optimized_model_filepath).count("LayerNormalization") == \
        ops(result.out / "model.onnx").count("LayerNormalization")


def test_single_adapter_fusion_and_empty_layer_were_compacted(exported):
    _, _, _, result = exported
    manifest = json.loads((result.out / "compress_manifest.json").read_text())
    actives = [site["active"] for layer in manifest["layers"] for site in layer["sites"].values() if site["active"]]
    assert actives[0][0] == "single"  # the fusion left with one adapter is a plain adapter now
    assert any(a[0] == "fuse" and len(a[2]) == 2 for a in actives)


def test_compacted_model_beside_the_graph_reloads(exported):
    _, _, _, result = exported
    reloaded = compressor.load_model(result.out)
    session = onnx_export.make_session(result.out / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    feeds = verify.make_inputs(names, 3, 11, "left", np.random.default_rng(0), vocab=100)
    with torch.inference_mode():
        out = reloaded(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()
    assert np.abs(session.run(None, feeds)[0] - ref).max() <= 1e-4


def test_sparse_variant_stores_pruned_weights_sparse(exported):
    _, _, _, result = exported
    graph = onnx.load(str(result.out / "model.sparse.onnx")).graph
    assert len(graph.sparse_initializer) == len(result.sparse["tensors"]) > 0
    assert result.sizes["model.sparse.onnx"] < result.sizes["model.onnx"]
    for t in result.sparse["tensors"]:
        assert t["nonzero"] / t["elements"] < 1 / 3
    text = (result.out / "export.md").read_text()
    assert "densifies" in text and "Break-even density: 0.333" in text


def test_int8_variant_is_quantized_and_its_deviation_recorded(exported):
    _, _, _, result = exported
    ops = {n.op_type for n in onnx.load(str(result.out / "model.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear"}
    assert np.isfinite(result.int8["max_abs_diff"])
    assert "| model.int8.onnx | cpu | recorded only |" in (result.out / "export.md").read_text()


def test_fp16_variant_has_fp16_weights_fp32_io_and_passes_its_tolerance(exported):
    (model_type, _, _), _, _, result = exported
    graph = onnx.load(str(result.out / "model.fp16.onnx")).graph
    types = {t.name: t.data_type for t in graph.initializer}
    matrices = [t.name for t in graph.initializer if len(t.dims) == 2]
    assert matrices and all(types[n] == onnx.TensorProto.FLOAT16 for n in matrices)
    assert onnx.TensorProto.FLOAT not in types.values()
    assert result.variants["fp16"]["fp16_initializers"] == list(types.values()).count(onnx.TensorProto.FLOAT16)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]
    weights = sum(t.ByteSize() for t in onnx.load(str(result.out / "model.onnx")).graph.initializer)
    assert sum(t.ByteSize() for t in graph.initializer) < 0.6 * weights  # the file also holds the graph itself
    assert result.sizes["model.fp16.onnx"] < result.sizes["model.onnx"]
    # held to 1e-2 against the masked fp32 model on the CPU EP; measured well under it
    assert result.variants["fp16"]["tolerance"] == 1e-2 and result.variants["fp16"]["max_abs_diff"] < 5e-3
    session = onnx_export.make_session(result.out / "model.fp16.onnx")
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, verify.make_inputs(names, 2, 7, "left", np.random.default_rng(2), vocab=100))[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    text = (result.out / "export.md").read_text()
    assert "## fp16 (onnxruntime float16 conversion" in text and "stated tolerance 0.01" in text
    assert "| model.fp16.onnx | cpu | 0.01 |" in text


def test_optimum_loads_the_export_directory(exported):
    (_, _, head), _, _, result = exported
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    cls = ORTModelForFeatureExtraction if head is None else ORTModelForSequenceClassification
    ort_model = cls.from_pretrained(result.out, file_name="model.onnx")
    reloaded = compressor.load_model(result.out)
    names = [i.name for i in ort_model.model.get_inputs()]
    feeds = {k: torch.from_numpy(v) for k, v in
             verify.make_inputs(names, 2, 9, "right", np.random.default_rng(1), vocab=100).items()}
    got, want = ort_model(**feeds), reloaded(**feeds)
    name = "last_hidden_state" if head is None else "logits"
    assert (getattr(got, name) - getattr(want, name)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def houlsby_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("h") / "model", "bert", "double_seq_bn", n_adapters=2,
                          fusion="dynamic", head="classifier", seed=3)


def test_no_optimize_keeps_the_plain_graph(houlsby_dir, tmp_path):
    model = compressor.load_model(houlsby_dir)
    result = export_onnx(model, tmp_path / "out", config=ExportConfig(optimize=False))
    assert result.parity["passed"] and attention_nodes_per_layer(tmp_path / "out" / "model.onnx") == {}
    assert not (tmp_path / "out" / "model.raw.onnx").exists()


def test_parity_failure_writes_nothing_unless_allowed(houlsby_dir, tmp_path):
    model = compressor.load_model(houlsby_dir)
    with pytest.raises(ParityError, match="parity failed"):
        export_onnx(model, tmp_path / "out", config=ExportConfig(atol=1e-30))
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(model, tmp_path / "kept", config=ExportConfig(atol=1e-30, allow_mismatch=True))
    assert json.loads((result.out / "parity.json").read_text())["passed"] is False


def test_interrupted_export_leaves_no_directory(houlsby_dir, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(verify, "compare", interrupt)
    result = runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def _one_line_error(result, needle: str):
    assert result.exit_code != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert needle in lines[0], lines[0]


def test_cli_export_and_bad_inputs(houlsby_dir, tmp_path):
    out = tmp_path / "out"
    ok = runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--out", str(out), "--seed", "1"])
    assert ok.exit_code == 0, ok.output
    assert {"model.onnx", "parity.json", "export.md", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    # the output exists: refused unless --overwrite
    _one_line_error(runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--out", str(out)]), "--overwrite")
    assert runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--out", str(out), "--overwrite"]).exit_code == 0
    # no format chosen
    _one_line_error(runner.invoke(app, ["export", str(houlsby_dir), "--out", str(tmp_path / "x")]), "--onnx")
    # a model directory without weights
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((houlsby_dir / "config.json").read_text())
    _one_line_error(runner.invoke(app, ["export", str(empty), "--onnx", "--out", str(tmp_path / "y")]), "noweights")
    # a mask for another model
    other = make_model_dir(tmp_path / "other", "bert", "double_seq_bn", n_adapters=3, fusion="dynamic")
    assert runner.invoke(app, ["prune", str(other), "--sparsity", "adapters=0.5", "--out", str(tmp_path / "m")]
                         ).exit_code == 0
    _one_line_error(runner.invoke(app, ["export", str(houlsby_dir), "--masks", str(tmp_path / "m"), "--onnx",
                                        "--out", str(tmp_path / "z")]), "mask")
    # an unknown quantization scheme, an unknown variant
    _one_line_error(runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--quantize", "int4",
                                        "--out", str(tmp_path / "w")]), "int8")
    _one_line_error(runner.invoke(app, ["export", str(houlsby_dir), "--onnx", "--variant", "fp8",
                                        "--out", str(tmp_path / "v")]), "fp16")
    assert not any(p.name in {"x", "y", "z", "w", "v"} or ".partial" in p.name for p in tmp_path.iterdir())
