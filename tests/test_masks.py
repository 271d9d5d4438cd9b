"""The MaskSet format (docs/design.md "Prunable units and the mask format"), its checks against the model it is
applied to, the pruning baselines' sparsity targets, and what a mask means in the masked model."""

from __future__ import annotations

import copy
import json
import math
import re
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file

import compressor
from compressor.errors import MaskError, OutputExistsError, PruningConfigError
from compressor.io import OUTPUT_MARKER
from compressor.masks import META_FILE, TENSORS_FILE, MaskSet, apply_masks, masked_copy
from compressor.pruning import parse_sparsity, prune
from compressor.units import KINDS, fingerprint, iter_units
from factories import make_model_dir, random_inputs

ALL_KINDS = dict(heads=0.5, neurons=0.3, adapters=0.5, bottleneck=0.5, weights=0.4)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("bert3"), "bert", "seq_bn", n_adapters=3, fusion="dynamic")


@pytest.fixture(scope="module")
def model(model_dir):
    return compressor.load_model(model_dir)


@pytest.fixture(scope="module")
def inputs():
    return random_inputs("bert", 3, 10, padding="random", seed=1)


def hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def units_of(model, kind):
    return [u for u in iter_units(model) if u.kind == kind]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- format

def test_save_load_roundtrip(model, tmp_path):
    ms = prune(model, "random", ALL_KINDS, seed=3)
    ms.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([OUTPUT_MARKER, TENSORS_FILE, META_FILE])
    back = MaskSet.load(tmp_path / "m")
    assert set(back.masks) == set(ms.masks)
    for key, mask in ms.masks.items():
        assert back.masks[key].dtype == torch.bool
        assert torch.equal(back.masks[key], mask), key
    assert back.fingerprint == ms.fingerprint == fingerprint(model)
    assert back.method == "random"
    assert back.params == ms.params and back.params["seed"] == 3
    assert back.params["sparsity"] == ALL_KINDS
    assert back.counts() == ms.counts()
    back.check(model)  # a loaded MaskSet applies to the model it was made for


def test_file_contents_follow_the_public_format(model, tmp_path):
    ms = prune(model, "magnitude", ALL_KINDS, seed=0)
    ms.save(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / TENSORS_FILE))
    units = {u.key: u for u in iter_units(model)}
    assert set(tensors) == set(ms.masks)
    assert {k.rsplit("::", 1)[1] for k in tensors} == set(KINDS)  # one of each kind was asked for
    for key, tensor in tensors.items():
        path, kind = key.rsplit("::", 1)
        assert re.fullmatch(r"[\w.,]+", path), key
        assert tensor.dtype == torch.bool
        assert tuple(tensor.shape) == units[key].shape
        if kind == "weights":  # the key names the model's own parameter
            assert tuple(model.get_parameter(path).shape) == tuple(tensor.shape)
        else:  # the key names the model's own module
            model.get_submodule(path)
    # keys from docs/design.md's table (a BertModel holds its layers at encoder.layer.<i>)
    assert "encoder.layer.1.attention.self::heads" in tensors
    assert "encoder.layer.0.intermediate::neurons" in tensors
    assert "encoder.layer.0.output.adapter_fusion_layer.a0,a1,a2::adapters" in tensors
    assert "encoder.layer.1.output.adapters.a2::bottleneck" in tensors
    assert "encoder.layer.0.output.adapters.a0.adapter_up.weight::weights" in tensors

    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["format"] == "compressor-masks" and meta["version"] == 1
    assert meta["fingerprint"] == fingerprint(model)
    assert meta["method"] == "magnitude"
    assert meta["params"]["sparsity"] == ALL_KINDS and meta["params"]["seed"] == 0
    assert set(meta["counts"]) == set(KINDS)
    for kind, c in meta["counts"].items():
        group = [t for k, t in tensors.items() if k.endswith("::" + kind)]
        assert c == {"kept": sum(int(t.sum()) for t in group), "total": sum(t.numel() for t in group)}


