"""Compaction: physically remove what a MaskSet prunes, with exactly the outputs of the masked model.

Surgery only: which units go is decided elsewhere (criteria and methods). The result is a model of the same
classes with smaller shapes, its manifest updated; `save_compacted` writes it as a directory that reloads
with `load_model` (manifest + config + safetensors, no pickles).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .io import atomic_output_dir
from .masks import MaskSet, apply_masks
from .modeling.architecture import LayerParts, layer_parts
from .modeling.compositions import Fuse, Single, of_children
from .modeling.loading import MANIFEST_FILE
from .modeling.modules import AdapterSite, Bottleneck, Fusion, Intermediate, SelfAttention
from .units import fingerprint


def _kept(mask: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Indices of the kept members of a unit of n (all when unmasked). Write-back slices with it too."""
    return torch.arange(n) if mask is None else torch.nonzero(mask, as_tuple=False).flatten()


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The Q/K/V rows (and the attention output's columns) of the kept `heads`. Write-back slices with it too."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _take(t: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`t` indexed along `dim` (t[index] or t[:, index]); `t` itself, not a copy, when every entry is kept."""
    n = t.shape[dim]
    if len(index) == n and torch.equal(index, torch.arange(n)):
        return t
    return t[index] if dim == 0 else t[:, index]


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An nn.Linear holding `weight` and `bias` in the default dtype; their storage is taken over, not copied
    (compaction replaces the module that held them)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dtype = torch.get_default_dtype()
    layer.weight = nn.Parameter(weight.detach().to(dtype).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype).contiguous())
    return layer


@torch.no_grad()
def compact(model: nn.Module, maskset: Optional[MaskSet] = None, in_place: bool = False) -> nn.Module:
    """Return a compacted copy of `model` under `maskset` (None: only fold what can be folded). `in_place`: the
    caller hands `model` over and it is compacted itself (no copy of the weights; `model` is the result)."""
    if not in_place:
        model = copy.deepcopy(model)
    if maskset is not None:
        apply_masks(model, maskset)
    manifest = model.compress_manifest
    for layer, spec in zip(layer_parts(model), manifest["layers"]):
        spec["heads"] = _compact_attention(layer)
        spec["intermediate"] = _compact_ffn(layer)
        for s, site in layer.sites:
            spec["sites"][s] = _compact_site(site, spec["sites"][s])
    manifest["compacted"] = True
    if maskset is not None:
        manifest["masks"] = dict(fingerprint=maskset.fingerprint, method=maskset.method, counts=maskset.counts())
    return model.eval()


def _compact_attention(layer: LayerParts) -> int:
    att: SelfAttention = layer.attention
    d = att.attention_head_size
    heads = _kept(att.get_mask("heads"), att.num_attention_heads)
    rows = head_rows(heads, d)
    new = SelfAttention(att.query.in_features, len(heads), d, att.dropout.p)
    for name in ("query", "key", "value"):
        old = getattr(att, name)
        setattr(new, name, _linear(_take(old.weight, rows), _take(old.bias, rows)))
    layer.replace_attention(new)
    dense = layer.mh_site.dense
    layer.mh_site.dense = _linear(_take(dense.weight, rows, 1), dense.bias)
    return len(heads)


def _compact_ffn(layer: LayerParts) -> int:
    ffn: Intermediate = layer.ffn
    keep = _kept(ffn.get_mask("neurons"), ffn.dense.out_features)
    new = Intermediate(ffn.dense.in_features, len(keep), ffn.intermediate_act_fn)
    new.dense = _linear(_take(ffn.dense.weight, keep), _take(ffn.dense.bias, keep))
    layer.replace_ffn(new)
    dense = layer.out_site.dense
    layer.out_site.dense = _linear(_take(dense.weight, keep, 1), dense.bias)
    return len(keep)


