"""`compress bench` / exporters.bench on a tiny compacted BERT with an ONNX file exported here: the report files and
their schema, skipped providers and targets, the PyTorch path, and user errors (one line, non-zero exit, nothing
written)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.compaction import compact, write_compacted
from compressor.errors import CompressorError
from compressor.io import OUTPUT_MARKER
import exporters.bench as bench_module
from exporters.bench import (NO_TORCH_FOR_ONNX, NOT_ONNX, BenchConfig, measure, measure_interleaved, parse_ints,
                             placement_from_profile, report_path, round_ratios, run_bench, spread)
from exporters.bench_report import busy_reasons, unsteady_reasons
from factories import make_model_dir

runner = CliRunner()
FAST = ("--batch-sizes", "1,2", "--seq-lens", "8,16", "--min-time", "0.01", "--warmup", "1", "--threads", "1")
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
RESULT_FIELDS = {"target", "provider", "batch_size", "seq_len", "status", "reason"}
STAT_FIELDS = {"repeats", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "seq_per_s", "speedup_p50",
               "rounds", "speedup_rounds"}
TIMING_FIELDS = {"order", "rounds_target", "load_average_before", "load_average_after", "other_cpu_cores", "timed_s",
                 "cpu_count"}
TARGET_FIELDS = {"name", "kind", "path", "onnx", "size_bytes", "parameters", "flops_per_token", "placement"}
MACHINE_FIELDS = {"platform", "processor", "cpu_count", "python", "torch", "onnxruntime", "onnx", "transformers",
                  "ort_available_providers", "threads"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def fast_config(**kw):
    return BenchConfig(**dict(dict(providers=["cpu"], batch_sizes=[1, 2], seq_lens=[8, 16], threads=1, warmup=1,
                                   min_time_s=0.01, min_repeats=3), **kw))


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """model: an AdapterHub-format model dir; export: compacted model + model.onnx, as `compress export` lays out."""
    root = tmp_path_factory.mktemp("bench")
    model_dir = make_model_dir(root / "model", "bert", "seq_bn", 2, "dynamic", head="classifier")
    compacted = compact(compressor.load_model(model_dir))
    export = root / "export"
    export.mkdir()
    write_compacted(compacted, export)
    ids = torch.randint(5, 100, (2, 8))
    # .eval() on the wrapper: the exporter restores the wrapper's training flag onto the whole model afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the adapter modules' mask checks
        torch.onnx.export(Logits(compacted).eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(export / "model.onnx"), dynamo=False, opset_version=17, input_names=INPUTS,
                          output_names=["logits"], dynamic_axes={**{k: {0: "batch", 1: "seq"} for k in INPUTS},
                                                                 "logits": {0: "batch"}})
    return dict(root=root, model=model_dir, export=export, onnx=export / "model.onnx")


def cells(report, target=None, provider=None):
    return [c for c in report["results"] if (target is None or c["target"] == target)
            and (provider is None or c["provider"] == provider)]


def no_partial_left(parent: Path):
    return not [p.name for p in parent.iterdir() if ".partial" in p.name]


# ----------------------------------------------------------------------------------------------- happy paths

def test_report_files_and_schema(dirs, tmp_path):
    out = tmp_path / "report"
    report = run_bench([dirs["export"], dirs["onnx"]], fast_config(), out)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "latency.png", "report.json", "report.md"]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == report

    assert report["format"] == "adapter-compressor-bench" and report["version"] == 1
    assert report["config"]["batch_sizes"] == [1, 2] and report["config"]["seq_lens"] == [8, 16]
    assert MACHINE_FIELDS <= set(report["machine"]) and report["machine"]["threads"] == 1
    assert report["providers"] == {"cpu": "CPUExecutionProvider"}
    assert TIMING_FIELDS <= set(report["timing"]) and report["timing"]["order"] == "interleaved"

    export, onnx_file = report["targets"]
    assert TARGET_FIELDS <= set(export) and export["kind"] == "export" and onnx_file["kind"] == "onnx"
    # the test runs outside the fixture's directory: names only, never a machine path
    assert (export["path"], export["onnx"], onnx_file["path"]) == ("export", "model.onnx", "model.onnx")
    assert export["name"] == "export" and onnx_file["name"] == "export/model.onnx"
    for t in (export, onnx_file):
        assert t["size_bytes"] == dirs["onnx"].stat().st_size
        assert 0 < t["parameters"] < 2 * sum(p.numel() for p in compressor.load_model(dirs["export"]).parameters())
        # FLOPs from the compacted PyTorch model (for the bare file: the manifest beside it)
        assert set(t["flops_per_token"]) == {"8", "16"} and t["flops_per_token"]["16"] > t["flops_per_token"]["8"] > 0
        placement = t["placement"]["cpu"]
        assert placement["nodes"]["CPUExecutionProvider"] > 0 and placement["cpu_fallback_ops"] == {}

    assert len(report["results"]) == 2 * 4
    for c in report["results"]:
        assert RESULT_FIELDS | STAT_FIELDS <= set(c) and c["status"] == "ok" and c["reason"] is None
        assert 0 < c["min_ms"] <= c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"] and c["std_ms"] >= 0
        assert c["repeats"] >= 3
        assert c["seq_per_s"] == pytest.approx(c["batch_size"] / (c["mean_ms"] / 1e3))
        assert c["speedup_p50"] > 0
        spread_ = c["speedup_rounds"]
        assert spread_["rounds"] == c["rounds"] >= 1 and spread_["min"] <= spread_["q1"] <= spread_["median"] \
            <= spread_["q3"] <= spread_["max"]
    assert all(c["speedup_p50"] == 1.0 and c["speedup_rounds"]["max"] == 1.0 for c in cells(report, "export"))
    # both targets of a shape ran the same rounds (they were timed in turn)
    for b, s in ((1, 8), (1, 16), (2, 8), (2, 16)):
        assert len({c["rounds"] for c in report["results"] if (c["batch_size"], c["seq_len"]) == (b, s)}) == 1

    md = (out / "report.md").read_text()
    for needle in ("## Targets", "## cpu (CPUExecutionProvider)", "speedup p50", "FLOPs/token (seq 16)",
                   "## Node placement", "## Machine", "| export/model.onnx | 2 | 16 |", "timed in turn",
                   "## Load while timing", "per-round min–max"):
        assert needle in md, needle
    text = (out / "report.json").read_text() + md
    assert str(dirs["root"]) not in text and str(tmp_path) not in text and '"/' not in text


def test_report_paths_relative_to_the_working_directory(dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(dirs["root"])
    report = run_bench([Path("export"), dirs["onnx"]], fast_config(batch_sizes=[1], seq_lens=[8]), tmp_path / "r")
    export, onnx_file = report["targets"]
    assert (export["path"], export["onnx"]) == ("export", "export/model.onnx")
    assert (onnx_file["path"], onnx_file["onnx"]) == ("export/model.onnx", "export/model.onnx")
    assert report["paths"].startswith("relative to the working directory")
    assert report_path(dirs["root"]) == "." and report_path("/definitely/elsewhere/x.onnx") == "x.onnx"
    assert report_path(dirs["onnx"], base=dirs["export"]) == "model.onnx"


def test_torch_provider_and_skipped_targets(dirs, tmp_path):
    """Model dir: PyTorch only. Export dir: both. Bare .onnx: ORT only. Skips carry their reason."""
    report = run_bench([dirs["model"], dirs["export"], dirs["onnx"]],
                       fast_config(providers=["cpu,torch"], batch_sizes=[2], seq_lens=[8]), tmp_path / "r")
    by = {(c["target"], c["provider"]): c for c in report["results"]}
    assert by[("model", "torch")]["status"] == "ok" and by[("export", "torch")]["status"] == "ok"
    assert by[("export", "cpu")]["status"] == "ok" and by[("export/model.onnx", "cpu")]["status"] == "ok"
    assert by[("model", "cpu")]["status"] == "skipped" and by[("model", "cpu")]["reason"] == NOT_ONNX
    assert by[("export/model.onnx", "torch")]["status"] == "skipped"
    assert by[("export/model.onnx", "torch")]["reason"] == NO_TORCH_FOR_ONNX
    assert by[("model", "torch")]["speedup_p50"] == 1.0
    assert by[("export", "cpu")]["speedup_p50"] is None  # the first target has no cpu measurement to compare with
    model = report["targets"][0]
    assert model["kind"] == "model" and model["onnx"] is None and model["placement"] == {}
    assert model["parameters"] == sum(p.numel() for p in compressor.load_model(dirs["model"]).parameters())
    assert model["size_bytes"] == (dirs["model"] / "model.safetensors").stat().st_size
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## torch (PyTorch (CPU))" in md and NOT_ONNX in md and NO_TORCH_FOR_ONNX in md


def test_run_bench_interleaves_targets_per_shape(dirs, tmp_path, monkeypatch):
    """The order of runs, never a time: for each provider x shape, every target's runner exists before any is
    timed, then the targets alternate A, B, C, A, B, C, ... (each slice after one re-warm run)."""
    events = []
    make_runner = bench_module._Provider.runner

    def recording(self, t, batch, seq):
        run = make_runner(self, t, batch, seq)
        key = (self.provider, batch, seq)
        events.append((key, "made", t.name))

        def wrapped():
            events.append((key, "run", t.name))
            run()
        return wrapped

    monkeypatch.setattr(bench_module._Provider, "runner", recording)
    run_bench([dirs["export"], dirs["onnx"], dirs["model"]],
              fast_config(providers=["cpu,torch"], batch_sizes=[1, 2], seq_lens=[8], warmup=1, min_repeats=4),
              tmp_path / "r")
    groups = [(key, list(group)) for key, group in itertools.groupby(events, key=lambda e: e[0])]
    # one group per provider x shape, in that order: no target is timed alone across shapes
    assert [key for key, _ in groups] == [("cpu", 1, 8), ("cpu", 2, 8), ("torch", 1, 8), ("torch", 2, 8)]
    for (provider, _, _), group in groups:
        expected = ["export", "export/model.onnx"] if provider == "cpu" else ["export", "model"]
        kinds = [kind for _, kind, _ in group]
        assert kinds == ["made"] * 2 + ["run"] * (len(kinds) - 2)  # every runner exists before any run
        assert [name for _, kind, name in group if kind == "made"] == expected
        runs = [name for _, kind, name in group if kind == "run"]
        assert runs[:2] == expected  # warm-up (warmup=1), in target order
        timed = runs[2:]
        # collapse consecutive runs of one target (a re-warm run + its slice): A, B, A, B, ... and whole rounds
        slices = [name for k, name in enumerate(timed) if k == 0 or timed[k - 1] != name]
        assert len(slices) >= 4 and slices == expected * (len(slices) // 2)


def test_measure_interleaved_order_and_failures():
    order = []

    def runner(name, fail_at=None):
        def run():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise MemoryError("out of memory")
        return run

    stats = measure_interleaved({"A": runner("A"), "B": runner("B"), "C": runner("C")}, warmup=1, min_time_s=0,
                                min_repeats=3, rounds=5)
    # warm-up once each, then per round: one re-warm run + a one-run slice (min_time 0) per target, in turn
    assert order == ["A", "B", "C"] + ["A", "A", "B", "B", "C", "C"] * 3
    assert all(s["repeats"] == 3 and len(s["slices"]) == 3 for s in stats.values())

    order.clear()
    failed = {}
    stats = measure_interleaved({"A": runner("A"), "B": runner("B", fail_at=4)}, warmup=0, min_time_s=0,
                                min_repeats=3, failed=failed)
    assert set(stats) == {"A"} and isinstance(failed["B"], MemoryError) and stats["A"]["repeats"] == 3
    assert order == ["A", "A", "B", "B", "A", "A", "B", "B", "A", "A"]  # B dropped after its failing run

    order.clear()
    single = measure_interleaved({"A": runner("A")}, warmup=2, min_time_s=0, min_repeats=3)
    assert order == ["A"] * 5 and single["A"]["repeats"] == 3  # alone: no re-warm runs


def test_round_ratios_and_spread():
    ratios = round_ratios([[2.0, 2.2, 1.8], [4.0], [2.0]], [[1.0, 1.1, 0.9], [1.0], [2.0]])
    assert ratios == [2.0, 4.0, 1.0]
    got = spread(ratios)
    assert got == dict(median=2.0, q1=1.5, q3=3.0, min=1.0, max=4.0, rounds=3)
    assert spread([]) is None


def test_busy_rule():
    def report(other=None, load=0.1, iqr=(1.45, 1.55)):
        r = dict(median=1.5, q1=iqr[0], q3=iqr[1], min=1.4, max=1.6, rounds=8)
        return dict(machine=dict(cpu_count=2, load_average=[load, 0, 0]),
                    timing=dict(other_cpu_cores=other, load_average_before=load, cpu_count=2),
                    results=[dict(target="pruned", provider="cpu", batch_size=8, seq_len=128, status="ok",
                                  speedup_rounds=r)])
    assert busy_reasons(report(other=0.05)) == []
    assert "other processes kept 0.90 of 2 cores" in busy_reasons(report(other=0.9))[0]
    assert busy_reasons(report(other=None, load=0.5)) == []  # no /proc/stat: the load average decides
    assert "load average 1.70" in busy_reasons(report(other=None, load=1.7))[0]
    assert unsteady_reasons(report(other=0.0)) == []
    # a wide per-round spread on a quiet machine is an unsteady speedup, not a busy machine
    assert busy_reasons(report(other=0.0, iqr=(1.2, 1.6))) == []
    wide = unsteady_reasons(report(other=0.0, iqr=(1.2, 1.6)))
    assert len(wide) == 1 and "pruned cpu b8x128: 1.50x, IQR 1.20–1.60" in wide[0]


def test_torch_cuda_missing_is_skipped_and_device_options(dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the skip path is not reachable")
    report = run_bench([dirs["model"]], fast_config(providers=["torch"], batch_sizes=[1], seq_lens=[8],
                                                    device="cuda", dtype="fp16"), tmp_path / "r")
    (cell,) = report["results"]
    assert cell["status"] == "skipped" and "PyTorch device cuda is not available here" in cell["reason"]
    assert report["providers"] == {"torch": "PyTorch (CUDA, fp16)"}
    with pytest.raises(CompressorError, match="apply to the torch provider only"):
        BenchConfig(providers=["cpu"], device="cuda")
    with pytest.raises(CompressorError, match="unknown dtype 'fp8'"):
        BenchConfig(providers=["torch"], dtype="fp8")


def test_torch_bf16_on_cpu(dirs, tmp_path):
    report = run_bench([dirs["model"]], fast_config(providers=["torch"], batch_sizes=[2], seq_lens=[8],
                                                    dtype="bf16"), tmp_path / "r")
    assert report["results"][0]["status"] == "ok", report["results"][0]["reason"]
    assert report["providers"] == {"torch": "PyTorch (CPU, bf16)"}


def test_torch_threads_restored(dirs, tmp_path):
    before = torch.get_num_threads()
    run_bench([dirs["model"]], fast_config(providers=["torch"], batch_sizes=[1], seq_lens=[8],
                                           threads=max(1, before - 1) if before > 1 else 2), tmp_path / "r")
    assert torch.get_num_threads() == before


def test_cli_unavailable_provider_is_skipped(dirs, tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", dirs["export"], "--provider", "cpu", "--provider", "cuda", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cuda = cells(report, provider="cuda")
    assert len(cuda) == 4 and all(c["status"] == "skipped" and "not available" in c["reason"] for c in cuda)
    assert all(c["status"] == "ok" for c in cells(report, provider="cpu"))
    assert "cuda" not in report["targets"][0]["placement"]
    assert "skipped: export on cuda (all shapes)" in result.stdout.replace("\n", " ")
    assert f"{out}/report.json" in result.stdout.replace("\n", "")
    assert "No cell ran on this provider" in (out / "report.md").read_text()


def test_cli_only_unavailable_provider_still_writes_report(dirs, tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", dirs["onnx"], "--provider", "tensorrt", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {OUTPUT_MARKER, "report.json", "report.md", "latency.png"}
    assert all(c["status"] == "skipped" for c in json.loads((out / "report.json").read_text())["results"])


def test_cli_overwrite_replaces_an_earlier_report(dirs, tmp_path):
    out = tmp_path / "bench"
    assert invoke("bench", dirs["onnx"], *FAST, "--out", out).exit_code == 0
    (out / "stale.txt").write_text("old")
    result = invoke("bench", dirs["onnx"], *FAST, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()


def test_cli_failed_cell_is_recorded_and_exits_non_zero(dirs, tmp_path):
    """A bare .onnx file (no config beside it to check against) at a sequence longer than its positions: that cell
    fails, the others run, the report says why, and the exit status is non-zero."""
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(dirs["onnx"], lone / "model.onnx")
    out = tmp_path / "bench"
    result = invoke("bench", lone / "model.onnx", "--batch-sizes", "1", "--seq-lens", "8,80", "--min-time", "0.01",
                    "--threads", "1", "--out", out)
    assert result.exit_code == 1, result.output
    assert "1 of 2 cells failed" in result.stderr
    report = json.loads((out / "report.json").read_text())
    ok, failed = report["results"]
    assert ok["status"] == "ok" and failed["status"] == "failed" and failed["seq_len"] == 80 and failed["reason"]
    assert report["targets"][0]["flops_per_token"] is None  # no PyTorch model beside the file
    assert "| failed |" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- units

def test_config_parsing():
    config = BenchConfig(providers=["cpu,torch", "CPU", "cuda"], batch_sizes="1, 8,1", seq_lens=[32, "128"])
    assert config.providers == ["cpu", "torch", "cuda"]
    assert config.batch_sizes == [1, 8] and config.seq_lens == [32, 128]
    assert config.shapes == [(1, 32), (1, 128), (8, 32), (8, 128)]
    for bad in ("0", "x", ",", "-4"):
        with pytest.raises(CompressorError):
            parse_ints(bad, "batch size")
    with pytest.raises(CompressorError, match="unknown provider"):
        BenchConfig(providers=["gpu"])


def test_measure_reaches_min_repeats_and_min_time():
    calls = []
    stats = measure(lambda: calls.append(1), warmup=2, min_time_s=0.02, min_repeats=5)
    assert stats["repeats"] >= 5 and len(calls) == stats["repeats"] + 2
    slow = measure(lambda: __import__("time").sleep(0.005), warmup=0, min_time_s=0.03, min_repeats=1)
    assert slow["repeats"] * slow["mean_ms"] >= 30 * 0.9 and slow["p50_ms"] >= 4


def test_placement_from_profile_lists_cpu_fallbacks():
    def node(name, provider, op, suffix="_kernel_time"):
        return dict(cat="Node", name=name + suffix, args=dict(provider=provider, op_name=op))
    events = [dict(cat="Session", name="model_run", args={}),
              node("a", "CUDAExecutionProvider", "MatMul"), node("b", "CPUExecutionProvider", "Shape"),
              node("b", "CPUExecutionProvider", "Shape"),  # a second run of the same node counts once
              node("c", "CPUExecutionProvider", "Shape"), node("d", "CPUExecutionProvider", "NonZero"),
              dict(cat="Node", name="a_fence_before", args={})]
    got = placement_from_profile(events, "CUDAExecutionProvider")
    assert got["nodes"] == {"CPUExecutionProvider": 3, "CUDAExecutionProvider": 1}
    assert got["cpu_fallback_ops"] == {"NonZero": 1, "Shape": 2}
    assert placement_from_profile(events, "CPUExecutionProvider")["cpu_fallback_ops"] == {}


# ----------------------------------------------------------------------------------------------- user errors

def _not_onnx(dirs, tmp):
    return dirs["export"] / "config.json"


def _garbage_onnx(dirs, tmp):
    (tmp / "bad.onnx").write_bytes(b"\x00not a protobuf\xff" * 50)
    return tmp / "bad.onnx"


def _empty_onnx(dirs, tmp):
    (tmp / "empty.onnx").write_bytes(b"")
    return tmp / "empty.onnx"


def _no_weights(dirs, tmp):
    (tmp / "half").mkdir()
    (tmp / "half" / "config.json").write_text((dirs["model"] / "config.json").read_text())
    return tmp / "half"


BAD_TARGETS = {
    "non-onnx-file": (_not_onnx, "is not an ONNX file"),
    "garbage-onnx": (_garbage_onnx, "is not an ONNX model"),
    "empty-onnx": (_empty_onnx, "is not an ONNX model"),
    "no-weights-dir": (_no_weights, "neither an export directory"),
    "missing": (lambda dirs, tmp: tmp / "nowhere", "does not exist"),
}


def assert_user_error(result, needle, out: Path):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout.strip() == ""
    assert not out.exists() and no_partial_left(out.parent)


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_cli_bad_target(dirs, tmp_path, case):
    make, needle = BAD_TARGETS[case]
    out = tmp_path / "bench"
    assert_user_error(invoke("bench", dirs["export"], make(dirs, tmp_path), *FAST, "--out", out), needle, out)


@pytest.mark.parametrize("args, needle", [
    (("--provider", "gpu"), "unknown provider 'gpu'"),
    (("--batch-sizes", "1,x"), "batch size 'x' is not an integer"),
    (("--seq-lens", "4096"), "sequence length 4096 is longer than export allows (64 positions)"),
])
def test_cli_bad_options(dirs, tmp_path, args, needle):
    out = tmp_path / "bench"
    base = dict(zip(FAST[::2], FAST[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for kv in base.items() for x in kv]
    assert_user_error(invoke("bench", dirs["export"], *flat, "--out", out), needle, out)


def test_cli_existing_output_refused(dirs, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("bench", dirs["onnx"], *FAST, "--out", out)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert no_partial_left(tmp_path)
