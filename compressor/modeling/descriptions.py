"""One description per supported model type: what differs between the encoders we load (issue 16).

Every module that needs a fact about a model type asks `describe(config)` here instead of testing
`config.model_type`; adding a model type is one `ModelDescription` in `DESCRIPTIONS` plus its rows in the test
matrix (tests/adapterhub_reference.py `ARCHS`). The layer paths below are relative to a transformers layer module
of the type and are what our surgery replaces (docs/design.md, "Data flow": load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import UnsupportedAdapterError


@dataclass(frozen=True)
class ModelDescription:
    model_type: str  # transformers' config.model_type
    adapterhub_class: str  # AdapterHub's flex-head class for it
    # positions start after the padding index (RoBERTa family): a model holds max_position_embeddings - pad - 1
    position_offset: bool = False
    token_types: bool = True  # the model reads token_type_ids (RoBERTa family: one type, not fed)
    ort_model_type: str = "bert"  # onnxruntime transformer optimizer's model_type
    pooler: bool = True  # the encoder class has an optional pooler (`add_pooling_layer`)
    layers: str = "encoder.layer"  # under the base model
    attention: str = "attention.self"  # under a layer: Q/K/V and the scores (replaced by SelfAttention)
    attention_output: str = "attention.output"  # dense + LayerNorm after attention: the mh_adapter site
    ffn: str = "intermediate"  # the FFN's first projection and activation (replaced by Intermediate)
    ffn_output: str = "output"  # dense + LayerNorm after the FFN: the output_adapter site

    @cached_property
    def adapter_key(self) -> re.Pattern:
        """AdapterHub's state-dict key of an adapter or fusion weight, whatever prefix the saving model class put
        before it: group 1 is the key from the layers path on."""
        sites = "|".join(re.escape(p) for p in (self.attention_output, self.ffn_output))
        return re.compile(rf"^(?:.*\.)?({re.escape(self.layers)}\.\d+\.(?:{sites})\.(?:adapters|adapter_fusion_layer)\..+)$")


DESCRIPTIONS = {d.model_type: d for d in (
    ModelDescription("bert", "BertAdapterModel"),
    ModelDescription("roberta", "RobertaAdapterModel", position_offset=True, token_types=False),
    ModelDescription("xlm-roberta", "XLMRobertaAdapterModel", position_offset=True, token_types=False),
    ModelDescription("electra", "ElectraAdapterModel", pooler=False),  # its embedding projection stays transformers'

)}


def describe(config_or_type) -> ModelDescription:
    """The description of a transformers config (or a model_type string, or a config.json dict)."""
    if isinstance(config_or_type, str):
        model_type = config_or_type
    elif isinstance(config_or_type, dict):
        model_type = config_or_type.get("model_type")
    else:
        model_type = getattr(config_or_type, "model_type", None)
    if model_type not in DESCRIPTIONS:
        raise UnsupportedAdapterError(
            f"model type '{model_type}' is not supported; supported: {', '.join(DESCRIPTIONS)}")
    return DESCRIPTIONS[model_type]


def max_positions(config) -> int:
    """How many tokens a config's position embeddings hold (0 when unknown); `config`: a transformers config or a
    config.json dict. An unsupported model type counts as having no offset."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    n = int(get("max_position_embeddings") or 0)
    model_type = get("model_type")
    if n and model_type in DESCRIPTIONS and DESCRIPTIONS[model_type].position_offset:
        n -= int(get("pad_token_id") or 0) + 1
    return n


def submodule(layer, path: str):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def set_submodule(layer, path: str, module) -> None:
    *parents, last = path.split(".")
    setattr(submodule(layer, ".".join(parents)) if parents else layer, last, module)