def test_counts(model):
    ms = prune(model, "random", dict(heads=0.5, adapters=0.34, weights=0.25), seed=1)
    counts = ms.counts()
    assert set(counts) == {"heads", "adapters", "weights"}
    # tiny model: 2 layers x 4 heads, 2 fusions over 3 adapters
    assert counts["heads"] == {"kept": 4, "total": 8}
    assert counts["adapters"] == {"kept": 4, "total": 6}
    total_weights = sum(u.size for u in units_of(model, "weights"))
    pruned_weights = sum(math.floor(u.size * 0.25) for u in units_of(model, "weights"))
    assert counts["weights"] == {"kept": total_weights - pruned_weights, "total": total_weights}
    full = MaskSet.full(model).counts()
    for kind in KINDS:
        assert full[kind]["kept"] == full[kind]["total"] == sum(u.size for u in units_of(model, kind))


def test_save_refuses_existing_dir_unless_overwrite(model, tmp_path):
    target = tmp_path / "m"
    prune(model, "random", dict(heads=0.5), seed=0).save(target)
    with pytest.raises(OutputExistsError):
        prune(model, "random", dict(heads=0.5), seed=1).save(target)
    assert MaskSet.load(target).params["seed"] == 0
    prune(model, "random", dict(heads=0.5), seed=1).save(target, overwrite=True)
    assert MaskSet.load(target).params["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left


def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="No space"):
        prune(model, "random", dict(heads=0.5)).save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- invariant 3

def test_same_seed_gives_identical_masks(model_dir, tmp_path):
    for method in ("random", "magnitude"):
        runs = []
        for i in range(2):  # a freshly loaded model each time
            m = compressor.load_model(model_dir)
            prune(m, method, ALL_KINDS, seed=7).save(tmp_path / f"{method}{i}")
            runs.append(MaskSet.load(tmp_path / f"{method}{i}"))
        assert set(runs[0].masks) == set(runs[1].masks)
        assert all(torch.equal(runs[0].masks[k], runs[1].masks[k]) for k in runs[0].masks), method
        assert (tmp_path / f"{method}0" / META_FILE).read_text() == (tmp_path / f"{method}1" / META_FILE).read_text()


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_same_seed_gives_byte_identical_masks_file(model_dir, tmp_path, method):
    files = set()
    for i in range(16):  # the header order is random per save: one pair of saves misses it half the time
        m = compressor.load_model(model_dir) if i < 2 else m
        prune(m, method, ALL_KINDS, seed=7).save(tmp_path / str(i))
        files.add((tmp_path / str(i) / TENSORS_FILE).read_bytes())
    assert len(files) == 1


def test_different_seed_gives_different_random_masks(model, tmp_path):
    a, b = prune(model, "random", ALL_KINDS, seed=0), prune(model, "random", ALL_KINDS, seed=1)
    assert a.counts() == b.counts()  # same targets ...
    differing = [k for k in a.masks if not torch.equal(a.masks[k], b.masks[k])]
    assert differing  # ... other units
    assert {a.kind_of(k) for k in differing} >= {"heads", "neurons", "weights"}
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert (tmp_path / "a" / TENSORS_FILE).read_bytes() != (tmp_path / "b" / TENSORS_FILE).read_bytes()


# ----------------------------------------------------------------------------------------------- masks for another model

def _other_model(tmp_path, **kwargs):
    return compressor.load_model(make_model_dir(tmp_path / "other", **kwargs))


def _assert_rejected(maskset, model, inputs, match):
    before = hidden(model, inputs)
    with pytest.raises(MaskError, match=match):
        maskset.check(model)
    target = copy.deepcopy(model)
    with pytest.raises(MaskError, match=match):
        apply_masks(target, maskset)
    assert torch.equal(hidden(target, inputs), before)  # nothing half-applied


def test_wrong_key_is_mask_error(model, inputs):
    ms = prune(model, "random", ALL_KINDS)
    key = "encoder.layer.0.attention.self::heads"
    ms.masks["encoder.layer.7.attention.self::heads"] = ms.masks.pop(key)
    _assert_rejected(ms, model, inputs, "names no prunable unit")


@pytest.mark.parametrize("key, match", [("encoder.layer.0.attention.self", "::<kind>"),
                                        ("encoder.layer.0.attention.self::filters", "::<kind>"),
                                        ("::heads", "names no prunable unit")])
