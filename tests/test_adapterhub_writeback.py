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
