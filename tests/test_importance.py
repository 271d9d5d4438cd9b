"""`importance` (compressor/pruning/importance.py): one-shot structured pruning by a gate-based data criterion
(taylor, head-gate or snip) over `examples` training examples, per unit group (scope=group) or with one ranking per
kind (scope=global), without retraining. Exact targets, the ranking each scope promises, the planted heads kept on
the learnable setting (task_factories.planted_signal_model) where random masks lose them, reproducibility, the
errors, and `compress prune --method importance` end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import compressor
from compressor.errors import PruningConfigError
from compressor.io import OUTPUT_MARKER
from compressor.masks import META_FILE, TENSORS_FILE, MaskSet, masked_copy
from compressor.pruning import CRITERIA, METHODS, prune
from compressor.pruning.importance import GATE_CRITERIA
from compressor.training.heads import ensure_head
from compressor.units import fingerprint, iter_units
from factories import make_model_dir
from task_factories import planted_signal_model, signal_context, signal_task, single_thread, tiny_tokenizer

SEED = 0
SPARSITY = {"heads": 0.5, "neurons": 0.25, "bottleneck": 0.5, "adapters": 0.34}


def n_pruned(fraction: float, n: int) -> int:
    return math.floor(round(fraction * n, 6))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def ctx(tokenizer):
    return signal_context(tokenizer, max_steps=2)


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """Tiny bert (2 layers x 4 heads, 37 FFN neurons), three 2-wide seq_bn adapters per layer in a dynamic fusion."""
    return compressor.load_model(make_model_dir(tmp_path_factory.mktemp("bert"), "bert", "seq_bn", 3, "dynamic"))


@pytest.fixture(scope="module")
def model(headless, ctx):
    """The same with a (random) head for the signal task: importance needs the task loss."""
    return ensure_head(copy.deepcopy(headless), ctx.spec, seed=SEED)


@pytest.fixture(scope="module")
def runs(model, ctx):
    cache = {}

    def run(scope="group", criterion="taylor", seed=SEED, again=False):
        key = (scope, criterion, seed, again)
        if key not in cache:
            cache[key] = prune(model, "importance", SPARSITY, seed=seed, data=ctx,
                               options=dict(scope=scope, criterion=criterion, examples=32))
        return cache[key]

    return run


# ----------------------------------------------------------------------------------------------- targets and ranking

@pytest.mark.parametrize("criterion", GATE_CRITERIA)
def test_group_scope_prunes_exactly_the_lowest_share_of_every_group(runs, model, criterion):
    ms = runs("group", criterion)
    units = ms.check(model)
    assert ms.method == "importance" and ms.fingerprint == fingerprint(model)
    assert ms.extra["criterion"] == criterion and ms.params["options"]["criterion"] == criterion
    for kind, fraction in SPARSITY.items():
        keys = {k for k, u in units.items() if u.kind == kind}
        assert keys and {k for k in ms.masks if ms.kind_of(k) == kind} == keys, kind
        for k in keys:
            mask = ms.masks[k]
            assert mask.dtype == torch.bool and tuple(mask.shape) == units[k].shape, k
            assert int((~mask).sum()) == n_pruned(fraction, mask.numel()), k
            if k in ms.extra["scores"]:  # the pruned members are the group's lowest-scoring ones
                scores = torch.tensor(ms.extra["scores"][k])
                assert float(scores[~mask].max()) <= float(scores[mask].min()), k
    assert ms.counts()["heads"] == {"kept": 4, "total": 8}  # 2 of 4 heads go in each of the 2 layers
    assert ms.counts()["neurons"] == {"kept": 2 * (37 - 9), "total": 74}  # floor(0.25 * 37) = 9 per layer
    assert set(ms.extra["scores"]) == {k for k, u in units.items() if u.kind in ("heads", "neurons", "bottleneck")}


@pytest.mark.parametrize("criterion", GATE_CRITERIA)
def test_global_scope_prunes_exactly_the_share_of_each_kind_in_one_ranking(runs, model, criterion):
    ms = runs("global", criterion)
    units = ms.check(model)
    for kind, fraction in SPARSITY.items():
        keys = sorted(k for k, u in units.items() if u.kind == kind)
        assert {k for k in ms.masks if ms.kind_of(k) == kind} == set(keys), kind
        total = sum(ms.masks[k].numel() for k in keys)
        assert sum(int((~ms.masks[k]).sum()) for k in keys) == n_pruned(fraction, total), kind
        assert all(int(ms.masks[k].sum()) >= 1 for k in keys), kind  # min_keep
        if not all(k in ms.extra["scores"] for k in keys):
            continue
        # one ranking over the kind's groups: a kept member scores below a pruned one only where its group was
        # down to min_keep (the ranking skipped it)
        pruned_max = max(float(torch.tensor(ms.extra["scores"][k])[~ms.masks[k]].max())
                         for k in keys if (~ms.masks[k]).any())
        for k in keys:
            kept = torch.tensor(ms.extra["scores"][k])[ms.masks[k]]
            if bool((kept < pruned_max).any()):
                assert int(ms.masks[k].sum()) == 1, k


def test_global_scope_is_not_the_group_share(runs):
    """Taylor scores of the tiny model's FFN neurons differ between its layers: the global ranking does not take
    floor(0.25 * 37) from each layer as group scope does."""
    group, glob = runs("group"), runs("global")
    neurons = sorted(k for k in glob.masks if glob.kind_of(k) == "neurons")
    assert [int((~group.masks[k]).sum()) for k in neurons] == [9, 9]
    assert [int((~glob.masks[k]).sum()) for k in neurons] != [9, 9]
    assert sum(int((~glob.masks[k]).sum()) for k in neurons) == 18


def test_examples_sets_the_scoring_batches(model, ctx):
    """--examples 20 at batch size 16: two batches, the criterion's own scores on them."""
    units = [u for u in iter_units(model) if u.kind in ("heads", "neurons")]
    ms = prune(model, "importance", {"heads": 0.5, "neurons": 0.25}, seed=SEED, data=ctx, options=dict(examples=20))
    two = CRITERIA["taylor"](seed=SEED, n_batches=2).scores(model, units, ctx)
    one = CRITERIA["taylor"](seed=SEED, n_batches=1).scores(model, units, ctx)
    for u in units:
        assert ms.extra["scores"][u.key] == [round(float(x), 6) for x in two[u.key]], u.key
    assert any(ms.extra["scores"][u.key] != [round(float(x), 6) for x in one[u.key]] for u in units)


