"""Pruning methods: turn criterion scores into a MaskSet. `compress prune --method NAME` picks one.

The baselines here prune, in every unit group of each kind asked for, the floor(fraction * size)
lowest-scoring members, keeping `min_keep` members (1 unless the user allows empty units).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from fractions import Fraction
from dataclasses import asdict, dataclass, field
from typing import Optional

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


@dataclass
class NoOptions:
    pass


class PruningMethod(ABC):
    name = "?"
    criterion = "?"
    needs_data = False
    kinds = KINDS  # unit kinds the method can prune
    scope = "group"  # "group": the fraction applies to each unit group; "global": one ranking over all groups
    Options = NoOptions  # the method's own settings (a dataclass; __post_init__ checks them)

    def __init__(self, config: PruneConfig, options: Optional[dict] = None):
        self.config = config
        unknown = sorted(set(options or {}) - set(self.Options.__dataclass_fields__))
        if unknown:
            valid = ", ".join(sorted(self.Options.__dataclass_fields__)) or "none"
            raise PruningConfigError(f"method '{self.name}' has no option {unknown[0]!r} (its options: {valid})")
        self.options = self.Options(**(options or {}))
        bad = sorted(set(config.sparsity) - set(self.kinds))
        if bad:
            raise PruningConfigError(f"method '{self.name}' prunes {', '.join(self.kinds)}, not {bad[0]}: "
                                     f"use --sparsity {self.kinds[0]}=FRACTION")

    def params(self) -> dict:
        return dict(asdict(self.config), options=asdict(self.options))

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
        return MaskSet(masks, fingerprint(model), self.name)


@register_method("random")
class RandomPruning(OneShotMethod):
    criterion = "random"


@register_method("magnitude")
class MagnitudePruning(OneShotMethod):
    criterion = "magnitude"


def global_prune(scores: dict, units: dict, fraction: float, min_keep: int) -> dict:
    """One ranking over all groups: prune the floor(fraction * total) lowest-scoring members overall, skipping
    members whose group would drop below `min_keep`. Ties break by key and position (reproducible)."""
    keys = sorted(scores)
    flat = torch.cat([scores[k].flatten().float() for k in keys])
    owner = torch.cat([torch.full((scores[k].numel(),), i) for i, k in enumerate(keys)]) if min_keep else None
    n_prune = math.floor(Fraction(repr(float(fraction))) * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    order = torch.argsort(flat, stable=True)
    if min_keep == 0:  # no group floor: the n lowest (vectorised; encoder weights are millions of members)
        keep[order[:n_prune]] = False
    else:
        left = {i: scores[k].numel() for i, k in enumerate(keys)}
        pruned = 0
        for idx in order.tolist():
            if pruned == n_prune:
                break
            group = int(owner[idx])
            if left[group] <= min_keep:
                continue
            keep[idx], left[group], pruned = False, left[group] - 1, pruned + 1
    out, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = keep[start:start + n].view(units[k].shape)
        start += n
    return out


def prune(model: nn.Module, method: str, sparsity: dict, seed: int = 0, min_keep: int = 1, data=None,
          options: Optional[dict] = None) -> MaskSet:
    """Run pruning method `method` on `model` (left unchanged). `data`: a training.TaskContext for the methods
    that need data. A method that trains weights returns them as `maskset.model`."""
    cls = METHODS.get_or_fail(method)
    if cls.needs_data and data is None:
        raise PruningConfigError(f"method '{method}' needs data: pass --data (e.g. --data glue:rte)")
    instance = cls(PruneConfig(sparsity=dict(sparsity), seed=seed, min_keep=min_keep), options)
    maskset = instance.run(model, data)
    maskset.params = instance.params()
    if data is not None:
        maskset.params["train"] = data.config.to_dict()
        if maskset.data is None:
            maskset.data = data.describe()
        if "dev_metrics" not in maskset.extra:
            maskset.extra["dev_metrics"] = _dev_metrics(maskset.model if maskset.model is not None else model,
                                                        maskset, data)
    return maskset


def _dev_metrics(model: nn.Module, maskset: MaskSet, data) -> Optional[dict]:
    """The masked model's dev metrics, when it has a head that fits the task (task-agnostic masks on a headless
    encoder have none until a head is trained)."""
    from ..masks import masked_copy
    from ..training.heads import num_labels_of

    if num_labels_of(model) != data.spec.num_labels:
        return None
    return data.evaluate(masked_copy(model, maskset))