def test_malformed_key_is_mask_error(model, inputs, key, match):
    ms = prune(model, "random", dict(weights=0.5))
    ms.masks[key] = torch.ones(4, dtype=torch.bool)
    _assert_rejected(ms, model, inputs, match)


def test_wrong_shape_is_mask_error(model, inputs):
    ms = prune(model, "random", ALL_KINDS)
    ms.masks["encoder.layer.1.intermediate::neurons"] = torch.ones(36, dtype=torch.bool)
    _assert_rejected(ms, model, inputs, "shape")


def test_non_bool_mask_is_mask_error(model, inputs):
    ms = prune(model, "random", dict(heads=0.5, weights=0.5))
    ms.masks["encoder.layer.0.attention.self::heads"] = ms.masks["encoder.layer.0.attention.self::heads"].float()
    _assert_rejected(ms, model, inputs, "dtype")


def test_other_fingerprint_is_mask_error(model, inputs):
    ms = prune(model, "random", ALL_KINDS)
    ms.fingerprint = "0123456789abcdef"
    _assert_rejected(ms, model, inputs, "0123456789abcdef")


def test_masks_of_a_model_with_more_adapters(model, inputs, tmp_path):
    other = _other_model(tmp_path, n_adapters=4)
    _assert_rejected(prune(other, "random", ALL_KINDS), model, inputs, "another model")
    # only keys both models share (heads, FFN): same keys and shapes, still another model
    shared = prune(other, "random", dict(heads=0.5, neurons=0.5))
    assert set(shared.masks) == set(prune(model, "random", dict(heads=0.5, neurons=0.5)).masks)
    _assert_rejected(shared, model, inputs, "made for model")


def test_masks_of_another_setup(model_dir, model, inputs):
    single = compressor.load_model(model_dir, setup="a1")
    _assert_rejected(prune(single, "random", dict(bottleneck=0.5, weights=0.2)), model, inputs, "made for")
    _assert_rejected(prune(model, "random", dict(adapters=0.5)), single, random_inputs("bert", 2, 6), "made for")
    # the same shared keys (heads only) but another setup: the fingerprint tells them apart
    _assert_rejected(prune(single, "random", dict(heads=0.5)), model, inputs, "made for model")


@pytest.mark.parametrize("other", [dict(model_type="roberta"), dict(head="flex")], ids=["roberta", "flex-head"])
def test_masks_of_another_architecture(model, inputs, tmp_path, other):
    _assert_rejected(prune(_other_model(tmp_path, **other), "random", dict(heads=0.5)), model, inputs, "made for")


# ----------------------------------------------------------------------------------------------- corrupt directories

