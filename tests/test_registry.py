"""Registries of pruning methods and criteria (a registered name without a test fails here), and the embedded
default model (all-MiniLM-L6-v2 + eight adapters in an AdapterFusion)."""

from __future__ import annotations

import copy

import pytest
import torch

import compressor
from compressor.errors import PruningConfigError
from compressor.pruning import CRITERIA, METHODS, prune, register_criterion, register_method
from compressor.pruning.criteria import Criterion
from compressor.pruning.methods import OneShotMethod, PruneConfig
from compressor.pruning.registry import Registry
from compressor.training.heads import ensure_head
from compressor.units import KINDS, iter_units
from factories import make_model_dir
from task_factories import signal_context, single_thread, tiny_tokenizer

# Names with tests in this suite (test_masks.py: sparsity targets, determinism, which units magnitude removes;
# test_methods.py: each method's paper behaviour, targets, determinism, comparisons on a learnable task;
# test_importance.py: importance's targets per scope, planted heads, determinism, errors, the CLI;
# test_criteria.py: the criteria's formulas, reproducibility, errors; test_cli.py: the prune command; the contract
# tests below). Add a name here only with its tests.
TESTED_METHODS = {"random", "magnitude", "lottery-fusion", "sparse-adapter", "adapt-by-pruning", "tamt", "omp", "imp",
                  "head-importance", "importance", "post-training"}
