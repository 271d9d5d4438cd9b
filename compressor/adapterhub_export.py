"""Write a pruned model back in AdapterHub's full-model format, so that the `adapters` library loads it.

AdapterHub cannot hold everything compaction produces, so the written model is the masked model made as small
as AdapterHub's configs allow, padded with exact zeros where they cannot vary:
- heads: transformers' `pruned_heads` in config.json (a layer keeps at least one head; if all were pruned,
  head 0 stays with zero output columns, which contributes nothing);
- FFN neurons: one FFN width (`intermediate_size`; DistilBERT: `hidden_dim`), the largest kept width; narrower
  layers get zero rows and columns;
- bottleneck neurons: a per-layer `reduction_factor` mapping, width k written as hidden / (k + 0.5) (AdapterHub
  computes int(hidden // rf)); the attention and FFN sites of a layer share it, so the narrower is zero-padded;
- fused adapters: an adapter pruned from a layer's fusion is left out of that layer (`leave_out`); the fusion
  order is changed, where the adapters' placements allow, so that its last adapter runs wherever the fusion does.
Base weights of a layer our surgery rebuilt (DistilBERT) go back under transformers' names. The result is
loaded back with our loader and compared with the compacted model: a model that AdapterHub
cannot represent exactly is an error, never a silently different file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .compaction import _kept as _keep
from .compaction import head_rows
from .errors import UnsupportedAdapterError
from .masks import MaskSet, masked_copy
from .modeling.architecture import layer_parts, transformers_names
from .modeling.config import NAMED_FUSION_CONFIGS, FusionConfig
from .modeling.descriptions import INVERTIBLE, describe
from .modeling.compositions import Fuse, of_children, parse
from .units import active_adapter_names


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])]) if t.shape[0] < n else t


def _pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], dim=1) if t.shape[1] < n else t


@torch.no_grad()
def write_adapterhub(model: nn.Module, maskset: Optional[MaskSet], out: Path, reference: nn.Module) -> Path:
    manifest = model.compress_manifest
    if manifest.get("compacted"):
        raise UnsupportedAdapterError("--adapterhub needs the original (uncompacted) model, not a compacted one")
    hub = copy.deepcopy(manifest["adapterhub"])
    setup = manifest["setup"]
    masked = masked_copy(model, maskset) if maskset is not None else copy.deepcopy(model)
    state = {k: v.detach().clone() for k, v in masked.state_dict().items()}
    config = copy.deepcopy(model.base_model.config)
    hidden = config.hidden_size
    layers = layer_parts(masked)
    d = describe(config)
    prefix = next(k.split(d.layers + ".")[0] for k in state if d.layers + "." in k) + d.layers

    # heads
    pruned_heads = {}
    for i, layer in enumerate(layers):
        att = layer.attention
        size, n = att.attention_head_size, att.num_attention_heads
        keep = _keep(att.get_mask("heads"), n)
        silent = len(keep) == 0
        if silent:
            keep = torch.tensor([0])
        if len(keep) < n:
            pruned_heads[i] = sorted(set(range(n)) - set(keep.tolist()))
            rows = head_rows(keep, size)
            p = f"{prefix}.{i}"
            for name in ("query", "key", "value"):
                state[f"{p}.{d.attention}.{name}.weight"] = state[f"{p}.{d.attention}.{name}.weight"][rows]
                state[f"{p}.{d.attention}.{name}.bias"] = state[f"{p}.{d.attention}.{name}.bias"][rows]
            reader = f"{p}.{d.attention_output}.dense.weight"
            state[reader] = state[reader][:, rows] * (0.0 if silent else 1.0)
    if pruned_heads:
        base_pruned = getattr(config, "pruned_heads", None) or {}
        if base_pruned:
            raise UnsupportedAdapterError("the model already has pruned_heads; write it back from an unpruned model")
        config.pruned_heads = pruned_heads

    # FFN neurons
    keeps = [_keep(layer.ffn.get_mask("neurons"), layer.ffn.dense.out_features) for layer in layers]
    width = max(1, max(len(k) for k in keeps))
    for i, keep in enumerate(keeps):
        ffn, reader = f"{prefix}.{i}.{d.ffn}.dense", f"{prefix}.{i}.{d.ffn_output}.dense"
        state[f"{ffn}.weight"] = _pad_rows(state[f"{ffn}.weight"][keep], width)
        state[f"{ffn}.bias"] = _pad_rows(state[f"{ffn}.bias"][keep], width)
        state[f"{reader}.weight"] = _pad_cols(state[f"{reader}.weight"][:, keep], width)
    setattr(config, d.ffn_size_field, width)

    # fused adapters -> leave_out; bottleneck neurons -> per-layer widths
    comp = _composition(hub, setup)
    present = {}  # layer -> set of adapters that run there
    for i, layer in enumerate(layers):
        kept, dropped = set(), set()
        for _, site in layer.sites:
            if site.active is None:
                continue
            gone = {n for f in site.active.fuses() for j, n in enumerate(f.names)
                    if (m := site.adapter_fusion_layer[f.name].get_mask("adapters")) is not None and not bool(m[j])}
            kept |= set(active_adapter_names(site)) - gone
            dropped |= gone
        if kept & dropped:
            raise UnsupportedAdapterError(
                f"layer {i}: its attention and FFN fusions keep different adapters, which AdapterHub's "
                "per-layer leave_out cannot express"
            )
        present[i] = kept
    widths = {}  # (adapter, layer) -> kept bottleneck indices per site
    for i, layer in enumerate(layers):
        for _, site in layer.sites:
            for name in present.get(i) or ():
                adapter = site.adapters[name] if name in site.adapters else None
                if adapter is not None:
                    widths.setdefault((name, i), []).append(_keep(adapter.get_mask("bottleneck"), adapter.width))
    for name, cfg in hub["adapters"].items():
        used = [i for i in range(len(layers)) if name in (present.get(i) or ())]
        if name not in _setup_names(hub, setup):
            continue
        cfg["leave_out"] = sorted(set(range(len(layers))) - set(used))
        mapping = {}
        for i in used:
            w = max(1, max(len(k) for k in widths[(name, i)]))
            mapping[str(i)] = hidden / (w + 0.5)
            for site_path, site in ((d.attention_output, layers[i].mh_site), (d.ffn_output, layers[i].out_site)):
                if name not in site.adapters:
                    continue
                keep = _keep(site.adapters[name].get_mask("bottleneck"), site.adapters[name].width)
                p = f"{prefix}.{i}.{site_path}.adapters.{name}"
                down = f"{p}.adapter_down.{1 if cfg['ln_before'] else 0}"
                state[f"{down}.weight"] = _pad_rows(state[f"{down}.weight"][keep], w)
                state[f"{down}.bias"] = _pad_rows(state[f"{down}.bias"][keep], w)
                state[f"{p}.adapter_up.weight"] = _pad_cols(state[f"{p}.adapter_up.weight"][:, keep], w)
        cfg["reduction_factor"] = mapping or cfg["reduction_factor"]
    children = []
    for child in (comp.children if comp is not None else ()):
        if isinstance(child, Fuse):
            order = _reorder_fusion(list(child.names), present, hub["adapters"])
            if order != list(child.names):  # the fusion's name is its adapter list: rename its weights too
                name = ",".join(order)
                old_part, new_part = f".adapter_fusion_layer.{child.name}.", f".adapter_fusion_layer.{name}."
                state = {k.replace(old_part, new_part): v for k, v in state.items()}
                hub["fusions"][name] = dict(hub["fusions"].pop(child.name), adapters=order)
                child = Fuse(name, tuple(order))
        children.append(child)
    if comp is not None:
        setup = str(of_children(children))

    # only the active setup travels; drop the rest
    keep_names = _setup_names(hub, setup)
    state = {k: v for k, v in state.items() if _belongs(k, keep_names, setup, hub)}
    state = _rename_base_weights(state, prefix, transformers_names(d))
    hub_section = _hub_section(hub, setup, keep_names)
    raw = config.to_dict()
    raw["adapters"] = hub_section
    if manifest["model_class"] == "flex" and manifest.get("heads"):
        raw["prediction_heads"] = manifest["heads"]
        raw["architectures"] = [describe(config).adapterhub_class]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _verify(out, setup, model, reference)
    return out


def _rename_base_weights(state: dict, prefix: str, names: dict) -> dict:
    """Base weights of a layer we rebuilt (DistilBERT) under transformers' names again."""
    if not names:
        return state
    out = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            key = f"{prefix}.{index}.{names.get(module, module)}.{leaf}"
        out[key] = value
    return out


