"""Criteria that read gradients or activations on task data (SNIP, GraSP, Taylor, head-gate gradient, fusion
influence) and the data-free SynFlow.

Structured units are scored through gates: a vector of ones multiplying each member's output (a head's context,
a neuron's or bottleneck neuron's activation, a fused adapter's output), so dL/dgate is the first-order effect of
removing the member. Weights are scored from their own gradients.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import PruningConfigError
from ..units import Unit
from .criteria import Criterion, register_criterion

GATED = ("heads", "neurons", "bottleneck", "adapters")


@contextlib.contextmanager
def gates_and_grads(model: nn.Module, units):
    """Ones-gates (requiring grad) on structured units, grads enabled on unit weights; all undone on exit."""
    gates, flags = {}, {}
    for u in units:
        if u.kind in GATED:
            module = model.get_submodule(u.module_path)
            gates[u.key] = torch.ones(u.shape, requires_grad=True, device=next(model.parameters()).device)
            module.set_gate(u.kind, gates[u.key])
        else:
            p = model.get_parameter(u.module_path)
            flags[u.key] = p.requires_grad
            p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: scores must be reproducible
    try:
        yield gates
    finally:
        model.train(was_training)
        for u in units:
            if u.kind in GATED:
                model.get_submodule(u.module_path).set_gate(u.kind, None)
            else:
                p = model.get_parameter(u.module_path)
                p.grad = None
                p.requires_grad_(flags[u.key])


def _tensor_of(model, unit: Unit, gates: dict):
    return gates[unit.key] if unit.kind in GATED else model.get_parameter(unit.module_path)


def _need_data(name: str, data):
    if data is None:
        raise PruningConfigError(f"criterion '{name}' needs data: pass --data")


class GradientCriterion(Criterion):
    """Scores from per-batch gradients: `combine(value, grad)` accumulated over `n_batches` batches."""

    needs_data = True
    n_batches = 8

    def __init__(self, seed: int = 0, n_batches: int = None):
        super().__init__(seed)
        if n_batches is not None:
            self.n_batches = n_batches

    def per_batch(self, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, unit: Unit, total: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return total

    def scores(self, model, units, data=None):
        _need_data(self.name, data)
        units = list(units)
        totals = {}
        with gates_and_grads(model, units) as gates:
            tensors = {u.key: _tensor_of(model, u, gates) for u in units}
            for batch in data.batches(self.n_batches, seed=self.seed):
                grads = torch.autograd.grad(data.loss(model, batch), list(tensors.values()), allow_unused=True)
                for (key, t), g in zip(tensors.items(), grads):
                    g = torch.zeros_like(t) if g is None else g
                    s = self.per_batch(t.detach(), g.detach())
                    totals[key] = s if key not in totals else totals[key] + s
            return {u.key: self.finish(u, totals[u.key], tensors[u.key].detach()).cpu() for u in units}


@register_criterion("snip")
class SnipCriterion(GradientCriterion):
    """SNIP (Lee et al. 2019) connection sensitivity |g * w| with g the gradient over the scoring batches (for a
    gated unit w is its gate, 1)."""

    def per_batch(self, value, grad):
        return grad

    def finish(self, unit, total, value):
        return (total * value).abs()


@register_criterion("taylor")
class TaylorCriterion(GradientCriterion):
    """First-order Taylor importance (Molchanov et al. 2019): |w * g| per batch, accumulated, so that members
    whose removal changes the loss in any batch score high even when the signs cancel on average."""

    def per_batch(self, value, grad):
        return (grad * value).abs()


@register_criterion("head-gate")
class HeadGateCriterion(GradientCriterion):
    """Head importance of Michel et al. (2019), as used by task-oriented pruning-adapter: |dL/dgate| accumulated
    over examples, then normalised per layer (L2) so that layers compare when ranked globally."""

    n_batches = 4

    def scores(self, model, units, data=None):
        units = list(units)
        bad = sorted({u.kind for u in units} - set(GATED))
        if bad:
            raise PruningConfigError(f"criterion 'head-gate' scores gated units ({', '.join(GATED)}), not {bad[0]}")
        return super().scores(model, units, data)

    def per_batch(self, value, grad):
        return grad.abs()

    def finish(self, unit, total, value):
        norm = total.double().norm()  # in float64: a nearly dead unit's tiny gradients would underflow when squared
        return (total.double() / norm).to(total.dtype) if norm > 0 else total


@register_criterion("grasp")
class GraspCriterion(Criterion):
    """GraSP (Wang et al. 2020): S = -w * (H g); GraSP removes the highest S (those whose removal reduces the
    gradient flow least), so the importance returned is -S = w * (H g). H g by double backpropagation."""

    needs_data = True
    n_batches = 4

    def scores(self, model, units, data=None):
        _need_data(self.name, data)
        units = list(units)
        with gates_and_grads(model, units) as gates:
            tensors = [_tensor_of(model, u, gates) for u in units]
            batches = list(data.batches(self.n_batches, seed=self.seed))
            g = [torch.zeros_like(t) for t in tensors]
            for batch in batches:
                for acc, gi in zip(g, torch.autograd.grad(data.loss(model, batch), tensors, allow_unused=True)):
                    if gi is not None:
                        acc += gi
            hg = [torch.zeros_like(t) for t in tensors]
            for batch in batches:
                grads = torch.autograd.grad(data.loss(model, batch), tensors, create_graph=True, allow_unused=True)
                z = sum((gi * g0).sum() for gi, g0 in zip(grads, g) if gi is not None)
                for acc, h in zip(hg, torch.autograd.grad(z, tensors, allow_unused=True)):
                    if h is not None:
                        acc += h
            return {u.key: (t.detach() * h).cpu() for u, t, h in zip(units, tensors, hg)}


@register_criterion("synflow")
class SynFlowCriterion(Criterion):
    """SynFlow (Tanaka et al. 2020), data-free: with every parameter replaced by its absolute value (in float64)
    and an all-ones input, R = sum of the outputs; score |w * dR/dw| (for a gated unit, dR/dgate)."""

    @torch.no_grad()
    def _linearise(self, model):
        for p in model.parameters():
            p.abs_()

    def scores(self, model, units, data=None):
        units = list(units)
        work = copy.deepcopy(model).double()
        self._linearise(work)
        encoder = work.base_model
        hidden = encoder.config.hidden_size
        device = next(work.parameters()).device
        with gates_and_grads(work, units) as gates:
            tensors = [_tensor_of(work, u, gates) for u in units]
            embeds = torch.ones(1, 8, hidden, dtype=torch.float64, device=device)
            out = work(inputs_embeds=embeds, attention_mask=torch.ones(1, 8, dtype=torch.long, device=device))
            r = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).sum()
            grads = torch.autograd.grad(r, tensors, allow_unused=True)
            return {u.key: ((t.detach() * g).abs() if g is not None else torch.zeros_like(t)).float().cpu()
                    for u, t, g in zip(units, tensors, grads)}


@register_criterion("fusion-influence")
class FusionInfluenceCriterion(Criterion):
    """Influence of each fused adapter on its fusion's output (Wu et al. 2022): I_i = <s_i v_i, c> / ||c||^2 with
    s_i the fusion attention weight, v_i the value-projected adapter output and c the fused output (the residual
    takes the rest of the share), averaged over the real tokens of the scoring batches."""

    needs_data = True
    n_batches = 8

    @torch.no_grad()
    def scores(self, model, units, data=None):
        _need_data(self.name, data)
        units = list(units)
        bad = sorted({u.kind for u in units} - {"adapters"})
        if bad:
            raise PruningConfigError(f"criterion 'fusion-influence' scores fused adapters only, not {bad[0]}")
        compacted = [u.module_path for u in units if getattr(model.get_submodule(u.module_path), "bottleneck_space",
                                                                False)]
        if compacted:  # its inputs are bottleneck activations, not the adapters' outputs the influence is made of
            raise PruningConfigError(f"criterion 'fusion-influence' needs the fusion's adapter outputs, which the "
                                     f"compacted fusion at {compacted[0]} computes in bottleneck space: score the "
                                     "model before compaction")
        totals = {u.key: torch.zeros(u.shape, dtype=torch.float64) for u in units}
        count = {"tokens": 0.0}
        current = {}
        handles = []

        def hook_for(key):
            def hook(fusion, args, output):
                query, ups, residual = args
                share = influence(fusion, query, ups, output)  # [b, s, n]
                mask = current["mask"].to(share.dtype).unsqueeze(-1)
                totals[key] += (share * mask).sum(dim=(0, 1)).double().cpu()
            return hook

        was_training = model.training
        model.eval()
        try:
            for u in units:
                handles.append(model.get_submodule(u.module_path).register_forward_hook(hook_for(u.key)))
            for batch in data.batches(self.n_batches, seed=self.seed):
                current["mask"] = batch["attention_mask"].to(next(model.parameters()).device)
                count["tokens"] += float(batch["attention_mask"].sum())
                data.loss(model, batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return {k: (v / max(count["tokens"], 1.0)).float() for k, v in totals.items()}


def influence(fusion, query: torch.Tensor, ups: list, output: torch.Tensor) -> torch.Tensor:
    """Per token, each fused adapter's share <s_i v_i, c> / ||c||^2 of the fusion output c. [b, s, n]"""
    n = len(ups)
    mask = fusion.get_mask("adapters")
    if n == 1 and mask is None:
        probs = torch.ones(*ups[0].shape[:-1], 1, dtype=ups[0].dtype, device=ups[0].device)
    else:
        probs = fusion.attention(query, ups)
    value = (lambda x: fusion.value(x)) if hasattr(fusion, "value") else (lambda x: x)
    norm = output.pow(2).sum(-1).clamp_min(1e-12)
    return torch.stack([(probs[..., i:i + 1] * value(ups[i]) * output).sum(-1) / norm for i in range(n)], dim=-1)
