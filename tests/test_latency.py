"""The latency model (compressor/latency.py) and post-training's latency target, on tiny models built with few
timing rounds: structure, monotone fitted tables, the cache, and the search against a fixed table. Nothing
asserts that a timing is accurate (benchmarks/latency_model.py measures that)."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import latency
from compressor.errors import CompressorError, PruningConfigError
from compressor.latency import LatencyModel, latency_model, layer_counts
from compressor.pruning import prune
from compressor.pruning.post_training import floor_masks
from compressor.units import iter_units
from task_factories import planted_signal_model, signal_context, single_thread

SHAPE = "1x32"
FAST = dict(rounds=2, progress=False)  # the default slice: what the method builds with latency_rounds=2


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def planted():
    return planted_signal_model(0)


@pytest.fixture(scope="module")
def ctx(planted):
    return signal_context(planted.tokenizer, max_steps=2)


@pytest.fixture(scope="module")
def onnx_model(planted):
    """Built on onnxruntime's CPU provider from the exported, optimised one-layer graphs."""
    return latency_model(planted.model, "cpu", SHAPE, **FAST)


def _monotone(curve):
    xs, ys = curve["counts"], curve["delta_ms"]
    return xs == sorted(set(xs)) and all(a <= b for a, b in zip(ys, ys[1:])) and ys[-1] == 0.0


def test_the_table_has_one_monotone_curve_per_kind_and_layer_kind(planted, onnx_model):
    t = onnx_model.table
    assert t["fingerprint"]["provider"] == "cpu" and t["fingerprint"]["shape"] == [1, 32]
    assert len(t["layers"]) == 2 and len(set(t["layers"])) == 1  # both layers have the same structure: one table
    table = t["tables"][t["layers"][0]]
    assert set(table["curves"]) == {"heads", "neurons", "output_adapter:adapters", "output_adapter:width"}
    assert table["full"] == layer_counts(planted.model)[0] == dict(heads=4, neurons=37, **{
        "output_adapter:adapters": 3, "output_adapter:width": 6})
    for kind, curve in table["curves"].items():
        assert _monotone(curve), (kind, curve)
        assert curve["counts"][-1] == table["full"][kind]
    assert table["curves"]["heads"]["counts"] == [1, 2, 3, 4]
    assert table["curves"]["neurons"]["counts"] == [1, 10, 19, 28, 37]
    assert t["fixed_ms"] >= 0 and table["dense_ms"] > 0


def test_predicted_latency_falls_monotonically_as_members_go(planted, onnx_model):
    model = planted.model
    dense = onnx_model.predict(model)
    assert dense["speedup"] == pytest.approx(1.0) and dense["latency_ms"] == pytest.approx(onnx_model.dense_ms())
    heads = [u for u in iter_units(model) if u.kind == "heads"]
    last = dense["latency_ms"]
    for k in (3, 2, 1, 0):
        ms = onnx_model.predict(model, floor_masks(heads, k))["latency_ms"]
        assert ms <= last + 1e-12
        last = ms
    everything = onnx_model.predict(model, floor_masks([u for u in iter_units(model) if u.kind != "weights"], 1))
    assert everything["speedup"] >= 1.0


