"""What a training stage updates (`--train adapters|fusion|head|all`), and weight masks held fixed while it does."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainingError
from ..modeling.modules import AdapterSite
from ..units import active_adapter_names
from .heads import head_parameters

TRAIN_CHOICES = ("adapters", "fusion", "head", "all")


def _active_modules(model: nn.Module, what: str):
    for module in model.modules():
        if isinstance(module, AdapterSite) and module.active is not None:
            if what == "adapters":
                yield from (module.adapters[n] for n in active_adapter_names(module))
            elif what == "fusion":
                yield from (module.adapter_fusion_layer[f.name] for f in module.active.fuses())


def select_trainable(model: nn.Module, what) -> list:
    """Freeze everything, then unfreeze and return the parameters of `what` (a choice or a list of choices;
    `fusion` and `adapters` train the head too when there is one, as AdapterHub's train_fusion / train_adapter)."""
    parts = [what] if isinstance(what, str) else list(what)
    bad = [p for p in parts if p not in TRAIN_CHOICES]
    if bad:
        raise TrainingError(f"--train {bad[0]!r} is not one of: {', '.join(TRAIN_CHOICES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = []
    if "all" in parts:
        chosen = list(model.parameters())
    for part in parts:
        if part in ("adapters", "fusion"):
            chosen += [p for m in _active_modules(model, part) for p in m.parameters()]
    chosen += head_parameters(model)
    unique = list({id(p): p for p in chosen}.values())
    if not unique:
        raise TrainingError(f"the model has nothing to train for --train {','.join(parts)} "
                            "(no active adapters or fusion, and no head)")
    for p in unique:
        p.requires_grad_(True)
    return unique


class FixedWeightMasks:
    """Keeps pruned weights at zero during training (SparseAdapter: pruned weights stay zero and get no update):
    gradients are zeroed after backward, weights re-zeroed after each step."""

    def __init__(self, model: nn.Module, masks: dict):  # parameter path -> bool keep-mask
        self.pairs = [(model.get_parameter(path), mask.to(model.get_parameter(path).device)) for path, mask in masks.items()]
        self.apply()

    @torch.no_grad()
    def apply(self, step: int = 0) -> None:
        for p, mask in self.pairs:
            p.mul_(mask.to(p.dtype))

    def zero_grads(self, step: int = 0) -> None:
        for p, mask in self.pairs:
            if p.grad is not None:
                p.grad.mul_(mask.to(p.grad.dtype))
