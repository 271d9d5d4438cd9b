"""Our plain nn.Modules: attention with per-layer head counts, FFN, bottleneck adapters, AdapterFusion, the
site that wires them where AdapterHub wires its BottleneckLayer, and AdapterHub's classification head.

Attribute names follow AdapterHub and transformers so that module paths (and so mask keys and state-dict keys)
are the ones users know. Every structured unit can carry a boolean mask buffer (non-persistent); a masked
module computes exactly what the compacted module computes after the masked units are removed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers.activations import get_activation


def activation(name: Optional[str]) -> nn.Module:
    """AdapterHub's Activation_Function_Class: transformers' activations by lower-cased name."""
    if name is None:
        return nn.Identity()
    if name.lower() == "leakyrelu":
        return nn.LeakyReLU()
    return get_activation(name.lower())


class Maskable:
    """Structured masks as non-persistent buffers named `mask_<kind>` (True = keep)."""

    def set_mask(self, kind: str, mask: Optional[torch.Tensor]) -> None:
        name = f"mask_{kind}"
        if mask is None:
            if name in self._buffers:
                del self._buffers[name]
            return
        self.register_buffer(name, mask.to(torch.bool), persistent=False)

    def get_mask(self, kind: str) -> Optional[torch.Tensor]:
        return self._buffers.get(f"mask_{kind}")

    def set_gate(self, kind: str, gate: Optional[torch.Tensor]) -> None:
        """A float gate per unit member, multiplied where the mask applies. Not state: criteria put ones that
        require grad here to read dL/dgate (head importance, SNIP, Taylor); mask learning puts soft masks."""
        self.__dict__[f"gate_{kind}"] = gate

    def unit_factor(self, kind: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Mask times gate (None when neither is set): the factor each member's output is multiplied by."""
        mask, gate = self.get_mask(kind), self.__dict__.get(f"gate_{kind}")
        if mask is None:
            return None if gate is None else gate.to(dtype)
        mask = mask.to(dtype)
        return mask if gate is None else mask * gate.to(dtype)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """nn.Linear that also works with zero input features (everything pruned: only the bias is left)."""
    if layer.in_features == 0:
        out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
        return out + layer.bias if layer.bias is not None else out
    return layer(x)


class SelfAttention(nn.Module, Maskable):
    """BERT/RoBERTa eager self-attention with its own head count (0 allowed) and an optional head mask.

    Replaces transformers' BertSelfAttention (same parameter names, same call signature) because transformers
    keeps one head count per model and v5 dropped `prune_heads`.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = head_dim
        self.all_head_size = num_heads * head_dim
        self.query = nn.Linear(hidden_size, self.all_head_size)
        self.key = nn.Linear(hidden_size, self.all_head_size)
        self.value = nn.Linear(hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                past_key_values=None, output_attentions=False, cache_position=None, **kwargs):
        b, s, _ = hidden_states.shape
        if self.num_attention_heads == 0:
            return hidden_states.new_zeros(b, s, 0), None
        q, k, v = (self._split(layer(hidden_states)) for layer in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        if head_mask is not None:
            probs = probs * head_mask
        context = torch.matmul(probs, v)
        factor = self.unit_factor("heads", context.dtype)
        if factor is not None:
            context = context * factor.view(1, -1, 1, 1)
        context = context.transpose(1, 2).reshape(b, s, self.all_head_size)
        return context, (probs if output_attentions else None)


class Intermediate(nn.Module, Maskable):
    """BertIntermediate with a neuron mask after the non-linearity."""

    def __init__(self, hidden_size: int, width: int, hidden_act):
        super().__init__()
        self.dense = nn.Linear(hidden_size, width)
        self.intermediate_act_fn = get_activation(hidden_act) if isinstance(hidden_act, str) else hidden_act

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.intermediate_act_fn(self.dense(hidden_states))
        factor = self.unit_factor("neurons", out.dtype)
        return out if factor is None else out * factor


class Bottleneck(nn.Module, Maskable):
    """AdapterHub's sequential bottleneck adapter (methods/modeling.py `Adapter`), inference path.

    `forward` returns (output, up): `output` is the adapter's own result (gating, layer norm, residual), `up`
    the scaled up-projection that AdapterFusion mixes.
    """

    def __init__(self, hidden_size: int, width: int, non_linearity: str = "relu", ln_before: bool = False,
                 ln_after: bool = False, adapter_residual_before_ln: bool = False, use_gating: bool = False,
                 scaling=1.0):
        super().__init__()
        self.width = width
        self.non_linearity_name = non_linearity
        self.adapter_residual_before_ln = adapter_residual_before_ln
        down = []
        if ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden_size)
            down.append(self.adapter_norm_before)
        down += [nn.Linear(hidden_size, width), activation(non_linearity)]
        self.adapter_down = nn.Sequential(*down)
        self.adapter_up = nn.Linear(width, hidden_size)
        if isinstance(scaling, (int, float)):
            self.scaling = float(scaling)
        elif scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:  # "channel"
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        if ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden_size)
        if use_gating:
            self.gate = nn.Linear(hidden_size, 1)

    @property
    def down_proj(self) -> nn.Linear:
        return self.adapter_down[-2]

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the bottleneck neurons (after the non-linearity), masked."""
        if hasattr(self, "adapter_norm_before"):
            x = self.adapter_norm_before(x)
        down = self.adapter_down[-1](self.down_proj(x))
        factor = self.unit_factor("bottleneck", down.dtype)
        return down if factor is None else down * factor

    def up(self, x: torch.Tensor) -> torch.Tensor:
        up = linear(self.bottleneck(x), self.adapter_up)
        return up * self.scaling if not (isinstance(self.scaling, float) and self.scaling == 1.0) else up

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        """`residual` None: a parallel adapter (AdapterHub's ParallelAdapter.forward), which adds none."""
        up = self.up(x)
        out = up
        if hasattr(self, "gate"):
            gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
            out = out * gate
        if residual is not None and self.adapter_residual_before_ln:
            out = out + residual
        if hasattr(self, "adapter_norm_after"):
            out = self.adapter_norm_after(out)
        if residual is not None and not self.adapter_residual_before_ln:
            out = out + residual
        return out, up


