"""`post-training` (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022): masks
to a target by Fisher importance, then least-squares mask tuning folded into the weights; no retraining.

Targets (exactly one): `target_speedup` X > 1, the predicted speedup over the dense (compacted) model on provider
`on` at `shape` (compressor/latency.py: a measured, cached latency model); `target_flops` F or `target_params` P,
fractions of the dense (compacted) model's FLOPs per token or parameters. For a speedup the search ranks members
by Fisher per predicted millisecond saved (LatencyCosts: the slope of the member's layer curve at the current kept
count); for FLOPs and parameters by Fisher per FLOP / parameter (FlopCosts, described below for FLOPs).

Masks over heads, FFN neurons, adapter bottleneck neurons and fused adapters from `examples` task examples
(default 1024), without retraining:

1. **Fisher-based mask search.** A mask variable of ones per example and unit member (forward hooks multiply a
   head's context, a neuron's or bottleneck neuron's activation, a fused adapter's output by it) gives
   per-example gradients of the summed task loss; the diagonal empirical Fisher of a member is the sum over the
   examples of its squared per-example gradient (Kwon eq. 5, at the all-ones mask).
2. **Search under a FLOPs constraint.** `target_flops` is a fraction of the dense model's FLOPs per token
   (`compressor/flops.py`, sequence length 128) *in its compacted form*: compaction folds every fusion exactly
   (docs/design.md, "compress_manifest.json"), so the dense reference is `total_cost(compact(model))`, not the
   model as loaded (whose standard-form fusions cost far more). All kinds compete in one greedy knapsack: the
   member with the lowest Fisher importance per FLOP it saves is removed until the estimated cost meets the
   target (a simplification of Kwon's search, which enumerates the number of kept heads and fills the rest
   with neurons; with adapters there is no such two-kind split). Costs per token: a head `8 h d + 4 L d`
   (Q/K/V rows, output columns, scores and mix at L = 128), an FFN neuron `4 h`, a bottleneck neuron `4 h`, a
   fused adapter its share of the folded fusion `4 h` plus the computation of its still-kept bottleneck
   neurons (and its gate). Structural effects of compaction (a fusion left with one adapter needs no query,
   key or value; the bottleneck-space form) are not in the estimate: the real cost of the chosen masks is
   measured by compacting a copy, and while it is above the target the search runs again with the estimate's
   target lowered by the excess (at most 6 times). Every unit group keeps `min_keep` members.
3. **Mask rearrangement** (`rearrange`, Kwon §4.2, compressor/pruning/rearrange.py): within each group of heads,
   FFN neurons and bottleneck neurons the count the search kept stays, and which members stay is re-chosen with
   the group's block of the Fisher matrix (accumulated in the same pass as the diagonal), so the cost is unchanged.
   Fused adapters are not rearranged (their costs differ).
4. **Mask tuning** (`tune`, Kwon §4.3), layer by layer in order, on the same examples: per block a scale per
   kept member minimises the squared error between the pruned model's block output (inputs from the model
   pruned and tuned so far) and the dense model's (inputs from the dense model), over real tokens:
   attention block `W_o (s * ctx) + b + x` against the dense `W_o ctx' + b + x'` (a scale per head), FFN block
   likewise with the output dense (a scale per neuron), a bottleneck adapter's up projection `U (s * a) + b`
   against the dense adapter's (a scale per bottleneck neuron). The normal equations are accumulated in
   float64 and solved with `torch.linalg.lstsq`, damped (1e-4 of the mean diagonal) and clamped to
   [-10, 10]; a block whose error would not fall keeps scales of one. The scales fold into the weights (a
   head's into its columns of the attention output dense, a neuron's into its column of the FFN output
   dense, a bottleneck neuron's into its column of `adapter_up`), so the result is a model + masks
   (`maskset.model`) and compaction stays exact (invariant 1). Fused adapters are not tuned. Both streams' layer
   inputs are kept between layers, so each layer runs a fixed number of times (O(L)); layers and their parts come
   from the model's description (`layer_parts`), not from BERT's module paths.

The sample is regrouped by length before any stage (`sample_batches`): each quantity is a sum over examples or
real tokens, and short texts in a batch padded to its longest cost most of the time.

Measured on the embedded default with MRPC (2-core CPU, 256 examples): heads and neurons only at
target_flops=0.7 keep dev accuracy 0.7574 (dense 0.7623); with all four kinds at 0.5 or 0.7 the search keeps
1 fused adapter per fusion site (8 of 48) and 1 bottleneck neuron per adapter, and the model falls to the
majority class (0.6838): the fused adapters' Fisher per FLOP ranks them below heads and neurons, which the
block-wise tuning (it reconstructs the attention and FFN sub-layers and the adapters' up projections, not the
fusion output) cannot repair. Open.

Kinds: those named with `--sparsity KIND=0` (the share pruned comes from the target, so a fraction must be 0), or
all four when none is named.
"""

