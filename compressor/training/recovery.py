"""Recovery training after structured pruning: train what is left of the adapters, fusion and head with the masks
held, then hand back plain weights (masks removed) so that the MaskSet applies them again at compaction."""

from __future__ import annotations

import copy

from torch import nn

from ..errors import TrainingError
from .loop import train
from .trainable import select_trainable


def retrain_masked(model: nn.Module, maskset, data, parts=("adapters", "fusion"), steps=None) -> nn.Module:
    """A copy of `model` whose `parts` (and head) were trained for `steps` (default: data.config's budget) on
    `data` (a TaskContext) under `maskset`'s structured masks. Pruned units get no gradient: their outputs are
    masked. Weight masks are not supported here (use sparse-adapter's fixed masks)."""
    from ..masks import apply_masks
    from ..units import units_by_key

    if any(maskset.kind_of(k) == "weights" for k in maskset.masks):
        raise TrainingError("recovery training holds structured masks only (weight masks: use sparse-adapter)")
    model = apply_masks(copy.deepcopy(model), maskset)
    params = select_trainable(model, list(parts))
    train(model, data.train_set, data.collate, data.loss, data.config, params, stage="recover", steps=steps)
    units = units_by_key(model)
    for key in maskset.masks:
        model.get_submodule(units[key].module_path).set_mask(units[key].kind, None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
