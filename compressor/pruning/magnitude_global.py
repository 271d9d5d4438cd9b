"""Magnitude baselines of TAMT's comparison (Chen et al., "The Lottery Ticket Hypothesis for Pre-trained BERT
Networks", 2020), over the pretrained encoder's weight matrices, ranked globally:

- `omp`: one-shot magnitude pruning of the pretrained weights.
- `imp`: iterative magnitude pruning: train the weights (masks fixed) on the objective, prune 10% of the
  remaining weights by trained magnitude, rewind the survivors to their pretrained values, repeat until the
  target (the last round prunes exactly to it). The masks apply to the pretrained weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..training import train
from ..training.objectives import task_loss
from ..training.trainable import FixedWeightMasks
from ..units import fingerprint
from .learned_masks import OBJECTIVES, PretrainingObjective, encoder_weight_units, n_pruned
from .methods import PruningMethod, global_prune, register_method


def _magnitudes(model, units) -> dict:
    return {u.key: model.get_parameter(u.module_path).detach().abs().cpu() for u in units}


@register_method("omp")
class OneShotGlobalMagnitude(PruningMethod):
    criterion = "magnitude"
    kinds = ("weights",)
    scope = "global"

    def run(self, model: nn.Module, data=None) -> MaskSet:
        units = {u.key: u for u in encoder_weight_units(model)}
        masks = global_prune(_magnitudes(model, units.values()), units, self.config.sparsity["weights"], 0)
        return MaskSet(masks, fingerprint(model), self.name)


@dataclass
class ImpOptions:
    rate: float = 0.1  # share of the remaining weights pruned per round
    objective: str = "mlm"  # what trains between rounds: mlm | kd | mlm+kd | task
    mlm_probability: float = 0.15

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise PruningConfigError(f"imp rate must be in (0, 1), got {self.rate}")
        if self.objective not in OBJECTIVES + ("task",):
            raise PruningConfigError(f"--objective must be one of: {', '.join(OBJECTIVES + ('task',))}")


def imp_schedule(fraction: float, rate: float) -> list:
    """Pruned fractions after each round: 1 - (1 - rate)^r, the last one exactly `fraction`."""
    if fraction <= 0:
        return []
    rounds = max(1, math.ceil(math.log(1 - fraction) / math.log(1 - rate) - 1e-9))
    return [1 - (1 - rate) ** r for r in range(1, rounds)] + [fraction]


@register_method("imp")
class IterativeMagnitude(PruningMethod):
    criterion = "magnitude"
    needs_data = True
    kinds = ("weights",)
    scope = "global"
    Options = ImpOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        work = copy.deepcopy(model)
        for p in work.parameters():
            p.requires_grad_(False)
        units = {u.key: u for u in encoder_weight_units(work)}  # keys of `model`: the masks are for it
        total = sum(u.size for u in units.values())
        if opts.objective == "task":
            from ..training.heads import ensure_head
            work = ensure_head(work, data.spec, seed=cfg.seed)  # a headless encoder gets a prefix (`bert.`)
            objective, extra_params = task_loss, []
        else:
            objective = PretrainingObjective(work, opts.objective, data.tokenizer, opts.mlm_probability, cfg.seed)
            extra_params = objective.parameters()
        prefix = f"{work.base_model_prefix}." if type(work) is not type(model) else ""
        paths = {k: prefix + u.module_path for k, u in units.items()}
        pretrained = {k: work.get_parameter(paths[k]).detach().clone() for k in units}
        masks = {k: torch.ones(u.shape, dtype=torch.bool) for k, u in units.items()}
        history = []
        for r, fraction in enumerate(imp_schedule(cfg.sparsity["weights"], opts.rate), start=1):
            fixed = FixedWeightMasks(work, {paths[k]: masks[k] for k in units})
            params = [work.get_parameter(paths[k]) for k in units] + list(extra_params)
            for p in params:
                p.requires_grad_(True)
            summary = train(work, data.train_set, data.collate, objective, data.config, params, stage=f"imp-{r}",
                            after_backward=fixed.zero_grads, after_step=fixed.apply)
            scores = {k: work.get_parameter(paths[k]).detach().abs().cpu() for k in units}
            for k in scores:
                scores[k][~masks[k]] = -1.0  # pruned weights stay pruned
            masks = global_prune(scores, units, fraction, 0)
            with torch.no_grad():  # rewind the survivors to their pretrained values
                for k in units:
                    work.get_parameter(paths[k]).copy_(pretrained[k])
            history.append(dict(round=r, pruned=round(1 - sum(int(m.sum()) for m in masks.values()) / total, 6),
                                train=summary))
        return MaskSet(masks, fingerprint(model), self.name, extra=dict(history=history, objective=opts.objective))