def test_the_cache_is_hit_for_the_same_fingerprint_and_missed_when_it_changes(planted, onnx_model, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    real_build = latency.build
    monkeypatch.setattr(latency, "build", no_build)
    again = latency_model(planted.model, "cpu", SHAPE, **FAST)
    assert again.table == onnx_model.table
    # another machine (its processor) or another shape is another key: built again
    real_fp = latency.machine_fingerprint
    monkeypatch.setattr(latency, "machine_fingerprint", lambda on, shape: dict(real_fp(on, shape), processor="other"))
    with pytest.raises(AssertionError, match="built again"):
        latency_model(planted.model, "cpu", SHAPE, **FAST)
    monkeypatch.setattr(latency, "machine_fingerprint", real_fp)
    built = []
    monkeypatch.setattr(latency, "build", lambda *a, **k: built.append(a[2]) or real_build(*a, **k))
    other = latency_model(planted.model, "torch-cpu", "2x16", **FAST)
    assert built == [(2, 16)] and other.key != onnx_model.key
    from compressor.default_model import cache_root

    assert json.loads((cache_root() / "latency" / f"{other.key}.json").read_text())["key"] == other.key


def test_the_search_meets_a_predicted_speedup_and_is_deterministic_given_the_table(planted, ctx, onnx_model):
    options = dict(target_speedup=1.2, on="cpu", shape=SHAPE, examples=48, tune=False, latency_rounds=2)
    lm = onnx_model  # the method finds it in the cache
    a = prune(planted.model, "post-training", {}, seed=0, data=ctx, options=options)
    b = prune(planted.model, "post-training", {}, seed=0, data=ctx, options=options)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks) and set(a.masks) == set(b.masks)
    e = a.extra
    assert e["target"] == "target_speedup" and e["on"] == "cpu" and e["shape"] == SHAPE
    assert e["latency_model"] == lm.key and e["target_met"]
    predicted = lm.predict(planted.model, a.masks)
    assert e["predicted_ms"] == pytest.approx(predicted["latency_ms"], abs=1e-6)
    assert e["predicted_speedup"] == pytest.approx(predicted["speedup"], rel=1e-3) and e["predicted_speedup"] >= 1.2
    assert set(a.counts()) == {"heads", "neurons", "bottleneck", "adapters"}  # all four kinds by default


def test_a_fixed_table_drives_the_search_toward_the_cheap_kind(planted, ctx):
    """A constructed table where only heads cost time: the search removes heads, not neurons."""
    t = latency_model(planted.model, "torch-cpu", SHAPE, **FAST).table
    table = json.loads(json.dumps(t))
    for s in table["tables"].values():
        s["curves"] = {k: dict(c, delta_ms=[0.0] * len(c["counts"])) for k, c in s["curves"].items()}
        s["curves"]["heads"] = dict(counts=[1, 4], delta_ms=[-3.0, 0.0])
        s["dense_ms"], table["fixed_ms"] = 5.0, 1.0
    lm = LatencyModel(table)
    from compressor.pruning.post_training import LatencyCosts, greedy_search

    units = [u for u in iter_units(planted.model) if u.kind != "weights"]
    scores = {u.key: torch.ones(u.shape) for u in units}
    masks = greedy_search(planted.model, units, scores, need=2.0, min_keep=1, cost=LatencyCosts(planted.model,
                                                                                                units, lm))
    kept = {u.kind: 0 for u in units}
    for u in units:
        kept[u.kind] += int(masks[u.key].sum())
    assert kept["heads"] == 6 and kept["neurons"] == 74  # each head saves 1 ms: two of them go
    assert lm.predict(planted.model, masks)["latency_ms"] == pytest.approx(9.0 - 2.0)


@pytest.mark.parametrize("options, match", [
    (dict(target_speedup=1000.0), r"target_speedup=1000.0 is above \d+\.\d\d, the predicted speedup of removing"),
    (dict(target_speedup=2.0, shape="1x512"), r"the model takes at most 64 tokens"),
])
def test_unreachable_targets_are_one_line_errors(planted, ctx, options, match):
    with pytest.raises(PruningConfigError, match=match):
        prune(planted.model, "post-training", {}, data=ctx,
              options=dict(options, on="torch-cpu", shape=options.get("shape", SHAPE), latency_rounds=2))


@pytest.mark.parametrize("on", ["cuda", "torch-cuda"])
def test_a_provider_not_available_here_is_a_one_line_error(planted, ctx, on):
    import onnxruntime as ort

    if (on == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()) or \
            (on == "torch-cuda" and torch.cuda.is_available()):
        pytest.skip(f"{on} is available here")
    with pytest.raises(CompressorError, match="not available here|sees no CUDA device") as e:
        prune(planted.model, "post-training", {}, data=ctx, options=dict(target_speedup=2.0, on=on))
    assert "\n" not in str(e.value)