from __future__ import annotations

import copy
import heapq
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import PruningConfigError
from ..flops import total_cost
from ..masks import MaskSet, apply_masks
from ..modeling.architecture import layer_parts, layers_of
from ..training.heads import num_labels_of
from ..units import fingerprint, iter_units
from ..units import unit_key as unit_key_of
from .methods import PruningMethod, register_method
from .rearrange import rearrange_masks

STRUCTURED = ("heads", "neurons", "bottleneck", "adapters")
REARRANGED = ("heads", "neurons", "bottleneck")  # members of one group cost the same: a swap keeps the cost
SEQ_LEN = 128
MAX_SEARCHES = 6


TARGETS = ("target_speedup", "target_flops", "target_params")


@dataclass
class PostTrainingOptions:
    target_speedup: Optional[float] = None  # predicted speedup over the dense (compacted) model on `on` (> 1)
    target_flops: Optional[float] = None  # fraction of the dense (compacted) model's FLOPs per token to keep
    target_params: Optional[float] = None  # fraction of the dense (compacted) model's parameters to keep
    on: str = "cpu"  # the latency model's provider: cpu | cuda | torch-cpu | torch-cuda
    shape: str = "1x128"  # the latency model's batch x sequence length
    examples: int = 1024  # task examples for the Fisher and the mask tuning
    rearrange: bool = True  # re-choose the kept members within each group with the block-diagonal Fisher
    tune: bool = True  # least-squares mask tuning, folded into the weights
    latency_rounds: int = 10  # interleaved timing rounds when the latency model is built

    def __post_init__(self):
        given = [t for t in TARGETS if getattr(self, t) is not None]
        if len(given) != 1:
            raise PruningConfigError("post-training needs exactly one target: --target-speedup X (> 1), "
                                     "--target-flops F or --target-params P (fractions of dense in (0, 1))"
                                     + (f"; got {' and '.join(given)}" if given else ""))
        self.target = given[0]
        try:
            value = float(getattr(self, self.target))
        except (TypeError, ValueError):
            raise PruningConfigError(f"post-training: {self.target} must be a number, got "
                                     f"{getattr(self, self.target)!r}") from None
        setattr(self, self.target, value)
        if self.target == "target_speedup":
            if not value > 1.0 or math.isinf(value):
                raise PruningConfigError(f"post-training: target_speedup={value} must be > 1 (2 = twice as fast as "
                                         "the dense model)")
        elif not 0.0 < value < 1.0 or math.isnan(value):
            what = "FLOPs per token" if "flops" in self.target else "parameters"
            raise PruningConfigError(f"post-training: {self.target}={value} must be in (0, 1), the fraction of "
                                     f"the dense model's {what} to keep")
        from ..latency import PROVIDERS, parse_shape

        self.on = str(self.on).strip().lower()
        if self.on not in PROVIDERS:
            raise PruningConfigError(f"post-training: unknown provider '{self.on}' (--on); choose one of "
                                     f"{', '.join(PROVIDERS)}")
        b, q = parse_shape(self.shape)
        self.shape = f"{b}x{q}"
        if int(self.examples) < 1:
            raise PruningConfigError(f"post-training: examples must be >= 1, got {self.examples}")
        self.examples = int(self.examples)
        if int(self.latency_rounds) < 1:
            raise PruningConfigError(f"post-training: latency_rounds must be >= 1, got {self.latency_rounds}")
        self.latency_rounds = int(self.latency_rounds)


def real_params(model: nn.Module, masks: Optional[dict] = None) -> int:
    """Parameters of `model` compacted under `masks` (None: only the exact folds)."""
    from ..compaction import compact

    maskset = MaskSet(masks, fingerprint(model)) if masks is not None else None
    return int(total_cost(compact(model, maskset), SEQ_LEN)["params"])


def real_flops(model: nn.Module, masks: Optional[dict] = None) -> int:
    """FLOPs per token (sequence length 128) of `model` compacted under `masks` (None: only the exact folds)."""
    from ..compaction import compact

    maskset = MaskSet(masks, fingerprint(model)) if masks is not None else None
    return int(total_cost(compact(model, maskset), SEQ_LEN)["flops_per_token"])


# ----------------------------------------------------------------------------------------------- Fisher

