"""The `compress` CLI with data and training, on tiny models, the tiny tokenizer and the synthetic signal task
written as a TSV file: prune with a method that trains (masks + the trained model), compact / eval that use the
trained model, train a head then eval, a data-free method, and the one-line errors of bad data and options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.io import OUTPUT_MARKER
from compressor.masks import META_FILE, TENSORS_FILE, MaskSet, masked_copy
from compressor.pruning import METHODS
from factories import make_model_dir, random_inputs
from task_factories import signal_data_args, with_tokenizer, write_signal_tsv

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_user_error(result, *needles, out: Path = None):
    """Non-zero exit, one line on stderr naming the problem, no traceback, nothing on stdout or at `out`."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output and result.stdout.strip() == ""
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if ".partial" in p.name]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def model_dir(root):
    """Three fused adapters, no head."""
    return with_tokenizer(make_model_dir(root / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic"))


@pytest.fixture(scope="module")
def flex_dir(root):
    """A flex model with a 3-label head 't' (the signal task has 2 labels)."""
    return with_tokenizer(make_model_dir(root / "flex", "bert", "seq_bn", n_adapters=2, fusion="dynamic",
                                         head="flex", seed=1))


@pytest.fixture(scope="module")
def data_file(root):
    return write_signal_tsv(root / "signal.tsv", n_train=100, n_dev=20)


data_args = signal_data_args


BUDGET = ("--max-steps", 5, "--batch-size", 8)


@pytest.fixture(scope="module")
def lottery_masks(root, model_dir, data_file):
    out = root / "lottery-masks"
    result = ok(invoke("prune", model_dir, "--method", "lottery-fusion", "--sparsity", "adapters=0.34",
                       *data_args(data_file), *BUDGET, "--rounds", 1, "--max-drop", 1.0, "--out", out))
    return out, result


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------------------------- happy paths

def test_tokenizer_loads_from_the_model_dir(model_dir):
    from compressor.api import load_tokenizer

    tok = load_tokenizer(model_dir, compressor.load_model(model_dir))
    assert tok("good alpha")["input_ids"] == [2, 5, 7, 3]


def test_prune_lottery_writes_masks_and_trained_model(lottery_masks, model_dir):
    out, result = lottery_masks
    assert sorted(p.name for p in out.iterdir()) == sorted([TENSORS_FILE, META_FILE, "model", OUTPUT_MARKER])
    assert {"config.json", "compress_manifest.json", "model.safetensors", "vocab.txt",
            "tokenizer_config.json"} <= {p.name for p in (out / "model").iterdir()}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "lottery-fusion" and meta["trained_model"] == "model"
    assert meta["params"]["options"]["rounds"] == 1 and meta["params"]["options"]["max_drop"] == 1.0
    assert meta["data"]["train_examples"] == 108 and meta["data"]["dev_examples"] == 12
    assert meta["counts"]["adapters"] == {"kept": 4, "total": 6}
    # the masks belong to the trained model (a head was added): it reloads and they fit it
    trained = compressor.load_model(out / "model")
    MaskSet.load(out).check(trained)
    assert "accuracy, dense" in result.stdout and "accuracy, pruned" in result.stdout
    assert "dev metrics on signal (12 examples)" in result.stdout
    assert f"{out}/model" in result.stdout.replace("\n", "")


def test_compact_uses_the_trained_model(lottery_masks, model_dir, tmp_path):
    masks, _ = lottery_masks
    out = tmp_path / "compact"
    result = ok(invoke("compact", model_dir, "--masks", masks, "--out", out))
    assert "note:" in result.stderr and str(masks / "model") in result.stderr.replace("\n", "")
    assert (out / "vocab.txt").is_file()  # the tokenizer travels with the trained model
    trained = compressor.load_model(masks / "model")
    masked, compacted = masked_copy(trained, MaskSet.load(masks)), compressor.load_model(out)
    inputs = random_inputs("bert", 3, 9, "random", vocab=25)
    ref = logits(masked, inputs)
    assert ref.shape == (3, 2)  # the original model has no head: this is the trained model
    assert (logits(compacted, inputs) - ref).abs().max().item() <= 1e-5
    # without MODEL: the same, and no note
    result = ok(invoke("compact", "--masks", masks, "--out", tmp_path / "c2"))
    assert "note:" not in result.stderr


def test_eval_masks_reproduces_the_methods_metric(lottery_masks, data_file, tmp_path):
    masks, _ = lottery_masks
    report = tmp_path / "eval.json"
    result = ok(invoke("eval", "--masks", masks, *data_args(data_file), "--json", report))
    got = json.loads(report.read_text())
    meta = json.loads((masks / META_FILE).read_text())
    assert got["metrics"]["accuracy"] == pytest.approx(meta["metric"], abs=1e-9)
    assert got["masks_method"] == "lottery-fusion" and got["task"] == "signal"
    assert "accuracy" in result.stdout


def test_train_head_then_eval(model_dir, data_file, tmp_path):
    out, ckpt = tmp_path / "trained", tmp_path / "ckpt"
    result = ok(invoke("train", model_dir, *data_args(data_file), "--train", "head", "--max-steps", 8,
                       "--learning-rate", 0.01, "--checkpoint-dir", ckpt, "--out", out))
    assert {"model.safetensors", "compress_manifest.json", "train.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "train.json").read_text())
    assert record["train"] == ["head"] and record["steps"] == 8 and record["head"] == "signal"
    assert record["config"]["max_steps"] == 8 and record["config"]["learning_rate"] == 0.01
    assert set(record["dev_before"]) == set(record["dev_after"]) == {"accuracy", "f1"}
    assert record["data"]["source"]["file"] == str(data_file.resolve()) and record["loss"] is not None
    assert "before" in result.stdout and "after" in result.stdout
    trained = compressor.load_model(out)
    assert logits(trained, random_inputs("bert", 2, 5, vocab=25)).shape == (2, 2)
    # only the head trained: the encoder and adapters are the original ones
    original = compressor.load_model(model_dir).state_dict()
    state = trained.state_dict()
    assert all(torch.equal(v, state["bert." + k]) for k, v in original.items())

    report = tmp_path / "eval.json"
    ok(invoke("eval", out, *data_args(data_file), "--json", report))
    assert json.loads(report.read_text())["metrics"] == pytest.approx(record["dev_after"])
    assert_user_error(invoke("eval", out, *data_args(data_file), "--json", report), "already exists", "--overwrite")

    # resume: the finished stage is loaded, not trained again, and gives the same model
    again = tmp_path / "again"
    ok(invoke("train", model_dir, *data_args(data_file), "--train", "head", "--max-steps", 8, "--learning-rate",
              0.01, "--checkpoint-dir", ckpt, "--resume", "--out", again))
    assert json.loads((again / "train.json").read_text())["resumed"] is True
    resumed = compressor.load_model(again).state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in state.items())


def test_train_new_head_replaces_a_head_of_another_size(flex_dir, data_file, tmp_path):
    assert_user_error(invoke("train", flex_dir, *data_args(data_file), "--train", "head", "--max-steps", 1,
                             "--out", tmp_path / "o"), "3 outputs", "--new-head", out=tmp_path / "o")
    out = tmp_path / "new"
    ok(invoke("train", flex_dir, *data_args(data_file), "--train", "fusion", "--new-head", *BUDGET, "--out", out))
    trained = compressor.load_model(out)
    assert list(trained.heads) == ["signal"] and trained.compress_manifest["active_head"] == "signal"
    assert logits(trained, random_inputs("bert", 2, 5, vocab=25)).shape == (2, 2)


def test_prune_omp_needs_no_data(model_dir, tmp_path):
    out = tmp_path / "omp"
    result = ok(invoke("prune", model_dir, "--method", "omp", "--sparsity", "weights=0.5", "--out", out))
    assert sorted(p.name for p in out.iterdir()) == sorted([TENSORS_FILE, META_FILE, OUTPUT_MARKER])
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "omp" and "trained_model" not in meta and meta["data"] is None
    assert "dev metrics" not in result.stdout
    # masks of a method that trained nothing: compact uses MODEL, silently
    result = ok(invoke("compact", model_dir, "--masks", out, "--out", tmp_path / "c"))
    assert "note:" not in result.stderr


def test_prune_help_lists_methods_and_which_need_data():
    result = ok(invoke("prune", "--help", env={"COLUMNS": "200"}))
    text = " ".join(result.stdout.split())
    for name, cls in METHODS.items():
        assert name in text
        assert (f"{name} (needs --data)" in text) == cls.needs_data, name
    for flag in ("--rounds", "--criterion", "--option", "--max-steps", "--text-columns", "--checkpoint-dir"):
        assert flag in text


# ----------------------------------------------------------------------------------------------- user errors

def test_unknown_method_lists_methods(model_dir, tmp_path):
    line = assert_user_error(invoke("prune", model_dir, "--method", "movement", "--sparsity", "heads=0.5",
                                    "--out", tmp_path / "o"), "'movement'", out=tmp_path / "o")
    assert all(name in line for name in METHODS)


def test_unknown_criterion_for_sparse_adapter(model_dir, data_file, tmp_path):
    assert_user_error(invoke("prune", model_dir, "--method", "sparse-adapter", "--sparsity", "weights=0.5",
                             "--criterion", "vibes", *data_args(data_file), "--out", tmp_path / "o"),
                      "'vibes'", "snip", "grasp", "synflow", out=tmp_path / "o")


@pytest.mark.parametrize("args, needles", [
    (("--method", "omp", "--sparsity", "weights=0.5", "--rounds", 2), ["'omp'", "--rounds", "none"]),
    (("--method", "lottery-fusion", "--sparsity", "adapters=0.5", "--criterion", "snip"),
     ["'lottery-fusion'", "--criterion", "--rounds", "--rewind-step", "--max-drop"]),
    (("--method", "imp", "--sparsity", "weights=0.5", "--option", "frobnicate=1"),
     ["'imp'", "--option frobnicate=1", "--option rate=V"]),
    (("--method", "imp", "--sparsity", "weights=0.5", "--option", "rate=lots"), ["rate", "float"]),
    (("--method", "imp", "--sparsity", "weights=0.5", "--option", "rate"), ["KEY=VALUE"]),
    (("--method", "lottery-fusion", "--sparsity", "adapters=0.5", "--rounds", 0), ["--rounds", ">= 1"]),
])
def test_method_options_are_checked(model_dir, data_file, tmp_path, args, needles):
    assert_user_error(invoke("prune", model_dir, *args, *data_args(data_file), "--out", tmp_path / "o"), *needles,
                      out=tmp_path / "o")


def test_method_that_needs_data_given_none(model_dir, tmp_path):
    assert_user_error(invoke("prune", model_dir, "--method", "lottery-fusion", "--sparsity", "adapters=0.5",
                             "--out", tmp_path / "o"), "lottery-fusion", "needs data", "--data", out=tmp_path / "o")


def test_data_file_without_the_named_columns(model_dir, data_file, tmp_path):
    assert_user_error(invoke("prune", model_dir, "--method", "lottery-fusion", "--sparsity", "adapters=0.5",
                             "--data", data_file, "--text-columns", "text", "--label-column", "label",
                             "--out", tmp_path / "o"), "no column 'text'", "sentence", out=tmp_path / "o")


def test_labels_do_not_match_the_head(flex_dir, data_file, tmp_path):
    assert_user_error(invoke("prune", flex_dir, "--method", "lottery-fusion", "--sparsity", "adapters=0.5",
                             *data_args(data_file), *BUDGET, "--out", tmp_path / "o"), "3 outputs", "needs 2",
                      out=tmp_path / "o")
    assert_user_error(invoke("eval", flex_dir, *data_args(data_file)), "3 outputs", "needs 2", "--new-head")


def test_eval_without_a_head(model_dir, data_file):
    assert_user_error(invoke("eval", model_dir, *data_args(data_file)), "no prediction head",
                      "train a head first: compress train")


def test_resume_without_checkpoint_dir(model_dir, data_file, tmp_path):
    for command in (("prune", model_dir, "--method", "lottery-fusion", "--sparsity", "adapters=0.5"),
                    ("train", model_dir, "--train", "head")):
        assert_user_error(invoke(*command, *data_args(data_file), "--resume", "--out", tmp_path / "o"),
                          "--resume", "--checkpoint-dir", out=tmp_path / "o")


def test_model_dir_without_tokenizer(root, data_file, tmp_path):
    bare = make_model_dir(root / "bare", "bert", "seq_bn", n_adapters=2, fusion="dynamic")
    assert_user_error(invoke("prune", bare, "--method", "lottery-fusion", "--sparsity", "adapters=0.5",
                             *data_args(data_file), "--out", tmp_path / "o"), str(bare), "no tokenizer files",
                      "pass --tokenizer NAME_OR_DIR", out=tmp_path / "o")


@pytest.fixture(scope="module")
def bare_dir(root):
    """A model saved without tokenizer files (as AdapterHub's save_pretrained leaves it)."""
    return make_model_dir(root / "bare-model", "bert", "seq_bn", n_adapters=3, fusion="dynamic")


@pytest.fixture(scope="module")
def tokenizer_dir(root):
    return with_tokenizer(root / "tokenizer")


def test_tokenizer_flag_and_the_outputs_carry_it(bare_dir, tokenizer_dir, data_file, tmp_path):
    """prune MODEL --tokenizer DIR on a model without tokenizer files; OUT/model then needs no flag."""
    out = tmp_path / "masks"
    ok(invoke("prune", bare_dir, "--tokenizer", tokenizer_dir, "--method", "lottery-fusion", "--sparsity",
              "adapters=0.34", *data_args(data_file), *BUDGET, "--rounds", 1, "--max-drop", 1.0, "--out", out))
    assert {"vocab.txt", "tokenizer_config.json"} <= {p.name for p in (out / "model").iterdir()}
    result = ok(invoke("eval", "--masks", out, *data_args(data_file)))
    assert "accuracy" in result.stdout and "note:" not in result.stderr
    # compact and export of the bare model with --tokenizer write it too; a later eval needs no flag
    ok(invoke("compact", bare_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / "compact"))
    assert (tmp_path / "compact" / "vocab.txt").is_file()
    trained = tmp_path / "trained"
    ok(invoke("train", bare_dir, "--tokenizer", tokenizer_dir, *data_args(data_file), "--train", "head", *BUDGET,
              "--out", trained))
    assert (trained / "vocab.txt").is_file()
    assert json.loads((trained / "train.json").read_text())["tokenizer"] == str(tokenizer_dir)
    ok(invoke("eval", trained, *data_args(data_file)))


def test_bare_model_needs_the_tokenizer_flag(bare_dir, data_file, tmp_path):
    assert_user_error(invoke("train", bare_dir, *data_args(data_file), "--train", "head", "--out", tmp_path / "o"),
                      "no tokenizer files", "pass --tokenizer NAME_OR_DIR", out=tmp_path / "o")


@pytest.mark.parametrize("name, needle", [("./missing-tokenizer", "no such directory"),
                                          ("data", "no tokenizer files there")])
def test_bad_tokenizer_flag(bare_dir, data_file, tmp_path, monkeypatch, name, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert_user_error(invoke("prune", bare_dir, "--tokenizer", name, "--method", "lottery-fusion", "--sparsity",
                             "adapters=0.5", *data_args(data_file), "--out", tmp_path / "o"), f"--tokenizer {name}",
                      needle, out=tmp_path / "o")


def test_trained_model_symlinked_out_of_the_mask_dir_is_refused(lottery_masks, tmp_path):
    """D10: masks.json's trained_model is followed only inside the mask directory, symlinks resolved."""
    import shutil

    masks = tmp_path / "masks"
    masks.mkdir()
    for name in (TENSORS_FILE, META_FILE):
        shutil.copyfile(lottery_masks[0] / name, masks / name)
    (masks / "model").symlink_to(lottery_masks[0] / "model", target_is_directory=True)
    for command in (("compact", "--masks", masks, "--out", tmp_path / "c"),
                    ("eval", "--masks", masks, "--data", "glue:rte")):
        result = invoke(*command)
        assert result.exit_code == 2
        assert_user_error(result, "trained_model", "out of the mask directory")
    assert not (tmp_path / "c").exists()


def test_bad_train_choice(model_dir, data_file, tmp_path):
    assert_user_error(invoke("train", model_dir, *data_args(data_file), "--train", "everything",
                             "--out", tmp_path / "o"), "'everything'", "adapters, fusion, head, all",
                      out=tmp_path / "o")


def test_masks_and_trained_model_appear_together_or_not_at_all(model_dir, tmp_path, monkeypatch):
    import compressor.api
    import compressor.pruning

    def trained_prune(model, method, sparsity, seed=0, min_keep=1, data=None, options=None):
        maskset = MaskSet.full(model, kinds=("heads",))
        maskset.model = model  # as if the method had trained it
        return maskset

    real = compressor.api.write_compacted
    written = []

    def failing(model, directory, tokenizer_dir=None):
        real(model, directory, tokenizer_dir)
        written.append(Path(directory))
        raise OSError("No space left on device")

    monkeypatch.setattr(compressor.pruning, "prune", trained_prune)
    monkeypatch.setattr(compressor.api, "write_compacted", failing)
    out = tmp_path / "out"
    result = invoke("prune", model_dir, "--sparsity", "heads=0.5", "--out", out)
    assert written and written[0].name == "model" and result.exit_code != 0
    # an environment error (a full disk) is one line, like our own errors (compressor.errors.as_user_error)
    assert isinstance(result.exception, SystemExit) and "No space left on device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(tmp_path.iterdir()) == []


def test_export_int8_with_data_reports_the_accuracy_change(lottery_masks, data_file, tmp_path):
    out = tmp_path / "onnx"
    result = ok(invoke("export", "--masks", lottery_masks[0], "--onnx", "--quantize", "int8", *data_args(data_file),
                       "--seed", 0, "--out", out))
    assert "fp32 vs int8" in result.stdout
    summary = (out / "export.md").read_text()
    assert "| accuracy |" in summary and "| f1 |" in summary
    # the fp32 graph scores what `compress eval` scores on the masked trained model
    report = tmp_path / "eval.json"
    ok(invoke("eval", "--masks", lottery_masks[0], *data_args(data_file), "--json", report))
    fp32 = [line for line in summary.splitlines() if line.startswith("| accuracy |")][0].split("|")[2]
    assert float(fp32) == pytest.approx(json.loads(report.read_text())["metrics"]["accuracy"], abs=1e-4)


def test_export_data_needs_int8(lottery_masks, data_file, tmp_path):
    assert_user_error(invoke("export", "--masks", lottery_masks[0], "--onnx", *data_args(data_file), "--out",
                             tmp_path / "o"), "--quantize int8", out=tmp_path / "o")


# ----------------------------------------------------------------------------------------------- recovery (KD)

@pytest.fixture(scope="module")
def headed_dir(root, model_dir, data_file):
    """model_dir with a trained 2-label head for the signal task: the dense teacher of the recovery tests."""
    out = root / "headed"
    ok(invoke("train", model_dir, *data_args(data_file), "--train", "head", "--max-steps", 4, "--out", out))
    return out


PRUNE_HALF = ("--method", "random", "--sparsity", "heads=0.5", "--sparsity", "neurons=0.5")


def test_prune_recover_kd_writes_the_recovered_model(headed_dir, data_file, root, tmp_path):
    out, plain = tmp_path / "kd", tmp_path / "plain"
    result = ok(invoke("prune", headed_dir, *PRUNE_HALF, *data_args(data_file), "--recover", "kd",
                       "--recover-steps", 3, "--kd-layers", "1", "--batch-size", 8, "--out", out))
    ok(invoke("prune", headed_dir, *PRUNE_HALF, "--out", plain))
    meta = json.loads((out / META_FILE).read_text())
    assert meta["trained_model"] == "model"
    rec = meta["recovery"]
    assert rec["kind"] == "kd" and rec["steps"] == 3 and rec["train"] == ["adapters", "fusion"]
    assert rec["kd"]["layers"] == [1] and set(rec["dev_metrics"]) == {"accuracy", "f1"}
    assert "recovered (kd)" in result.stdout
    # the masks are those of the same pruning without recovery; the recovered weights moved
    masks = MaskSet.load(out)
    assert all(torch.equal(masks.masks[k], v) for k, v in MaskSet.load(plain).masks.items())
    recovered, dense = compressor.load_model(out / "model"), compressor.load_model(headed_dir)
    assert not all(torch.equal(v, dense.state_dict()[k]) for k, v in recovered.state_dict().items())
    # compaction of the recovered model equals the masked recovered model (invariant 1)
    ok(invoke("compact", "--masks", out, "--out", tmp_path / "c"))
    inputs = random_inputs("bert", 3, 9, "random", vocab=25)
    ref = logits(masked_copy(recovered, masks), inputs)
    assert (logits(compressor.load_model(tmp_path / "c"), inputs) - ref).abs().max().item() <= 1e-5
    # eval --against dense: the reference is MODEL, the model the masks were pruned from, not the recovered
    # weights without their masks
    report, plain = tmp_path / "eval.json", tmp_path / "plain.json"
    result = ok(invoke("eval", headed_dir, "--masks", out, *data_args(data_file), "--against", "dense",
                       "--fidelity-examples", 20, "--bootstrap", 50, "--json", report))
    ok(invoke("eval", headed_dir, *data_args(data_file), "--json", plain))
    got = json.loads(report.read_text())
    assert got["reference_metrics"] == pytest.approx(json.loads(plain.read_text())["metrics"])
    assert "the model the masks were made from" in result.output and f"reference: {headed_dir} (dense)" in result.output
    # compress train --teacher on the pruned student: OUT is the compacted, distilled model
    trained = tmp_path / "t"
    result = ok(invoke("train", "--masks", out, "--teacher", headed_dir, *data_args(data_file), "--train",
                       "adapters,fusion", "--max-steps", 3, "--batch-size", 8, "--out", trained))
    record = json.loads((trained / "train.json").read_text())
    assert record["teacher"] == str(headed_dir) and record["masks"]["method"] == "random"
    assert record["dev_kl_before"] >= 0 and record["dev_kl_after"] >= 0 and record["kd"]["temperature"] > 0
    assert "KL(teacher || model)" in result.stdout
    manifest = json.loads((trained / "compress_manifest.json").read_text())
    assert manifest["compacted"] and manifest["masks"]["method"] == "random"


def test_prune_recover_task(headed_dir, data_file, tmp_path):
    out = tmp_path / "task"
    ok(invoke("prune", headed_dir, *PRUNE_HALF, *data_args(data_file), "--recover", "task", "--recover-steps", 2,
              "--train", "head", "--batch-size", 8, "--out", out))
    rec = json.loads((out / META_FILE).read_text())["recovery"]
    assert rec["kind"] == "task" and rec["train"] == ["head"] and rec["kd"] is None


@pytest.mark.parametrize("args, needles", [
    (("--recover", "kd"), ["--recover kd", "--data"]),
    (("--recover", "vibes", "DATA"), ["'vibes'", "task", "kd"]),
    (("--kd-layers", "1", "DATA"), ["--recover kd"]),
    (("--recover", "task", "--kd-temperature", 3, "DATA"), ["--kd-*", "--recover kd"]),
    (("--recover", "kd", "--kd-temperature", 0, "DATA"), ["--kd-temperature", "> 0"]),
    (("--recover", "kd", "--kd-layers", "one", "DATA"), ["--kd-layers", "1,3,5"]),
    (("--recover", "kd", "--train", "everything", "DATA"), ["--train", "'everything'"]),
    (("--sparsity", "weights=0.5", "--recover", "kd", "DATA"), ["--recover", "weight masks"]),
])
def test_recover_options_are_checked(headed_dir, data_file, tmp_path, args, needles):
    args = [a for x in args for a in (data_args(data_file) if x == "DATA" else (x,))]
    assert_user_error(invoke("prune", headed_dir, *PRUNE_HALF, *args, "--out", tmp_path / "o"), *needles,
                      out=tmp_path / "o")


def test_teacher_that_cannot_teach(headed_dir, flex_dir, data_file, root, tmp_path):
    from compressor.compaction import compact, save_compacted

    roberta = with_tokenizer(make_model_dir(root / "roberta", "roberta", "seq_bn", n_adapters=3, fusion="dynamic"))
    wide = compressor.load_model(headed_dir)
    wide.base_model.resize_token_embeddings(120)
    vocab = with_tokenizer(save_compacted(compact(wide), tmp_path / "vocab"))
    for teacher, needle in ((roberta, "architecture is roberta"), (vocab, "vocabulary size is 120"),
                            (flex_dir, "head has 3 labels")):
        assert_user_error(invoke("train", headed_dir, "--teacher", teacher, *data_args(data_file), "--train",
                                 "fusion", *BUDGET, "--out", tmp_path / "o"), needle, out=tmp_path / "o")
    assert_user_error(invoke("train", headed_dir, "--kd-hidden-weight", 2, *data_args(data_file), "--train",
                             "fusion", *BUDGET, "--out", tmp_path / "o"), "--teacher", out=tmp_path / "o")


def test_prune_prints_the_methods_warnings(model_dir, data_file, tmp_path):
    """adapt-by-pruning's paper variant at the paper's rate, five steps on a tiny model: nothing is pruned in
    training and the loss barely moves the scores. The user is told both, and masks.json keeps them."""
    out = tmp_path / "abp"
    result = ok(invoke("prune", model_dir, "--method", "adapt-by-pruning", "--sparsity", "weights=0.5",
                       *data_args(data_file), *BUDGET, "--option", "variant=paper", "--out", out))
    text = " ".join(result.output.split())
    assert "warning: adapt-by-pruning: training ended with 0.0% of the weights pruned, short of the 50% target" in text
    assert "times less than their random start spreads them: the mask is the random start's" in text
    warnings = json.loads((out / META_FILE).read_text())["warnings"]
    assert len(warnings) == 2 and warnings[0].startswith("adapt-by-pruning: training ended with 0.0%")
