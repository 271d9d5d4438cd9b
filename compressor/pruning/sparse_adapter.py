"""`sparse-adapter`: He et al., "SparseAdapter" (Findings of EMNLP 2022).

Prune adapters at initialisation: re-create the active adapters freshly initialised (optionally widened by
1/(1 - sparsity), "Large-Sparse", which keeps the non-zero budget of the dense adapter), score their weights
(or, structured, their bottleneck neurons) with `--criterion`, keep one global top-k over all adapters, then
train with the mask fixed: pruned weights stay zero and get no update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..modeling.edit import reinit_adapters
from ..training import train
from ..training.heads import ensure_head
from ..training.trainable import FixedWeightMasks, select_trainable
from ..units import active_adapter_names, fingerprint, iter_units
from ..modeling.modules import AdapterSite
from .criteria import CRITERIA
from .methods import PruningMethod, global_prune, register_method

PAI_CRITERIA = ("random", "magnitude", "snip", "grasp", "synflow")


@dataclass
class SparseAdapterOptions:
    criterion: str = "snip"
    widen: bool = False  # Large-Sparse: width / (1 - sparsity) at the same number of non-zero weights
    train: str = "adapters"

    def __post_init__(self):
        if self.criterion not in PAI_CRITERIA:
            raise PruningConfigError(f"sparse-adapter --criterion must be one of: {', '.join(PAI_CRITERIA)} "
                                     f"(got {self.criterion!r})")


def adapter_units(model: nn.Module, kind: str) -> list:
    """The active adapters' units of `kind`: bottleneck neurons, or the weights of their linear layers."""
    return [u for u in iter_units(model) if u.kind == kind and (kind == "bottleneck" or ".adapters." in u.module_path)]


def active_adapters(model: nn.Module) -> list:
    names = []
    for m in model.modules():
        if isinstance(m, AdapterSite) and m.active is not None:
            names += [n for n in active_adapter_names(m) if n not in names]
    return names


@register_method("sparse-adapter")
class SparseAdapter(PruningMethod):
    needs_data = True
    kinds = ("weights", "bottleneck")
    scope = "global"
    Options = SparseAdapterOptions

    @property
    def criterion(self):
        return self.options.criterion

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        if len(cfg.sparsity) != 1:
            raise PruningConfigError("sparse-adapter prunes one kind at a time: --sparsity weights=F (unstructured) "
                                     "or --sparsity bottleneck=F (structured)")
        (kind, fraction), = cfg.sparsity.items()
        model = ensure_head(copy.deepcopy(model), data.spec, seed=cfg.seed)
        names = active_adapters(model)
        if not names:
            raise PruningConfigError("sparse-adapter prunes adapters, but the model runs none: choose a --setup")
        reinit_adapters(model, names, width_scale=1 / (1 - fraction) if opts.widen else 1.0, seed=cfg.seed)
        units = {u.key: u for u in adapter_units(model, kind)}
        criterion = CRITERIA.get_or_fail(opts.criterion)(seed=cfg.seed)
        scores = criterion.scores(model, list(units.values()), data)
        masks = global_prune(scores, units, fraction, 0 if kind == "weights" else cfg.min_keep)
        params = select_trainable(model, opts.train)
        if kind == "weights":
            fixed = FixedWeightMasks(model, {units[k].module_path: m for k, m in masks.items()})
            summary = train(model, data.train_set, data.collate, data.loss, data.config, params, stage="sparse",
                            after_backward=fixed.zero_grads, after_step=fixed.apply)
        else:
            for k, m in masks.items():
                model.get_submodule(units[k].module_path).set_mask(kind, m)
            summary = train(model, data.train_set, data.collate, data.loss, data.config, params, stage="sparse")
        metric = data.evaluate(model)
        for k in masks:
            if kind != "weights":
                model.get_submodule(units[k].module_path).set_mask(kind, None)
        for p in model.parameters():
            p.requires_grad_(False)
        extra = dict(train=summary, dev_metrics=metric, adapters=names, widened=opts.widen,
                     nonzero_adapter_weights=sum(int(m.sum()) for m in masks.values()) if kind == "weights" else None)
        return MaskSet(masks, fingerprint(model), self.name, extra=extra, model=model.eval())
