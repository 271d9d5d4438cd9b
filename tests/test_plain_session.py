"""A plain onnxruntime session is the fast path (issue 13, item 1): the deploy graph writes its residual additions
as Sum, which onnxruntime's load-time SkipLayerNormFusion does not match, so a session with default options (what
users' servers and optimum's ORTModel classes open) keeps the Add + LayerNormalization pair that is the faster one
on the CPU, with no session option. Our CUDA / TensorRT sessions get the Add back (the fused kernel is the fast one
there). Not timed: benchmarks/sessions.py measures it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import compressor
from exporters import verify
from exporters.onnx_export import ExportConfig, export_onnx
from exporters.optimize import residual_sums, skip_layer_norm_form
from exporters.runtime import make_session, skip_layer_norm_graph
from factories import make_model_dir

CASES = [("bert", "seq_bn", "classifier"), ("roberta", "double_seq_bn", None)]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def exported(request, tmp_path_factory):
    model_type, adapter, head = request.param
    root = tmp_path_factory.mktemp("plain")
    src = make_model_dir(root / "model", model_type, adapter, n_adapters=3, fusion="dynamic", head=head)
    model = compressor.load_model(src)
    result = export_onnx(model, root / "out", None, ExportConfig(seed=0), tokenizer_dir=src)
    return request.param, result


def ops(model) -> Counter:
    graph = (onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model).graph
    return Counter(n.op_type for n in graph.node)


def loaded_graph(source, tmp_path, name: str, **kwargs) -> Counter:
    """Op counts of the graph onnxruntime runs after its load-time optimisations, in a session with default
    options (only the file to write the optimised graph to) on the CPU execution provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], **kwargs)
    return session, ops(options.optimized_model_filepath)


def feeds_for(session, batch=3, seq=13, padding="left", seed=0):
    names = [i.name for i in session.get_inputs()]
    return verify.make_inputs(names, batch, seq, padding, np.random.default_rng(seed), vocab=100)


def test_no_layer_norm_is_fed_by_an_add(exported):
    """The property onnxruntime's fusion keys on: a LayerNormalization whose input comes from an Add."""
    _, result = exported
    graph = onnx.load(str(result.out / "model.onnx")).graph
    producer = {out: node for node in graph.node for out in node.output}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) >= 4
    assert {producer[n.input[0]].op_type for n in norms} == {"Sum"}
    assert "SkipLayerNormalization" not in {n.op_type for n in graph.node}


def test_plain_session_keeps_the_pair_and_matches(exported, tmp_path):
    _, result = exported
    path = result.out / "model.onnx"
    plain, loaded = loaded_graph(str(path), tmp_path, "plain")
    assert "SkipLayerNormalization" not in loaded
    assert loaded["LayerNormalization"] == ops(path)["LayerNormalization"]
    ours = make_session(path)  # our CPU session: default options bar threads, the same graph
    feeds = feeds_for(plain)
    got = plain.run(None, feeds)[0]
    assert np.array_equal(got, ours.run(None, feeds)[0])
    reloaded = compressor.load_model(result.out)
    with torch.inference_mode():
        out = reloaded(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_sum_and_add_forms_are_the_same_arithmetic(exported):
    """The residual Sum is Add's IEEE addition: with the fusion off, both forms give bit-identical outputs."""
    import onnxruntime as ort

    _, result = exported
    path = result.out / "model.onnx"
    model = onnx.load(str(path))
    n = skip_layer_norm_form(model)
    assert n == ops(path)["Sum"] >= 4 and ops(model)["Sum"] == 0
    add_form = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["SkipLayerNormFusion"])
    sum_form = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for padding in ("right", "left", "random"):
        feeds = feeds_for(sum_form, batch=4, seq=17, padding=padding, seed=1)
        assert np.array_equal(add_form.run(None, feeds)[0], sum_form.run(None, feeds)[0])
    assert residual_sums(model) == n and ops(model) == ops(path)


def test_gpu_sessions_get_the_fusable_form(exported, tmp_path):
    """What make_session hands CUDA / TensorRT: the Adds back, which onnxruntime's SkipLayerNormFusion (the same
    transformer on every provider it supports) fuses at load; checked here on the CPU provider. Outputs match."""
    import onnxruntime as ort

    _, result = exported
    path = result.out / "model.onnx"
    options = ort.SessionOptions()
    graph = skip_layer_norm_graph(path, options)
    assert graph is not None and "Sum" not in ops(onnx.load_from_string(graph))
    fused, loaded = loaded_graph(graph, tmp_path, "gpu-form")
    # In these tiny graphs onnxruntime's shape inference gives the residual Adds after an adapter inputs whose dims
    # it cannot prove equal, so only the first residual of each graph fuses; in the real MiniLM every one does
    # (18 of 18 on the compacted default: benchmarks/results/sessions.md)
    assert loaded["SkipLayerNormalization"] >= 1
    assert "SkipLayerNormalization" not in loaded_graph(str(path), tmp_path, "cpu-form")[1]
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = feeds_for(plain, seed=2)
    assert np.abs(fused.run(None, feeds)[0] - plain.run(None, feeds)[0]).max() <= 1e-4


def test_gpu_form_of_a_graph_with_external_data(exported, tmp_path):
    """Past 2 GB the weights live beside the graph: the rewritten graph, loaded from bytes, still finds them."""
    import onnxruntime as ort

    _, result = exported
    model = onnx.load(str(result.out / "model.onnx"))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").is_file()
    options = ort.SessionOptions()
    graph = skip_layer_norm_graph(tmp_path / "model.onnx", options)
    assert graph is not None and len(graph) < (tmp_path / "model.onnx.data").stat().st_size
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(result.out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = feeds_for(plain, seed=3)
    assert np.abs(session.run(None, feeds)[0] - plain.run(None, feeds)[0]).max() <= 1e-4
