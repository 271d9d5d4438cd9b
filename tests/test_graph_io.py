"""The low-memory export path writes the same graphs as the stock one (exporters/graph_io.py, issue 13 item 6):
`export_graph` (torch.onnx.export without parameters, initializers written one at a time) against
`torch.onnx.export` with its parameters, `optimize_graph` on a raw graph whose weights are external (read only
where a fusion needs values) against onnxruntime's optimizer on the inline graph saved by `OnnxModel`, and
`compact(in_place=True)` against the copying compaction."""

import copy
import logging
import warnings

import onnx
import pytest
import torch

import compressor
from compressor.compaction import compact
from exporters import graph_io
from exporters import onnx_export as oe
from exporters import optimize as graph_opt
from factories import make_model_dir


def _proto(path):
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # onnx.load marks tensors it read from external data DEFAULT explicitly
        t.ClearField("data_location")
    return model.SerializeToString()  # canonical field order: equal bytes = equal models


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("graph_io")
    return compact(compressor.load_model(make_model_dir(directory / "m", head="classifier"))), directory


def _stock_export(model, path):
    inputs, output = oe.io_names(model)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes[output] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(oe._Graph(model, inputs, output).eval(), tuple(torch.ones(2, 8, dtype=torch.long)
                          for _ in inputs), str(path), dynamo=False, opset_version=oe.OPSET, input_names=inputs,
                          output_names=[output], dynamic_axes=axes, do_constant_folding=True)


def test_export_and_optimise_write_the_stock_graphs(compacted):
    model, d = compacted
    _stock_export(model, d / "stock.onnx")
    oe.export_graph(model, d / "inline.onnx")
    assert not (d / "inline.onnx.data").exists()
    assert _proto(d / "inline.onnx") == _proto(d / "stock.onnx")

    oe.export_graph(model, d / "raw.onnx", external=True)
    raw = onnx.load(str(d / "raw.onnx"), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer) > 10
    assert _proto(d / "raw.onnx") == _proto(d / "stock.onnx")

    _, FusionOptions, optimize_model = graph_opt._optimizer_modules()
    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    options.enable_skip_layer_norm = False
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    stock = optimize_model(str(d / "stock.onnx"), model_type="bert", num_heads=0, hidden_size=0,
                           optimization_options=options, opt_level=0)
    graph_opt.adapter_attention_fusion(stock).apply()
    graph_opt.residual_sums(stock.model)
    stock.topological_sort()
    stock.save_model_to_file(str(d / "stock_opt.onnx"))
    attention = graph_opt.optimize_graph(d / "raw.onnx", d / "opt.onnx")
    assert attention == graph_opt.attention_nodes_per_layer(d / "stock_opt.onnx") and attention
    assert not (d / "opt.onnx.data").exists()
    assert _proto(d / "opt.onnx") == _proto(d / "stock_opt.onnx")


def test_write_model_external_round_trip(compacted, monkeypatch):
    _, d = compacted
    if not (d / "stock.onnx").exists():
        _stock_export(compacted[0], d / "stock.onnx")
    model = onnx.load(str(d / "stock.onnx"))
    assert graph_io.write_model(model, d / "ext.onnx", external=True)
    on_disk = onnx.load(str(d / "ext.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    monkeypatch.setattr(graph_io, "TWO_GB", 1)  # past the limit: external data without being asked
    assert graph_io.write_model(on_disk, d / "ext2.onnx", base_dir=d)
    assert _proto(d / "ext.onnx") == _proto(d / "ext2.onnx") == _proto(d / "stock.onnx")


def test_compact_in_place_is_the_copying_compaction(tmp_path):
    model = compressor.load_model(make_model_dir(tmp_path / "m", head="classifier"))
    expected = compact(copy.deepcopy(model)).state_dict()
    before = {p.data_ptr() for p in model.parameters()}
    got = compact(model, in_place=True)
    assert got is model
    state = got.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    kept = {p.data_ptr() for p in got.parameters()} & before
    assert len(kept) > len(before) // 2  # unpruned weights were taken over, not copied


@pytest.mark.parametrize("form", ["inline", "two graph fields", "external"])
def test_split_weights_is_onnx_save_with_external_data(compacted, tmp_path, form):
    """`split_weights` (int8's pre-processing reads the deploy graph with it) gives the graph `onnx.save_model`
    with external data writes, from a self-contained file, one written by `write_model` (its initializers in a
    second `graph` field) or one whose weights are external already."""
    model, d = compacted
    if not (d / "stock.onnx").exists():
        _stock_export(model, d / "stock.onnx")
    src = tmp_path / "src.onnx"
    stock = onnx.load(str(d / "stock.onnx"))
    if form == "inline":
        onnx.save_model(stock, str(src))
    else:
        graph_io.write_model(stock, src, external=form == "external")
    expected = tmp_path / "expected" / "m.onnx"
    expected.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(expected), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=graph_io.EXTERNAL_MIN_BYTES)
    got = tmp_path / "got" / "m.onnx"
    got.parent.mkdir()
    shell = graph_io.split_weights(src, got.parent / "m.onnx.data")
    onnx.save_model(shell, str(got))
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in shell.graph.initializer) > 10
    assert shell == onnx.load(str(expected), load_external_data=False)  # the same offsets, in the same file
    assert _proto(got) == _proto(expected) == _proto(d / "stock.onnx")
