"""Edits that change a model's adapters (and so its manifest): add a bottleneck adapter with per-layer widths,
or re-create an adapter at new widths. New weights get AdapterHub's default ("bert") initialisation."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .architecture import apply_setup, layer_parts, resolve_setup, site_adapter_entry
from .config import BottleneckConfig
from .modules import Bottleneck


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _reduction_factors(hidden: int, widths: Mapping[int, int]) -> dict:
    # AdapterHub's width is int(hidden // rf): hidden / (k + 0.5) gives back k exactly (docs/design.md trap)
    return {str(i): hidden / (k + 0.5) for i, k in widths.items()}


def set_adapter(model: nn.Module, name: str, cfg: BottleneckConfig, widths: Mapping[int, int], seed: int = 0,
                activate: bool = False) -> nn.Module:
    """Create (or re-create) adapter `name` with `widths[layer]` at the sites `cfg` names, freshly initialised,
    in place; `activate` makes it the active setup."""
    manifest = model.compress_manifest
    hidden = model.base_model.config.hidden_size
    cfg.reduction_factor = _reduction_factors(hidden, widths)
    cfg.leave_out = [i for i in range(len(manifest["layers"])) if i not in widths]
    manifest["adapterhub"]["adapters"][name] = cfg.to_dict()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i, (layer, spec) in enumerate(zip(layer_parts(model), manifest["layers"])):
            for s, site in layer.sites:
                if i not in widths or not getattr(cfg, s):
                    spec["sites"][s]["adapters"].pop(name, None)
                    if name in site.adapters:
                        del site.adapters[name]
                    continue
                entry = site_adapter_entry(cfg, widths[i])
                spec["sites"][s]["adapters"][name] = entry
                adapter = Bottleneck(hidden, entry["width"], entry["non_linearity"], entry["ln_before"],
                                     entry["ln_after"], entry["adapter_residual_before_ln"], entry["use_gating"],
                                     entry["scaling"])
                init_bert_weights(adapter)
                site.adapters[name] = adapter.to(next(model.parameters()).device)
    finally:
        torch.random.set_rng_state(gen_state)
    if activate:
        resolve_setup(manifest, name)
    apply_setup(model, manifest)
    return model


def reinit_adapters(model: nn.Module, names, width_scale: float = 1.0, seed: int = 0) -> nn.Module:
    """Re-create the named adapters freshly initialised, each layer's width multiplied by `width_scale`
    (SparseAdapter's pruning at initialisation, and its Large-Sparse widening)."""
    manifest = model.compress_manifest
    for name in names:
        cfg = BottleneckConfig(**manifest["adapterhub"]["adapters"][name])
        widths = {}
        for i, spec in enumerate(manifest["layers"]):
            for s in ("mh_adapter", "output_adapter"):
                if name in spec["sites"][s]["adapters"]:
                    widths[i] = max(1, int(round(spec["sites"][s]["adapters"][name]["width"] * width_scale)))
        set_adapter(model, name, cfg, widths, seed=seed)
    return model
