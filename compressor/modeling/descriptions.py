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
from typing import Optional

from ..errors import UnsupportedAdapterError

INVERTIBLE = "invertible_adapters"  # AdapterHub's attribute of the base model holding invertible adapters


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
    # config fields that a model type names its own way (DistilBERT: hidden_dim, activation, attention_dropout)
    ffn_size_field: str = "intermediate_size"
    activation_field: str = "hidden_act"
    attention_dropout_field: str = "attention_probs_dropout_prob"
    # A layout unlike BERT's (DistilBERT): our surgery replaces transformers' whole layer by `layer_class` (in
    # modeling/modules.py), whose attribute names are the four paths above; `source` says where each part sits
    # in transformers' layer: (role, path) for query, key, value, attention_dense, attention_norm, ffn_in,
    # ffn_dense, ffn_norm and the dropouts after the two dense layers (None: none there).
    layer_class: Optional[str] = None
    source: tuple = ()
    # AdapterHub's invertible adapters (MAD-X): a forward hook on this module (under the base model) passes its
    # output through the active setup's first() adapter's invertible adapter, as AdapterHub's post_embedding_forward
    # does; it is `embedding_size_field` wide (ELECTRA: before its embedding projection). None: AdapterHub has no
    # invertible adapters for the type, and loading one is refused.
    embeddings: Optional[str] = "embeddings"
    embedding_size_field: str = "hidden_size"

    def embedding_size(self, config) -> int:
        return getattr(config, self.embedding_size_field)

    def ffn_size(self, config) -> int:
        return getattr(config, self.ffn_size_field)

    def activation(self, config) -> str:
        return getattr(config, self.activation_field)

    def attention_dropout(self, config) -> float:
        return getattr(config, self.attention_dropout_field)

    def site_path(self, layer: int, site: str) -> str:
        """The module path, under the base model, of adapter site `site` (mh_adapter | output_adapter) of a
        layer: where AdapterHub's state-dict keys put that site's adapters and fusions."""
        return f"{self.layers}.{layer}.{self.attention_output if site == 'mh_adapter' else self.ffn_output}"

    @cached_property
    def adapter_key(self) -> re.Pattern:
        """AdapterHub's state-dict key of an adapter, fusion or invertible adapter weight, whatever prefix the saving
        model class put before it: group 1 is the key from the layers path (or `invertible_adapters`) on."""
        sites = "|".join(re.escape(p) for p in (self.attention_output, self.ffn_output))
        return re.compile(rf"^(?:.*\.)?({re.escape(self.layers)}\.\d+\.(?:{sites})\.(?:adapters|adapter_fusion_layer)\..+"
                          rf"|{INVERTIBLE}\.[^.]+\..+)$")


DESCRIPTIONS = {d.model_type: d for d in (
    ModelDescription("bert", "BertAdapterModel"),
    ModelDescription("roberta", "RobertaAdapterModel", position_offset=True, token_types=False),
    ModelDescription("xlm-roberta", "XLMRobertaAdapterModel", position_offset=True, token_types=False),
    # its embedding projection stays transformers'; invertible adapters run before it, embedding_size wide
    ModelDescription("electra", "ElectraAdapterModel", pooler=False, embedding_size_field="embedding_size"),
    # AdapterHub's TransformerBlockWithAdapters: attention_adapters(out_lin output, block input, sa_layer_norm),
    # output_adapters(lin2 output, attention site output, output_layer_norm); no token types, no pooler
    ModelDescription(
        "distilbert", "DistilBertAdapterModel", token_types=False, pooler=False, layers="transformer.layer",
        attention="attention", attention_output="attention_adapters", ffn="ffn", ffn_output="output_adapters",
        ffn_size_field="hidden_dim", activation_field="activation", attention_dropout_field="attention_dropout",
        layer_class="DistilBertLayer", source=(
            ("query", "attention.q_lin"), ("key", "attention.k_lin"), ("value", "attention.v_lin"),
            ("attention_dense", "attention.out_lin"), ("attention_norm", "sa_layer_norm"),
            ("attention_dropout", None), ("ffn_in", "ffn.lin1"), ("ffn_dense", "ffn.lin2"),
            ("ffn_norm", "output_layer_norm"), ("ffn_dropout", "ffn.dropout"))),
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
