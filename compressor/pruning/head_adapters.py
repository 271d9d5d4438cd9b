"""`head-importance`: Wang, Yang and Sun, task-oriented memory-efficient pruning-adapter.

Head importance is the gradient of head gates on a few task examples (criterion `head-gate`: |dL/dgate|
accumulated, normalised per layer), ranked globally; the least important heads are pruned. Then adapters are
attached to every layer with a width that follows the layer's importance (the summed importance of its kept
heads), and trained (with the head) while the pruned heads stay masked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..modeling.architecture import layer_of_path
from ..modeling.config import BottleneckConfig
from ..modeling.edit import set_adapter
from ..training import train
from ..training.heads import ensure_head
from ..training.trainable import select_trainable
from ..units import fingerprint, iter_units
from .criteria import CRITERIA
from .methods import PruningMethod, global_prune, register_method


@dataclass
class HeadImportanceOptions:
    examples: int = 64  # task examples the head gradients are taken on
    adapter_width: int = 32  # mean bottleneck width; each layer's follows its importance
    adapter_name: str = "pruning_adapter"

    def __post_init__(self):
        if self.examples < 1 or self.adapter_width < 1:
            raise PruningConfigError("head-importance: examples and adapter_width must be >= 1")


def importance_widths(layer_importance: list, mean_width: int) -> dict:
    """Widths proportional to the layers' importance, mean `mean_width`, each at least 1."""
    total = sum(layer_importance)
    n = len(layer_importance)
    if total <= 0:
        return {i: mean_width for i in range(n)}
    return {i: max(1, int(round(mean_width * n * imp / total))) for i, imp in enumerate(layer_importance)}


@register_method("head-importance")
class HeadImportance(PruningMethod):
    criterion = "head-gate"
    needs_data = True
    kinds = ("heads",)
    scope = "global"
    Options = HeadImportanceOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        model = ensure_head(copy.deepcopy(model), data.spec, seed=cfg.seed)
        units = {u.key: u for u in iter_units(model) if u.kind == "heads"}
        criterion = CRITERIA.get_or_fail(self.criterion)(seed=cfg.seed, n_batches=max(1, -(-opts.examples // data.config.batch_size)))
        scores = criterion.scores(model, list(units.values()), data)
        masks = global_prune(scores, units, cfg.sparsity["heads"], cfg.min_keep)
        by_layer = sorted(units, key=lambda k: layer_of_path(model, units[k].module_path).index)
        layer_importance = [float((scores[k] * masks[k]).sum()) for k in by_layer]
        widths = importance_widths(layer_importance, opts.adapter_width)
        set_adapter(model, opts.adapter_name, BottleneckConfig(), widths, seed=cfg.seed, activate=True)
        for k, m in masks.items():
            model.get_submodule(units[k].module_path).set_mask("heads", m)
        params = select_trainable(model, "adapters")
        summary = train(model, data.train_set, data.collate, data.loss, data.config, params, stage="adapters")
        metrics = data.evaluate(model)
        for k in masks:
            model.get_submodule(units[k].module_path).set_mask("heads", None)
        for p in model.parameters():
            p.requires_grad_(False)
        extra = dict(train=summary, dev_metrics=metrics, adapter=opts.adapter_name, adapter_widths=widths,
                     layer_importance=layer_importance,
                     head_scores={k: [round(float(x), 6) for x in scores[k]] for k in by_layer})
        return MaskSet(masks, fingerprint(model), self.name, extra=extra, model=model.eval())
