"""`lottery-fusion`: Wu et al., "Pruning AdapterFusion with Lottery Ticket Hypothesis" (Findings of NAACL 2022).

Train the fusion (and head) on the task, recording the trainable weights at `--rewind-step`. Then, over
`--rounds` rounds, score every fused adapter by its influence on its fusion's output (criterion
`fusion-influence`, averaged over training data), prune the least influential so that after round r a fraction
r/R of the target is gone, rewind the surviving weights to the recorded values and retrain. Stop at the target,
or at the last round whose dev metric is within `--max-drop` of the dense model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..training import train
from ..training.heads import ensure_head
from ..training.trainable import select_trainable
from ..units import fingerprint, iter_units
from .criteria import CRITERIA
from .methods import PruningMethod, prune_group, register_method


@dataclass
class LotteryOptions:
    rounds: int = 3
    rewind_step: int = 0  # 0: rewind to the weights before training (the original lottery ticket)
    max_drop: float = 0.01  # largest tolerated drop of the dev metric (absolute, e.g. 0.01 = one point)
    train: str = "fusion"  # what trains: the fusion (and head), as AdapterHub's train_adapter_fusion

    def __post_init__(self):
        if self.rounds < 1:
            raise PruningConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.rewind_step < 0:
            raise PruningConfigError(f"--rewind-step must be >= 0, got {self.rewind_step}")
        if self.max_drop < 0:
            raise PruningConfigError(f"--max-drop must be >= 0, got {self.max_drop}")


def snapshot(params: dict) -> dict:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def rewind(params: dict, saved: dict) -> None:
    """Copy the recorded values back into the surviving weights."""
    for name, p in params.items():
        p.copy_(saved[name])


@register_method("lottery-fusion")
class LotteryFusion(PruningMethod):
    criterion = "fusion-influence"
    needs_data = True
    kinds = ("adapters",)
    Options = LotteryOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        model = ensure_head(copy.deepcopy(model), data.spec, seed=cfg.seed)
        units = [u for u in iter_units(model) if u.kind == "adapters"]
        if not units:
            raise PruningConfigError("lottery-fusion prunes fused adapters, but the model's active setup has no "
                                     "fusion: choose one with --setup")
        trainable = set(map(id, select_trainable(model, opts.train)))
        params = {n: p for n, p in model.named_parameters() if id(p) in trainable}
        saved = {"weights": snapshot(params)}  # step 0 unless a later rewind step is reached

        def record(step):
            if step == opts.rewind_step:
                saved["weights"] = snapshot(params)

        history = [dict(round=0, stage="dense", train=train(model, data.train_set, data.collate, data.loss, data.config,
                                                             params.values(), stage="dense", after_step=record))]
        dense = data.main_metric(data.evaluate(model))
        history[0].update(metric=dense, kept=sum(u.size for u in units))
        masks = {u.key: torch.ones(u.shape, dtype=torch.bool) for u in units}
        accepted = dict(masks=masks, state=snapshot(params), metric=dense, round=0)
        criterion = CRITERIA.get_or_fail(self.criterion)(seed=cfg.seed)
        stopped = None
        for r in range(1, opts.rounds + 1):
            scores = criterion.scores(model, units, data)
            fraction = cfg.sparsity["adapters"] * r / opts.rounds
            new = {}
            for u in units:
                s = scores[u.key].clone()
                s[~accepted["masks"][u.key]] = float("-inf")  # pruned adapters stay pruned
                new[u.key] = prune_group(s, fraction, cfg.min_keep)
            for u in units:
                model.get_submodule(u.module_path).set_mask("adapters", new[u.key])
            rewind(params, saved["weights"])
            summary = train(model, data.train_set, data.collate, data.loss, data.config, params.values(),
                            stage=f"round-{r}")
            metric = data.main_metric(data.evaluate(model))
            history.append(dict(round=r, fraction=fraction, kept=sum(int(m.sum()) for m in new.values()),
                                metric=metric, train=summary,
                                kept_adapters={k: m.nonzero().flatten().tolist() for k, m in new.items()},
                                scores={u.key: [round(float(x), 6) for x in scores[u.key]] for u in units}))
            if dense - metric > opts.max_drop:
                stopped = f"round {r}: dev {data.spec.main_metric} {metric:.4f} is more than {opts.max_drop} " \
                          f"below the dense {dense:.4f}; kept round {accepted['round']}"
                break
            accepted = dict(masks=new, state=snapshot(params), metric=metric, round=r)
        rewind(params, accepted["state"])
        for u in units:
            model.get_submodule(u.module_path).set_mask("adapters", None)
        for p in model.parameters():
            p.requires_grad_(False)
        extra = dict(history=history, dense_metric=dense, metric=accepted["metric"], accepted_round=accepted["round"],
                     stopped_early=stopped, target_met=stopped is None)
        return MaskSet(accepted["masks"], fingerprint(model), self.name, extra=extra, model=model.eval())
