"""Importance criteria: (model, units) -> one score tensor per unit, higher = more important.

Kept apart from the methods that use them and from compaction (Torch-Pruning's importance/surgery split).
Each criterion is a registered class; a test fails when a registered criterion has no test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Iterable

import torch
from torch import nn

from ..modeling.architecture import layer_of_path
from ..units import Unit
from .registry import Registry

CRITERIA = Registry("criterion")
register_criterion = CRITERIA.register


class Criterion(ABC):
    name = "?"
    needs_data = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def scores(self, model: nn.Module, units: Iterable[Unit], data=None) -> dict:
        """Scores per unit key, shaped like the unit; higher = more important."""


@register_criterion("random")
class RandomCriterion(Criterion):
    """Uniform random scores, drawn per unit in key order from one seeded generator (reproducible)."""

    def scores(self, model, units, data=None):
        gen = torch.Generator().manual_seed(self.seed)
        return {u.key: torch.rand(u.shape, generator=gen) for u in sorted(units, key=lambda u: u.key)}


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """L2 norm of the weights a unit owns: |w| for single weights; for a head its Q, K, V rows and output
    columns; for an FFN or bottleneck neuron its in-row and out-column; for a fused adapter all its weights
    (its up projection scaled as it runs)."""

    @torch.no_grad()
    def scores(self, model, units, data=None):
        return {u.key: _magnitude(model, u) for u in units}


def _sq_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.pow(2).sum(dim=1)


def _magnitude(model: nn.Module, unit: Unit) -> torch.Tensor:
    if unit.kind == "weights":
        return model.get_parameter(unit.module_path).detach().abs()
    module = model.get_submodule(unit.module_path)
    if unit.kind == "heads":
        d = module.attention_head_size
        rows = sum(_sq_rows(getattr(module, n).weight) for n in ("query", "key", "value"))
        out = _sq_rows(layer_of_path(model, unit.module_path).mh_site.dense.weight.T)
        return (rows + out).view(-1, d).sum(dim=1).sqrt()
    if unit.kind == "neurons":
        out = layer_of_path(model, unit.module_path).out_site.dense.weight
        return (_sq_rows(module.dense.weight) + _sq_rows(out.T)).sqrt()
    if unit.kind == "bottleneck":
        return (_sq_rows(module.down_proj.weight) + _sq_rows(module.adapter_up.weight.T)).sqrt()
    if unit.kind == "adapters":
        site = model.get_submodule(unit.module_path.rsplit(".adapter_fusion_layer.", 1)[0])
        return torch.stack([_adapter_norm(site.adapters[n]) for n in unit.members])
    raise ValueError(unit.kind)


def _adapter_norm(adapter) -> torch.Tensor:
    scale = adapter.scaling if isinstance(adapter.scaling, torch.Tensor) else torch.tensor(adapter.scaling)
    up = adapter.adapter_up.weight * scale.reshape(-1, 1) if scale.numel() > 1 else adapter.adapter_up.weight * scale
    return (adapter.down_proj.weight.pow(2).sum() + up.pow(2).sum()).sqrt()
