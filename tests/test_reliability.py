"""Issue 12's bad-input defects D1-D12: each test reproduces one. A user error is one line on stderr, a non-zero
exit, no traceback and nothing left behind; `--overwrite` replaces only an earlier output of ours."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.io import OUTPUT_MARKER
from compressor.masks import META_FILE, MaskSet
from compressor.modeling import load_model
from factories import make_model_dir
from task_factories import signal_data_args, with_tokenizer, write_signal_tsv

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles):
    """Non-zero exit, exactly one `error:` line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output and result.stdout.strip() == ""
    return lines[0]


def no_partial(parent: Path) -> bool:
    return not [p.name for p in Path(parent).iterdir() if ".partial" in p.name]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def model_dir(root):
    return with_tokenizer(make_model_dir(root / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic"))


@pytest.fixture(scope="module")
def flex_dir(root):
    return with_tokenizer(make_model_dir(root / "flex", "bert", "seq_bn", n_adapters=2, fusion="dynamic",
                                         head="flex", seed=1))


@pytest.fixture(scope="module")
def data_file(root):
    return write_signal_tsv(root / "signal.tsv", n_train=40, n_dev=12)


data_args = signal_data_args


@pytest.fixture(scope="module")
def compacted(root, model_dir):
    out = root / "compacted"
    ok(invoke("compact", model_dir, "--out", out))
    return out


# ----------------------------------------------------------------------------------------------- D1: --overwrite

def user_files(directory: Path) -> dict:
    (directory / "notes.txt").write_text("mine")
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "data.csv").write_text("a,b\n")
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("out", [".", ".."])
def test_d1_overwrite_never_removes_the_working_directory_or_an_ancestor(model_dir, tmp_path, monkeypatch, out):
    work = tmp_path / "d"
    work.mkdir()
    before_work, before_parent = user_files(work), sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(work)
    one_line_error(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", out, "--overwrite"),
                   "working directory")
    assert {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file()} == before_work
    assert sorted(p.name for p in tmp_path.iterdir()) == before_parent


def test_d1_overwrite_refuses_a_directory_that_is_not_ours(model_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    before = user_files(mine)
    one_line_error(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", mine, "--overwrite"),
                   OUTPUT_MARKER)
    assert {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_d1_overwrite_refuses_an_input_even_when_it_is_ours(compacted, tmp_path):
    one_line_error(invoke("compact", compacted, "--out", compacted, "--overwrite"), "input")
    assert load_model(compacted) is not None  # still there, still loads


def test_d1_overwrite_replaces_an_earlier_output_of_ours(model_dir, tmp_path):
    out = tmp_path / "masks"
    ok(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", out))
    assert (out / OUTPUT_MARKER).is_file()
    ok(invoke("prune", model_dir, "--sparsity", "heads=0.25", "--out", out, "--overwrite"))
    assert json.loads((out / META_FILE).read_text())["params"]["sparsity"] == {"heads": 0.25}
    assert no_partial(tmp_path)


# ----------------------------------------------------------------------------------------------- D2: signals

def _wait_for(predicate, proc, limit: float = 120.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < limit and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _export_int8(model_dir: Path, out: Path, tmpdir: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "compressor", "export", str(model_dir), "--onnx", "--quantize",
                             "int8", "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _left_in(tmpdir: Path) -> set:
    return {str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*")}


@pytest.fixture(scope="module")
def left_by_a_finished_export(model_dir, root) -> set:
    """What an export that ends normally leaves in TMPDIR: caches of torch and onnxruntime, not ours."""
    tmpdir = root / "baseline-tmp"
    tmpdir.mkdir()
    proc = _export_int8(model_dir, root / "baseline-export", tmpdir)
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return _left_in(tmpdir)


@pytest.mark.parametrize("signum,moment", [(signal.SIGTERM, "quantizer temp files"),
                                           (signal.SIGHUP, "partial output")])
def test_d2_termination_signals_leave_nothing_behind(model_dir, tmp_path, left_by_a_finished_export, signum,
                                                     moment):
    """Signal `compress export --onnx --quantize int8` mid-run: no `.OUT.partial-*`, and no temp files in TMPDIR
    beyond the caches a finished export leaves too."""
    parent, tmpdir = tmp_path / "parent", tmp_path / "tmp"
    parent.mkdir()
    tmpdir.mkdir()
    out = parent / "exported"
    proc = _export_int8(model_dir, out, tmpdir)
    if moment == "partial output":
        hit = _wait_for(lambda: not no_partial(parent), proc)
    else:  # the optimised graph is written, then the quantizer writes its pre-processed graphs under TMPDIR
        hit = _wait_for(lambda: any(parent.glob(".exported.partial-*/model.onnx"))
                        and _left_in(tmpdir) - left_by_a_finished_export, proc)
    assert hit, f"the export ended before the signal could be sent: {proc.communicate()}"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], stderr
    assert not out.exists() and no_partial(parent)
    assert _left_in(tmpdir) <= left_by_a_finished_export


# ----------------------------------------------------------------------------------------------- D3: writing

def test_d3_out_below_a_file(model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", tmp_path / "file" / "sub"),
                   "is a file")


def test_d3_read_only_parent_fails_before_any_work(model_dir, tmp_path):
    if os.geteuid() == 0:
        parent = Path("/sys/kernel")  # sysfs: even root cannot create a directory there
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    one_line_error(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", parent / "masks"),
                   "cannot write")


def test_d3_json_onto_a_directory(flex_dir, data_file, tmp_path):
    (tmp_path / "dir").mkdir()
    one_line_error(invoke("eval", flex_dir, *data_args(data_file), "--json", tmp_path / "dir", "--overwrite"),
                   "is a directory")
    assert (tmp_path / "dir").is_dir()


def test_d3_out_a_symlink_with_overwrite(model_dir, tmp_path):
    real = tmp_path / "real"
    ok(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", real))
    link = tmp_path / "link"
    link.symlink_to(real)
    one_line_error(invoke("prune", model_dir, "--sparsity", "heads=0.25", "--out", link, "--overwrite"),
                   "symbolic link")
    assert link.is_symlink() and (real / META_FILE).is_file()


def test_d3_a_full_disk_is_one_line(compacted, tmp_path):
    """A file-size limit makes the OS refuse writes past 4 KiB (EFBIG), as a full disk refuses them (ENOSPC)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "compressor", "compact", str(compacted), "--out", str(out)],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and no_partial(tmp_path)


# ----------------------------------------------------------------------------------------------- D4: --max-length

@pytest.mark.parametrize("command", ["eval", "train", "prune"])
def test_d4_max_length_beyond_the_position_embeddings(flex_dir, data_file, tmp_path, command):
    args = {"eval": ("eval", flex_dir),
            "train": ("train", flex_dir, "--train", "head", "--max-steps", 1, "--out", tmp_path / "o"),
            "prune": ("prune", flex_dir, "--method", "importance", "--sparsity", "heads=0.5", "--out",
                      tmp_path / "o")}[command]
    one_line_error(invoke(*args, *data_args(data_file), "--max-length", 1000), "--max-length", "64")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- D5: parity feeds

def test_d5_export_with_every_head_pruned(model_dir, tmp_path):
    model = load_model(model_dir)
    masks = MaskSet.full(model, kinds=("heads",))
    for key in masks.masks:
        masks.masks[key] = torch.zeros_like(masks.masks[key])
    masks.save(tmp_path / "masks")
    ok(invoke("export", model_dir, "--masks", tmp_path / "masks", "--onnx", "--seed", 0, "--out", tmp_path / "e"))
    import onnx

    names = [i.name for i in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.input]
    assert "attention_mask" not in names  # the graph really lacks it: the check fed only what it declares
    assert json.loads((tmp_path / "e" / "parity.json").read_text())["passed"]


# ----------------------------------------------------------------------------------------------- D6: adapter options

def edited_model(source: Path, target: Path, edit) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    edit(config["adapters"])
    (target / "config.json").write_text(json.dumps(config))
    return target


def _rename_adapter(hub):
    hub["adapters"]["../../etc/x.y"] = hub["adapters"].pop("a0")
    hub["fusion_name_map"] = {k: ["../../etc/x.y" if n == "a0" else n for n in v]
                              for k, v in (hub.get("fusion_name_map") or {}).items()}


def _set_option(key, value):
    def edit(hub):
        for cfg in hub["config_map"].values():
            cfg[key] = value
    return edit


@pytest.mark.parametrize("name,edit,needle", [
    ("dotted-name", _rename_adapter, "not allowed"),
    ("non-linearity", _set_option("non_linearity", "sparkle"), "non_linearity"),
    ("leave-out", _set_option("leave_out", "3"), "leave_out"),
    ("reduction-text", _set_option("reduction_factor", "16"), "must be a number"),  # D12: not "must be > 0"
])
def test_d6_adapter_options_are_validated(model_dir, tmp_path, name, edit, needle):
    target = edited_model(model_dir, tmp_path / name, edit)
    assert "adapters" in json.loads((target / "config.json").read_text())
    one_line_error(invoke("inspect", target), needle)


# ----------------------------------------------------------------------------------------------- D7: manifest

@pytest.mark.parametrize("field,edit", [
    ("head_dim", lambda m: m.pop("head_dim")),
    ("layers", lambda m: m.update(layers="abc")),
    ("heads", lambda m: m["layers"][0].update(heads=-2)),
    ("num_labels", lambda m: [h.pop("num_labels") for h in m["heads"].values()]),
])
def test_d7_tampered_manifest(flex_dir, tmp_path, field, edit):
    import shutil

    out = tmp_path / "c"
    ok(invoke("compact", flex_dir, "--out", out))
    path = out / "compress_manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["heads"], "the flex model has a head whose num_labels can be removed"
    edit(manifest)
    path.write_text(json.dumps(manifest))
    one_line_error(invoke("inspect", out), field)
    shutil.rmtree(out)


# ----------------------------------------------------------------------------------------------- D8-D10: masks

def test_d8_masks_json_not_utf8(model_dir, tmp_path):
    masks = tmp_path / "m"
    ok(invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", masks))
    (masks / META_FILE).write_bytes(b'{"format": "\xff\xfe"}')
    one_line_error(invoke("compact", model_dir, "--masks", masks, "--out", tmp_path / "c"), "UTF-8")
    assert not (tmp_path / "c").exists()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


@pytest.mark.parametrize("bad", ["pickle", "step-abc"])
def test_d9_resume_from_a_bad_checkpoint(flex_dir, data_file, tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt" / "train"
    if bad == "pickle":
        (ckpt / "final").mkdir(parents=True)
        (ckpt / "final" / "model.pt").write_bytes(pickle.dumps({"w": Payload()}))
    else:
        (ckpt / "step-abc").mkdir(parents=True)
    line = one_line_error(invoke("train", flex_dir, *data_args(data_file), "--train", "head", "--new-head",
                                 "--max-steps", 2, "--checkpoint-dir", tmp_path / "ckpt", "--resume", "--out", tmp_path / "o"),
                          "resume")
    assert "weights_only=False" not in line
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- D11: umask

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_d11_outputs_honour_the_umask(model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        ok(invoke("compact", model_dir, "--out", tmp_path / "c"))
    finally:
        os.umask(old)
    out = tmp_path / "c"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------- D12: the small ones

def test_d12_wrong_shapes_keep_their_detail(model_dir, tmp_path):
    import shutil

    target = tmp_path / "wrong"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] += 3
    (target / "config.json").write_text(json.dumps(config))
    one_line_error(invoke("inspect", target), "size mismatch", "[37]", "[40]")


def test_d12_hostile_pickle_never_advises_weights_only_false(model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "hostile"
    shutil.copytree(model_dir, target)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    line = one_line_error(invoke("inspect", target), "refusing")
    assert "weights_only" not in line.replace("weights_only=True", "") and "False" not in line
    assert not (tmp_path / "PWNED").exists()


def test_d12_a_file_is_not_called_missing(model_dir, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    one_line_error(invoke("inspect", tmp_path / "config.json"), "is a file")