class Fusion(nn.Module, Maskable):
    """AdapterFusion (AdapterHub's BertFusion), inference path, in one of two exact forms.

    - "standard": AdapterHub's parameters (query, key, value) and computation, n key projections per token.
    - "folded" (after compaction): scores_i = u_i . (M x + c) with M = Wk^T Wq and c = Wk^T bq (the key bias
      adds the same q.bk to every score, which the softmax cancels), and the bias-free value projection applied
      once to the softmax-weighted sum: 2h^2 + O(nh) per token instead of (2n+1)h^2.
    - "bottleneck space" (after compaction, `bottleneck_widths` given: the fused adapters' widths k_i, in order):
      the fusion reads the adapters' bottleneck activations a_i instead of their outputs u_i = U_i a_i + b_i.
      With r = R x + c the folded query side, score_i = r . u_i = (U_i^T R x + U_i^T c) . a_i + (b_i^T R x + b_i^T c),
      so one `score_proj` h -> (sum k + n) gives every U_i^T r block and every b_i . r; the mix V sum_i p_i u_i =
      sum_i p_i (V U_i a_i + V b_i) is one (sum k + n) -> h matmul over [p_1 a_1, ..., p_n a_n, p] whose weight is
      the fused adapters' `adapter_up` (V U_i, V b_i: compaction folds V into them) side by side. No h x h
      matmul is left except V on the residual when the residual comes before V (`value` is then that V).
      Exact for every supported configuration: the fusion mixes the adapters' scaled up-projections only, which
      are affine in a_i (gating, ln_after and the adapter residual are not part of them).
    The `adapters` mask removes a fused adapter from the softmax; with none left the mixed context is zero.
    """

    def __init__(self, hidden_size: int, query: bool = True, key: bool = True, value: bool = True,
                 residual_before: bool = False, query_before_ln: bool = False, folded: bool = False,
                 bottleneck_widths: Optional[list] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.residual_before = residual_before
        self.query_before_ln = query_before_ln
        self.folded = folded or bottleneck_widths is not None
        self.bottleneck_space = bottleneck_widths is not None
        if self.bottleneck_space:
            widths = [int(k) for k in bottleneck_widths]
            self.widths = widths
            n, total = len(widths), sum(widths)
            if n >= 2:  # a softmax over one adapter is 1: no scores
                self.score_proj = nn.Linear(hidden_size, total + n)
            # which adapter each bottleneck column belongs to, and that as a [sum k, n] 0/1 matrix (block sums)
            seg = torch.repeat_interleave(torch.arange(n), torch.tensor(widths, dtype=torch.long)) if n else \
                torch.zeros(0, dtype=torch.long)
            self.register_buffer("segment", seg, persistent=False)
            self.register_buffer("block_sum", nn.functional.one_hot(seg, n).to(torch.float32) if n else
                                 torch.zeros(0, 0), persistent=False)
            if value:  # V of the residual, which comes before V (residual_before); V of the mix is in the ups
                self.value = nn.Linear(hidden_size, hidden_size, bias=False)
            return
        if folded:
            if query or key:
                self.score_proj = nn.Linear(hidden_size, hidden_size, bias=query)
        else:
            if query:
                self.query = nn.Linear(hidden_size, hidden_size)
            if key:
                self.key = nn.Linear(hidden_size, hidden_size)
        if value:
            self.value = nn.Linear(hidden_size, hidden_size, bias=False)

    def _query_side(self, query: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.score_proj(query) if hasattr(self, "score_proj") else query
        return self.query(query) if hasattr(self, "query") else query

    def forward(self, query: torch.Tensor, ups: list, residual: torch.Tensor, up_layers: Optional[list] = None
                ) -> torch.Tensor:
        """query [b, s, h]; ups: the n fused adapters' scaled up-projections, each [b, s, h]; residual [b, s, h].
        In bottleneck space `ups` are the adapters' bottleneck activations a_i [b, s, k_i] and `up_layers` their
        `adapter_up` Linears (V U_i, V b_i).

        Scores and the weighted sum are per-adapter multiply-and-reduce ops rather than einsums over a stacked
        [b, s, n, h] tensor: no copy into a stack, and onnxruntime runs Mul/ReduceSum far faster than Einsum."""
        if self.bottleneck_space:
            return self._bottleneck_forward(query, ups, residual, up_layers)
        n = len(ups)
        gate = self.__dict__.get("gate_adapters")
        if gate is not None:  # criteria read dL/dgate here: a gate scales each fused adapter's output
            ups = [u * gate[i] for i, u in enumerate(ups)]
        mask = self.get_mask("adapters")
        if n == 0 or (mask is not None and not bool(mask.any())):
            context = torch.zeros_like(residual)
        elif n == 1 and mask is None:
            context = ups[0]  # a softmax over one is 1
        else:
            probs = self.attention(query, ups)
            context = probs[..., 0:1] * ups[0]
            for i in range(1, n):
                context = context + probs[..., i:i + 1] * ups[i]
        return self.finish(context, residual)

    def _bottleneck_forward(self, query, acts: list, residual, up_layers: list) -> torch.Tensor:
        n = len(acts)
        rest = self.value(residual) if hasattr(self, "value") else residual
        mask = self.get_mask("adapters")
        if n == 0 or (mask is not None and not bool(mask.any())):
            return rest  # a zero mix
        gate = self.__dict__.get("gate_adapters")
        if n == 1:
            mix = linear(acts[0], up_layers[0])
            return (mix * gate[0] if gate is not None else mix) + rest
        acts_all = torch.cat(acts, dim=-1)  # [b, s, sum k]
        probs = self._bottleneck_probs(query, acts_all)
        if gate is not None:  # a gate scales u_i: its score above, its share of the mix here
            probs = probs * gate.to(probs.dtype)
        mixed = torch.cat([acts_all * probs.index_select(-1, self.segment), probs], dim=-1)
        weight = torch.cat([u.weight for u in up_layers] + [u.bias.unsqueeze(-1) for u in up_layers], dim=-1)
        return nn.functional.linear(mixed, weight) + rest

    def _bottleneck_probs(self, query: torch.Tensor, acts_all: torch.Tensor) -> torch.Tensor:
        total = acts_all.shape[-1]
        proj = self.score_proj(query)  # [b, s, sum k + n]: the U_i^T r blocks, then b_i . r
        scores = torch.matmul(proj[..., :total] * acts_all, self.block_sum.to(proj.dtype)) + proj[..., total:]
        gate = self.__dict__.get("gate_adapters")
        if gate is not None:
            scores = scores * gate.to(scores.dtype)
        mask = self.get_mask("adapters")
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def attention(self, query: torch.Tensor, ups: list) -> torch.Tensor:
        """The fusion's softmax weights [b, s, n] over the fused adapters (masked ones get 0). In bottleneck
        space `ups` are the bottleneck activations."""
        if self.bottleneck_space:
            if len(ups) < 2:
                return torch.ones(*query.shape[:-1], len(ups), dtype=query.dtype, device=query.device)
            return self._bottleneck_probs(query, torch.cat(ups, dim=-1))
        r = self._query_side(query)
        keys = [self.key(u) for u in ups] if not self.folded and hasattr(self, "key") else ups
        scores = torch.stack([(r * k).sum(-1) for k in keys], dim=-1)
        mask = self.get_mask("adapters")
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def finish(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Residual and value projection around the mixed context (linear in the context when the residual is
        added after the value projection)."""
        if self.residual_before:
            context = context + residual
        if hasattr(self, "value"):
            context = self.value(context)
        if not self.residual_before:
            context = context + residual
        return context


class AdapterSite(nn.Module):
    """Replaces BertSelfOutput / BertOutput: dense + dropout, then the active composition wired as AdapterHub's
    BottleneckLayer wires it (compositions.py: each child after its lead adapter's pre_forward, then the last
    adapter's post_forward), then the layer norm.

    `active` is None (plain transformer sub-layer) or a Composition (Single, Fuse, Stack; the manifest's JSON
    form is accepted too). `placements[i]` holds the original_ln_before / original_ln_after /
    residual_before_ln of child i's lead adapter (a Single's adapter, a Fuse's last adapter: AdapterHub's
    compose_fuse); `placement` is the last child's (post_forward).
    """

    def __init__(self, dense: nn.Linear, layer_norm: nn.LayerNorm, dropout: nn.Module, location: str):
        super().__init__()
        self.dense = dense
        self.LayerNorm = layer_norm
        self.dropout = dropout
        self.location = location
        self.adapters = nn.ModuleDict()
        self.adapter_fusion_layer = nn.ModuleDict()
        self.active = None
        self.placements: list = []

    @property
    def active(self):
        return self.__dict__["_active"]

    @active.setter
    def active(self, value) -> None:
        from .compositions import from_json
        self.__dict__["_active"] = from_json(value)

    @property
    def placement(self) -> dict:
        return self.placements[-1] if self.placements else {}

    @placement.setter
    def placement(self, value: dict) -> None:
        """One placement for every child (a Single or Fuse site, as manifests before Stack had it)."""
        n = len(self.active.children) if self.active is not None else 1
        self.placements = [dict(value) for _ in range(n)] if value else []

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dropout(linear(hidden_states, self.dense))
        if self.active is None:
            return self.LayerNorm(h + input_tensor)
        return self.active.forward(self, h, input_tensor, self.placements)


class DistilBertLayer(nn.Module):
    """A DistilBERT block (transformers' TransformerBlock) made of our parts, laid out as AdapterHub's
    TransformerBlockWithAdapters: attention, then the mh_adapter site `attention_adapters` (dense = out_lin,
    LayerNorm = sa_layer_norm, residual = the block's input), the FFN, then the output_adapter site
    `output_adapters` (dense = lin2, LayerNorm = output_layer_norm, residual = the attention site's output).

    transformers hands every block the raw [batch, seq] 0/1 mask (eager attention); it becomes BERT's additive
    mask here, in the same ops as BERT's extended mask so that onnxruntime's attention fusion matches it. A
    masked score is finfo.min where DistilBERT writes finfo.min over it: both are exactly 0 after the softmax.
    """

    def __init__(self, attention: SelfAttention, mh_site: "AdapterSite", ffn: Intermediate, out_site: "AdapterSite"):
        super().__init__()
        self.attention = attention
        self.attention_adapters = mh_site
        self.ffn = ffn
        self.output_adapters = out_site

    def forward(self, x, attn_mask=None, head_mask=None, output_attentions=False, **kwargs):
        extended = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError("DistilBertLayer needs the [batch, seq] attention mask of eager attention")
            extended = (1.0 - attn_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        context, probs = self.attention(x, extended, head_mask, output_attentions=output_attentions)
        h = self.attention_adapters(context, x)
        out = self.output_adapters(self.ffn(h), h)
        return (probs, out) if output_attentions else (out,)


class PredictionHead(nn.Sequential):
    """AdapterHub's ClassificationHead layout (heads/base.py): [Dropout, Linear, act, Dropout, Linear] for
    layers=2, applied to the first token (or the pooler output with use_pooler)."""

    def __init__(self, hidden_size: int, num_labels: int, layers: int = 2, activation_function: str = "tanh",
                 bias: bool = True, use_pooler: bool = False, dropout: float = 0.0):
        modules = []
        for i in range(layers):
            modules.append(nn.Dropout(dropout))
            if i < layers - 1:
                modules.append(nn.Linear(hidden_size, hidden_size))
                if activation_function:
                    modules.append(activation(activation_function))
            else:
                modules.append(nn.Linear(hidden_size, num_labels, bias=bias))
        super().__init__(*modules)
        self.use_pooler = use_pooler
