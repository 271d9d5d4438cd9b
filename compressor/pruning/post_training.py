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
   target lowered by the excess (at most 6 times). Every unit group keeps `min_keep` members. Mask
   rearrangement (Kwon §4.2, block-diagonal Fisher) is not done.
3. **Mask tuning** (`tune`, Kwon §4.3), layer by layer in order, on the same examples: per block a scale per
   kept member minimises the squared error between the pruned model's block output (inputs from the model
   pruned and tuned so far) and the dense model's (inputs from the dense model), over real tokens:
   attention block `W_o (s * ctx) + b + x` against the dense `W_o ctx' + b + x'` (a scale per head), FFN block
   likewise with the output dense (a scale per neuron), a bottleneck adapter's up projection `U (s * a) + b`
   against the dense adapter's (a scale per bottleneck neuron). The normal equations are accumulated in
   float64 and solved with `torch.linalg.lstsq`, damped (1e-4 of the mean diagonal) and clamped to
   [-10, 10]; a block whose error would not fall keeps scales of one. The scales fold into the weights (a
   head's into its columns of the attention output dense, a neuron's into its column of the FFN output
   dense, a bottleneck neuron's into its column of `adapter_up`), so the result is a model + masks
   (`maskset.model`) and compaction stays exact (invariant 1). Fused adapters are not tuned.

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
from ..modeling.architecture import layers_of
from ..modeling.modules import Bottleneck, Fusion, Intermediate, SelfAttention
from ..training.heads import num_labels_of
from ..units import fingerprint, iter_units
from ..units import unit_key as unit_key_of
from .methods import PruningMethod, register_method

STRUCTURED = ("heads", "neurons", "bottleneck", "adapters")
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
    """The first `examples` training examples in the seeded order, in batches of the task's batch size."""
    bs = data.config.batch_size
    out, left = [], examples
    for batch in data.batches(max(1, -(-examples // bs)), seed=seed):
        n = min(left, int(batch["input_ids"].shape[0]))
        out.append(_slice(batch, n))
        left -= n
        if left <= 0:
            break
    return out


def fisher(model: nn.Module, units: list, data, batches: list, advance=None) -> dict:
    """Diagonal empirical Fisher per unit member: the sum over examples of the squared per-example gradient of
    the task loss w.r.t. the member's mask, at the all-ones mask."""
    device = next(model.parameters()).device
    totals = {u.key: torch.zeros(u.size, dtype=torch.float64) for u in units}
    with _PerExampleGates(model, units) as gates:
        for batch in batches:
            b = int(batch["input_ids"].shape[0])
            tensors = gates.new_batch(b, device)
            loss = data.loss(model, batch) * b  # the mean over the batch times b: the sum of per-example losses
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for u, g in zip(units, grads):
                if g is not None:
                    totals[u.key] += g.detach().double().pow(2).sum(0).cpu()
            if advance:
                advance()
    return {u.key: totals[u.key].view(u.shape) for u in units}


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
        self.site_of = {}  # site path -> (layer, site name, fusion key or None, [(name, bottleneck key, width)])
        for li, layer in enumerate(layers_of(model)):
            self.where[unit_key_of(paths[id(layer.attention.self)], "heads")] = (li, "heads")
            self.where[unit_key_of(paths[id(layer.intermediate)], "neurons")] = (li, "neurons")
            for sname, site in zip(SITES, (layer.attention.output, layer.output)):
                if site.active is None:
                    continue
                spath = paths[id(site)]
                names = list(site.active[2]) if site.active[0] == "fuse" else [site.active[1]]
                fkey = unit_key_of(f"{spath}.adapter_fusion_layer.{site.active[1]}", "adapters") \
                    if site.active[0] == "fuse" else None
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
        alive = [j for j in range(len(members)) if fkey is None or fkey not in keep or bool(keep[fkey][j])]
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
    """Least squares for one block's scales. With X the members' activations [tokens, m * d] (d = 1 for a
    neuron, the head size for a head), W the weight that reads them [out, m * d] and r the target minus what does
    not scale, E(s) = sum_t ||W (s * x_t) - r_t||^2 = s'Gs - 2c's + rr with G the per-member block sums of
    (X'X) * (W'W) and c those of (r W) * X. X'X and (r W) * X are accumulated per batch (float32, summed in
    float64); W'W is taken once."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n
        self.gram = self.cw = self.weight = None
        self.rr = 0.0

    def add(self, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> None:
        x, r = x.float(), r.float()
        gram, cw = (x.T @ x).double(), ((r @ weight.float()) * x).sum(0).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.cw = cw if self.cw is None else self.cw + cw
        self.rr += float(r.double().pow(2).sum())
        self.weight = weight

    def solve_terms(self) -> tuple:
        W = self.weight.double()
        m = (self.gram * (W.T @ W))
        d = m.shape[0] // self.n
        G = m.view(self.n, d, self.n, d).sum((1, 3))
        return G, self.cw.view(self.n, d).sum(1)

    def error(self, s: torch.Tensor) -> float:
        G, c = self.terms
        return float(s @ G @ s - 2 * c @ s + self.rr)


def _capture(model, layer_index, specs, store, adapters: str):
    """Hooks on layer `layer_index` of `model` writing the inputs of the blocks named by `specs` into `store`
    (for the adapters' up projections: their input, or with adapters="out" their output), and a hook that stops
    the forward pass after that layer."""
    layer = layers_of(model)[layer_index]
    handles = []
    for name, module, what in specs(layer):
        if (what or adapters) == "in":
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: store.__setitem__(name, tuple(a.detach() for a in args[:2]))))
        else:
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: store.__setitem__(name, out.detach())))

    def stop(mod, args, out):
        raise _Stop

    handles.append(layer.register_forward_hook(stop))
    return handles


def _layer_specs(model):
    """(name, module, what) of each tunable block of a layer: the attention and FFN output sites' inputs, and per
    active non-bottleneck-space adapter its up projection's input (working model) / output (dense model)."""
    def specs(layer):
        out = [("heads", layer.attention.output, "in"), ("neurons", layer.output, "in")]
        for sname, site in (("mh", layer.attention.output), ("out", layer.output)):
            if site.active is None:
                continue
            if site.active[0] == "fuse" and getattr(site.adapter_fusion_layer[site.active[1]], "bottleneck_space",
                                                    False):
                continue
            names = list(site.active[2]) if site.active[0] == "fuse" else [site.active[1]]
            for n in names:
                adapter = site.adapters[n]
                if adapter.width > 0:
                    out.append((f"{sname}:{n}", adapter.adapter_up, None))
        return out
    return specs


def _run_to(model, batch):
    """Forward `batch` until the stop hook fires."""
    device = next(model.parameters()).device
    try:
        model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    except _Stop:
        pass


@torch.no_grad()
def tune_masks(dense: nn.Module, work: nn.Module, masks: dict, units: list, batches: list, advance=None) -> list:
    """Kwon §4.3 on `work` (masked; weights changed in place), layer by layer. Returns per tuned block its key,
    the reconstruction error with scales of one and with the tuned scales (sums over real tokens)."""
    unit_of = {(u.kind, u.module_path): u for u in units}
    layers_w, layers_d = layers_of(work), layers_of(dense)
    prefix = {id(m): p for p, m in work.named_modules()}
    report = []
    specs = _layer_specs(work)
    for li in range(len(layers_w)):
        lw, ld = layers_w[li], layers_d[li]
        blocks = {}
        plan = []  # (name, unit, kind-specific data)
        att = unit_of.get(("heads", prefix[id(lw.attention.self)]))
        if att is not None:
            plan.append(("heads", att))
        ffn = unit_of.get(("neurons", prefix[id(lw.intermediate)]))
        if ffn is not None:
            plan.append(("neurons", ffn))
        adapters = []
        for name, module, _ in specs(lw):
            if ":" in name:
                site_name, aname = name.split(":")
                site = lw.attention.output if site_name == "mh" else lw.output
                path = f"{prefix[id(site)]}.adapters.{aname}"
                u = unit_of.get(("bottleneck", path))
                if u is not None:
                    adapters.append((name, u))
        plan += adapters
        if not plan:
            continue
        for name, u in plan:
            blocks[name] = _Block(u.key, u.size)
        wstore, dstore = {}, {}
        handles = _capture(work, li, specs, wstore, "in") + _capture(dense, li, _layer_specs(dense), dstore, "out")
        try:
            for batch in batches:
                wstore.clear()
                dstore.clear()
                _run_to(dense, batch)
                _run_to(work, batch)
                tok = batch["attention_mask"].reshape(-1).bool()
                for name, u in plan:
                    blk = blocks[name]
                    if name in ("heads", "neurons"):
                        site_w = lw.attention.output if name == "heads" else lw.output
                        site_d = ld.attention.output if name == "heads" else ld.output
                        x_in, res = (t.reshape(-1, t.shape[-1])[tok] for t in wstore[name])
                        xd_in, resd = (t.reshape(-1, t.shape[-1])[tok] for t in dstore[name])
                        # the target minus what does not scale: dense block output - bias - residual
                        r = nn.functional.linear(xd_in, site_d.dense.weight, site_d.dense.bias) + resd - res
                        if site_w.dense.bias is not None:
                            r = r - site_w.dense.bias
                        blk.add(x_in, r, site_w.dense.weight)
                    else:
                        a = wstore[name][0]  # the working adapter_up's input (masked activations)
                        a = a.reshape(-1, a.shape[-1])[tok]
                        up = next(m for n, m, _ in specs(lw) if n == name)
                        out_d = dstore[name].reshape(-1, dstore[name].shape[-1])[tok]
                        blk.add(a, out_d - up.bias if up.bias is not None else out_d, up.weight)
                if advance:
                    advance()
        finally:
            for hnd in handles:
                hnd.remove()
        for name, u in plan:
            blk = blocks[name]
            if blk.gram is None:  # no token in the sample
                continue
            blk.terms = blk.solve_terms()
            kept = masks[u.key].flatten().nonzero().flatten()
            ones = torch.ones(u.size, dtype=torch.float64)
            before = blk.error(ones * masks[u.key].flatten().double())
            s = ones.clone()
            if len(kept):
                G = blk.terms[0][kept][:, kept]
                damp = 1e-4 * float(G.diagonal().mean()) + 1e-12
                sol = torch.linalg.lstsq(G + damp * torch.eye(len(kept), dtype=G.dtype),
                                         blk.terms[1][kept].unsqueeze(-1)).solution.squeeze(-1)
                s[kept] = sol.clamp(-10.0, 10.0)
            s = s * masks[u.key].flatten().double()
            after = blk.error(s)
            applied = after < before
            if applied:
                _fold(lw, name, s.float(), specs)
            report.append(dict(key=u.key, layer=li, error_before=before, error_after=after if applied else before,
                               applied=bool(applied)))
    return report


def _fold(layer, name: str, s: torch.Tensor, specs) -> None:
    """Fold per-member scales into the weights that read the members' outputs (pruned members' columns are
    read as zeros anyway)."""
    if name == "heads":
        W = layer.attention.output.dense.weight
        H = s.numel()
        W.copy_((W.view(W.shape[0], H, -1) * s.view(1, H, 1)).view_as(W))
    elif name == "neurons":
        W = layer.output.dense.weight
        W.mul_(s.view(1, -1))
    else:
        up = next(m for n, m, _ in specs(layer) if n == name)
        up.weight.mul_(s.view(1, -1))


# ----------------------------------------------------------------------------------------------- the method

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
            scores = fisher(work, units, data, batches, advance)
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
        seconds = dict(fisher=round(t1 - t0, 2), search=round(t2 - t1, 2), tuning=round(time.perf_counter() - t2, 2))
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
        )
        if opts.target == "target_params":
            extra.update(dense_params=dense, params=achieved, params_fraction=round(achieved / dense, 6))
        lm = objective["latency"]
        if lm is not None:
            extra.update(on=opts.on, shape=opts.shape, latency_model=lm.key, predicted_dense_ms=round(dense, 6),
                         predicted_ms=round(achieved, 6), predicted_speedup=round(dense / achieved, 4))
        return MaskSet(masks, fingerprint(model), self.name, extra=extra, model=work.eval() if opts.tune else None)