class _PerExampleGates:
    """Forward hooks that multiply each unit member's output by a per-example gate [batch, members] of ones that
    requires grad: d(sum of per-example losses)/d gate[b] is example b's own gradient."""

    def __init__(self, model: nn.Module, units: list):
        self.model, self.units, self.gates, self.handles = model, units, {}, []

    def new_batch(self, batch_size: int, device) -> list:
        self.gates = {u.key: torch.ones(batch_size, u.size, device=device, requires_grad=True) for u in self.units}
        return [self.gates[u.key] for u in self.units]

    def __enter__(self):
        for u in self.units:
            module = self.model.get_submodule(u.module_path)
            key = u.key
            if u.kind == "heads":
                def hook(mod, args, out, key=key):
                    ctx, probs = out
                    b, s, _ = ctx.shape
                    g = self.gates[key].to(ctx.dtype)
                    ctx = (ctx.view(b, s, mod.num_attention_heads, -1) * g[:, None, :, None]).view(b, s, -1)
                    return ctx, probs
                self.handles.append(module.register_forward_hook(hook))
            elif u.kind == "neurons":
                self.handles.append(module.register_forward_hook(
                    lambda mod, args, out, key=key: out * self.gates[key].to(out.dtype)[:, None, :]))
            elif u.kind == "bottleneck":
                # on the non-linearity: Bottleneck.bottleneck calls adapter_down's parts, never the Sequential
                self.handles.append(module.adapter_down[-1].register_forward_hook(
                    lambda mod, args, out, key=key: out * self.gates[key].to(out.dtype)[:, None, :]))
            elif u.kind == "adapters":
                if getattr(module, "bottleneck_space", False):
                    raise PruningConfigError(f"post-training needs the fusion's adapter outputs, which the compacted "
                                             f"fusion at {u.module_path} computes in bottleneck space: prune the "
                                             "model before compaction")

                def pre(mod, args, key=key):
                    query, ups, residual = args[:3]
                    g = self.gates[key]
                    ups = [up * g[:, i, None, None].to(up.dtype) for i, up in enumerate(ups)]
                    return (query, ups, residual, *args[3:])
                self.handles.append(module.register_forward_pre_hook(pre))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles, self.gates = [], {}


