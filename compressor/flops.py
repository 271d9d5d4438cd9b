"""Analytic cost: parameters and FLOPs per token (a multiply-add = 2 FLOPs) of every layer, so users see where
the cost is. Embeddings and the prediction head are left out of the FLOPs (they do not change with pruning)."""

from __future__ import annotations

from torch import nn

from .modeling.architecture import layer_parts
from .modeling.compositions import Fuse
from .modeling.modules import AdapterSite, Fusion
from .units import active_adapter_names


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fusion_flops(fusion: Fusion, n: int, hidden: int) -> int:
    """Per token, as our modules compute it. The standard form projects every adapter's output by the key; the
    folded form projects the query once. Both apply the bias-free value projection once, to the mixed context
    (equal to AdapterHub's value_before_softmax, which applies it to each of the n adapters: V is linear). The
    bottleneck-space form: `bottleneck_fusion_flops` (its adapters' up projections included)."""
    if getattr(fusion, "bottleneck_space", False):
        return bottleneck_fusion_flops(hidden, fusion.widths, hasattr(fusion, "value"))
    if n == 0:
        return 2 * hidden * hidden if hasattr(fusion, "value") else 0
    mix = 4 * n * hidden  # scores and weighted sum
    if fusion.folded:
        proj = (2 * hidden * hidden if hasattr(fusion, "score_proj") else 0)
        return proj + mix + (2 * hidden * hidden if hasattr(fusion, "value") else 0)
    proj = 2 * hidden * hidden * (int(hasattr(fusion, "query")) + n * int(hasattr(fusion, "key")))
    return proj + mix + (2 * hidden * hidden if hasattr(fusion, "value") else 0)


def bottleneck_fusion_flops(hidden: int, widths: list, value_on_residual: bool) -> int:
    """The bottleneck-space fusion (see Fusion), per token as computed, with the n up-projections it replaces:
    score_proj h -> (K + n) (K = sum of the widths), the per-adapter dot products (K products, then a K x n
    block-sum matmul), the K weightings p_i a_i, the mix (K + n) -> h, and V of the residual when the residual
    comes before V. One adapter: its up projection only (a softmax over one is 1)."""
    n, total = len(widths), sum(widths)
    rest = 2 * hidden * hidden if value_on_residual else 0
    if n <= 1:
        return 2 * hidden * total + rest
    scores = 2 * hidden * (total + n) + total + 2 * total * n
    return scores + total + 2 * hidden * (total + n) + rest


def site_cost(site: AdapterSite, hidden: int) -> dict:
    """Per token, every child of the site's composition: a bottleneck's down and up projections (and gate), a
    fusion's cost (`fusion_flops`; a bottleneck-space fusion computes its adapters' up projections in its mix,
    so they count there)."""
    children = site.active.children if site.active is not None else ()
    adapter_flops = fusion = fusion_params = 0
    for child in children:
        fuse = isinstance(child, Fuse)
        module = site.adapter_fusion_layer[child.name] if fuse else None
        ups = 0 if fuse and getattr(module, "bottleneck_space", False) else 1
        adapter_flops += sum(2 * (1 + ups) * hidden * site.adapters[n].width
                             + (2 * hidden if hasattr(site.adapters[n], "gate") else 0) for n in child.adapters())
        if fuse:
            fusion += fusion_flops(module, len(child.names), hidden)
            fusion_params += _params(module)
    names = active_adapter_names(site)
    return dict(adapters=names, widths=[site.adapters[n].width for n in names], adapter_flops=adapter_flops,
                fusion_flops=fusion, adapter_params=sum(_params(site.adapters[n]) for n in names),
                fusion_params=fusion_params, fused=any(isinstance(c, Fuse) for c in children))


def layer_costs(model: nn.Module, seq_len: int = 128) -> list:
    hidden = model.base_model.config.hidden_size
    rows = []
    for i, layer in enumerate(layer_parts(model)):
        att = layer.attention
        inner = att.all_head_size
        att_flops = 2 * hidden * inner * 3 + 4 * seq_len * inner + 2 * inner * hidden
        ffn = layer.ffn.dense.out_features
        sites = {s: site_cost(m, hidden) for s, m in layer.sites}
        base_params = _params(att) + _params(layer.mh_site.dense) + _params(layer.ffn) + \
            _params(layer.out_site.dense) + 4 * hidden
        rows.append(dict(
            layer=i, heads=att.num_attention_heads, ffn=ffn, sites=sites,
            attention_flops=att_flops, ffn_flops=4 * hidden * ffn,
            adapter_flops=sum(s["adapter_flops"] for s in sites.values()),
            fusion_flops=sum(s["fusion_flops"] for s in sites.values()),
            base_params=base_params,
            adapter_params=sum(s["adapter_params"] + s["fusion_params"] for s in sites.values()),
        ))
    return rows


def total_cost(model: nn.Module, seq_len: int = 128) -> dict:
    rows = layer_costs(model, seq_len)
    flops = {k: sum(r[k] for r in rows) for k in ("attention_flops", "ffn_flops", "adapter_flops", "fusion_flops")}
    return dict(params=_params(model), flops_per_token=sum(flops.values()), **flops, seq_len=seq_len)