@pytest.fixture
def saved(model, tmp_path):
    prune(model, "random", ALL_KINDS, seed=2).save(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("cut", [0, 5, 40, "half", -1])
def test_truncated_tensor_file(saved, cut):
    raw = (saved / TENSORS_FILE).read_bytes()
    n = {"half": len(raw) // 2, -1: len(raw) - 1}.get(cut, cut)
    (saved / TENSORS_FILE).write_bytes(raw[:n])
    with pytest.raises(MaskError, match="masks.safetensors"):
        MaskSet.load(saved)


def test_garbage_tensor_file(saved):
    size = len((saved / TENSORS_FILE).read_bytes())
    gen = torch.Generator().manual_seed(0)
    (saved / TENSORS_FILE).write_bytes(bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist()))
    with pytest.raises(MaskError, match="masks.safetensors"):
        MaskSet.load(saved)


@pytest.mark.parametrize("name", [META_FILE, TENSORS_FILE])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(MaskError, match=re.escape(name)):
        MaskSet.load(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(MaskError):
        MaskSet.load(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", "", '{"format": "something-else", "version": 1}',
                                  '{"format": "compressor-masks", "version": 99}'])
def test_bad_meta_file(saved, text):
    (saved / META_FILE).write_text(text)
    with pytest.raises(MaskError, match="masks.json"):
        MaskSet.load(saved)


@pytest.mark.parametrize("edit", ["drop-fingerprint", "list"])
def test_meta_file_without_fingerprint_or_not_an_object(saved, edit):
    meta = json.loads((saved / META_FILE).read_text())
    if edit == "drop-fingerprint":
        del meta["fingerprint"]
    else:
        meta = [meta]
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(MaskError):
        MaskSet.load(saved)


# ----------------------------------------------------------------------------------------------- sparsity targets

def _expected_pruned(fraction: float, n: int, min_keep: int) -> int:
    return min(math.floor(Fraction(str(fraction)) * n), max(n - min_keep, 0))


@pytest.mark.parametrize("method", ["random", "magnitude"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_sparsity_met_exactly_per_unit_group(model, method, fraction):
    ms = prune(model, method, {k: fraction for k in KINDS}, seed=5)
    units = {u.key: u for u in iter_units(model)}
    assert set(ms.masks) == set(units)
    for key, mask in ms.masks.items():
        n = units[key].size
        assert int((~mask).sum()) == _expected_pruned(fraction, n, 0 if units[key].kind == "weights" else 1), key
        if units[key].kind != "weights":
            assert mask.any(), key  # at least one member kept by default


@pytest.mark.parametrize("min_keep", [0, 2, 3, 5])
def test_min_keep(model, min_keep):
    fraction = 0.9
    ms = prune(model, "random", dict(heads=fraction, adapters=fraction, bottleneck=fraction, weights=fraction),
               min_keep=min_keep)
    units = {u.key: u for u in iter_units(model)}
    for key, mask in ms.masks.items():
        unit = units[key]
        keep = 0 if unit.kind == "weights" else min_keep  # single weights are never kept by min_keep
        assert int((~mask).sum()) == _expected_pruned(fraction, unit.size, keep), key
    heads = [m for k, m in ms.masks.items() if k.endswith("::heads")]
    assert all(int(m.sum()) == max(1, min(min_keep, 4)) for m in heads)  # floor(0.9 * 4) = 3 pruned at most


def test_floor_is_exact_near_one(model):
    ms = prune(model, "random", dict(bottleneck=0.9999999999), min_keep=0)  # groups of 2: floor(1.9999999998) = 1
    assert all(int(m.sum()) == 1 for m in ms.masks.values())


def test_only_asked_kinds_are_masked(model):
    ms = prune(model, "magnitude", dict(neurons=0.5))
    assert {ms.kind_of(k) for k in ms.masks} == {"neurons"}
    assert len(ms.masks) == 2


# ----------------------------------------------------------------------------------------------- magnitude

def _zero_head(model, layer, head):
    att = model.base_model.encoder.layer[layer].attention
    d = att.self.attention_head_size
    rows = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(att.self, name).weight[rows] = 0
        att.output.dense.weight[:, rows] = 0


def test_magnitude_prunes_zeroed_heads(model):
    m = copy.deepcopy(model)
    _zero_head(m, 0, 2)
    _zero_head(m, 1, 0)
    ms = prune(m, "magnitude", dict(heads=0.25))
    assert ms.masks["encoder.layer.0.attention.self::heads"].tolist() == [True, True, False, True]
    assert ms.masks["encoder.layer.1.attention.self::heads"].tolist() == [False, True, True, True]


def test_magnitude_keeps_largest_head(model):
    m = copy.deepcopy(model)
    att = m.base_model.encoder.layer[1].attention
    d = att.self.attention_head_size
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(att.self, name).weight[3 * d:] *= 10
    ms = prune(m, "magnitude", dict(heads=0.75))
    assert ms.masks["encoder.layer.1.attention.self::heads"].tolist() == [False, False, False, True]


def test_magnitude_prunes_zeroed_ffn_neuron(model):
    m = copy.deepcopy(model)
    layer = m.base_model.encoder.layer[0]
    with torch.no_grad():
        layer.intermediate.dense.weight[5] = 0
        layer.output.dense.weight[:, 5] = 0
    ms = prune(m, "magnitude", dict(neurons=0.03))  # floor(0.03 * 37) = 1
    mask = ms.masks["encoder.layer.0.intermediate::neurons"]
    assert (~mask).nonzero().flatten().tolist() == [5]


def test_magnitude_prunes_zeroed_fused_adapter_and_bottleneck_neuron(model):
    m = copy.deepcopy(model)
    site0, site1 = m.base_model.encoder.layer[0].output, m.base_model.encoder.layer[1].output
    with torch.no_grad():
        for p in site0.adapters["a1"].parameters():
            p.mul_(1e-3)
        site1.adapters["a0"].adapter_down[0].weight[1] = 0
        site1.adapters["a0"].adapter_up.weight[:, 1] = 0
    ms = prune(m, "magnitude", dict(adapters=0.34, bottleneck=0.5))
    assert ms.masks["encoder.layer.0.output.adapter_fusion_layer.a0,a1,a2::adapters"].tolist() == [True, False, True]
    assert ms.masks["encoder.layer.1.output.adapters.a0::bottleneck"].tolist() == [True, False]


def test_magnitude_weights_prunes_smallest_entries(model):
    ms = prune(model, "magnitude", dict(weights=0.6))
    for key, mask in ms.masks.items():
        w = model.get_parameter(key.rsplit("::", 1)[0]).detach().abs()
        assert w[mask].min() >= w[~mask].max(), key


# ----------------------------------------------------------------------------------------------- --sparsity parsing

def test_parse_sparsity_accepts():
    assert parse_sparsity(["heads=0.5", "adapters=0.75", " weights = 0 "]) == dict(heads=0.5, adapters=0.75,
                                                                                 weights=0.0)


@pytest.mark.parametrize("items, match", [
    (["heads=1.0"], r"\[0, 1\)"), (["heads=1"], r"\[0, 1\)"), (["heads=-0.1"], r"\[0, 1\)"),
    (["heads=2.5"], r"\[0, 1\)"), (["heads=nan"], r"\[0, 1\)"), (["heads=inf"], r"\[0, 1\)"),
    (["filters=0.5"], "unknown unit kind 'filters'"), (["=0.5"], "unknown unit kind"),
    (["heads"], "KIND=FRACTION"), (["heads:0.5"], "KIND=FRACTION"), (["heads=half"], "not a number"),
    (["heads="], "not a number"), (["heads=0.5", "heads=0.2"], "twice"), ([], "at least one"), (None, "at least one"),
])
def test_parse_sparsity_rejects(items, match):
    with pytest.raises(PruningConfigError, match=match):
        parse_sparsity(items)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="random", sparsity=dict(heads=1.0)), r"\[0, 1\)"),
    (dict(method="random", sparsity=dict(heads=-0.5)), r"\[0, 1\)"),
    (dict(method="random", sparsity=dict(layers=0.5)), "unknown unit kind"),
    (dict(method="random", sparsity=dict(heads=0.5), min_keep=-1), "min_keep"),
    (dict(method="movement", sparsity=dict(heads=0.5)), "magnitude.*random"),
])
def test_prune_rejects_bad_config(model, kwargs, match):
    with pytest.raises(PruningConfigError, match=match):
        prune(model, **kwargs)


