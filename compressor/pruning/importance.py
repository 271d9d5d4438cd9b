"""`importance`: one-shot structured pruning by a data-driven importance score, without retraining.

Each head, FFN neuron, bottleneck neuron or fused adapter is scored through a gate on its output (`taylor`:
|gate x dL/dgate|, the first-order estimate of the loss change when the unit is removed, as in Molchanov et al.
2019 and, for heads, Michel et al. 2019; or `head-gate` / `snip`) on `--examples` training examples. Per unit
group (`scope=group`: the same share in every layer, so latency falls evenly) or in one ranking per kind
(`scope=global`: layers that matter keep more).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..training.heads import num_labels_of
from ..units import fingerprint, iter_units
from .criteria import CRITERIA
from .methods import PruningMethod, global_prune, prune_group, register_method

STRUCTURED = ("heads", "neurons", "bottleneck", "adapters")
GATE_CRITERIA = ("taylor", "head-gate", "snip")


@dataclass
class ImportanceOptions:
    criterion: str = "taylor"
    examples: int = 256  # training examples the scores are averaged over
    scope: str = "group"  # group: the share per unit group (layer); global: one ranking per kind

    def __post_init__(self):
        if self.criterion not in GATE_CRITERIA:
            raise PruningConfigError(f"importance: --criterion must be one of {', '.join(GATE_CRITERIA)}, "
                                     f"got {self.criterion!r}")
        if self.examples < 1:
            raise PruningConfigError(f"importance: --examples must be >= 1, got {self.examples}")
        if self.scope not in ("group", "global"):
            raise PruningConfigError(f"importance: scope must be group or global, got {self.scope!r}")


@register_method("importance")
class Importance(PruningMethod):
    criterion = "taylor"
    needs_data = True
    kinds = STRUCTURED
    Options = ImportanceOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        if num_labels_of(model) != data.spec.num_labels:
            raise PruningConfigError("importance scores units by the task loss: the model needs a trained head "
                                     f"for {data.spec.ref} (train one with `compress train --train head`)")
        units = {u.key: u for u in iter_units(model) if u.kind in cfg.sparsity}
        n_batches = max(1, -(-opts.examples // data.config.batch_size))
        scores = CRITERIA.get_or_fail(opts.criterion)(seed=cfg.seed, n_batches=n_batches).scores(
            model, list(units.values()), data)
        if opts.scope == "group":
            masks = {k: prune_group(scores[k], cfg.sparsity[u.kind], cfg.min_keep) for k, u in units.items()}
        else:
            masks = {}
            for kind in cfg.sparsity:
                of_kind = {k: u for k, u in units.items() if u.kind == kind}
                if not of_kind:  # a kind the model lacks (adapters without a fusion): nothing to rank, as with group
                    continue
                masks.update(global_prune({k: scores[k] for k in of_kind}, of_kind, cfg.sparsity[kind],
                                          cfg.min_keep))
        extra = dict(criterion=opts.criterion, scores={k: [round(float(x), 6) for x in scores[k].flatten()]
                                                       for k, u in units.items() if u.kind != "adapters"
                                                       and scores[k].numel() <= 64})
        return MaskSet(masks, fingerprint(model), self.name, extra=extra)