def _compact_adapter(adapter: Bottleneck, in_fusion: bool):
    """Drop pruned bottleneck neurons and fold the scaling into the up projection.

    Inside a fusion only the scaled up-projection is used, so gating and the adapter's own layer norm go."""
    keep = _kept(adapter.get_mask("bottleneck"), adapter.width)
    hidden = adapter.adapter_up.out_features
    entry = dict(width=len(keep), non_linearity=adapter.non_linearity_name,
                 ln_before=hasattr(adapter, "adapter_norm_before"),
                 ln_after=hasattr(adapter, "adapter_norm_after") and not in_fusion,
                 adapter_residual_before_ln=adapter.adapter_residual_before_ln,
                 use_gating=hasattr(adapter, "gate") and not in_fusion, scaling=1.0)
    new = Bottleneck(hidden, entry["width"], entry["non_linearity"], entry["ln_before"], entry["ln_after"],
                     entry["adapter_residual_before_ln"], entry["use_gating"], 1.0)
    scale = adapter.scaling if isinstance(adapter.scaling, torch.Tensor) else torch.tensor([adapter.scaling])
    scale = scale.detach().reshape(-1, 1) if scale.numel() > 1 else scale.detach().reshape(1, 1)
    down, up = adapter.down_proj, adapter.adapter_up
    with torch.no_grad():
        new.down_proj.weight.copy_(down.weight[keep])
        new.down_proj.bias.copy_(down.bias[keep])
        new.adapter_up.weight.copy_(up.weight[:, keep] * scale)
        new.adapter_up.bias.copy_(up.bias * scale.flatten())
        for name in ("adapter_norm_before", "adapter_norm_after", "gate"):
            if hasattr(new, name):
                getattr(new, name).load_state_dict(getattr(adapter, name).state_dict())
    return new, entry


def _compact_site(site: AdapterSite, spec: dict) -> dict:
    """Each child of the site's composition compacted in turn (a stacked adapter, a fusion and its adapters);
    a child keeps its place and its lead adapter's placement."""
    new_spec = dict(adapters={}, fusions={}, active=None, placement=dict(spec["placement"]))
    if "placements" in spec:
        new_spec["placements"] = [dict(p) for p in spec["placements"]]
    adapters, fusions = nn.ModuleDict(), nn.ModuleDict()
    children = [_compact_fuse(site, c, spec, adapters, fusions, new_spec) if isinstance(c, Fuse) else
                _compact_single(site, c, adapters, new_spec)
                for c in (site.active.children if site.active is not None else ())]
    site.adapters, site.adapter_fusion_layer = adapters, fusions
    site.active = of_children(children)
    new_spec["active"] = None if site.active is None else site.active.to_json()
    return new_spec


def _compact_single(site: AdapterSite, child: Single, adapters: nn.ModuleDict, new_spec: dict) -> Single:
    adapters[child.name], new_spec["adapters"][child.name] = _compact_adapter(site.adapters[child.name],
                                                                                in_fusion=False)
    return child


def _compact_fuse(site: AdapterSite, child: Fuse, spec: dict, adapters: nn.ModuleDict, fusions: nn.ModuleDict,
                  new_spec: dict):
    """A fusion without its pruned adapters: folded, in bottleneck space, or a plain adapter when one is left."""
    fname, names = child.name, list(child.names)
    fusion: Fusion = site.adapter_fusion_layer[fname]
    mask = fusion.get_mask("adapters")
    kept = [n for i, n in enumerate(names) if mask is None or bool(mask[i])]
    # kept bottleneck neurons per kept adapter, read before the adapters are replaced
    neurons = {n: _kept(site.adapters[n].get_mask("bottleneck"), site.adapters[n].width) for n in kept}
    for n in kept:
        adapters[n], new_spec["adapters"][n] = _compact_adapter(site.adapters[n], in_fusion=True)
    has_value = hasattr(fusion, "value")
    if fusion.bottleneck_space and len(kept) == 1 and not has_value:
        return Single(kept[0])  # its up projection already holds V
    if fusion.bottleneck_space:
        # a compacted model compacted again: the ups hold V, so it stays in bottleneck space
        new, entry = _copy_bottleneck(fusion, names, kept, neurons, spec["fusions"][fname])
        fusions[fname] = new
        new_spec["fusions"][fname] = dict(entry, adapters=kept)
        return Fuse(fname, tuple(kept))
    if len(kept) == 1 and not (has_value and fusion.residual_before):
        # softmax over one adapter is 1: out = V u + residual, a plain adapter with V folded into its up.
        only = adapters[kept[0]]
        if has_value:
            v = fusion.value.weight
            with torch.no_grad():
                only.adapter_up.weight.copy_(v @ only.adapter_up.weight)
                only.adapter_up.bias.copy_(v @ only.adapter_up.bias)
        return Single(kept[0])
    folded, entry = _fold_fusion(fusion, len(kept))
    ups = [adapters[n] for n in kept]
    if len(kept) >= 2 and _bottleneck_is_cheaper(folded, ups):
        folded, entry = _to_bottleneck_space(folded, ups)
    fusions[fname] = folded
    new_spec["fusions"][fname] = dict(entry, adapters=kept)
    return Fuse(fname, tuple(kept))