TESTED_CRITERIA = {"random", "magnitude", "snip", "taylor", "grasp", "head-gate", "synflow", "fusion-influence"}
# unit kinds a criterion scores, where not every kind
CRITERION_KINDS = {"head-gate": ("heads", "neurons", "adapters", "bottleneck"), "fusion-influence": ("adapters",)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return compressor.load_model(make_model_dir(tmp_path_factory.mktemp("bert"), "bert", "seq_bn", 3, "dynamic"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny task for the methods and criteria that need data: two optimiser steps per training stage."""
    return signal_context(tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")), max_steps=2)


@pytest.fixture(scope="module")
def headed(model, data):
    """The model with a head for the task (data criteria read the task loss)."""
    return ensure_head(copy.deepcopy(model), data.spec)


# ----------------------------------------------------------------------------------------------- every name has a test

def test_every_registered_method_has_a_test():
    untested = sorted(set(METHODS) - TESTED_METHODS)
    assert not untested, f"pruning method(s) {untested} are registered without tests: add tests, then the names"


def test_every_registered_criterion_has_a_test():
    untested = sorted(set(CRITERIA) - TESTED_CRITERIA)
    assert not untested, f"criterion/criteria {untested} are registered without tests: add tests, then the names"


def test_tested_names_are_registered():
    assert TESTED_METHODS <= set(METHODS)
    assert TESTED_CRITERIA <= set(CRITERIA)


def test_a_new_method_without_a_test_is_caught():
    @register_method("zz-untested")
    class Untested(OneShotMethod):
        criterion = "random"

    try:
        assert Untested.name == "zz-untested" and METHODS["zz-untested"] is Untested
        assert not set(METHODS) <= TESTED_METHODS
    finally:
        del METHODS["zz-untested"]
    assert set(METHODS) <= TESTED_METHODS


# ----------------------------------------------------------------------------------------------- duplicates

def test_duplicate_method_is_rejected():
    before = dict(METHODS)

    class Again(OneShotMethod):
        criterion = "random"

    with pytest.raises(ValueError, match="'magnitude' is registered twice"):
        register_method("magnitude")(Again)
    assert dict(METHODS) == before and Again.__dict__.get("name") is None


def test_duplicate_criterion_is_rejected():
    before = dict(CRITERIA)

    class Again(Criterion):
        def scores(self, model, units, data=None):
            return {}

    with pytest.raises(ValueError, match="'random' is registered twice"):
        register_criterion("random")(Again)
    assert dict(CRITERIA) == before


def test_registry():
    reg = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(type("B", (), {}))
    assert reg["a"].__name__ == "A" and reg.get_or_fail("a") is reg["a"]
    reg.register("b")(type("B", (), {}))
    with pytest.raises(PruningConfigError, match="unknown widget 'c'; choose one of: a, b"):
        reg.get_or_fail("c")


# ----------------------------------------------------------------------------------------------- contracts

# methods whose amount comes from a target (--option target_flops), not from per-kind shares: their own tests
# (tests/test_post_training.py) check the target and the kinds; the share-based contract below does not apply
TARGET_DRIVEN = {"post-training"}
METHOD_KINDS = [(name, kind) for name in sorted(set(METHODS) - TARGET_DRIVEN) for kind in METHODS[name].kinds]
CHEAP_OPTIONS = {"lottery-fusion": dict(rounds=1), "imp": dict(rate=0.3), "head-importance": dict(examples=16),
                 "importance": dict(examples=16)}
# methods that score by the task loss of the model given and refuse one without a head for the task
NEEDS_HEAD = {"importance"}


def given_model(name, model, headed):
    return headed if name in NEEDS_HEAD else model


@pytest.mark.parametrize("name, kind", METHOD_KINDS)
def test_method_contract(model, headed, data, name, kind):
    """Every method, for each kind it prunes: a valid MaskSet for the model it returns (or the one given), masks of
    that kind only, the target (per unit group for group-scope methods, over all the masked units for global
    ones), reproducible, and the model given left unchanged."""
    cls = METHODS[name]
    model = given_model(name, model, headed)
    assert cls.name == name and cls.scope in ("group", "global")
    assert cls.criterion in CRITERIA or cls.criterion == "learned" or isinstance(cls.criterion, property)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = data if cls.needs_data else None
    options = CHEAP_OPTIONS.get(name)
    with single_thread():
        a = prune(model, name, {kind: 0.5}, seed=4, data=ctx, options=options)
        b = prune(model, name, {kind: 0.5}, seed=4, data=ctx, options=options)
    out = a.model if a.model is not None else model
    units = a.check(out)
    assert a.method == name and a.masks
    assert {a.kind_of(k) for k in a.masks} == {kind}
    if cls.criterion != "learned":  # the criterion the instance uses (sparse-adapter's comes from its options)
        assert cls(PruneConfig({kind: 0.5}), None).criterion in CRITERIA
    min_keep = 0 if kind == "weights" else 1
    for key, mask in a.masks.items():
        assert mask.dtype == torch.bool and tuple(mask.shape) == units[key].shape, key
        assert torch.equal(mask, b.masks[key]), key
        if cls.scope == "group":
            assert int((~mask).sum()) == min(units[key].size // 2, units[key].size - min_keep), key
    if cls.scope == "global":
        total = sum(m.numel() for m in a.masks.values())
        assert sum(int((~m).sum()) for m in a.masks.values()) == total // 2
    if name in ("random", "magnitude"):
        assert set(a.masks) == {k for k, u in units.items() if u.kind == kind}
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items()
                                        if len(c.kinds) > 1 and n != "sparse-adapter" and n not in TARGET_DRIVEN))
def test_method_prunes_several_kinds_at_once(model, headed, data, name):
    cls = METHODS[name]
    model = given_model(name, model, headed)
    with single_thread():
        ms = prune(model, name, {k: 0.5 for k in cls.kinds}, seed=4, data=data if cls.needs_data else None)
    assert {ms.kind_of(k) for k in ms.masks} == set(cls.kinds)
    ms.check(ms.model if ms.model is not None else model)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_criterion_contract(model, headed, data, name):
    """Every criterion: one finite score per member of every unit asked for (the kinds it scores), reproducible
    for a seed; data criteria score the model with a head on the task's batches."""
    cls = CRITERIA[name]
    assert cls.name == name
    scored = headed if cls.needs_data else model
    ctx = data if cls.needs_data else None
    kinds = CRITERION_KINDS.get(name, KINDS)
    units = [u for u in iter_units(scored) if u.kind in kinds]
    assert {u.kind for u in units} == set(kinds)
    with single_thread():
        scores = cls(seed=1).scores(scored, units, ctx)
        again = cls(seed=1).scores(scored, units, ctx)
    assert set(scores) == {u.key for u in units}
    for u in units:
        assert tuple(scores[u.key].shape) == u.shape, u.key
        assert torch.isfinite(scores[u.key]).all(), u.key
        assert torch.equal(scores[u.key], again[u.key]), u.key
    # a subset of units gets the same scores (a unit's score does not depend on which others were asked), except
    # for random (one generator in key order) and GraSP (H g couples every scored parameter, as in the paper)
    subset = [u for u in units if u.kind == "adapters"]
    if name not in ("random", "grasp"):
        with single_thread():
            part = cls(seed=1).scores(scored, subset, ctx)
        assert all(torch.equal(part[u.key], scores[u.key]) for u in subset)


def test_random_criterion_depends_on_seed(model):
    units = list(iter_units(model))
    a, b = CRITERIA["random"](seed=0).scores(model, units), CRITERIA["random"](seed=1).scores(model, units)
    assert any(not torch.equal(a[k], b[k]) for k in a)
