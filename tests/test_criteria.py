"""Importance criteria of issue 4: SNIP, Taylor, GraSP, head-gate gradients, fusion influence (data) and SynFlow
(data-free). Their formulas on a toy problem with a known Hessian, their reproducibility and errors on the tiny
models, and on the learnable setting (task_factories.planted_signal_model) that they find what matters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import PruningConfigError
from compressor.modeling.modules import Fusion
from compressor.pruning import CRITERIA
from compressor.pruning.data_criteria import GATED, influence
from compressor.pruning.methods import global_prune
from compressor.units import Unit, iter_units
from factories import make_model_dir, random_inputs
from task_factories import signal_context

DATA_CRITERIA = ("snip", "taylor", "grasp", "head-gate", "fusion-influence")
# the unit kinds each criterion scores (the others refuse them)
KINDS_OF = {"head-gate": GATED, "fusion-influence": ("adapters",)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: also `planted`


@pytest.fixture(scope="module")
def model(planted):
    return planted.model


@pytest.fixture(scope="module")
def ctx(planted):
    return signal_context(planted.tokenizer)


def units_for(model, name) -> list:
    kinds = KINDS_OF.get(name)
    return [u for u in iter_units(model) if kinds is None or u.kind in kinds]


def encoder_weights(model) -> dict:
    return {u.key: u for u in iter_units(model) if u.kind == "weights" and ".adapters." not in u.key
            and ".adapter_fusion_layer." not in u.key}


@pytest.fixture(scope="module")
def scores(model, ctx):
    """Each data criterion's scores on the planted model, seed 0 (computed once)."""
    return {name: CRITERIA[name](seed=0).scores(model, units_for(model, name), ctx) for name in DATA_CRITERIA}


# ----------------------------------------------------------------------------------------------- formulas

class Toy(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)


class QuadraticTask:
    """loss_b(w) = 1/2 w A_b w^T + c_b . w on batch b: gradient A_b w + c_b, Hessian A_b."""

    def __init__(self, a, c):
        self.a, self.c = a, c

    def batches(self, n=None, batch_size=None, seed=None):
        yield from range(len(self.a))[:n]

    def loss(self, model, b):
        w = model.lin.weight.flatten()
        return 0.5 * w @ self.a[b] @ w + self.c[b] @ w


@pytest.fixture
def toy():
    gen = torch.Generator().manual_seed(3)
    a = [(lambda m: m @ m.T)(torch.randn(3, 3, generator=gen, dtype=torch.float64)) for _ in range(4)]
    c = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(4)]
    model = Toy(torch.randn(1, 3, generator=gen, dtype=torch.float64)).double()
    unit = Unit("lin.weight::weights", "weights", "lin.weight", (1, 3))
    return model, unit, QuadraticTask(a, c), model.lin.weight.detach().flatten().clone(), a, c


def test_snip_taylor_grasp_formulas(toy):
    model, unit, task, w, a, c = toy
    grads = [a[b] @ w + c[b] for b in range(4)]
    g = sum(grads)
    snip = CRITERIA["snip"](n_batches=4).scores(model, [unit], task)[unit.key].flatten()
    taylor = CRITERIA["taylor"](n_batches=4).scores(model, [unit], task)[unit.key].flatten()
    grasp = CRITERIA["grasp"]().scores(model, [unit], task)[unit.key].flatten()
    assert torch.allclose(snip.double(), (g * w).abs())  # SNIP: |g . w|, g over the scoring batches
    assert torch.allclose(taylor.double(), sum((gb * w).abs() for gb in grads))  # Taylor: per batch |g_b w|
    assert torch.allclose(grasp.double(), w * (sum(a) @ g))  # GraSP: -S = w (H g), H g by double backprop
    assert bool((taylor >= snip - 1e-6).all())
    # the criteria leave the model as they found it
    assert torch.equal(model.lin.weight.detach().flatten(), w) and model.lin.weight.grad is None
    assert model.lin.weight.requires_grad  # its requires_grad flag restored (it was trainable)


# ----------------------------------------------------------------------------------------------- every data criterion

