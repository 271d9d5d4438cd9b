"""int8 quantization (exporters/quantization.py) on a tiny exported model: static QDQ int8 calibrated on its
inputs stays within a stated tolerance of fp32; `nodes_to_exclude` leaves the named nodes fp32 in the graph; the
sensitivity ranking finds a planted huge-range weight; the measured choice (the first candidate within the
bounds, or the units kept fp32 by option) is recorded in export.md; bad int8 options are one-line errors."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.errors import ExportError
from exporters import quantization as q
from exporters.onnx_export import ExportConfig, export_onnx
from factories import make_model_dir

runner = CliRunner()

# Static int8 of the tiny model against its fp32 graph on 64 rows of random ids: the max abs diff of the logits
# is held to LOGITS_RTOL times the largest fp32 logit (measured: 0.042 per-channel, 0.049 per-tensor; dynamic
# 0.038-0.048), and at least MIN_AGREEMENT of the predictions must agree (measured: all of them).
LOGITS_RTOL = 0.1
MIN_AGREEMENT = 0.95


def random_batches(n: int, seed: int, batch: int = 8, seq: int = 12, vocab: int = 100) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[: batch // 2, seq - 3:] = 0  # some padded rows
        ids = rng.integers(5, vocab, size=(batch, seq), dtype=np.int64) * mask
        out.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids)))
    return out


def setup(**kw) -> q.Int8Setup:
    return q.Int8Setup(random_batches(8, seed=1), random_batches(8, seed=2), "random token ids", **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    model = compressor.load_model(make_model_dir(root / "model", "bert", "seq_bn", n_adapters=2, fusion="dynamic",
                                                 head="classifier", seed=3))
    export_onnx(model, root / "out", config=ExportConfig(seed=0))
    return root / "out" / "model.onnx"


@pytest.fixture(scope="module")
def pre(exported, tmp_path_factory):
    return q.preprocess(exported, tmp_path_factory.mktemp("pre") / "pre.onnx")


def test_static_int8_is_within_the_stated_tolerance_of_fp32(exported, pre, tmp_path):
    s = setup()
    dst = q.quantize(pre, tmp_path / "static.onnx", q.Scheme("static", per_channel=True), s)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, activations included
    ref, got = q.logits_of(exported, s.fidelity), q.logits_of(dst, s.fidelity)
    assert 0 < np.abs(ref - got).max() <= LOGITS_RTOL * np.abs(ref).max()  # quantized (not a copy), and close
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= MIN_AGREEMENT


def test_contrib_outputs_are_typed_so_every_matmul_is_quantized(pre, tmp_path):
    """Without the declared types of the fused Attention's outputs, the static quantizer skipped the MatMuls
    downstream of it (they stayed fp32): every weight MatMul now reads a quantized activation."""
    dst = q.quantize(pre, tmp_path / "static.onnx", q.STATIC, setup())
    graph = onnx.load(str(dst)).graph
    producers = {o: n for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and producers.get(n.input[1]) is not None
               and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert matmuls and all(producers[n.input[0]].op_type == "DequantizeLinear" for n in matmuls)


@pytest.mark.parametrize("scheme", [q.DYNAMIC, q.STATIC])
def test_nodes_to_exclude_stay_fp32(pre, tmp_path, scheme):
    names = [n for nodes in q.units(pre, scheme, by="node").values() for n in nodes]
    kept = [n for n in names if "intermediate" in n][:1]
    assert kept
    graph = onnx.load(str(q.quantize(pre, tmp_path / "x.onnx", scheme, setup(), exclude=kept))).graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    node = by_name[kept[0]]
    assert node.op_type == "MatMul" and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT  # fp32 weight
    int8 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= len(names) - 1  # the others are quantized
    assert not any(n in by_name and by_name[n].op_type == "MatMul" for n in names if n not in kept
                   and "MatMul" in n and scheme.kind == "dynamic")


def _loaded(path) -> bytes:
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # onnx.load marks tensors it read from external data DEFAULT explicitly
        t.ClearField("data_location")
    return model.SerializeToString()  # canonical field order: equal bytes = equal models


@pytest.mark.parametrize("per_channel,exclude", [(False, False), (True, True)])
def test_dynamic_int8_is_the_graph_quantize_dynamic_writes(exported, pre, tmp_path, per_channel, exclude):
    """The dynamic int8 graph, quantized with the fp32 weights left on disk (weights_stay_on_disk), is the one
    onnxruntime's own `quantize_dynamic` writes from the same pre-processed graph with the same options; the
    pre-processed graph (read one tensor at a time) is the one the stock recipe writes."""
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    assert q.hooks_available()  # else this onnxruntime quantizes with its weights in memory
    scheme = q.Scheme("dynamic", per_channel)
    kept = q.units(pre, scheme)["layer 0 ffn in"] if exclude else []
    quantize_dynamic(str(pre), str(tmp_path / "stock.onnx"), weight_type=QuantType.QInt8, per_channel=per_channel,
                     nodes_to_exclude=kept, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    got = q.quantize(pre, tmp_path / "low.onnx", scheme, exclude=kept)
    assert _loaded(got) == _loaded(tmp_path / "stock.onnx")
    assert not list(pre.parent.glob(".*quantized*"))  # its scratch file is gone
    with q.weights_stay_on_disk(pre.parent):  # what the quantizer loads: the graph, its weights on disk
        loaded = importlib.import_module("onnxruntime.quantization.quantize").load_model_with_shape_infer(pre)
    assert sum(uses_external_data(t) for t in loaded.graph.initializer) > 10

    model = onnx.load(str(exported))  # the stock pre-processing: the model loaded whole
    add_pre_process_metadata(model)
    stock = tmp_path / "pre" / "pre.onnx"
    stock.parent.mkdir()
    onnx.save_model(model, str(stock), save_as_external_data=True, location="pre.onnx.data")
    graph_only = onnx.load(str(stock), load_external_data=False)
    q.type_contrib_outputs(graph_only)
    onnx.save_model(graph_only, str(stock))
    assert onnx.load(str(pre), load_external_data=False) == graph_only and _loaded(pre) == _loaded(stock)


def plant_outlier(src, dst, node_name: str) -> None:
    """One weight element of `node_name` at 200x the tensor's largest: per-tensor int8 then rounds the rest of
    that weight to zero, while fp32 keeps it. (Planted before a LayerNorm, such an outlier saturates the graph:
    its output no longer depends on anything else, and no quantization shows.)"""
    model = onnx.load(str(src))
    graph = model.graph
    weight = next(n for n in graph.node if n.name == node_name).input[1]
    init = next(i for i in graph.initializer if i.name == weight)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = 200 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, weight))
    onnx.save(model, str(dst))


def test_sensitivity_ranks_a_planted_huge_range_weight_first(exported, tmp_path):
    names = [n for nodes in q.units(exported, q.DYNAMIC, by="node").values() for n in nodes]
    planted = next(n for n in names if "layer.0/output/adapter_down" in n)  # an outlier the up-projection damps
    plant_outlier(exported, tmp_path / "planted.onnx", planted)
    ws = q.Workspace(tmp_path / "planted.onnx", setup())
    try:
        ranking = q.sensitivity(ws, q.DYNAMIC, by="node")
    finally:
        ws.close()
    assert len(ranking) == len(names)
    assert ranking[0]["unit"] == planted and ranking[0]["cost"] > 10 * ranking[1]["cost"]


def test_units_kept_fp32_by_option_are_the_costliest_and_recorded(exported, tmp_path):
    """`int8` with a setup that searches, one unit kept fp32 by option: every scheme measured, the winner is the
    candidate of least cost, written as model.int8.onnx and summarised in export.md."""
    out = tmp_path / "out"
    with q.int8_setup(setup(search=True, keep=1)):
        result = export_onnx(compressor.load_model(exported.parent), out, config=ExportConfig(variants=["int8"],
                                                                                             seed=0))
    entry = result.variants["int8"]
    names = [c["name"] for c in entry["candidates"]]
    assert names[:4] == [s.name for s in q.SCHEMES] and len(names) == 5 and names[4].endswith(" + 1 fp32")
    best = min(entry["candidates"][:4], key=lambda c: c["cost"])["name"]
    assert names[4] == f"{best} + 1 fp32" == entry["winner"]  # the least costly scheme, its costliest unit fp32
    assert len(entry["sensitivity"]) == len(q.units(exported, q.Scheme(*best.split("-", 1)[:1],
                                                                       per_channel="per-channel" in best)))
    assert entry["kept_fp32"][0]["unit"] == entry["sensitivity"][0]["unit"]
    graph = onnx.load(str(out / "model.int8.onnx")).graph  # kept nodes keep their fp32 op; quantized are replaced
    assert set(entry["kept_fp32"][0]["nodes"]) <= {n.name for n in graph.node if n.op_type in q.DYNAMIC_OPS}
    text = (out / "export.md").read_text()
    assert f"**{entry['winner']}** (units kept fp32 by --int8-keep-fp32;" in text  # not the parity rule's key
    assert "| candidate | mean KL" in text and "Sensitivity" in text


def test_without_a_unit_kept_by_option_the_first_scheme_within_the_bounds_wins(exported, tmp_path):
    """The tiny model's int8 error is far below the bounds: dynamic per-tensor (the fastest) wins, and no
    sensitivity is run."""
    record = q.search(exported, tmp_path / "int8.onnx", setup())
    first = record["candidates"][0]
    assert q.meets(first) and record["winner"] == "dynamic" and record["choice"] == "the first within the bounds"
    assert not record["sensitivity"] and len(record["candidates"]) == len(q.SCHEMES)


def test_int8_static_variant_is_written_and_measured(exported, tmp_path):
    out = tmp_path / "out"
    with q.int8_setup(setup(keep=0)):
        result = export_onnx(compressor.load_model(exported.parent), out,
                             config=ExportConfig(variants=["int8-static"], seed=0))
    entry = result.variants["int8-static"]
    assert [c["name"] for c in entry["candidates"]] == ["static", "static-per-channel"] and not entry["sensitivity"]
    assert (out / "model.int8-static.onnx").exists() and result.parity["targets"]["model.int8-static.onnx"]
    assert "## int8-static" in (out / "export.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--int8-keep-fp32", "-1"], "--int8-keep-fp32 must be 0 or more, got -1"),
    (["--calibration-examples", "0", "--variant", "int8-static"], "--calibration-examples must be at least 1"),
    (["--int8-keep-fp32", "2", "--quantize", "int8"], "--int8-keep-fp32 applies to a measured int8 graph"),
])
def test_bad_int8_options_are_one_line_errors(exported, tmp_path, args, needle):
    result = runner.invoke(app, ["export", str(exported.parent), "--onnx", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_static_int8_without_texts_says_what_to_give(exported, tmp_path):
    """No --data and no tokenizer in the export directory: int8-static cannot calibrate."""
    with pytest.raises(ExportError, match="int8-static needs calibration texts and a tokenizer: give --data"):
        q.packaged_setup(tmp_path)


def test_cli_int8_static_without_data_calibrates_on_the_packaged_sample(tmp_path):
    """`--variant int8-static` with no --data: the packaged MRPC training sample, tokenised with the model's
    tokenizer, calibrates (`--calibration-examples`) and measures; the CLI prints the choice."""
    from task_factories import with_tokenizer

    model = with_tokenizer(make_model_dir(tmp_path / "m", "bert", "seq_bn", n_adapters=2, fusion="dynamic",
                                          head="classifier", seed=3))
    out = tmp_path / "o"
    result = runner.invoke(app, ["export", str(model), "--onnx", "--variant", "int8-static", "--int8-keep-fp32", "0",
                                 "--calibration-examples", "16", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "int8-static: static" in result.stdout and "kept fp32: none" in result.stdout
    text = (out / "export.md").read_text()
    assert "the packaged MRPC training sample (16 calibration rows, the next 256 to measure)" in text
