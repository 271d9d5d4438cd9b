"""The `compress` CLI on tiny models: inspect, prune, compact; user errors are one line, a non-zero exit, no
traceback (unless --debug) and no output left behind (docs/design.md invariant 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compressor
import compressor.api
import compressor.compaction
from compressor.cli import app
from compressor.errors import CompressorError, ModelLoadError
from compressor.io import OUTPUT_MARKER
from compressor.masks import META_FILE, TENSORS_FILE, MaskSet, masked_copy
from compressor.pruning import METHODS
from factories import make_model_dir, random_inputs

# typer's CliRunner keeps stdout and stderr apart (result.stdout / result.stderr); result.output has both.
runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("bert3") / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic")


@pytest.fixture(scope="module")
def flex_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("flex") / "model", "bert", "double_seq_bn", n_adapters=2,
                          fusion="dynamic", head="flex", seed=1)


@pytest.fixture(scope="module")
def other_masks(tmp_path_factory):
    """Masks made for another model (four fused adapters instead of three)."""
    root = tmp_path_factory.mktemp("other")
    other = make_model_dir(root / "model", "bert", "seq_bn", n_adapters=4, fusion="dynamic")
    result = invoke("prune", other, "--method", "random", "--sparsity", "heads=0.5", "--sparsity", "adapters=0.5",
                    "--out", root / "masks")
    assert result.exit_code == 0, result.output
    return root / "masks"


def no_partial_left(parent: Path):
    return not [p.name for p in parent.iterdir() if ".partial" in p.name]


def assert_user_error(result, *needles, out: Path = None):
    """Non-zero exit, exactly one line on stderr naming the problem, no traceback, no output written."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""
    if out is not None:
        assert not out.exists()
        assert no_partial_left(out.parent)
    return lines[0]