def _composition(hub: dict, setup: Optional[str]):
    return None if setup is None else parse(setup, {k: v["adapters"] for k, v in hub["fusions"].items()})


def _setup_names(hub: dict, setup: Optional[str]) -> list:
    return [] if setup is None else _composition(hub, setup).adapters()


def _belongs(key: str, names: list, setup: Optional[str], hub: dict) -> bool:
    if ".adapters." in key:
        return key.split(".adapters.", 1)[1].split(".", 1)[0] in names
    if ".adapter_fusion_layer." in key:
        fusions = [] if setup is None else [f.name for f in _composition(hub, setup).fuses()]
        return key.split(".adapter_fusion_layer.", 1)[1].rsplit(".", 2)[0] in fusions
    if key.startswith(f"{INVERTIBLE}.") or f".{INVERTIBLE}." in key:  # copied whole, for the adapters that travel
        return key.split(f"{INVERTIBLE}.", 1)[1].split(".", 1)[0] in names
    return True


def _reorder_fusion(names: list, present: dict, adapters: dict) -> list:
    """AdapterHub needs the fusion's last adapter wherever the fusion runs; it also takes that adapter's
    placement. Move an always-present adapter last when every fused adapter has the same placement."""
    running = [p & set(names) for p in present.values() if p & set(names)]  # where the fusion runs
    if all(names[-1] in p for p in running):
        return names
    candidates = [n for n in names if all(n in p for p in running)]
    placements = {json.dumps({k: adapters[n][k] for k in ("original_ln_before", "original_ln_after",
                                                           "residual_before_ln")}) for n in names}
    if not candidates or len(placements) > 1:
        raise UnsupportedAdapterError(
            "no adapter of the fusion survives in every layer, and AdapterHub runs a fusion only where its last "
            "adapter is present: this pruned fusion cannot be written in AdapterHub's format (the compacted "
            "directory is still written)"
        )
    return [n for n in names if n != candidates[0]] + [candidates[0]]


