"""`compress compact --adapterhub`: the pruned model written back in AdapterHub's format loads in the
`adapters` library and gives the compacted model's outputs."""

from __future__ import annotations

import json

import pytest
import torch

adapters = pytest.importorskip("adapters")

import compressor  # noqa: E402
from compressor.api import compact_to_dir  # noqa: E402
from compressor.errors import UnsupportedAdapterError  # noqa: E402
from compressor.pruning import prune  # noqa: E402
from factories import make_model_dir, random_inputs  # noqa: E402


def _load_with_adapters(directory, head):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    if head == "flex":
        model = adapters.AutoAdapterModel.from_pretrained(directory)
    else:
        cls = AutoModelForSequenceClassification if head == "classifier" else AutoModel
        model = cls.from_pretrained(directory)
        adapters.init(model)
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    setup = next(iter(json.loads((directory / "config.json").read_text())["adapters"]["fusions"]))
    model.set_active_adapters(adapters.composition.Fuse(*setup.split(",")))
    return model.eval()


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("kwargs", [
    dict(head="flex"),
    dict(adapter_config="double_seq_bn"),
    dict(model_type="roberta", head="classifier"),
    dict(model_type="xlm-roberta", head="flex"),
    dict(model_type="electra", adapter_config="double_seq_bn", head="classifier"),
], ids=["bert-pfeiffer-flex", "bert-houlsby", "roberta-pfeiffer-classifier", "xlmr-pfeiffer-flex",
        "electra-houlsby-classifier"])
def test_written_back_model_loads_in_adapters(tmp_path, kwargs):
    src = make_model_dir(tmp_path / "src", n_adapters=3, **kwargs)
    model = compressor.load_model(src)
    masks = prune(model, "random", dict(heads=0.5, neurons=0.3, bottleneck=0.5, adapters=0.0), seed=1)
    for key, mask in masks.masks.items():  # drop adapter a0 from layer 0's fusion(s): becomes leave_out=[0]
        if key.endswith("::adapters") and ".layer.0." in key:
            mask[0] = False
    compacted = compact_to_dir(model, masks, tmp_path / "out", adapterhub=True, source=src)
    written = tmp_path / "out" / "adapterhub"
    config = json.loads((written / "config.json").read_text())
    assert config["pruned_heads"] and config["adapters"]["config_map"]["cfg_a0"]["leave_out"] == [0]
    ref = _load_with_adapters(written, kwargs.get("head"))
    inputs = random_inputs(kwargs.get("model_type", "bert"), 3, 9, "left")
    with torch.no_grad():
        assert (_out(ref(**inputs)) - _out(compacted(**inputs))).abs().max() <= 1e-5


def test_unrepresentable_fusion_is_a_clear_error(tmp_path):
    """Each layer keeps a different single adapter: no adapter runs in every layer, so AdapterHub cannot run
    the fusion; the command refuses and writes nothing."""
    src = make_model_dir(tmp_path / "src", n_adapters=2)
    model = compressor.load_model(src)
    masks = prune(model, "random", dict(adapters=0.5), seed=0)
    for key, mask in masks.masks.items():
        layer = int(key.split(".layer.")[1].split(".")[0])
        mask[:] = torch.tensor([layer == 0, layer == 1])
    with pytest.raises(UnsupportedAdapterError, match="AdapterHub"):
        compact_to_dir(model, masks, tmp_path / "out", adapterhub=True, source=src)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case_id", ["stack_lang_task_houlsby_mixed", "stack_lang_fuse2", "par_bn_options"])
def test_written_back_stack_loads_in_adapters(tmp_path, case_id):
    """Stack(lang, task), Stack(lang, Fuse(a, b)) and a parallel adapter, saved by the adapters library: pruned
    (heads, FFN and bottleneck neurons of the stacked, fused and parallel adapters; fused adapter a out of layer
    0), written back, loaded by the adapters library under the same setup, equal to the compacted model."""
    import adapterhub_reference as ref

    case = ref.CASES_BY_ID[case_id]
    src = ref.save_case(ref.build_reference(case), case, "full", tmp_path / "src")["path"]
    model = compressor.load_model(src, setup=case.setup)
    masks = prune(model, "random", dict(heads=0.5, neurons=0.3, bottleneck=0.5, adapters=0.0), seed=1)
    for key, mask in masks.masks.items():
        if key.endswith("::adapters") and ".layer.0." in key:
            mask[0] = False
    compacted = compact_to_dir(model, masks, tmp_path / "out", adapterhub=True, source=src)
    written = tmp_path / "out" / "adapterhub"
    hub = json.loads((written / "config.json").read_text())["adapters"]
    assert set(hub["adapters"]) == set(case.adapter_names)
    if case.fusion:
        assert hub["config_map"]["cfg_a"]["leave_out"] == [0]
    theirs = ref.reload_reference(case, "full", dict(path=str(written)))
    for padding in ref.PADDINGS:
        inputs = ref.make_inputs(case.arch, padding)
        with torch.no_grad():
            got, ours = ref.reloaded_outputs(theirs, case, inputs), ref.output_of(compacted(**inputs), case)
        assert ref.max_abs_diff(got, ours) <= 1e-5


@pytest.mark.parametrize("case_id", ["xlmr_seqcls_stack_inv_lang_fuse2", "roberta_fuse2_inv_first"])
def test_written_back_invertible_adapter_loads_in_adapters(tmp_path, case_id):
    """MAD-X: the language adapter's invertible block (on the embeddings, not pruned) is written back under
    AdapterHub's keys with its config, and runs there again for the same setup's first() adapter."""
    import adapterhub_reference as ref
    from safetensors.torch import load_file

    case = ref.CASES_BY_ID[case_id]
    src = ref.save_case(ref.build_reference(case), case, "full", tmp_path / "src")["path"]
    model = compressor.load_model(src, setup=case.setup)
    masks = prune(model, "random", dict(heads=0.5, neurons=0.3, bottleneck=0.5), seed=1)
    compacted = compact_to_dir(model, masks, tmp_path / "out", adapterhub=True, source=src)
    written = tmp_path / "out" / "adapterhub"
    first = model.base_model.invertible_adapters.active
    hub = json.loads((written / "config.json").read_text())["adapters"]
    assert hub["config_map"][f"cfg_{first}"]["inv_adapter"] == "nice"
    keys = [k for k in load_file(str(written / "model.safetensors")) if "invertible_adapters." in k]
    assert keys and all(f"invertible_adapters.{first}." in k for k in keys)
    theirs = ref.reload_reference(case, "full", dict(path=str(written)))
    assert first in theirs.base_model.invertible_adapters
    for padding in ref.PADDINGS:
        inputs = ref.make_inputs(case.arch, padding)
        with torch.no_grad():
            got, ours = ref.reloaded_outputs(theirs, case, inputs), ref.output_of(compacted(**inputs), case)
        assert ref.max_abs_diff(got, ours) <= 1e-5
