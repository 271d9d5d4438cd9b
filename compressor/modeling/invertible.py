"""Invertible adapters (MAD-X language adapters): AdapterHub's NICE coupling block on the embedding output.

AdapterHub gives every adapter whose config sets `inv_adapter` a coupling block in the base model's
`invertible_adapters` (state-dict keys `invertible_adapters.<adapter>.F.0.weight` ...), and a forward hook on the
embeddings runs the block of the active setup's `first()` adapter (a Stack's first child, a fusion's first fused
adapter), or nothing when that adapter has none. We do the same: a forward hook on the module the model type's
description names (`embeddings`), reading `InvertibleAdapters.active`. The block is kept whole: no pruning unit,
copied by compaction, written back under its own keys.

AdapterHub also runs the block in reverse on the hidden states before an LM head's output embeddings; we load
classification heads only (`head_kwargs` refuses the others), so the reverse pass never runs here.

The manifest's `invertible` entry (only in models that have one): `adapters` {name: {block, non_linearity,
widths [F, G]}} and `active` (the name whose block runs, or null).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedAdapterError
from . import compositions
from .descriptions import INVERTIBLE, describe, submodule
from .modules import activation


class NiceCoupling(nn.Module):
    """AdapterHub's NICECouplingBlock, forward direction: x = [x1, x2] (halves of the features, the first
    `size // 2` wide) -> y1 = x1 + F(x2), y2 = x2 + G(y1), [y1, y2]. F and G: Linear, activation, Linear."""

    def __init__(self, size: int, widths, non_linearity: Optional[str]):
        super().__init__()
        self.split = size // 2
        rest = size - self.split
        self.F = nn.Sequential(nn.Linear(rest, widths[0]), activation(non_linearity), nn.Linear(widths[0], self.split))
        self.G = nn.Sequential(nn.Linear(self.split, widths[1]), activation(non_linearity), nn.Linear(widths[1], rest))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split:]
        y1 = x1 + self.F(x2)
        return torch.cat((y1, x2 + self.G(y1)), -1)


class InvertibleAdapters(nn.ModuleDict):
    """The base model's invertible adapters by adapter name; `active` names the one that runs (or None)."""

    active: Optional[str] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.active not in self:
            return hidden_states
        return self[self.active](hidden_states)


class _EmbeddingHook:
    """A forward hook that replaces the embeddings' output by the invertible adapters' (AdapterHub's hook_fn).
    An object, not a closure: deep copies of the model (compaction, masked copies) take a copy along."""

    def __init__(self, layer: InvertibleAdapters):
        self.layer = layer

    def __call__(self, module, args, output):
        return self.layer(output)


def widths(size: int, reduction_factor: float) -> list:
    """[F, G] hidden widths as AdapterHub's subnet constructor computes them: int(inputs // reduction_factor);
    F reads the second half of the features, G the first."""
    return [int((size - size // 2) // reduction_factor), int((size // 2) // reduction_factor)]


def manifest_fields(config, adapters: dict) -> dict:
    """{"invertible": entry} for AdapterHub configs (name -> BottleneckConfig); {} when no adapter has an
    invertible adapter (so that other manifests stay as they were)."""
    wanted = {name: cfg for name, cfg in adapters.items() if cfg.inv_adapter is not None}
    if not wanted:
        return {}
    d = describe(config)
    if d.embeddings is None:
        raise UnsupportedAdapterError(f"adapter '{next(iter(wanted))}': option inv_adapter is not supported for "
                                      f"model type '{d.model_type}' (AdapterHub has no invertible adapters for it)")
    size = d.embedding_size(config)
    return dict(invertible=dict(active=None, adapters={
        name: dict(block=cfg.inv_adapter, non_linearity=cfg.non_linearity,
                   widths=widths(size, cfg.inv_adapter_reduction_factor)) for name, cfg in wanted.items()}))


def active_name(manifest: dict) -> Optional[str]:
    """The adapter whose invertible adapter runs: AdapterHub's first() of the active setup."""
    setup = manifest.get("setup")
    if setup is None:
        return None
    fusions = {k: v["adapters"] for k, v in manifest["adapterhub"]["fusions"].items()}
    first = compositions.parse(setup, fusions).first()
    return first if first in manifest["invertible"]["adapters"] else None


def install_invertible(model: nn.Module, manifest: dict) -> None:
    """Give the base model the manifest's invertible adapters (once; weights are loaded afterwards), hook them on
    the embeddings and set the active one for the manifest's setup. No-op for a model without any."""
    entry = manifest.get("invertible")
    if not entry:
        return
    base = model.base_model
    config = base.config
    d = describe(config)
    layer = getattr(base, INVERTIBLE, None)
    if layer is None:
        layer = InvertibleAdapters()
        for name, a in _checked(entry).items():
            layer[name] = NiceCoupling(d.embedding_size(config), a["widths"], a["non_linearity"])
        setattr(base, INVERTIBLE, layer)
        submodule(base, d.embeddings).register_forward_hook(_EmbeddingHook(layer))
    entry["active"] = layer.active = active_name(manifest)


def _checked(entry: dict) -> dict:
    adapters = entry.get("adapters")
    if not isinstance(adapters, dict):
        raise ModelLoadError("compress_manifest.json: invertible.adapters must be an object; re-run compress compact")
    for name, a in adapters.items():
        ok = (isinstance(a, dict) and a.get("block") == "nice" and isinstance(a.get("widths"), list)
              and len(a["widths"]) == 2 and all(isinstance(w, int) and w >= 0 for w in a["widths"]))
        if not ok:
            raise ModelLoadError(f"compress_manifest.json: invertible.adapters.{name} must have block 'nice' and "
                                 "two widths; re-run compress compact")
    return adapters


def summary(model: nn.Module) -> Optional[dict]:
    """What `compress inspect` shows: the invertible adapter that runs, its widths, parameters and FLOPs per
    token, and the adapters that hold one but do not run under this setup."""
    layer = getattr(model.base_model, INVERTIBLE, None)
    if layer is None:
        return None
    out = dict(active=layer.active, held=sorted(layer), block=None, widths=None, params=0, flops_per_token=0)
    if layer.active in layer:
        block = layer[layer.active]
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        out.update(block="nice", widths=[block.F[0].out_features, block.G[0].out_features],
                   params=sum(p.numel() for p in block.parameters()),
                   flops_per_token=sum(2 * m.in_features * m.out_features for m in linears))
    return out