def test_global_scope_skips_a_kind_the_model_lacks(tmp_path, ctx):
    """adapters on a model without a fusion: no adapter masks, as with group scope (not a crash in the ranking)."""
    plain = ensure_head(compressor.load_model(make_model_dir(tmp_path / "plain", "bert", "seq_bn", 1, None)),
                        ctx.spec, seed=SEED)
    for scope in ("group", "global"):
        ms = prune(plain, "importance", {"adapters": 0.5, "heads": 0.5}, seed=SEED, data=ctx,
                   options=dict(scope=scope, examples=16))
        assert ms.counts() == {"heads": {"kept": 4, "total": 8}}, scope


# ----------------------------------------------------------------------------------------------- learnable setting

@pytest.fixture(scope="module")
def planted():
    return planted_signal_model(SEED)


def accuracy(ctx, model, masks: dict) -> float:
    return ctx.main_metric(ctx.evaluate(masked_copy(model, MaskSet(masks, fingerprint(model)))))


@pytest.fixture(scope="module")
def planted_ctx(planted):
    return signal_context(planted.tokenizer, max_steps=2)


@pytest.fixture(scope="module")
def random_heads_accuracy(planted, planted_ctx):
    """Dev accuracy of six random head masks keeping one head per layer (heads=0.75, 2 of 8 kept)."""
    accs = [accuracy(planted_ctx, planted.model, prune(planted.model, "random", {"heads": 0.75}, seed=s).masks)
            for s in range(6)]
    assert min(accs) < 0.7  # some random masks lose the signal
    return sum(accs) / len(accs)


@pytest.mark.parametrize("scope", ["group", "global"])
def test_taylor_keeps_the_planted_heads_and_beats_random(planted, planted_ctx, random_heads_accuracy, scope):
    ms = prune(planted.model, "importance", {"heads": 0.75}, seed=SEED, data=planted_ctx,
               options=dict(criterion="taylor", examples=64, scope=scope))
    assert ms.model is None and ms.check(planted.model)
    for key, heads in planted.keep.items():  # one head left per layer: the planted one
        assert ms.masks[key].nonzero().flatten().tolist() == list(heads), key
    acc = accuracy(planted_ctx, planted.model, ms.masks)
    assert acc == 1.0 and acc >= random_heads_accuracy + 0.15
    assert ms.extra["dev_metrics"]["accuracy"] == acc  # prune reports the masked model's dev metrics