# ----------------------------------------------------------------------------------------------- masked-model semantics

def test_full_masks_leave_the_model_unchanged(model, inputs):
    masked = masked_copy(model, MaskSet.full(model))
    assert torch.equal(hidden(masked, inputs), hidden(model, inputs))


def test_masked_copy_leaves_the_original_alone(model, inputs):
    before = hidden(model, inputs)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    masked = masked_copy(model, prune(model, "random", ALL_KINDS, seed=4))
    assert max_diff(hidden(masked, inputs), before) > 1e-3
    assert torch.equal(hidden(model, inputs), before)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def _one_pruned(model, key, index) -> MaskSet:
    unit = {u.key: u for u in iter_units(model)}[key]
    mask = torch.ones(unit.shape, dtype=torch.bool)
    mask.view(-1)[index] = False
    return MaskSet({key: mask}, fingerprint(model))


def test_pruned_head_contributes_no_context(model, inputs):
    masked = masked_copy(model, _one_pruned(model, "encoder.layer.0.attention.self::heads", 1))
    ref = copy.deepcopy(model)  # the same head, silenced through its output columns
    _zero_out_columns(ref.base_model.encoder.layer[0].attention.output.dense, slice(8, 16))
    assert max_diff(hidden(masked, inputs), hidden(model, inputs)) > 1e-3
    assert max_diff(hidden(masked, inputs), hidden(ref, inputs)) <= 1e-5


