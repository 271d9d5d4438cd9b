"""Invariant 1 of docs/design.md: for any MaskSet, masked model == compacted model (fp32, max abs diff <= 1e-5),
on random inputs with random padding, including all-pruned units and fusions left with one adapter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressor
from compressor.compaction import compact, save_compacted
from compressor.masks import MaskSet, masked_copy
from compressor.modeling.compositions import Single
from compressor.units import iter_units
import adapterhub_reference as ref
from factories import make_model_dir, random_inputs

VARIANTS = {
    "bert-pfeiffer-dynamic-flex": dict(model_type="bert", adapter_config="seq_bn", fusion="dynamic", head="flex"),
    "bert-houlsby-static": dict(model_type="bert", adapter_config="double_seq_bn", fusion="static"),
    "roberta-pfeiffer-dynamic-classifier": dict(model_type="roberta", adapter_config="seq_bn", fusion="dynamic",
                                                head="classifier"),
    "bert-residual-before-query-before-ln": dict(
        model_type="bert", adapter_config="seq_bn", fusion="dynamic",
        fusion_overrides=dict(residual_before=True, query_before_ln=True)),
    "roberta-houlsby-keyless": dict(model_type="roberta", adapter_config="double_seq_bn", fusion="dynamic",
                                    fusion_overrides=dict(key=False)),
    # scores x . u_i (no query, no key); layer 0's adapters are h/2 wide (sum of widths 3h/2): the fusion stays
    # folded there unless pruning narrows them; layer 1's go to bottleneck space
    "bert-wide-first-layer": dict(model_type="bert", adapter_config="seq_bn", fusion="dynamic",
                                  fusion_overrides=dict(query=False, key=False),
                                  adapter_overrides=dict(reduction_factor={"0": 2, "default": 16})),
    # compacted (bottleneck-space fusions) and reloaded: pruned and compacted again
    "compacted-bert-pfeiffer-dynamic-flex": dict(model_type="bert", adapter_config="seq_bn", fusion="dynamic",
                                                 head="flex", compacted=True),
    "compacted-bert-residual-before": dict(model_type="bert", adapter_config="seq_bn", fusion="dynamic",
                                           fusion_overrides=dict(residual_before=True), compacted=True),
    # issue 16's rows: XLM-R (RoBERTa's layout, its own classes) and ELECTRA (embedding projection, no pooler)
    "xlmr-pfeiffer-dynamic-flex": dict(model_type="xlm-roberta", adapter_config="seq_bn", fusion="dynamic",
                                       head="flex"),
    "electra-houlsby-dynamic-classifier": dict(model_type="electra", adapter_config="double_seq_bn",
                                               fusion="dynamic", head="classifier"),
    "bert-single-adapter-gated-channel": dict(
        model_type="bert", adapter_config="seq_bn", fusion=None, n_adapters=1,
        adapter_overrides=dict(use_gating=True, ln_after=True, ln_before=True, scaling="channel")),
    # built and saved by the adapters library (tests/adapterhub_reference.py's cases): DistilBERT's own block
    # (a Houlsby fusion with residual_before and a flex head; a static fusion under transformers' head) and a
    # BERT with mBERT's vocabulary, fed ids from all of it
    "distilbert-houlsby-residual-before-flex": dict(model_type="distilbert", reference="distilbert_flex_fuse2"),
    "distilbert-pfeiffer-static-seqcls": dict(model_type="distilbert", reference="distilbert_seqcls_fuse2_static"),
    "compacted-distilbert-houlsby-flex": dict(model_type="distilbert", reference="distilbert_flex_fuse2",
                                              compacted=True),
    "mbert-pfeiffer-dynamic-flex": dict(model_type="bert", reference="mbert_flex_fuse2", vocab=ref.MBERT_VOCAB),
    # Stack(lang, task) and Stack(lang, Fuse(a, b[, c])): stacked bottlenecks and a stacked fusion
    "stack-lang-task-mixed-seqcls": dict(model_type="bert", reference="stack_lang_task_houlsby_mixed"),
    "stack-lang-fuse2-flex": dict(model_type="bert", reference="stack_lang_fuse2"),
    "compacted-stack-lang-fuse3-distilbert": dict(model_type="distilbert", reference="stack_lang_fuse3_static_houlsby",
                                                  compacted=True),
    # parallel bottleneck adapters (par_bn): alone (both sites, gating, ln_after) and stacked before a Houlsby
    "par-bn-options-roberta-seqcls": dict(model_type="roberta", reference="par_bn_options"),
    "stack-par-bn-task": dict(model_type="bert", reference="stack_par_bn_task"),
    # MAD-X: an invertible language adapter on the embeddings (kept whole, copied) under Stack(lang, Fuse(a, b))
    "stack-inv-lang-fuse2-xlmr-seqcls": dict(model_type="xlm-roberta", reference="xlmr_seqcls_stack_inv_lang_fuse2"),
}


def _reference_dir(case_id: str, root):
    case = ref.CASES_BY_ID[case_id]
    return ref.save_case(ref.build_reference(case), case, "full", root)["path"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, kwargs in VARIANTS.items():
        kwargs = dict(kwargs)
        compacted = kwargs.pop("compacted", False)
        kwargs.pop("vocab", None)
        if "reference" in kwargs:
            d = _reference_dir(kwargs["reference"], tmp_path_factory.mktemp(name))
        else:
            d = make_model_dir(tmp_path_factory.mktemp(name), **kwargs)
        setup = ref.CASES_BY_ID[kwargs["reference"]].setup if "reference" in kwargs else None
        model = compressor.load_model(d, setup=setup)
        if compacted:
            model = compressor.load_model(save_compacted(compact(model), tmp_path_factory.mktemp(name) / "c"))
        out[name] = (kwargs["model_type"], model)
    return out


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _random_masks(model, data) -> MaskSet:
    """Each unit group: keep all, prune all, keep exactly one, or a random subset."""
    masks = {}
    for unit in iter_units(model):
        style = data.draw(st.sampled_from(["all", "none", "one", "random", "random"]), label=unit.kind)
        n = unit.size
        if style == "all":
            keep = torch.ones(n, dtype=torch.bool)
        elif style == "none":
            keep = torch.zeros(n, dtype=torch.bool)
        elif style == "one":
            keep = torch.zeros(n, dtype=torch.bool)
            keep[data.draw(st.integers(0, n - 1), label="kept")] = True
        else:
            seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
            keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
        masks[unit.key] = keep.view(unit.shape)
    from compressor.units import fingerprint
    return MaskSet(masks, fingerprint(model), "property-test")


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masked_equals_compacted(models, variant, data):
    model_type, model = models[variant]
    maskset = _random_masks(model, data)
    masked, compacted = masked_copy(model, maskset), compact(model, maskset)
    padding = data.draw(st.sampled_from(["right", "left", "random"]))
    batch, seq = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 12))
    inputs = random_inputs(model_type, batch, seq, padding, seed=data.draw(st.integers(0, 1000)),
                           vocab=VARIANTS[variant].get("vocab", 100))
    expected, out = _output(masked, inputs), _output(compacted, inputs)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max().item() <= 1e-5


def test_compaction_really_shrinks(models):
    """Pruning half of every kind removes parameters and fused adapters; a fusion left with one adapter
    becomes a plain adapter (no fusion module left at that site)."""
    _, model = models["bert-pfeiffer-dynamic-flex"]
    masks = {}
    for unit in iter_units(model):
        keep = torch.ones(unit.size, dtype=torch.bool)
        if unit.kind == "adapters":
            keep[1:] = False
        elif unit.kind in ("heads", "neurons", "bottleneck"):
            keep[: unit.size // 2] = False
        masks[unit.key] = keep.view(unit.shape)
    from compressor.units import fingerprint
    compacted = compact(model, MaskSet(masks, fingerprint(model)))
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(compacted) < 0.8 * n_params(model)
    for layer in compacted.base_model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 2
        assert len(layer.output.adapter_fusion_layer) == 0
        assert isinstance(layer.output.active, Single)


def test_all_heads_pruned_layer_keeps_output_bias(models):
    _, model = models["bert-houlsby-static"]
    masks = {u.key: torch.zeros(u.shape, dtype=torch.bool) for u in iter_units(model)
             if u.kind == "heads" and ".layer.0." in u.key}
    from compressor.units import fingerprint
    compacted = compact(model, MaskSet(masks, fingerprint(model)))
    att = compacted.base_model.encoder.layer[0].attention
    assert att.self.num_attention_heads == 0 and att.output.dense.in_features == 0
    inputs = random_inputs("bert", 2, 5)
    assert (_output(compacted, inputs) - _output(masked_copy(model, MaskSet(masks, fingerprint(model))), inputs)
            ).abs().max() <= 1e-5


def test_folded_fusion_is_cheaper(models):
    """The rewritten fusion costs 2h^2 + O(nh) per token instead of (n+2)h^2 (AdapterHub's (2n+1)h^2 with V
    already applied once to the mix); in bottleneck space 4h(K + n) + O(nK) with the up projections included."""
    from compressor.compaction import _fold_fusion
    from compressor.flops import fusion_flops, site_cost
    _, model = models["bert-pfeiffer-dynamic-flex"]
    compacted = compact(model)
    hidden = model.base_model.config.hidden_size
    site, new_site = model.base_model.encoder.layer[0].output, compacted.base_model.encoder.layer[0].output
    fname, names = site.active.name, site.active.names
    n = len(names)
    assert fusion_flops(site.adapter_fusion_layer[fname], n, hidden) == 2 * hidden * hidden * (n + 2) + 4 * n * hidden
    folded, _ = _fold_fusion(site.adapter_fusion_layer[fname], n)
    assert fusion_flops(folded, n, hidden) == 4 * hidden * hidden + 4 * n * hidden
    assert not hasattr(folded, "key")
    fusion = new_site.adapter_fusion_layer[fname]
    assert fusion.bottleneck_space and not hasattr(fusion, "key") and not hasattr(fusion, "value")
    widths = [site.adapters[a].width for a in names]
    k = sum(widths)
    assert fusion.widths == widths
    assert fusion_flops(fusion, n, hidden) == 4 * hidden * (k + n) + 2 * k + 2 * k * n
    after = site_cost(new_site, hidden)
    assert after["adapter_flops"] == 2 * hidden * k  # the up projections are in the fusion's mix
    assert after["adapter_flops"] + after["fusion_flops"] < 2 * hidden * k + fusion_flops(folded, n, hidden) + 2 * hidden * k


def _forms(model) -> dict:
    return {(i, s): f.get("bottleneck_space", False) for i, layer in enumerate(model.compress_manifest["layers"])
            for s, site in layer["sites"].items() for f in site["fusions"].values()}


def test_bottleneck_space_only_where_cheaper(models, tmp_path):
    """Chosen per site by FLOPs as computed: layer 0's wide adapters (K = 3h/2) keep the folded form, layer 1's
    narrow ones go to bottleneck space; pruning layer 0's bottleneck to a third moves it there too. Exact,
    recorded in the manifest, reloaded as such."""
    from compressor.compaction import _bottleneck_is_cheaper, _fold_fusion
    from compressor.flops import total_cost
    model_type, model = models["bert-wide-first-layer"]
    compacted = compact(model)
    assert _forms(compacted) == {(0, "output_adapter"): False, (1, "output_adapter"): True}
    site = compacted.base_model.encoder.layer[0].output
    assert not site.adapter_fusion_layer[site.active.name].bottleneck_space
    inputs = random_inputs(model_type, 3, 9, "random", seed=5)
    assert (_output(compacted, inputs) - _output(model, inputs)).abs().max() <= 1e-5
    from compressor.compaction import folded_fusions_only
    with folded_fusions_only():  # the same compaction with today's folded form everywhere
        old = compact(model)
    assert not any(_forms(old).values())
    assert total_cost(compacted)["flops_per_token"] < total_cost(old)["flops_per_token"]
    reloaded = compressor.load_model(save_compacted(compacted, tmp_path / "c"))
    assert _forms(reloaded) == _forms(compacted)
    assert (_output(reloaded, inputs) - _output(compacted, inputs)).abs().max() == 0
    # a third of layer 0's bottleneck neurons: K = 15 < h, now cheaper in bottleneck space
    masks = {}
    for unit in iter_units(model):
        if unit.kind == "bottleneck" and ".layer.0." in unit.key:
            keep = torch.zeros(unit.size, dtype=torch.bool)
            keep[: unit.size // 3] = True
            masks[unit.key] = keep
    from compressor.units import fingerprint
    maskset = MaskSet(masks, fingerprint(model))
    pruned = compact(model, maskset)
    assert _forms(pruned) == {(0, "output_adapter"): True, (1, "output_adapter"): True}
    assert (_output(pruned, inputs) - _output(masked_copy(model, maskset), inputs)).abs().max() <= 1e-5
    site = model.base_model.encoder.layer[0].output
    folded, _ = _fold_fusion(site.adapter_fusion_layer[site.active.name], 3)
    assert not _bottleneck_is_cheaper(folded, [site.adapters[a] for a in site.active.names])


def test_bottleneck_space_manifest_is_checked(models, tmp_path):
    import json

    from compressor.errors import ModelLoadError
    from compressor.modeling.loading import MANIFEST_FILE
    _, model = models["bert-pfeiffer-dynamic-flex"]
    for value, field in (("yes", "bottleneck_space"), (True, "folded")):
        d = save_compacted(compact(model), tmp_path / f"c-{field}")
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        fusion = next(iter(manifest["layers"][0]["sites"]["output_adapter"]["fusions"].values()))
        assert fusion["bottleneck_space"] is True and fusion["folded"] is True
        fusion["bottleneck_space"] = value
        if field == "folded":
            fusion["folded"] = False
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(ModelLoadError, match=field):
            compressor.load_model(d)


def test_compacted_directory_reloads(models, tmp_path):
    model_type, model = models["roberta-pfeiffer-dynamic-classifier"]
    from compressor.pruning import prune
    maskset = prune(model, "random", dict(heads=0.5, neurons=0.5, adapters=0.5, bottleneck=0.5), seed=3)
    compacted = compact(model, maskset)
    save_compacted(compacted, tmp_path / "c")
    reloaded = compressor.load_model(tmp_path / "c")
    inputs = random_inputs(model_type, 3, 7, "left")
    assert (_output(reloaded, inputs) - _output(compacted, inputs)).abs().max() == 0
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "c").iterdir())


@pytest.mark.parametrize("name", ["bert-pfeiffer-dynamic-flex"])
def test_compacting_a_compacted_model_again_is_exact(models, name, tmp_path):
    """A compacted model (folded fusion) reloaded, pruned again and compacted again equals its masked form."""
    model_type, model = models[name]
    gen = torch.Generator().manual_seed(0)
    first = MaskSet.full(model, kinds=("heads", "bottleneck"))
    for mask in first.masks.values():
        mask[torch.randperm(mask.numel(), generator=gen)[: mask.numel() // 2]] = False
    reloaded = compressor.load_model(save_compacted(compact(model, first), tmp_path / "c1"))
    second = MaskSet.full(reloaded, kinds=("heads", "adapters"))
    for key, mask in second.masks.items():
        mask[0] = False if mask.numel() > 2 else True
    inputs = random_inputs(model_type, 2, 6)
    folded_only = compact(reloaded)
    assert (_output(folded_only, inputs) - _output(reloaded, inputs)).abs().max() <= 1e-5
    assert (_output(compact(reloaded, second), inputs) - _output(masked_copy(reloaded, second), inputs)
            ).abs().max() <= 1e-5


def test_compacted_adapterhub_cases_match_adapterhub(tmp_path):
    """The AdapterHub parity matrix (test_adapterhub_parity.py's references, one format per case), compacted
    (bottleneck-space fusions where cheaper), still gives what the `adapters` library gives (atol 1e-5)."""
    pytest.importorskip("adapters")
    import adapterhub_reference as ref

    store, chosen = ref.ReferenceStore(tmp_path), 0
    for case, fmt in ref.iter_case_formats(ref.CASES):
        if fmt != case.formats[0] or (case.head == "flex" and fmt.startswith("split")):
            continue
        spec = store.saved(case, fmt)
        model = compressor.load_model(spec["path"], adapters=spec["adapters"], fusion=spec["fusion"],
                                      setup=spec["setup"])
        compacted = compact(model)
        chosen += sum(_forms(compacted).values())
        for padding in ref.PADDINGS:
            with torch.no_grad():
                got = ref.output_of(compacted(**store.inputs(case, padding)), case)
            diff = ref.max_abs_diff(got, store.expected(case, padding))
            assert diff <= 1e-5, f"{case.id}/{fmt}/{padding}: {diff:.3g}"
    assert chosen > 0