def output_of(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# ----------------------------------------------------------------------------------------------- happy paths

def test_inspect(model_dir):
    result = invoke("inspect", model_dir)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "setup a0,a1,a2" in result.stdout
    assert "total" in result.stdout
    assert "FLOPs per token" in result.stdout and "parameters" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith(("0 ", "1 "))]
    assert len(rows) == 2  # one row per layer


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_prune_writes_masks_and_summary(model_dir, tmp_path, method):
    out = tmp_path / "masks"
    result = invoke("prune", model_dir, "--method", method, "--sparsity", "heads=0.5", "--sparsity", "adapters=0.34",
                    "--sparsity", "bottleneck=0.5", "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([TENSORS_FILE, META_FILE, OUTPUT_MARKER])
    assert no_partial_left(tmp_path)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == method
    assert meta["params"]["sparsity"] == dict(heads=0.5, adapters=0.34, bottleneck=0.5)
    assert meta["params"]["seed"] == 3 and meta["params"]["min_keep"] == 1
    assert meta["counts"] == {"heads": {"kept": 4, "total": 8}, "adapters": {"kept": 4, "total": 6},
                              "bottleneck": {"kept": 6, "total": 12}}
    MaskSet.load(out).check(compressor.load_model(model_dir))
    for kind in ("heads", "adapters", "bottleneck"):
        assert kind in result.stdout
    assert "50.0%" in result.stdout and "33.3%" in result.stdout
    assert str(out / TENSORS_FILE) in result.stdout.replace("\n", "")


def test_prune_default_method_is_magnitude_and_allow_empty(model_dir, tmp_path):
    result = invoke("prune", model_dir, "--sparsity", "heads=0.75", "--allow-empty", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["method"] == "magnitude" and meta["params"]["min_keep"] == 0


def test_prune_same_seed_same_masks(model_dir, tmp_path):
    for name in ("a", "b"):
        result = invoke("prune", model_dir, "--method", "random", "--sparsity", "neurons=0.5", "--sparsity",
                        "weights=0.3", "--seed", 11, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    a, b = MaskSet.load(tmp_path / "a"), MaskSet.load(tmp_path / "b")
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("which", ["model_dir", "flex_dir"])
def test_compact_reloads_and_matches_masked_model(request, tmp_path, which):
    src = request.getfixturevalue(which)
    masks, out = tmp_path / "masks", tmp_path / "compact"
    result = invoke("prune", src, "--method", "random", "--sparsity", "heads=0.5", "--sparsity", "neurons=0.5",
                    "--sparsity", "adapters=0.5", "--sparsity", "bottleneck=0.5", "--seed", 1, "--out", masks)
    assert result.exit_code == 0, result.output
    result = invoke("compact", src, "--masks", masks, "--out", out)
    assert result.exit_code == 0, result.output
    assert {"config.json", "compress_manifest.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert no_partial_left(tmp_path)
    assert "compaction" in result.stdout and "parameters" in result.stdout and "FLOPs" in result.stdout
    assert f"wrote {out}" in result.stdout.replace("\n", "")

    original = compressor.load_model(src)
    maskset = MaskSet.load(masks)
    masked, compacted = masked_copy(original, maskset), compressor.load_model(out)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(compacted) < n_params(original)
    for layer in compacted.base_model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 2
    for padding, (batch, seq) in (("random", (3, 9)), ("left", (2, 5))):
        inputs = random_inputs("bert", batch, seq, padding, seed=seq)
        ref, got = output_of(masked, inputs), output_of(compacted, inputs)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5
        assert (output_of(original, inputs) - ref).abs().max().item() > 1e-4  # the masks did change something


def test_compact_without_masks_only_folds(model_dir, tmp_path):
    result = invoke("compact", model_dir, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    inputs = random_inputs("bert", 2, 7, "random")
    original, compacted = compressor.load_model(model_dir), compressor.load_model(tmp_path / "c")
    assert (output_of(original, inputs) - output_of(compacted, inputs)).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------- user errors

def _prune_args(model, out):
    return ("prune", model, "--sparsity", "heads=0.5", "--out", out)


def _compact_args(model, out):
    return ("compact", model, "--out", out)


def _without_weights(model_dir, tmp_path):
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text((model_dir / "config.json").read_text())
    return d


def _corrupt(model_dir, tmp_path, how):
    d = tmp_path / f"corrupt-{how}"
    d.mkdir()
    (d / "config.json").write_text((model_dir / "config.json").read_text())
    raw = (model_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"\x00garbage" * 100)
    return d


BAD_MODELS = {
    "missing": (lambda model_dir, tmp_path: tmp_path / "nowhere", "does not exist"),
    "no-weights": (_without_weights, "no model weights"),
    "truncated": (lambda m, t: _corrupt(m, t, "truncated"), "cannot read weights"),
    "garbage": (lambda m, t: _corrupt(m, t, "garbage"), "cannot read weights"),
    "phm_layer": (lambda m, t: make_model_dir(t / "phm", adapter_overrides=dict(phm_layer=True)), "phm_layer"),
    "is_parallel": (lambda m, t: make_model_dir(t / "par", adapter_overrides=dict(is_parallel=True)), "is_parallel"),
    "unknown-option": (lambda m, t: make_model_dir(t / "unk", adapter_overrides=dict(frobnicate=2)), "frobnicate"),
}


@pytest.mark.parametrize("command", [_prune_args, _compact_args], ids=["prune", "compact"])
@pytest.mark.parametrize("bad", list(BAD_MODELS))
def test_bad_model(model_dir, tmp_path, bad, command):
    make, needle = BAD_MODELS[bad]
    path = make(model_dir, tmp_path)
    out = tmp_path / "out"
    line = assert_user_error(invoke(*command(path, out)), needle, out=out)
    if bad in ("missing", "no-weights", "truncated", "garbage"):
        assert str(path) in line


def _edit_config(model_dir, tmp_path, edit):
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(model_dir, d)
    raw = json.loads((d / "config.json").read_text())
    raw = edit(raw) or raw
    (d / "config.json").write_text(json.dumps(raw))
    return d


@pytest.mark.parametrize("edit, needle", [
    pytest.param(lambda c: c["adapters"]["config_map"]["cfg"].update(reduction_factor=32), "adapter config implies",
                 id="weights-do-not-match-config"),
    pytest.param(lambda c: [c], "config.json", id="config-not-an-object"),
    pytest.param(lambda c: dict(c, model_type="nonexistent"), "nonexistent", id="unknown-model-type"),
    pytest.param(lambda c: c["adapters"]["config_map"]["cfg"].update(reduction_factor=0), "reduction_factor",
                 id="reduction-factor-zero"),
    pytest.param(lambda c: c["adapters"]["fusion_name_map"].update({"a0,a1,a2": ["a0", "zz"]}), "zz",
                 id="fusion-of-unknown-adapter"),
])
def test_malformed_config(model_dir, tmp_path, edit, needle):
    path = _edit_config(model_dir, tmp_path, edit)
    assert_user_error(invoke("inspect", path), needle)


def test_bad_model_inspect(model_dir, tmp_path):
    assert_user_error(invoke("inspect", _corrupt(model_dir, tmp_path, "truncated")), "cannot read weights")
    assert_user_error(invoke("inspect", tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("sparsity, needles", [
    (["heads=1.0"], ["heads=1.0", "[0, 1)"]),
    (["heads=-0.1"], ["heads=-0.1", "[0, 1)"]),
    (["heads=0.5", "neurons=1"], ["neurons=1", "[0, 1)"]),
    (["layers=0.5"], ["unknown unit kind 'layers'", "heads", "adapters"]),
    (["heads"], ["KIND=FRACTION"]),
    (["heads=lots"], ["not a number"]),
])
def test_bad_sparsity(model_dir, tmp_path, sparsity, needles):
    args = ["prune", model_dir, "--out", tmp_path / "out"]
    for item in sparsity:
        args += ["--sparsity", item]
    assert_user_error(invoke(*args), *needles, out=tmp_path / "out")


def test_missing_sparsity_is_a_usage_error(model_dir, tmp_path):
    result = invoke("prune", model_dir, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--sparsity" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_method_lists_methods(model_dir, tmp_path):
    line = assert_user_error(invoke("prune", model_dir, "--method", "movement", "--sparsity", "heads=0.5",
                                    "--out", tmp_path / "out"), "movement", out=tmp_path / "out")
    for name in METHODS:
        assert name in line


@pytest.mark.parametrize("command", ["prune", "compact"])
def test_existing_out_needs_overwrite(model_dir, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = _prune_args(model_dir, out) if command == "prune" else _compact_args(model_dir, out)
    line = assert_user_error(invoke(*args), "already exists", "--overwrite")
    assert str(out) in line
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    # --overwrite replaces only an earlier output of ours (compressor.io's marker), never a foreign directory
    assert_user_error(invoke(*args, "--overwrite"), "not written by compress")
    assert (out / "keep.txt").read_text() == "mine"
    (out / OUTPUT_MARKER).write_text("{}")
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / ("masks.json" if command == "prune" else "model.safetensors")).is_file()
    assert no_partial_left(tmp_path)


def test_masks_for_another_model(model_dir, tmp_path, other_masks):
    out = tmp_path / "out"
    assert_user_error(invoke("compact", model_dir, "--masks", other_masks, "--out", out), "another model", out=out)


def test_masks_for_another_setup(model_dir, tmp_path):
    masks, out = tmp_path / "masks", tmp_path / "out"
    result = invoke("prune", model_dir, "--setup", "a1", "--sparsity", "heads=0.5", "--out", masks)
    assert result.exit_code == 0, result.output
    assert_user_error(invoke("compact", model_dir, "--masks", masks, "--out", out), "made for", out=out)
    result = invoke("compact", model_dir, "--setup", "a1", "--masks", masks, "--out", out)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["missing-json", "truncated", "not-a-dir"])
def test_bad_mask_dir(model_dir, tmp_path, damage):
    masks, out = tmp_path / "masks", tmp_path / "out"
    assert invoke(*_prune_args(model_dir, masks)).exit_code == 0
    if damage == "missing-json":
        (masks / META_FILE).unlink()
        needle = "masks.json"
    elif damage == "truncated":
        raw = (masks / TENSORS_FILE).read_bytes()
        (masks / TENSORS_FILE).write_bytes(raw[: len(raw) - 3])
        needle = "masks.safetensors"
    else:
        masks = tmp_path / "nowhere"
        needle = "nowhere"
    assert_user_error(invoke("compact", model_dir, "--masks", masks, "--out", out), needle, out=out)


def test_unknown_setup(model_dir, tmp_path):
    assert_user_error(invoke(*_prune_args(model_dir, tmp_path / "out"), "--setup", "zz"), "'zz'", "a0,a1,a2",
                      out=tmp_path / "out")


@pytest.mark.parametrize("name", ["run[x]", "run[/]b"])
def test_error_message_keeps_brackets(tmp_path, name):
    missing = tmp_path / name / "model"
    assert_user_error(invoke("inspect", missing), str(missing))


# ----------------------------------------------------------------------------------------------- nothing half-written

def _fail_after_writing(monkeypatch, exc):
    calls = []
    real = compressor.compaction.write_compacted

    def failing(model, directory, tokenizer_dir=None):
        calls.append(Path(directory))
        real(model, directory, tokenizer_dir)
        assert (Path(directory) / "model.safetensors").is_file()
        raise exc

    # api.py imports the function by name: patch it where it is looked up (and at its home, in case that changes)
    monkeypatch.setattr(compressor.api, "write_compacted", failing)
    monkeypatch.setattr(compressor.compaction, "write_compacted", failing)
    return calls


def test_failure_while_writing_compacted_model_leaves_nothing(model_dir, tmp_path, monkeypatch):
    calls = _fail_after_writing(monkeypatch, RuntimeError("disk went away"))
    out = tmp_path / "out"
    result = invoke("compact", model_dir, "--out", out)
    assert calls, "the failing writer was not used"
    assert result.exit_code != 0
    assert isinstance(result.exception, RuntimeError)  # not one of ours: a bug shows, nothing is written
    assert not out.exists() and not calls[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_typed_failure_while_writing_is_one_line(model_dir, tmp_path, monkeypatch):
    calls = _fail_after_writing(monkeypatch, ModelLoadError("simulated failure"))
    out = tmp_path / "out"
    assert_user_error(invoke("compact", model_dir, "--out", out), "simulated failure", out=out)
    assert calls and not calls[0].exists()


def test_interrupt_while_writing_leaves_nothing(model_dir, tmp_path, monkeypatch):
    _fail_after_writing(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    result = invoke("compact", model_dir, "--out", out)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert not out.exists() and no_partial_left(tmp_path)


def test_sigterm_while_writing_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import signal

    from compressor.io import Interrupted

    _fail_after_writing(monkeypatch, Interrupted(signal.SIGTERM))
    out = tmp_path / "out"
    result = invoke("compact", model_dir, "--out", out)
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.stderr.strip() == "interrupted (SIGTERM): nothing was written"
    assert not out.exists() and no_partial_left(tmp_path)


def test_overwrite_failure_keeps_the_old_output(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("compact", model_dir, "--out", out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    _fail_after_writing(monkeypatch, RuntimeError("disk went away"))
    assert invoke("compact", model_dir, "--out", out, "--overwrite").exit_code != 0
    assert (out / "model.safetensors").read_bytes() == before
    assert no_partial_left(tmp_path)


def test_failure_while_writing_masks_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def broken_save(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    out = tmp_path / "out"
    result = invoke(*_prune_args(model_dir, out))
    assert calls and result.exit_code != 0
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- --debug

def test_debug_lets_the_exception_through(tmp_path):
    result = invoke("--debug", "prune", tmp_path / "nowhere", "--sparsity", "heads=0.5", "--out", tmp_path / "o")
    assert isinstance(result.exception, ModelLoadError)
    assert result.exit_code != 0
    with pytest.raises(CompressorError, match="does not exist"):
        invoke("--debug", "inspect", tmp_path / "nowhere", catch_exceptions=False)


def test_real_process_error_output(tmp_path):
    """The installed entry point: one line without --debug, the traceback with it."""
    base = [sys.executable, "-m", "compressor.cli"]
    args = ["prune", str(tmp_path / "nowhere"), "--sparsity", "heads=0.5", "--out", str(tmp_path / "o")]
    env = dict(os.environ, COLUMNS="200")
    procs = [subprocess.Popen(base + flags + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for flags in ([], ["--debug"])]
    (plain_out, plain_err), (debug_out, debug_err) = (p.communicate(timeout=120) for p in procs)
    plain_rc, debug_rc = (p.returncode for p in procs)
    assert plain_rc == 2
    lines = plain_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model directory {tmp_path / 'nowhere'} does not exist")
    assert plain_out == ""
    assert debug_rc != 0
    assert "Traceback" in debug_err and "ModelLoadError" in debug_err and "does not exist" in debug_err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- --help and options

def _help(*command):
    result = invoke(*command, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [(), ("inspect",), ("prune",), ("compact",), ("export",), ("train",), ("eval",),
                                     ("bench",), ("demo",)])
def test_help_fits_80_columns(command):
    text = _help(*command)
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long


def test_prune_help_puts_each_method_beside_its_description():
    from compressor.cli import method_description

    lines = [line.strip() for line in _help("prune").splitlines()]
    for name, cls in METHODS.items():
        head = f"{name}{' (needs --data)' if cls.needs_data else ''}: "
        found = [line for line in lines if line.startswith(head)]
        assert len(found) == 1, (name, found)
        words = method_description(name, cls).split()[:2]  # the description starts on the method's line
        assert found[0][len(head):].split()[:len(words)] == words, (name, found[0])
    assert "--tokenizer" in " ".join(lines)


def test_bench_threads_must_be_positive(tmp_path):
    """D12: --threads 0 used to mean every core, silently."""
    result = invoke("bench", tmp_path, "--threads", 0, "--out", tmp_path / "bench")
    assert result.exit_code == 2 and "--threads" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "bench").exists()
    from compressor import BenchRequest, bench

    with pytest.raises(CompressorError, match="--threads must be >= 1"):
        bench(BenchRequest(targets=[tmp_path], threads=0, out=tmp_path / "bench"))