@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_data_criteria_need_data(model, name):
    assert CRITERIA[name].needs_data
    with pytest.raises(PruningConfigError, match=f"criterion '{name}' needs data: pass --data"):
        CRITERIA[name](seed=0).scores(model, units_for(model, name))


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_data_criteria_are_reproducible_for_a_seed(model, ctx, scores, name):
    units = units_for(model, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = CRITERIA[name](seed=0).scores(model, units, ctx)
    assert set(again) == set(scores[name]) == {u.key for u in units}
    for u in units:
        assert tuple(again[u.key].shape) == u.shape and bool(torch.isfinite(again[u.key]).all()), u.key
        assert torch.equal(again[u.key], scores[name][u.key]), u.key
    # nothing left behind: no gates, no gradients, no hooks, the weights unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not any(k.startswith("gate_") and v is not None for m in model.modules() for k, v in vars(m).items())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_another_seed_scores_other_batches(model, ctx, scores, name):
    units = units_for(model, name)
    other = CRITERIA[name](seed=1).scores(model, units, ctx)
    assert any(not torch.equal(other[u.key], scores[name][u.key]) for u in units)


@pytest.mark.parametrize("name, kind, match", [("head-gate", "weights", "scores gated units"),
                                               ("fusion-influence", "heads", "scores fused adapters only")])
def test_criteria_refuse_units_they_cannot_score(model, ctx, name, kind, match):
    with pytest.raises(PruningConfigError, match=match):
        CRITERIA[name](seed=0).scores(model, [u for u in iter_units(model) if u.kind == kind], ctx)


# ----------------------------------------------------------------------------------------------- what they find

def test_snip_differs_from_magnitude_and_grasp_from_snip(model, scores):
    units = encoder_weights(model)
    magnitude = CRITERIA["magnitude"]().scores(model, units.values())
    masks = {name: global_prune({k: s[k] for k in units}, units, 0.5, 0)
             for name, s in (("magnitude", magnitude), ("snip", scores["snip"]), ("grasp", scores["grasp"]))}

    def differ(a, b):
        return sum(int((masks[a][k] != masks[b][k]).sum()) for k in units) / sum(u.size for u in units.values())

    assert differ("snip", "magnitude") > 0.05 and differ("grasp", "snip") > 0.05
    assert all(bool((scores["snip"][k] >= 0).all()) for k in units)
    assert any(bool((scores["grasp"][k] < 0).any()) for k in units)  # GraSP is signed: w (H g)


def test_taylor_is_at_least_snip(model, scores):
    """Same batches: sum_b |g_b w| >= |sum_b g_b w|, strictly where per-batch signs disagree."""
    units = units_for(model, "snip")
    assert all(bool((scores["taylor"][u.key] >= scores["snip"][u.key] * (1 - 1e-5) - 1e-12).all()) for u in units)
    assert any(bool((scores["taylor"][u.key] > scores["snip"][u.key] * 1.01).any()) for u in units)


def test_head_gate_normalises_tiny_gradients_too():
    """A nearly dead unit's gradients (~1e-24) still give a unit-norm score vector (no float32 underflow of the
    squares), and a unit no gradient reaches stays zero."""
    finish = CRITERIA["head-gate"]().finish
    unit = Unit("x::heads", "heads", "x", (2,))
    assert torch.allclose(finish(unit, torch.tensor([3e-24, 4e-24]), None), torch.tensor([0.6, 0.8]))
    assert torch.equal(finish(unit, torch.zeros(2), None), torch.zeros(2))


@pytest.mark.parametrize("name", ["snip", "taylor", "head-gate"])
def test_gradient_criteria_find_the_planted_heads(planted, scores, name):
    """The task signal flows through one planted head per layer: the gate-gradient criteria rank it first."""
    for key, heads in planted.keep.items():
        assert int(scores[name][key].argmax()) == heads[0], key


def test_head_gate_is_normalised_per_layer(model, ctx, scores):
    """|dL/dgate| accumulated, then L2-normalised per unit group (a layer's heads) so layers compare globally."""
    assert {k.rsplit("::", 1)[1] for k in scores["head-gate"]} == {"heads", "neurons", "adapters", "bottleneck"}
    head_gate = CRITERIA["head-gate"]
    # Taylor's accumulated |g_b * gate| (gate = 1) on the same batches, before the normalisation
    taylor = CRITERIA["taylor"](seed=0, n_batches=head_gate.n_batches).scores(model, units_for(model, "head-gate"), ctx)
    for key, s in scores["head-gate"].items():
        t = taylor[key].double()
        if not bool(t.any()):  # a unit no gradient reaches (a dead adapter) stays all zero
            assert not bool(s.any()), key
            continue
        assert float(s.double().norm()) == pytest.approx(1.0, abs=1e-5), key
        assert bool((s >= 0).all())
        assert torch.allclose(s.double(), t / t.norm(), atol=1e-5), key
    assert len({round(float(t.norm()), 6) for t in taylor.values()}) > 1  # the raw scale did differ per group


def test_synflow_needs_no_data(planted, ctx):
    """SynFlow is data-free: the same scores without data, with data, and for any seed; the model untouched."""
    model = planted.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = list(iter_units(model))
    crit = CRITERIA["synflow"]
    assert not crit.needs_data
    plain = crit(seed=0).scores(model, units)
    assert set(plain) == {u.key for u in units}
    for other in (crit(seed=0).scores(model, units, ctx), crit(seed=5).scores(model, units)):
        assert all(torch.equal(plain[k], other[k]) for k in plain)
    assert all(bool((s >= 0).all()) and bool(torch.isfinite(s).all()) for s in plain.values())
    assert sum(int((s > 0).sum()) for s in plain.values()) > 0.9 * sum(s.numel() for s in plain.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # abs() applied to a copy


# ----------------------------------------------------------------------------------------------- fusion influence

@pytest.mark.parametrize("fusion, overrides", [("dynamic", {}), ("static", {}), ("dynamic", dict(residual_before=True))])
@pytest.mark.parametrize("masked", [False, True])
def test_influence_shares_and_the_residual_share_sum_to_one(tmp_path, fusion, overrides, masked):
    """I_i = <s_i v_i, c> / ||c||^2 per token; with the residual's share <r', c> / ||c||^2 (r' the residual as it
    enters c: through the value projection when residual_before) they sum to 1. A masked adapter's share is 0."""
    model = compressor.load_model(make_model_dir(tmp_path, "bert", "seq_bn", 3, fusion, fusion_overrides=overrides))
    fusions = [m for m in model.modules() if isinstance(m, Fusion)]
    if masked:
        for f in fusions:
            f.set_mask("adapters", torch.tensor([True, False, True]))
    seen = []

    def hook(module, args, output):
        seen.append((module, args, output))

    handles = [f.register_forward_hook(hook) for f in fusions]
    with torch.no_grad():
        model(**random_inputs("bert", 3, 7))
    for h in handles:
        h.remove()
    assert len(seen) == len(fusions) == 2
    for fusion_module, (query, ups, residual), output in seen:
        with torch.no_grad():
            shares = influence(fusion_module, query, ups, output)  # [b, s, n]
            residual_part = fusion_module.finish(torch.zeros_like(residual), residual)
            residual_share = (residual_part * output).sum(-1) / output.pow(2).sum(-1)
        assert shares.shape == (3, 7, 3)
        assert torch.allclose(shares.sum(-1) + residual_share, torch.ones(3, 7), atol=1e-4)
        if masked:
            assert bool((shares[..., 1] == 0).all())
        assert float(shares.abs().max()) > 1e-3  # the adapters do take a share


def test_fusion_influence_scores_are_token_averages_of_the_shares(model, ctx, scores):
    """The criterion averages the per-token shares over the real tokens of its scoring batches."""
    units = units_for(model, "fusion-influence")
    assert len(units) == 2 and all(u.shape == (3,) for u in units)
    totals, tokens = {u.key: torch.zeros(3, dtype=torch.float64) for u in units}, 0.0
    fusions = {u.key: model.get_submodule(u.module_path) for u in units}
    for batch in ctx.batches(8, seed=0):
        seen = {}
        handles = [f.register_forward_hook((lambda k: lambda m, a, o: seen.__setitem__(k, (a, o)))(k))
                   for k, f in fusions.items()]
        with torch.no_grad():
            ctx.loss(model, batch)
        for h in handles:
            h.remove()
        mask = batch["attention_mask"].double().unsqueeze(-1)
        for k, ((query, ups, residual), output) in seen.items():
            with torch.no_grad():
                totals[k] += (influence(fusions[k], query, ups, output).double() * mask).sum(dim=(0, 1))
        tokens += float(batch["attention_mask"].sum())
    for k in totals:
        assert torch.allclose(scores["fusion-influence"][k].double(), totals[k] / tokens, atol=1e-6), k
    assert math.isfinite(sum(float(s.sum()) for s in scores["fusion-influence"].values()))
