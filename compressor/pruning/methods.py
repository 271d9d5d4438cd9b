"""Pruning methods: turn criterion scores into a MaskSet. `compress prune --method NAME` picks one.

The baselines here prune, in every unit group of each kind asked for, the floor(fraction * size)
lowest-scoring members, keeping `min_keep` members (1 unless the user allows empty units).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from fractions import Fraction
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..units import KINDS, fingerprint, iter_units
from .criteria import CRITERIA
from .registry import Registry

METHODS = Registry("method")
register_method = METHODS.register


@dataclass
class PruneConfig:
    sparsity: dict = field(default_factory=dict)  # kind -> fraction pruned per unit group
    seed: int = 0
    min_keep: int = 1  # members each unit group keeps (0 allows a layer with no heads, a fusion with no adapter)

    def __post_init__(self):
        for kind, fraction in self.sparsity.items():
            if kind not in KINDS:
                raise PruningConfigError(f"unknown unit kind '{kind}'; kinds: {', '.join(KINDS)}")
            if not 0.0 <= fraction < 1.0:
                raise PruningConfigError(f"sparsity {kind}={fraction} must be in [0, 1)")
        if self.min_keep < 0:
            raise PruningConfigError("min_keep must be >= 0")


class PruningMethod(ABC):
    name = "?"
    criterion = "?"
    needs_data = False

    def __init__(self, config: PruneConfig):
        self.config = config

    @abstractmethod
    def run(self, model: nn.Module, data=None) -> MaskSet:
        """The masks for `model`."""


def prune_group(scores: torch.Tensor, fraction: float, min_keep: int) -> torch.Tensor:
    """Keep-mask of one unit group: drop the floor(fraction * n) lowest scores, keep at least min_keep."""
    flat = scores.flatten()
    n = flat.numel()
    # exact decimal arithmetic: 0.29 * 100 is 29, not floor(28.999999999999996)
    n_prune = min(math.floor(Fraction(repr(float(fraction))) * n), max(n - min_keep, 0))
    keep = torch.ones(n, dtype=torch.bool)
    if n_prune:
        keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    return keep.view(scores.shape)


class OneShotMethod(PruningMethod):
    """One-shot pruning by a criterion, per unit group."""

    def run(self, model, data=None):
        cfg = self.config
        units = [u for u in iter_units(model) if u.kind in cfg.sparsity]
        scores = CRITERIA.get_or_fail(self.criterion)(seed=cfg.seed).scores(model, units, data)
        masks = {}
        for unit in units:
            min_keep = 0 if unit.kind == "weights" else cfg.min_keep
            masks[unit.key] = prune_group(scores[unit.key], cfg.sparsity[unit.kind], min_keep)
        return MaskSet(masks, fingerprint(model), self.name, asdict(cfg))


@register_method("random")
class RandomPruning(OneShotMethod):
    criterion = "random"


@register_method("magnitude")
class MagnitudePruning(OneShotMethod):
    criterion = "magnitude"


def prune(model: nn.Module, method: str, sparsity: dict, seed: int = 0, min_keep: int = 1, data=None) -> MaskSet:
    cls = METHODS.get_or_fail(method)
    if cls.needs_data and data is None:
        raise PruningConfigError(f"method '{method}' needs data: pass --data")
    return cls(PruneConfig(sparsity=dict(sparsity), seed=seed, min_keep=min_keep)).run(model, data)