def _fold_fusion(fusion: Fusion, n: int):
    """The folded form of a fusion that keeps n adapters (see Fusion). An already folded fusion (a compacted
    model compacted again) keeps its score projection as it is."""
    if fusion.folded:
        return _copy_folded(fusion, n)
    has_q, has_k = (False, False) if n <= 1 else (hasattr(fusion, "query"), hasattr(fusion, "key"))
    keep_value = hasattr(fusion, "value") and (n > 0 or fusion.residual_before)  # V 0 = 0
    new = Fusion(fusion.hidden_size, query=has_q, key=has_k, value=keep_value, residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True)
    with torch.no_grad():
        if has_q and has_k:  # r = Wk^T (Wq x + bq)
            wk = fusion.key.weight
            new.score_proj.weight.copy_(wk.T @ fusion.query.weight)
            new.score_proj.bias.copy_(wk.T @ fusion.query.bias)
        elif has_q:
            new.score_proj.weight.copy_(fusion.query.weight)
            new.score_proj.bias.copy_(fusion.query.bias)
        elif has_k:  # (Wk u + bk) . x = u . (Wk^T x) + const
            new.score_proj.weight.copy_(fusion.key.weight.T)
        if keep_value:
            new.value.weight.copy_(fusion.value.weight)
    entry = dict(query=has_q, key=has_k, value=keep_value, residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True)
    return new, entry


def _copy_folded(fusion: Fusion, n: int):
    proj = getattr(fusion, "score_proj", None) if n > 1 else None
    has_q = proj is not None and proj.bias is not None  # the query bias is what gives score_proj a bias
    has_k = proj is not None and not has_q
    keep_value = hasattr(fusion, "value") and (n > 0 or fusion.residual_before)
    new = Fusion(fusion.hidden_size, query=has_q, key=has_k, value=keep_value, residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True)
    with torch.no_grad():
        if proj is not None:
            new.score_proj.load_state_dict(proj.state_dict())
        if keep_value:
            new.value.weight.copy_(fusion.value.weight)
    entry = dict(query=has_q, key=has_k, value=keep_value, residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True)
    return new, entry


_BOTTLENECK_SPACE = {"enabled": True}


@contextlib.contextmanager
def folded_fusions_only():
    """Within it, compaction never chooses the bottleneck-space fusion (today's folded form everywhere): for
    benchmarks and tests that compare the two forms. Not thread-safe."""
    previous = _BOTTLENECK_SPACE["enabled"]
    _BOTTLENECK_SPACE["enabled"] = False
    try:
        yield
    finally:
        _BOTTLENECK_SPACE["enabled"] = previous


def _bottleneck_is_cheaper(folded: Fusion, adapters: list) -> bool:
    """Per token, as computed (compressor.flops): the folded fusion plus the n up-projections it mixes, against
    the bottleneck-space fusion (which computes no up-projection). The down-projections are the same in both."""
    from .flops import bottleneck_fusion_flops, fusion_flops

    if not _BOTTLENECK_SPACE["enabled"]:
        return False
    hidden, widths = folded.hidden_size, [a.width for a in adapters]
    today = fusion_flops(folded, len(widths), hidden) + sum(2 * hidden * k for k in widths)
    value_on_residual = hasattr(folded, "value") and folded.residual_before
    return bottleneck_fusion_flops(hidden, widths, value_on_residual) < today


