"""Prediction heads for training: find the model's head, or give a headless encoder a new AdapterHub-style
classification head (recorded in the manifest, so the trained model saves and reloads with it)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import DataError
from ..modeling.architecture import FlexHeadModel
from ..modeling.modules import PredictionHead


def num_labels_of(model: nn.Module) -> Optional[int]:
    """The active head's number of outputs, None without a head."""
    if isinstance(model, FlexHeadModel):
        return None if model.active_head is None else model.heads[model.active_head][-1].out_features
    classifier = getattr(model, "classifier", None)
    if classifier is not None:
        return model.config.num_labels
    return None


def head_parameters(model: nn.Module) -> list:
    if isinstance(model, FlexHeadModel):
        return list(model.heads[model.active_head].parameters()) if model.active_head else []
    classifier = getattr(model, "classifier", None)
    return list(classifier.parameters()) if classifier is not None else []


def ensure_head(model: nn.Module, spec, name: Optional[str] = None, seed: int = 0) -> nn.Module:
    """`model` with a head that fits `spec` (a data TaskSpec): the model's own head when its size matches, a
    new head on a flex model (or a headless encoder, which becomes a flex model) when it has none."""
    import torch

    want = 1 if spec.label_list is None else len(spec.label_list)
    have = num_labels_of(model)
    if have is not None:
        if have != want:
            raise DataError(f"the model's head has {have} outputs, task '{spec.name}' needs {want}: "
                            "train a new head with `compress train --train head --new-head`")
        return model
    manifest = model.compress_manifest
    name = name or spec.name
    config = model.config if not isinstance(model, FlexHeadModel) else model.base_model.config
    head_config = dict(head_type="classification", num_labels=want, layers=2, activation_function="tanh",
                       use_pooler=False, bias=True, dropout_prob=getattr(config, "hidden_dropout_prob", 0.1),
                       label2id=None if spec.label_list is None else {l: i for i, l in enumerate(spec.label_list)})
    torch.manual_seed(seed)
    head = PredictionHead(config.hidden_size, want, dropout=head_config["dropout_prob"])
    for module in head.modules():
        if isinstance(module, nn.Linear):  # transformers' BERT initialisation
            nn.init.normal_(module.weight, std=getattr(config, "initializer_range", 0.02))
            nn.init.zeros_(module.bias)
    if not isinstance(model, FlexHeadModel):
        if manifest["model_class"] != "encoder":
            raise DataError(f"cannot add a head to a {manifest['model_class']} model")
        model = FlexHeadModel(model, {}, None)
        model.compress_manifest = manifest
        manifest["model_class"] = "flex"
    model.heads[name] = head
    model.active_head = name
    manifest["heads"] = {**manifest.get("heads", {}), name: head_config}
    manifest["active_head"] = name
    return model
