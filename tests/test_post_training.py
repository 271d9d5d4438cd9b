"""`post-training` (compressor/pruning/post_training.py, Kwon et al. 2022): Fisher mask search under a FLOPs
target and least-squares mask tuning folded into the weights, on the planted-signal tiny model
(task_factories.planted_signal_model: the task signal flows through one known head per layer; the factories
plant heads only, so only heads are checked against a plant)."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.compaction import compact
from compressor.errors import PruningConfigError
from compressor.masks import MaskSet, masked_copy
from compressor.modeling.architecture import layers_of
from compressor.pruning import METHODS, prune
from compressor.pruning.post_training import floor_masks, member_costs, real_flops
from compressor.units import fingerprint, iter_units
from factories import make_model_dir
from task_factories import (signal_context, signal_data_args, with_tokenizer,
                            write_signal_tsv)

SEED = 0
ALL = {"heads": 0, "neurons": 0, "bottleneck": 0, "adapters": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: also `planted`


@pytest.fixture(scope="module")
def ctx(planted):
    return signal_context(planted.tokenizer, max_steps=2)


@pytest.fixture(scope="module")
def tuned(planted, ctx):
    return prune(planted.model, "post-training", ALL, seed=SEED, data=ctx, options=dict(target_flops=0.3, examples=96))


def test_fisher_search_keeps_the_planted_heads_when_the_budget_drops_the_others(planted, ctx):
    """Heads only, a target between one and two heads per layer: 3 of 4 heads go in each layer (min_keep 1),
    and the one kept is the planted head."""
    model = planted.model
    heads = [u for u in iter_units(model) if u.kind == "heads"]
    dense = real_flops(model)
    one_each = real_flops(model, floor_masks(heads, 1))
    head_cost = next(iter(member_costs(model, heads).values()))
    target = (one_each + head_cost / 2) / dense
    ms = prune(model, "post-training", {"heads": 0}, seed=SEED, data=ctx,
               options=dict(target_flops=target, examples=64, tune=False))
    assert ms.model is None and ms.extra["target_met"] and ms.extra["flops"] <= target * dense
    for key, keep in planted.keep.items():
        assert ms.masks[key].nonzero().flatten().tolist() == list(keep), key
    assert set(ms.masks) == {u.key for u in heads}


def test_every_kind_gets_a_fisher_signal(planted, ctx):
    """Each unit member's gate reaches the loss: no kind scores all zeros (the bottleneck gates once hooked a
    module the forward pass never calls, and every adapter neuron scored 0)."""
    from compressor.pruning.post_training import fisher, sample_batches

    work = copy.deepcopy(planted.model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    units = [u for u in iter_units(work) if u.kind in ALL]
    scores = fisher(work, units, ctx, sample_batches(ctx, 32, SEED))
    for kind in ALL:
        assert sum(float(scores[u.key].sum()) for u in units if u.kind == kind) > 0, kind
    assert all(float(scores[u.key].sum()) > 0 for u in units if u.kind == "bottleneck")


def test_all_kinds_compete_and_the_target_is_met(planted, tuned):
    ms = tuned
    ms.check(planted.model)
    assert ms.method == "post-training" and set(ms.counts()) == set(ALL)
    assert ms.extra["target_met"] and ms.extra["flops"] <= 0.3 * ms.extra["dense_flops"]
    assert ms.extra["flops"] == real_flops(planted.model, ms.masks)  # measured on the compacted model
    for key, keep in planted.keep.items():  # the planted heads survive the joint search too
        assert bool(ms.masks[key][list(keep)].all()), key
    assert ms.extra["dev_metrics"]["accuracy"] == 1.0


def test_mask_tuning_lowers_every_tuned_blocks_reconstruction_error(tuned):
    tuning = tuned.extra["tuning"]
    assert len(tuning) == 10  # per layer: heads, neurons, three adapters' bottlenecks
    for t in tuning:
        assert t["error_after"] <= t["error_before"], t
        assert t["applied"] and t["error_after"] < t["error_before"], t


def _attention_error(model, masks, dense, batches):
    """Layer 0's attention block error ||W_o ctx + b + x - dense||^2 over real tokens (its input x is the
    embeddings in both models, so this is independent of later layers)."""
    def capture(m):
        store = {}
        site = layers_of(m)[0].attention.output
        h = site.register_forward_pre_hook(lambda mod, args: store.setdefault("in", []).append(
            site.dense(args[0]) + args[1]))
        return store, h

    masked = masked_copy(model, MaskSet(masks, fingerprint(model)))
    (s_m, h_m), (s_d, h_d) = capture(masked), capture(dense)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                masked(**inputs)
                dense(**inputs)
    finally:
        h_m.remove()
        h_d.remove()
    err = 0.0
    for a, b, batch in zip(s_m["in"], s_d["in"], batches):
        tok = batch["attention_mask"].bool()
        err += float(((a - b)[tok] ** 2).sum())
    return err


def test_tuned_weights_reconstruct_the_dense_attention_output_better(planted, ctx, tuned):
    from compressor.pruning.post_training import sample_batches

    batches = sample_batches(ctx, 96, SEED)
    untuned = _attention_error(planted.model, tuned.masks, planted.model, batches)
    after = _attention_error(tuned.model, tuned.masks, planted.model, batches)
    assert after < untuned
    first = next(t for t in tuned.extra["tuning"] if t["layer"] == 0 and t["key"].endswith("::heads"))
    assert after == pytest.approx(first["error_after"], rel=1e-3)
    assert untuned == pytest.approx(first["error_before"], rel=1e-3)


def test_the_compacted_tuned_model_equals_the_masked_tuned_model(tuned):
    model = tuned.model
    masked = masked_copy(model, tuned)
    small = compact(model, tuned)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 25, (4, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    attention[3, 3:] = 0
    with torch.no_grad():
        a = masked(input_ids=ids, attention_mask=attention).logits
        b = small(input_ids=ids, attention_mask=attention).logits
    assert float((a - b).abs().max()) <= 1e-5


def test_same_seed_same_masks_and_weights_and_the_input_model_is_unchanged(planted, ctx):
    before = {k: v.clone() for k, v in planted.model.state_dict().items()}
    a = prune(planted.model, "post-training", ALL, seed=3, data=ctx, options=dict(target_flops=0.4, examples=48))
    b = prune(planted.model, "post-training", ALL, seed=3, data=ctx, options=dict(target_flops=0.4, examples=48))
    assert set(a.masks) == set(b.masks) and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    after = planted.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(n.startswith("mask_") for m in planted.model.modules() for n in m._buffers)
    assert not any(n.startswith("mask_") for m in a.model.modules() for n in m._buffers)


@pytest.mark.parametrize("options, match", [
    (dict(target_flops=1.5), r"target_flops=1.5 must be in \(0, 1\)"),
    (dict(target_flops=0.0), r"target_flops=0.0 must be in \(0, 1\)"),
    (dict(target_flops=1.0), r"target_flops=1.0 must be in \(0, 1\)"),
    (dict(), r"needs exactly one target: --target-speedup X"),
    (dict(target_flops=0.5, target_params=0.5), r"exactly one target.*got target_flops and target_params"),
    (dict(target_speedup=1.0), r"target_speedup=1.0 must be > 1"),
    (dict(target_speedup=0.5), r"target_speedup=0.5 must be > 1"),
    (dict(target_params=1.2), r"target_params=1.2 must be in \(0, 1\)"),
    (dict(target_speedup=2, on="tpu"), r"unknown provider 'tpu'"),
    (dict(target_speedup=2, shape="128"), r"shape '128' is not BxS"),
    (dict(target_speedup=2, shape="0x128"), r"must be >= 1"),
    (dict(target_flops=0.5, examples=0), r"examples must be >= 1"),
])
def test_bad_options(planted, ctx, options, match):
    with pytest.raises(PruningConfigError, match=match):
        prune(planted.model, "post-training", ALL, data=ctx, options=options)


def test_a_target_below_what_removing_everything_leaves_is_refused(planted, ctx):
    with pytest.raises(PruningConfigError, match=r"target_flops=0.01 is below 0\.\d+, what removing every prunable"):
        prune(planted.model, "post-training", ALL, data=ctx, options=dict(target_flops=0.01))


def test_a_share_is_refused_the_kinds_are_named_with_zero(planted, ctx):
    with pytest.raises(PruningConfigError, match=r"leave --sparsity out or name the kinds .* \(got heads=0.5\)"):
        prune(planted.model, "post-training", {"heads": 0.5}, data=ctx, options=dict(target_flops=0.5))


def test_is_registered_as_a_data_method():
    cls = METHODS["post-training"]
    assert cls.needs_data and cls.kinds == ("heads", "neurons", "bottleneck", "adapters")
    assert cls.targeted
    assert list(cls.Options.__dataclass_fields__) == ["target_speedup", "target_flops", "target_params", "on",
                                                      "shape", "examples", "rearrange", "tune", "latency_rounds"]


# ----------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from typer.testing import CliRunner

    from compressor.cli import app

    tmp = tmp_path_factory.mktemp("cli")
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    model_dir = with_tokenizer(make_model_dir(tmp / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic"))
    data = signal_data_args(write_signal_tsv(tmp / "signal.tsv", 64, 16))
    headed = tmp / "headed"
    r = invoke("train", model_dir, *data, "--train", "head", "--max-steps", 2, "--batch-size", 8, "--out", headed)
    assert r.exit_code == 0, r.output
    return invoke, headed, data, tmp


@pytest.mark.parametrize("value, match", [("1.5", "must be in (0, 1)"), ("0", "must be in (0, 1)"),
                                          ("-0.2", "must be in (0, 1)"), ("0.001", "is below")])
def test_cli_bad_targets_are_one_line_errors(cli_setup, value, match):
    invoke, headed, data, tmp = cli_setup
    out = tmp / f"bad-{value}"
    r = invoke("prune", headed, "--method", "post-training", "--sparsity", "heads=0", "--sparsity", "neurons=0",
               *data, "--option", f"target_flops={value}", "--out", out)
    assert r.exit_code == 2, r.output
    assert match in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_prune_post_training_writes_masks_and_the_tuned_model(cli_setup):
    import json

    import compressor

    invoke, headed, data, tmp = cli_setup
    out = tmp / "pt"
    r = invoke("prune", headed, "--method", "post-training", *[a for k in ALL for a in ("--sparsity", f"{k}=0")],
               *data, "--option", "target_flops=0.5", "--option", "examples=32", "--batch-size", 8, "--out", out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    meta = json.loads((out / "masks.json").read_text())
    assert meta["method"] == "post-training" and meta["trained_model"] == "model"
    assert meta["params"]["options"] == dict(target_speedup=None, target_flops=0.5, target_params=None, on="cpu",
                                             shape="1x128", examples=32, rearrange=True, tune=True,
                                             latency_rounds=10)
    assert meta["target"] == "target_flops" and meta["target_flops"] == 0.5
    assert meta["target_met"] and meta["flops"] <= 0.5 * meta["dense_flops"]
    trained = compressor.load_model(out / "model")
    MaskSet.load(out).check(trained)
    original = compressor.load_model(headed)
    assert copy.deepcopy(trained.state_dict()).keys() == original.state_dict().keys()


def test_cli_prune_to_a_speedup_without_sparsity_records_the_prediction(cli_setup, monkeypatch):
    import json

    invoke, headed, data, tmp = cli_setup
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp / "cache"))
    out = tmp / "speed"
    r = invoke("prune", headed, "--method", "post-training", *data, "--target-speedup", "1.2", "--on", "torch-cpu",
               "--shape", "1x32", "--option", "latency_rounds=2", "--option", "examples=32", "--batch-size", 8,
               "--out", out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    meta = json.loads((out / "masks.json").read_text())
    assert meta["target"] == "target_speedup" and meta["target_speedup"] == 1.2
    assert meta["on"] == "torch-cpu" and meta["shape"] == "1x32" and meta["target_met"]
    assert meta["predicted_speedup"] >= 1.2 and meta["predicted_ms"] < meta["predicted_dense_ms"]
    assert (tmp / "cache" / "latency" / f"{meta['latency_model']}.json").is_file()
    assert set(meta["counts"]) == set(ALL)  # all four structured kinds compete without --sparsity


@pytest.mark.parametrize("args, match", [
    (("--target-speedup", "1"), "must be > 1"),
    (("--target-speedup", "2", "--target-flops", "0.5"), "exactly one target"),
    (("--target-speedup", "2", "--on", "tpu"), "unknown provider 'tpu'"),
    (("--target-speedup", "2", "--shape", "1by128"), "is not BxS"),
    (("--target-flops", "0.5", "--option", "target_flops=0.4"), "given twice"),
    ((), "exactly one target"),
])
def test_cli_target_errors_are_one_line(cli_setup, args, match):
    invoke, headed, data, tmp = cli_setup
    out = tmp / "bad-target"
    r = invoke("prune", headed, "--method", "post-training", *data, *args, "--out", out)
    assert r.exit_code == 2, r.output
    assert match in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_other_methods_still_need_sparsity(cli_setup):
    invoke, headed, data, tmp = cli_setup
    r = invoke("prune", headed, "--out", tmp / "no-sparsity")
    assert r.exit_code == 2 and "give at least one --sparsity" in r.stderr


def test_cli_export_of_a_cpu_speed_target_reports_measured_beside_predicted(cli_setup):
    """Export times the dense and the pruned graph in plain CPU sessions when the masks carry a latency target on
    cpu. The masks of the torch-cpu test above, relabelled cpu (building the cpu table exports a graph per
    configuration: too slow for a unit test); only the record's structure is checked, not the timing."""
    import json
    import shutil

    invoke, headed, data, tmp = cli_setup
    masks, out = tmp / "cpu-speed", tmp / "cpu-speed-onnx"
    shutil.copytree(tmp / "speed", masks)
    meta = json.loads((masks / "masks.json").read_text())
    meta["on"] = "cpu"
    (masks / "masks.json").write_text(json.dumps(meta))
    r = invoke("export", headed, "--masks", masks, "--onnx", "--out", out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    record = json.loads((out / "speedup.json").read_text())
    assert record["predicted_speedup"] == meta["predicted_speedup"] and record["target_speedup"] == 1.2
    assert record["shape"] == "1x32" and record["speedup"] > 0 and record["dense_ms"] > 0
    assert "measured" in r.output and "predicted" in r.output
    assert "## Speedup over the dense model" in (out / "export.md").read_text()


# ----------------------------------------------------------------------------------------------- rearrangement

def _planted_gradients(examples: int = 200, seed: int = 0):
    """Per-example mask gradients [examples, 6] with a planted correlation: members 0 and 1 are the two halves of
    one split unit (the same gradient, half each: each alone looks cheap, together they are the whole unit);
    members 2 and 3 are independent, a little dearer each on the diagonal; 4 and 5 are costly."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(examples, generator=gen, dtype=torch.float64)
    g = torch.randn(examples, 6, generator=gen, dtype=torch.float64) * torch.tensor([0, 0, 0.6, 0.65, 2, 3])
    g[:, 0] = g[:, 1] = 0.5 * z
    return g


def test_rearrangement_fixes_what_the_diagonal_fisher_picks_wrong_on_correlated_units():
    from itertools import combinations

    from compressor.pruning.rearrange import quadratic_loss, rearrange

    g = _planted_gradients()
    F = g.T @ g
    diagonal = torch.ones(6, dtype=torch.bool)
    diagonal[F.diagonal().argsort()[:2]] = False  # what the diagonal ranking prunes: the two halves
    assert sorted((~diagonal).nonzero().flatten().tolist()) == [0, 1]
    new = rearrange(diagonal, F)
    assert int(new.sum()) == 4 and new[:2].sum() == 1  # one half stays: the unit is no longer removed whole
    best = min(quadratic_loss(F, torch.tensor([i not in p for i in range(6)])) for p in combinations(range(6), 2))
    assert quadratic_loss(F, new) == pytest.approx(best)  # here the greedy swap finds the optimum
    assert quadratic_loss(F, new) < 0.75 * quadratic_loss(F, diagonal)
    # the estimate is what it claims: the squared sum of the removed members' gradients over the examples
    assert quadratic_loss(F, new) == pytest.approx(float(g[:, ~new].sum(1).pow(2).sum()))


@pytest.mark.parametrize("seed", range(20))
def test_rearrangement_never_raises_the_quadratic_estimate(seed):
    from compressor.pruning.rearrange import quadratic_loss, rearrange

    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (1,), generator=gen))
    g = torch.randn(int(torch.randint(1, 60, (1,), generator=gen)), n, generator=gen, dtype=torch.float64)
    g = g @ torch.randn(n, n, generator=gen, dtype=torch.float64)  # correlated members
    F = g.T @ g
    keep = torch.rand(n, generator=gen) < 0.5
    new = rearrange(keep, F)
    assert int(new.sum()) == int(keep.sum())
    assert quadratic_loss(F, new) <= quadratic_loss(F, keep) * (1 + 1e-12) + 1e-12
    assert torch.equal(rearrange(keep, F), new)  # deterministic


def test_rearrangement_in_the_method_keeps_the_counts_and_lowers_or_keeps_every_estimate(planted, ctx, tuned):
    off = prune(planted.model, "post-training", ALL, seed=SEED, data=ctx,
                options=dict(target_flops=0.3, examples=96, rearrange=False, tune=False))
    assert off.extra["rearrangement"] is None
    assert tuned.counts() == off.counts()  # the same number kept per group: the same cost
    for key in off.masks:
        assert int(tuned.masks[key].sum()) == int(off.masks[key].sum()), key
    summary = tuned.extra["rearrangement"]
    assert set(summary["kinds"]) == {"heads", "neurons", "bottleneck"}
    for group in summary["groups"]:
        assert group["loss_after"] <= group["loss_before"] * (1 + 1e-9), group
        changed = int((tuned.masks[group["key"]] != off.masks[group["key"]]).sum())
        assert changed == 2 * group["swapped"], group


# ----------------------------------------------------------------------------------------------- other layouts

@pytest.mark.parametrize("model_type", ["electra", "xlm-roberta"])
def test_post_training_with_tuning_on_other_model_types_and_masked_equals_compacted(tmp_path, ctx, model_type):
    """Tuning asks the model's description for its layer parts (no BERT module path): ELECTRA (with its embedding
    projection) and XLM-RoBERTa prune, tune every block, and the compacted tuned model is the masked one."""
    import compressor
    from compressor.training.heads import ensure_head

    model = compressor.load_model(make_model_dir(tmp_path / "m", model_type, "seq_bn", 2, "dynamic"))
    model = ensure_head(model, ctx.spec, seed=SEED).eval()
    ms = prune(model, "post-training", ALL, seed=SEED, data=ctx, options=dict(target_flops=0.5, examples=32))
    assert ms.extra["target_met"] and ms.model is not None
    assert len(ms.extra["tuning"]) == 2 * (2 + 2)  # per layer: heads, neurons, two adapters' bottlenecks
    assert all(t["error_after"] <= t["error_before"] for t in ms.extra["tuning"])
    assert any(t["applied"] for t in ms.extra["tuning"])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 25, (3, 10), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    with torch.no_grad():
        a = masked_copy(ms.model, ms)(input_ids=ids, attention_mask=attention).logits
        b = compact(ms.model, ms)(input_ids=ids, attention_mask=attention).logits
    assert float((a - b).abs().max()) <= 1e-5