def _to_bottleneck_space(folded: Fusion, adapters: list):
    """The bottleneck-space form (see Fusion) of a folded fusion over `adapters` (compacted, scalings folded).

    r = R x + c is the folded query side (R = I, c = 0 without score projection). score_proj rows: U_i^T R for
    every adapter, then b_i^T R; bias U_i^T c, then b_i . c. The value projection goes into each adapter's up
    projection (V U_i, V b_i); it stays as a module only for the residual when the residual comes before it.
    Products are formed in float64."""
    hidden, widths = folded.hidden_size, [a.width for a in adapters]
    has_value = hasattr(folded, "value")
    keep_value = has_value and folded.residual_before
    new = Fusion(hidden, value=keep_value, residual_before=folded.residual_before,
                 query_before_ln=folded.query_before_ln, folded=True, bottleneck_widths=widths)
    proj = getattr(folded, "score_proj", None)
    r_weight = proj.weight.double() if proj is not None else torch.eye(hidden, dtype=torch.float64)
    r_bias = proj.bias.double() if proj is not None and proj.bias is not None else None
    v = folded.value.weight.double() if has_value else None
    with torch.no_grad():
        ups = [(a.adapter_up.weight.double(), a.adapter_up.bias.double()) for a in adapters]
        weight = torch.cat([u.T @ r_weight for u, _ in ups] + [b[None, :] @ r_weight for _, b in ups])
        if r_bias is None:
            bias = torch.zeros(weight.shape[0], dtype=torch.float64)
        else:
            bias = torch.cat([u.T @ r_bias for u, _ in ups] + [(b @ r_bias).reshape(1) for _, b in ups])
        new.score_proj.weight.copy_(weight)
        new.score_proj.bias.copy_(bias)
        if v is not None:
            for a, (u, b) in zip(adapters, ups):
                a.adapter_up.weight.copy_(v @ u)
                a.adapter_up.bias.copy_(v @ b)
        if keep_value:
            new.value.weight.copy_(folded.value.weight)
    has_q, has_k = proj is not None and proj.bias is not None, proj is not None and proj.bias is None
    entry = dict(query=has_q, key=has_k, value=keep_value, residual_before=folded.residual_before,
                 query_before_ln=folded.query_before_ln, folded=True, bottleneck_space=True)
    return new, entry


def _copy_bottleneck(fusion: Fusion, names: list, kept: list, neurons: dict, old_entry: dict):
    """A bottleneck-space fusion restricted to the kept adapters and their kept bottleneck neurons: rows of
    score_proj go with the neurons (and the b_i . r row with its adapter); the ups already hold V."""
    widths = [len(neurons[n]) for n in kept]
    keep_value = hasattr(fusion, "value")
    new = Fusion(fusion.hidden_size, value=keep_value, residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True, bottleneck_widths=widths)
    with torch.no_grad():
        if hasattr(new, "score_proj"):
            starts = torch.cumsum(torch.tensor([0] + fusion.widths), 0)
            total = int(starts[-1])
            rows = [starts[names.index(n)] + neurons[n] for n in kept]
            rows += [torch.tensor([total + names.index(n)]) for n in kept]
            rows = torch.cat(rows).long()
            new.score_proj.weight.copy_(fusion.score_proj.weight[rows])
            new.score_proj.bias.copy_(fusion.score_proj.bias[rows])
        if keep_value:
            new.value.weight.copy_(fusion.value.weight)
    entry = dict(query=bool(old_entry.get("query")), key=bool(old_entry.get("key")), value=keep_value,
                 residual_before=fusion.residual_before,
                 query_before_ln=fusion.query_before_ln, folded=True, bottleneck_space=True)
    return new, entry


def save_compacted(model: nn.Module, out, overwrite: bool = False, tokenizer_dir=None) -> Path:
    """Write a compacted model as a directory that appears whole or not at all."""
    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(model, tmp, tokenizer_dir)
    return Path(out)


def write_compacted(model: nn.Module, directory: Path, tokenizer_dir=None) -> None:
    """config.json, compress_manifest.json, model.safetensors (+ the tokenizer files of `tokenizer_dir`: the
    model's own directory, or where compressor.api saved the tokenizer given with --tokenizer)."""
    from safetensors.torch import save_file

    model.base_model.config.to_json_file(str(directory / "config.json"))
    manifest = dict(model.compress_manifest, fingerprint=fingerprint(model))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    # safetensors refuses shared storage (AdapterHub registers ln_before twice): clone only a tensor whose storage
    # an earlier one uses, not the whole state (a second copy of the weights)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        whole = v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        state[k] = v.clone() if ptr in seen or not whole else v
        seen.add(ptr)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), directory)


# what `tokenizer.save_pretrained` writes for the tokenizers of the encoders we load (BERT, RoBERTa, XLM-R, ...):
# copied with a model so that later commands on it need no --tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