def _slice(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


def sample_batches(data, examples: int, seed: int) -> list:
    """The first `examples` training examples in the seeded order, in batches of the task's batch size, regrouped
    by length (stable) so that a batch pads little: every quantity here is a sum over examples or real tokens, which
    the grouping does not change, and the padding it saves is most of the work on short texts (SST-2)."""
    bs = data.config.batch_size
    out, left = [], examples
    for batch in data.batches(max(1, -(-examples // bs)), seed=seed):
        n = min(left, int(batch["input_ids"].shape[0]))
        out.append(_slice(batch, n))
        left -= n
        if left <= 0:
            break
    collate = getattr(data, "collate", None)
    if collate is None or not out:
        return out
    items = []
    for batch in out:
        real = batch["attention_mask"].bool()
        for i in range(int(real.shape[0])):
            items.append({k: (v[i][real[i]].tolist() if v.dim() == 2 and k != "labels" else v[i].item())
                          for k, v in batch.items()})
    items.sort(key=lambda it: len(it["input_ids"]))  # stable: ties keep the seeded order
    return [collate(items[i:i + bs]) for i in range(0, len(items), bs)]


def fisher(model: nn.Module, units: list, data, batches: list, advance=None) -> dict:
    """Diagonal empirical Fisher per unit member: the sum over examples of the squared per-example gradient of
    the task loss w.r.t. the member's mask, at the all-ones mask."""
    return fisher_information(model, units, data, batches, advance)[0]


def fisher_information(model: nn.Module, units: list, data, batches: list, advance=None, blocks=()) -> tuple:
    """(diagonal Fisher per unit, full Fisher block [n, n] per unit whose kind is in `blocks`): one forward and
    backward per batch; the per-example gate makes the batch's gradient per example."""
    device = next(model.parameters()).device
    totals = {u.key: torch.zeros(u.size, dtype=torch.float64) for u in units}
    full = {u.key: torch.zeros(u.size, u.size, dtype=torch.float64) for u in units if u.kind in blocks}
    with _PerExampleGates(model, units) as gates:
        for batch in batches:
            b = int(batch["input_ids"].shape[0])
            tensors = gates.new_batch(b, device)
            loss = data.loss(model, batch) * b  # the mean over the batch times b: the sum of per-example losses
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for u, g in zip(units, grads):
                if g is not None:
                    g = g.detach().cpu()
                    totals[u.key] += g.double().pow(2).sum(0)
                    if u.key in full:
                        full[u.key] += (g.T @ g).double()  # float32 products of one batch, summed in float64
            if advance:
                advance()
    return {u.key: totals[u.key].view(u.shape) for u in units}, full


# ----------------------------------------------------------------------------------------------- search

def member_costs(model: nn.Module, units: list) -> dict:
    """FLOPs per token one member of each unit saves when removed (the adapters' entry is the fusion share only;
    the search adds the adapter's kept bottleneck neurons)."""
    h = model.base_model.config.hidden_size
    costs = {}
    for u in units:
        module = model.get_submodule(u.module_path)
        if u.kind == "heads":
            d = module.attention_head_size
            costs[u.key] = 8 * h * d + 4 * SEQ_LEN * d
        elif u.kind in ("neurons", "bottleneck"):
            costs[u.key] = 4 * h
        else:
            costs[u.key] = 4 * h
    return costs


def _adapter_bottlenecks(model: nn.Module, units: list) -> dict:
    """(fusion key, index) -> (bottleneck key or None, the adapter's fixed extra cost: its gate)."""
    h = model.base_model.config.hidden_size
    keys = {u.key for u in units}
    out = {}
    for u in units:
        if u.kind != "adapters":
            continue
        site = u.module_path.split(".adapter_fusion_layer.")[0]
        for i, name in enumerate(u.members):
            adapter = model.get_submodule(f"{site}.adapters.{name}")
            bkey = f"{site}.adapters.{name}::bottleneck"
            out[(u.key, i)] = (bkey if bkey in keys else None, adapter.width,
                               2 * h if hasattr(adapter, "gate") else 0)
    return out


class FlopCosts:
    """What one member saves when removed, in FLOPs per token (or, with `params=True`, parameters): the estimate
    the greedy search ranks by. A fused adapter saves its fusion share plus its still-kept bottleneck neurons (and
    its gate); a bottleneck neuron of a removed adapter saves nothing more."""

    def __init__(self, model: nn.Module, units: list, params: bool = False):
        h = model.base_model.config.hidden_size
        self.costs = member_costs(model, units)
        if params:
            for u in units:
                d = model.get_submodule(u.module_path).attention_head_size if u.kind == "heads" else 1
                self.costs[u.key] = dict(heads=4 * h * d + 3 * d, adapters=h).get(u.kind, 2 * h + 1)
        self.per_neuron = 2 * h + 1 if params else 4 * h
        self.gate = 2 * h if not params else h + 1
        self.adapters = _adapter_bottlenecks(model, units)
        self.owner = {v[0]: k for k, v in self.adapters.items() if v[0] is not None}

    def __call__(self, key: str, i: int, keep: dict) -> float:
        if (key, i) in self.adapters:
            bkey, width, gate = self.adapters[(key, i)]
            kept = int(keep[bkey].sum()) if bkey is not None else width
            return self.costs[key] + self.per_neuron * kept + (self.gate if gate else 0)
        if key in self.owner and not bool(keep[self.owner[key][0]][self.owner[key][1]]):
            return 0  # the adapter is gone: its bottleneck neurons save nothing more
        return self.costs[key]


class LatencyCosts:
    """What one member saves when removed, in predicted milliseconds (compressor/latency.py): the slope of its
    layer's piecewise-linear curve at the current kept count. A fused adapter saves its fusion share plus the
    site's width curve over its kept bottleneck neurons. Never below `floor` (flat segments still rank)."""

    def __init__(self, model: nn.Module, units: list, latency):
        from ..latency import SITES

        self.lm, self.adapters = latency, _adapter_bottlenecks(model, units)
        self.owner = {v[0]: k for k, v in self.adapters.items() if v[0] is not None}
        self.floor = 1e-9 * latency.dense_ms()
        self.where, self.sizes = {}, {u.key: u.size for u in units}
        paths = {id(m): p for p, m in model.named_modules()}
        for li, parts in enumerate(layer_parts(model)):
            self.where[unit_key_of(paths[id(parts.attention)], "heads")] = (li, "heads")
            self.where[unit_key_of(paths[id(parts.ffn)], "neurons")] = (li, "neurons")
            # per site: (layer, site name, fusion key or None, [(name, bottleneck key, width)])
            for sname, site in zip(SITES, (parts.mh_site, parts.out_site)):
                if site.active is None:
                    continue
                spath = paths[id(site)]
                # the fused adapters first (index i of the fusion unit is member i), then the stacked ones
                fuses = site.active.fuses()
                fused = list(fuses[0].names) if fuses else []
                names = fused + [n for n in site.active.adapters() if n not in fused]
                fkey = unit_key_of(f"{spath}.adapter_fusion_layer.{fuses[0].name}", "adapters") if fuses else None
                members = [(n, unit_key_of(f"{spath}.adapters.{n}", "bottleneck"), site.adapters[n].width)
                           for n in names]
                info = (li, sname, fkey, members)
                if fkey is not None:
                    self.where[fkey] = info
                for _, bkey, _ in members:
                    self.where[bkey] = info

    def _site(self, info, keep):
        """Kept adapters (indices) and the site's kept width."""
        li, sname, fkey, members = info
        alive = [j for j in range(len(members))
                 if fkey is None or fkey not in keep or j >= len(keep[fkey]) or bool(keep[fkey][j])]
        widths = [int(keep[b].sum()) if b in keep else w for _, b, w in members]
        return alive, widths

    def __call__(self, key: str, i: int, keep: dict) -> float:
        info = self.where[key]
        if len(info) == 2:
            li, kind = info
            n = int(keep[key].sum())
            return max(self.lm.delta(li, kind, n) - self.lm.delta(li, kind, n - 1), self.floor)
        li, sname, fkey, members = info
        alive, widths = self._site(info, keep)
        total = sum(widths[j] for j in alive)
        width = f"{sname}:width"
        if key == fkey:
            k = len(alive)
            a = f"{sname}:adapters"
            share = self.lm.delta(li, a, k) - self.lm.delta(li, a, k - 1)
            return max(share + self.lm.delta(li, width, total) - self.lm.delta(li, width, total - widths[i]),
                       self.floor)
        j = next(j for j, m in enumerate(members) if m[1] == key)
        if j not in alive:
            return 0  # the adapter is gone: its bottleneck neurons save nothing more
        return max(self.lm.delta(li, width, total) - self.lm.delta(li, width, total - 1), self.floor)


def greedy_search(model: nn.Module, units: list, scores: dict, need: float, min_keep: int, cost=None) -> dict:
    """Remove the member with the lowest Fisher per unit of cost saved until the estimated savings reach `need`.
    `cost(key, i, keep)`: what removing member i of unit `key` saves now (default FlopCosts). Costs change as
    members go (an adapter's with its bottleneck neurons, a latency slope with the kept count): a lazy heap
    re-ranks a member whose cost changed when it comes up. Deterministic: ties break by key, index."""
    cost = cost or FlopCosts(model, units)
    keep = {u.key: torch.ones(u.size, dtype=torch.bool) for u in units}
    left = {u.key: u.size for u in units}

    def priority(key, i, c):
        s = float(scores[key].flatten()[i])
        return s / c if c > 0 else math.inf

    heap = []
    for u in units:
        for i in range(u.size):
            c = cost(u.key, i, keep)
            heap.append((priority(u.key, i, c), u.key, i, c))
    heapq.heapify(heap)
    saved = 0.0
    while heap and saved < need:
        p, key, i, c = heapq.heappop(heap)
        now = cost(key, i, keep)
        if now != c:  # stale: the member's cost changed since it was ranked
            heapq.heappush(heap, (priority(key, i, now), key, i, now))
            continue
        if c == 0 or left[key] <= min_keep:
            continue
        keep[key][i] = False
        left[key] -= 1
        saved += c
    return {u.key: keep[u.key].view(u.shape) for u in units}


def floor_masks(units: list, min_keep: int) -> dict:
    out = {}
    for u in units:
        m = torch.zeros(u.size, dtype=torch.bool)
        m[:min_keep] = True
        out[u.key] = m.view(u.shape)
    return out


# ----------------------------------------------------------------------------------------------- mask tuning

class _Stop(Exception):
    pass


class _Block:
    """Least squares for one block's scales over its kept members. With X the kept members' activations
    [tokens, k * d] (d = 1 for a neuron, the head size for a head), W the columns of the weight that reads them
    [out, k * d] and r the target minus what does not scale, E(s) = sum_t ||W (s * x_t) - r_t||^2 = s'Gs - 2c's + rr
    with G the per-member block sums of (X'X) * (W'W) and c those of (r W) * X. X'X and (r W) * X are accumulated
    per batch (float32, summed in float64); W'W is taken once. Pruned members' activations are zeros: leaving
    them out changes no sum."""

    def __init__(self, unit, keep: torch.Tensor, weight: torch.Tensor):
        self.unit, self.keep = unit, keep.flatten().bool()
        self.d = weight.shape[1] // unit.size
        self.kept = self.keep.nonzero().flatten()
        self.cols = (self.kept[:, None] * self.d + torch.arange(self.d)).flatten()
        self.weight = weight[:, self.cols].float()
        self.gram = self.cw = None
        self.rr = 0.0

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        x, r = x[:, self.cols].float(), r.float()
        gram, cw = (x.T @ x).double(), ((r @ self.weight) * x).sum(0).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.cw = cw if self.cw is None else self.cw + cw
        self.rr += float(r.double().pow(2).sum())

    def solve(self) -> tuple:
        """(scales of every member, zero where pruned; error with scales of one; error with the scales)."""
        W, k = self.weight.double(), len(self.kept)
        G = (self.gram * (W.T @ W)).view(k, self.d, k, self.d).sum((1, 3))
        c = self.cw.view(k, self.d).sum(1)
        error = lambda s: float(s @ G @ s - 2 * c @ s + self.rr)  # noqa: E731
        ones = torch.ones(k, dtype=torch.float64)
        sol = ones
        if k:
            damp = 1e-4 * float(G.diagonal().mean()) + 1e-12
            sol = torch.linalg.lstsq(G + damp * torch.eye(k, dtype=G.dtype), c.unsqueeze(-1)).solution.squeeze(-1)
            sol = sol.clamp(-10.0, 10.0)
        s = torch.zeros(self.unit.size, dtype=torch.float64)
        s[self.kept] = sol
        return s, error(ones), error(sol)


def _tunable_blocks(parts, paths: dict) -> list:
    """(unit key, kind, module whose input (or, for a dense adapter, output) is captured, the Linear that reads
    the members) of each tunable block of a layer, as the model's description lays it out: the heads (read by the
    attention site's dense), the FFN neurons (the FFN site's dense) and the bottleneck neurons of each active
    adapter not computed in bottleneck space (its up projection)."""
    out = [(unit_key_of(paths[id(parts.attention)], "heads"), "heads", parts.mh_site, parts.mh_site.dense),
           (unit_key_of(paths[id(parts.ffn)], "neurons"), "neurons", parts.out_site, parts.out_site.dense)]
    for _, site in parts.sites:
        if site.active is None:
            continue
        in_space = {n for f in site.active.fuses()
                    if getattr(site.adapter_fusion_layer[f.name], "bottleneck_space", False) for n in f.names}
        for n in (n for n in site.active.adapters() if n not in in_space):
            adapter = site.adapters[n]
            if adapter.width > 0:
                out.append((unit_key_of(paths[id(adapter)], "bottleneck"), "bottleneck", adapter.adapter_up,
                            adapter.adapter_up))
    return out


def _capture(blocks: list, store: dict, outputs: bool) -> list:
    """Hooks writing each block's captured tensors into `store`: a site's (input, residual); an up projection's
    input, or with `outputs` its output."""
    handles = []
    for key, kind, module, _ in blocks:
        if outputs and kind == "bottleneck":
            handles.append(module.register_forward_hook(
                lambda mod, args, out, key=key: store.__setitem__(key, out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, key=key: store.__setitem__(key, args[:2])))
    return handles


def _run_to(model, batch):
    """Forward `batch` until a hook raises _Stop."""
    device = next(model.parameters()).device
    try:
        model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    except _Stop:
        pass


def _first_layer_inputs(model, batches) -> list:
    """Per batch, the arguments the encoder passes to its first layer (hidden states, attention mask, ...)."""
    calls = []

    def pre(mod, args, kwargs):
        if not args:  # hidden states passed by name
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        calls.append((args, kwargs))
        raise _Stop

    handle = layers_of(model)[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for batch in batches:
            _run_to(model, batch)
    finally:
        handle.remove()
    return calls


def _layer(layer, hidden, call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def tune_masks(dense: nn.Module, work: nn.Module, masks: dict, units: list, batches: list, advance=None) -> list:
    """Kwon §4.3 on `work` (masked; weights changed in place), layer by layer. Each layer's inputs are kept for
    both streams (the dense model's, the model pruned and tuned so far), so every layer runs a fixed number of
    times (O(L), not a forward from the bottom per layer). Returns per tuned block its key, the reconstruction
    error with scales of one and with the tuned scales (sums over real tokens)."""
    unit_of = {u.key: u for u in units}
    parts_w, parts_d = layer_parts(work), layer_parts(dense)
    paths_w, paths_d = ({id(m): p for p, m in net.named_modules()} for net in (work, dense))
    calls = _first_layer_inputs(dense, batches)
    d_in = [args[0] for args, _ in calls]
    w_in = list(d_in)  # the embeddings are not pruned: both streams start equal
    toks = [batch["attention_mask"].reshape(-1).bool() for batch in batches]
    report = []
    last = len(parts_w) - 1
    for li, (pw, pd, lw, ld) in enumerate(zip(parts_w, parts_d, layers_of(work), layers_of(dense))):
        bw, bd = _tunable_blocks(pw, paths_w), _tunable_blocks(pd, paths_d)
        plan = [(bw_, bd_) for bw_, bd_ in zip(bw, bd) if bw_[0] in unit_of]
        blocks = {key: _Block(unit_of[key], masks[key], reader.weight.detach()) for (key, _, _, reader), _ in plan}
        wstore, dstore = {}, {}
        handles = _capture([b for b, _ in plan], wstore, False) + _capture([b for _, b in plan], dstore, True)
        w_out = []
        try:
            for i, tok in enumerate(toks):
                wstore.clear()
                dstore.clear()
                d_next = _layer(ld, d_in[i], calls[i])
                w_out.append(_layer(lw, w_in[i], calls[i]))
                d_in[i] = d_next
                for (key, kind, _, reader_w), (_, _, _, reader_d) in plan:
                    if kind == "bottleneck":  # the dense adapter's up projection output is the target
                        a = wstore[key][0]
                        out_d = dstore[key]
                        target = out_d if reader_w.bias is None else out_d - reader_w.bias
                        blocks[key].add(a.reshape(-1, a.shape[-1])[tok], target.reshape(-1, target.shape[-1])[tok])
                        continue
                    x_in, res = (t.reshape(-1, t.shape[-1])[tok] for t in wstore[key])
                    xd_in, resd = (t.reshape(-1, t.shape[-1])[tok] for t in dstore[key])
                    # the target minus what does not scale: dense block output - bias - residual
                    r = nn.functional.linear(xd_in, reader_d.weight, reader_d.bias) + resd - res
                    if reader_w.bias is not None:
                        r = r - reader_w.bias
                    blocks[key].add(x_in, r)
                if advance:
                    advance()
        finally:
            for hnd in handles:
                hnd.remove()
        changed = False
        for (key, _, _, reader), _ in plan:
            blk = blocks[key]
            if blk.gram is None:  # no token in the sample
                continue
            s, before, after = blk.solve()
            applied = after < before
            if applied:
                W = reader.weight
                W.copy_((W.view(W.shape[0], blk.unit.size, -1) * s.float().view(1, -1, 1)).view_as(W))
                changed = True
            report.append(dict(key=key, layer=li, error_before=before, error_after=after if applied else before,
                               applied=bool(applied)))
        if li < last:  # the next layer's inputs: the tuned layer's outputs
            w_in = [_layer(lw, w_in[i], calls[i]) for i in range(len(toks))] if changed else w_out
    return report


# ----------------------------------------------------------------------------------------------- the method

def _rearrangement_summary(report: list) -> dict:
    """Per kind: members swapped and the summed quadratic estimate d'Fd before and after; per group the same."""
    kinds = {}
    for r in report:
        k = kinds.setdefault(r["key"].rsplit("::", 1)[1], dict(groups=0, swapped=0, loss_before=0.0, loss_after=0.0))
        k["groups"] += 1
        k["swapped"] += r["swapped"]
        k["loss_before"] += r["loss_before"]
        k["loss_after"] += r["loss_after"]
    g = lambda x: float(f"{x:.6g}")  # noqa: E731
    return dict(kinds={k: dict(v, loss_before=g(v["loss_before"]), loss_after=g(v["loss_after"]))
                       for k, v in sorted(kinds.items())},
                groups=[dict(r, loss_before=g(r["loss_before"]), loss_after=g(r["loss_after"])) for r in report])

def _progress():
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())


@register_method("post-training")
class PostTraining(PruningMethod):
    criterion = "fisher"
    needs_data = True
    kinds = STRUCTURED
    scope = "global"
    Options = PostTrainingOptions

    targeted = True  # prunes to a target option: --sparsity may be left out (all four kinds compete)

    def __init__(self, config, options=None):
        super().__init__(config, options)
        nonzero = sorted(k for k, f in config.sparsity.items() if f != 0)
        if nonzero:
            raise PruningConfigError(f"post-training prunes to a target (--target-speedup, --target-flops, "
                                     f"--target-params), not to a share: leave --sparsity out or name the kinds "
                                     f"that compete as --sparsity KIND=0 (got {nonzero[0]}="
                                     f"{config.sparsity[nonzero[0]]})")
        if self.options.target == "target_speedup":
            from ..latency import check_provider

            check_provider(self.options.on)  # available here, before any work

    def _objective(self, model: nn.Module, units: list, kinds: set) -> dict:
        """What the target constrains: measure(masks) (FLOPs, parameters or predicted ms of the compacted model),
        the dense value, the target value, the search's cost estimate, and what the masks record."""
        opts, cfg = self.options, self.config
        floor_m = floor_masks(units, cfg.min_keep)
        what = ", ".join(sorted(kinds))
        if opts.target == "target_speedup":
            from ..latency import latency_model

            lm = latency_model(model, opts.on, opts.shape, rounds=opts.latency_rounds)
            measure = lambda masks: lm.predict(model, masks)["latency_ms"]  # noqa: E731
            dense = lm.dense_ms()
            most = dense / measure(floor_m)
            if opts.target_speedup > most:
                raise PruningConfigError(f"post-training: target_speedup={opts.target_speedup} is above "
                                         f"{most:.2f}, the predicted speedup of removing every prunable unit "
                                         f"({what}) on {opts.on} at {opts.shape}")
            return dict(measure=measure, dense=dense, target=dense / opts.target_speedup,
                        cost=LatencyCosts(model, units, lm), latency=lm)
        params = opts.target == "target_params"
        measure = (lambda masks: real_params(model, masks)) if params else (lambda masks: real_flops(model, masks))
        dense, floor = measure(None), measure(floor_m)
        target = getattr(opts, opts.target) * dense
        if target < floor:
            raise PruningConfigError(f"post-training: {opts.target}={getattr(opts, opts.target)} is below "
                                     f"{floor / dense:.4f}, what removing every prunable unit ({what}) leaves of the "
                                     f"dense model's {dense} {'parameters' if params else 'FLOPs per token'}")
        return dict(measure=measure, dense=dense, target=target, cost=FlopCosts(model, units, params=params),
                    latency=None)

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        if num_labels_of(model) != data.spec.num_labels:
            raise PruningConfigError("post-training scores units by the task loss: the model needs a trained head "
                                     f"for {data.spec.ref} (train one with `compress train --train head`)")
        kinds = set(cfg.sparsity) or set(STRUCTURED)
        units = [u for u in iter_units(model) if u.kind in kinds]
        if not units:
            raise PruningConfigError(f"post-training: the model has no unit of kind {', '.join(sorted(kinds))}")
        loaded = int(total_cost(model, SEQ_LEN)["flops_per_token"])
        objective = self._objective(model, units, kinds)
        measure, dense, target = objective["measure"], objective["dense"], objective["target"]
        batches = sample_batches(data, opts.examples, cfg.seed)
        n_layers = len(layers_of(model))
        work = copy.deepcopy(model).eval()
        for p in work.parameters():
            p.requires_grad_(False)
        with _progress() as bar:
            total = len(batches) * (1 + (n_layers if opts.tune else 0))
            task = bar.add_task("post-training: Fisher", total=total)
            advance = lambda: bar.advance(task)  # noqa: E731
            t0 = time.perf_counter()
            scores, blocks = fisher_information(work, units, data, batches, advance,
                                                REARRANGED if opts.rearrange else ())
            t1 = time.perf_counter()
            need, searches = dense - target, []
            for _ in range(MAX_SEARCHES):
                masks = greedy_search(work, units, scores, need, cfg.min_keep, objective["cost"])
                achieved = measure(masks)
                searches.append(dict(estimated_savings=float(f"{need:.6g}"), achieved=float(f"{achieved:.6g}")))
                if achieved <= target:
                    break
                need += achieved - target
            t2 = time.perf_counter()
            rearranged = []
            if blocks:
                # the same count per group, hence the same cost: `achieved` still holds
                masks, rearranged = rearrange_masks(masks, blocks)
                del blocks
            t3 = time.perf_counter()
            tuning = []
            if opts.tune:
                bar.update(task, description="post-training: mask tuning")
                apply_masks(work, MaskSet(masks, fingerprint(work)))
                was_training = model.training
                try:
                    tuning = tune_masks(model.eval(), work, masks, units, batches, advance)
                finally:
                    model.train(was_training)
                for u in units:
                    work.get_submodule(u.module_path).set_mask(u.kind, None)
        seconds = dict(fisher=round(t1 - t0, 2), search=round(t2 - t1, 2), rearrange=round(t3 - t2, 2),
                       tuning=round(time.perf_counter() - t3, 2))
        if opts.target == "target_flops":
            flops, dense_flops = achieved, dense
        else:
            flops, dense_flops = real_flops(model, masks), real_flops(model)
        extra = dict(
            seconds=seconds, target=opts.target, **{opts.target: getattr(opts, opts.target)},
            dense_flops=dense_flops, loaded_flops=loaded, flops=flops, flops_fraction=round(flops / dense_flops, 6),
            target_met=achieved <= target, searches=searches,
            examples=sum(int(b["input_ids"].shape[0]) for b in batches),
            fisher={u.key: [float(f"{x:.6g}") for x in scores[u.key].flatten()] for u in units
                    if u.kind != "neurons" and u.size <= 64},
            tuning=[dict(t, error_before=float(f"{t['error_before']:.6g}"),
                         error_after=float(f"{t['error_after']:.6g}")) for t in tuning],
            rearrangement=_rearrangement_summary(rearranged) if opts.rearrange else None,
        )
        if opts.target == "target_params":
            extra.update(dense_params=dense, params=achieved, params_fraction=round(achieved / dense, 6))
        lm = objective["latency"]
        if lm is not None:
            extra.update(on=opts.on, shape=opts.shape, latency_model=lm.key, predicted_dense_ms=round(dense, 6),
                         predicted_ms=round(achieved, 6), predicted_speedup=round(dense / achieved, 4))
        return MaskSet(masks, fingerprint(model), self.name, extra=extra, model=work.eval() if opts.tune else None)
