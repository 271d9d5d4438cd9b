"""Prunable units of a loaded model, named by the model's own module paths (docs/design.md's table).

| kind       | key                                                    | shape            |
| heads      | <layer>.<attention>::heads (BERT: attention.self)       | [num heads]      |
| neurons    | <layer>.<ffn>::neurons (BERT: intermediate)             | [ffn width]      |
| adapters   | <site>.adapter_fusion_layer.<fusion>::adapters         | [fused adapters] |
| bottleneck | <site>.adapters.<name>::bottleneck                     | [width]          |
| weights    | <path of a Linear weight>::weights                     | weight shape     |

Only the active setup's adapters and fusions are units: the others do not run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .modeling.modules import AdapterSite, Intermediate, SelfAttention

KINDS = ("heads", "neurons", "adapters", "bottleneck", "weights")
SEP = "::"


@dataclass(frozen=True)
class Unit:
    key: str  # "<module path>::<kind>"
    kind: str
    module_path: str
    shape: tuple
    members: tuple = ()  # for `adapters`: the fused adapter names, in fusion order

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def unit_key(module_path: str, kind: str) -> str:
    return f"{module_path}{SEP}{kind}"


def active_adapter_names(site: AdapterSite) -> list:
    """Every adapter the site's composition runs (stacked and fused), in order."""
    return [] if site.active is None else site.active.adapters()


def iter_units(model: nn.Module) -> Iterator[Unit]:
    for path, module in model.named_modules():
        if isinstance(module, SelfAttention) and module.num_attention_heads > 0:
            yield Unit(unit_key(path, "heads"), "heads", path, (module.num_attention_heads,))
        elif isinstance(module, Intermediate) and module.dense.out_features > 0:
            yield Unit(unit_key(path, "neurons"), "neurons", path, (module.dense.out_features,))
        elif isinstance(module, AdapterSite) and module.active is not None:
            for upath, kind, shape, members in module.active.units(module, path):
                yield Unit(unit_key(upath, kind), kind, upath, shape, members)
    for path, param in weight_params(model):
        yield Unit(unit_key(path, "weights"), "weights", path, tuple(param.shape))


def weight_params(model: nn.Module):
    """Linear weights that run: encoder layers, and the active adapters and fusion of each site (our modules
    exist inside encoder layers only)."""
    for path, module in model.named_modules():
        if isinstance(module, (SelfAttention, Intermediate)):
            for name, sub in module.named_children():
                if isinstance(sub, nn.Linear) and sub.weight.numel():
                    yield f"{path}.{name}.weight", sub.weight
        elif isinstance(module, AdapterSite):
            if module.dense.weight.numel():
                yield f"{path}.dense.weight", module.dense.weight
            if module.active is not None:
                for mpath, sub in module.active.modules(module, path):
                    yield from _linear_weights(sub, mpath)


def _linear_weights(module: nn.Module, prefix: str):
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and sub.weight.numel() and not name.startswith("gate"):
            yield f"{prefix}.{name}.weight", sub.weight


def units_by_key(model: nn.Module) -> dict:
    return {u.key: u for u in iter_units(model)}


def fingerprint(model: nn.Module) -> str:
    """Structural identity: the unit keys and shapes, base dimensions and active setup."""
    config = model.base_model.config
    manifest = getattr(model, "compress_manifest", {})
    payload = dict(
        model_type=config.model_type, hidden=config.hidden_size, layers=config.num_hidden_layers,
        setup=manifest.get("setup"), units=[[u.key, list(u.shape)] for u in iter_units(model)],
    )
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)