# ----------------------------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_masks_and_leaves_the_model_unchanged(model, ctx):
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    try:
        a = prune(model, "importance", SPARSITY, seed=3, data=ctx, options=dict(examples=32))
        b = prune(model, "importance", SPARSITY, seed=3, data=ctx, options=dict(examples=32))
        assert model.training  # the scoring's eval mode is undone
    finally:
        model.eval()
    assert set(a.masks) == set(b.masks) and a.masks
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.extra["scores"] == b.extra["scores"]
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(b.startswith("mask_") for m in model.modules() for b in m._buffers)
    assert all(v is None for m in model.modules() for k, v in vars(m).items() if k.startswith("gate_"))


# ----------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("options, match", [
    (dict(criterion="magnitude"), r"--criterion must be one of taylor, head-gate, snip, got 'magnitude'"),
    (dict(criterion="grasp"), r"--criterion must be one of taylor, head-gate, snip, got 'grasp'"),
    (dict(examples=0), r"--examples must be >= 1, got 0"),
    (dict(scope="layer"), r"scope must be group or global, got 'layer'"),
    (dict(rounds=2), r"method 'importance' has no option 'rounds' \(its options: criterion, examples, scope\)"),
], ids=["magnitude", "grasp", "examples-0", "scope-layer", "unknown-option"])
def test_bad_options(model, ctx, options, match):
    with pytest.raises(PruningConfigError, match=match):
        prune(model, "importance", {"heads": 0.5}, data=ctx, options=options)


def test_weights_are_refused(model, ctx):
    with pytest.raises(PruningConfigError, match="method 'importance' prunes heads, neurons, bottleneck, adapters, "
                                                 "not weights"):
        prune(model, "importance", {"heads": 0.5, "weights": 0.5}, data=ctx)


def test_needs_data(model):
    with pytest.raises(PruningConfigError, match="method 'importance' needs data"):
        prune(model, "importance", {"heads": 0.5})


@pytest.fixture(scope="module")
def three_label(tmp_path_factory):
    return compressor.load_model(make_model_dir(tmp_path_factory.mktemp("flex"), "bert", "seq_bn", 2, "dynamic",
                                                head="flex"))


@pytest.mark.parametrize("which", ["headless", "three_label"])
def test_a_model_without_a_head_for_the_task_is_refused(request, ctx, which):
    """No head, or a head with 3 outputs for the 2-label task: the task loss cannot score the units."""
    given = request.getfixturevalue(which)
    before = state(given)
    with pytest.raises(PruningConfigError, match="needs a trained head for signal"):
        prune(given, "importance", {"heads": 0.5}, data=ctx)
    after = given.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_is_registered_as_a_data_method():
    cls = METHODS["importance"]
    assert cls.needs_data and cls.kinds == ("heads", "neurons", "bottleneck", "adapters")
    assert set(GATE_CRITERIA) <= set(CRITERIA) and cls.criterion in GATE_CRITERIA


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_prune_importance(tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app

    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    model_dir = make_model_dir(tmp_path / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic")
    tiny_tokenizer(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    task = signal_task(n_train=64, n_dev=16, seed=0)
    data_file = tmp_path / "signal.tsv"
    data_file.write_text("\n".join(["sentence\tlabel"] + [f"{e.texts[0]}\t{task.spec.label_list[e.label]}"
                                                          for e in task.train + task.dev]) + "\n")
    data = ("--data", data_file, "--text-columns", "sentence", "--label-column", "label")
    headed = tmp_path / "headed"  # importance needs a head for the task: train one first
    invoke("train", model_dir, *data, "--train", "head", "--max-steps", 2, "--batch-size", 8, "--out", headed)

    out = tmp_path / "masks"
    result = invoke("prune", headed, "--method", "importance", *data, "--sparsity", "heads=0.5",
                    "--option", "criterion=taylor", "--option", "examples=16", "--batch-size", 8, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, TENSORS_FILE, META_FILE])  # no model
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "importance" and meta["criterion"] == "taylor"
    assert meta["params"]["options"] == dict(criterion="taylor", examples=16, scope="group")
    assert meta["counts"] == {"heads": {"kept": 4, "total": 8}}
    assert meta["data"]["train_examples"] > 0 and "trained_model" not in meta
    assert set(meta["dev_metrics"]) >= {"accuracy"}
    masks = MaskSet.load(out)
    masks.check(compressor.load_model(headed))  # the masks are for the model given
    assert all(int((~m).sum()) == 2 for m in masks.masks.values())
    assert "dev metrics on signal" in result.stdout and "accuracy, pruned" in result.stdout