def _hub_section(hub: dict, setup: Optional[str], names: list) -> dict:
    adapters = {n: hub["adapters"][n] for n in names}
    section = dict(adapters={n: f"cfg_{n}" for n in adapters}, config_map={f"cfg_{n}": c for n, c in adapters.items()},
                   fusions={}, fusion_config_map={}, fusion_name_map={})
    for i, fuse in enumerate(_composition(hub, setup).fuses() if setup is not None else ()):
        f = hub["fusions"][fuse.name]
        named = [k for k, v in NAMED_FUSION_CONFIGS.items() if FusionConfig.from_adapterhub(v).to_dict() == f["config"]]
        if named:  # adapters 1.3 reads only named fusion configs back from a full model's config.json
            section["fusions"][fuse.name] = named[0]
        else:
            cfg = "fusion_cfg" if i == 0 else f"fusion_cfg_{i}"
            section["fusions"][fuse.name] = cfg
            section["fusion_config_map"][cfg] = dict(
                dict(regularization=False, value_initialized=False, dropout_prob=None), **f["config"])
        section["fusion_name_map"][fuse.name] = f["adapters"]
    return section


def _verify(out: Path, setup: Optional[str], model: nn.Module, reference: nn.Module) -> None:
    from .modeling.loading import load_model

    written = load_model(out, setup=setup)
    config = model.base_model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        a, b = written(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    a = a.logits if getattr(a, "logits", None) is not None else a.last_hidden_state
    b = b.logits if getattr(b, "logits", None) is not None else b.last_hidden_state
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise UnsupportedAdapterError(
            f"the pruned model is not representable exactly in AdapterHub's format (max abs diff {diff:.2e} "
            "after writing it back); use the compacted directory instead"
        )