def _zero_out_columns(linear, cols):
    with torch.no_grad():
        linear.weight[:, cols] = 0


def test_pruned_ffn_neuron_has_zero_activation(model, inputs):
    masked = masked_copy(model, _one_pruned(model, "encoder.layer.1.intermediate::neurons", 11))
    ref = copy.deepcopy(model)
    _zero_out_columns(ref.base_model.encoder.layer[1].output.dense, 11)
    assert max_diff(hidden(masked, inputs), hidden(model, inputs)) > 1e-4
    assert max_diff(hidden(masked, inputs), hidden(ref, inputs)) <= 1e-5


def test_pruned_bottleneck_neuron_has_zero_activation(model, inputs):
    masked = masked_copy(model, _one_pruned(model, "encoder.layer.0.output.adapters.a2::bottleneck", 0))
    ref = copy.deepcopy(model)
    _zero_out_columns(ref.base_model.encoder.layer[0].output.adapters["a2"].adapter_up, 0)
    assert max_diff(hidden(masked, inputs), hidden(model, inputs)) > 1e-4
    assert max_diff(hidden(masked, inputs), hidden(ref, inputs)) <= 1e-5


def test_weight_masks_zero_exactly_the_pruned_weights(model):
    ms = prune(model, "random", dict(weights=0.5), seed=9)
    masked = masked_copy(model, ms)
    for key, mask in ms.masks.items():
        path = key.rsplit("::", 1)[0]
        w, orig = masked.get_parameter(path), model.get_parameter(path)
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), key
        assert torch.equal(w[mask], orig[mask]), key


def _fusion_key(layer):
    return f"encoder.layer.{layer}.output.adapter_fusion_layer.a0,a1,a2::adapters"


def test_masking_a_fused_adapter_changes_the_output(model, inputs):
    ms = MaskSet({_fusion_key(0): torch.tensor([True, False, True])}, fingerprint(model))
    assert max_diff(hidden(masked_copy(model, ms), inputs), hidden(model, inputs)) > 1e-4


def test_pruned_fused_adapter_leaves_the_softmax(model, inputs):
    """Masking a2 of a0,a1,a2 equals fusing a0 and a1 only: the others renormalise."""
    ms = MaskSet({_fusion_key(0): torch.tensor([True, True, False]), _fusion_key(1): torch.tensor([True, True, False])},
                 fingerprint(model))
    ref = copy.deepcopy(model)
    for layer in ref.base_model.encoder.layer:
        layer.output.active = ["fuse", "a0,a1,a2", ["a0", "a1"]]
    assert max_diff(hidden(masked_copy(model, ms), inputs), hidden(ref, inputs)) <= 1e-5


@pytest.mark.parametrize("keep", [0, 2])
def test_fusion_left_with_one_adapter_is_that_adapter_with_value_folded(model, inputs, keep):
    names = ["a0", "a1", "a2"]
    mask = torch.zeros(3, dtype=torch.bool)
    mask[keep] = True
    ms = MaskSet({_fusion_key(0): mask, _fusion_key(1): mask}, fingerprint(model))
    ref = copy.deepcopy(model)  # each layer: the single adapter, with the fusion's value projection folded in
    for layer in ref.base_model.encoder.layer:
        site = layer.output
        value = site.adapter_fusion_layer["a0,a1,a2"].value.weight
        up = site.adapters[names[keep]].adapter_up
        with torch.no_grad():
            up.weight.copy_(value @ up.weight)
            up.bias.copy_(value @ up.bias)
        site.active = ["single", names[keep]]
    masked = hidden(masked_copy(model, ms), inputs)
    assert max_diff(masked, hidden(model, inputs)) > 1e-4
    assert max_diff(masked, hidden(ref, inputs)) <= 1e-5
