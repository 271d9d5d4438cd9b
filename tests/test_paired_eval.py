"""`compress eval --against`: the paired statistics of compressor.evaluation on constructed predictions whose
answer is known, then the CLI on tiny models (a masked model against its dense self, an int8 graph against its
fp32 export, bad references)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from compressor.cli import app
from compressor.data import metrics as M
from compressor.evaluation import (
    BATCHED_METRICS, agreement, compare, mean_kl, paired_bootstrap, read_texts, regression_agreement, within_noise,
)
from factories import make_model_dir
from task_factories import signal_data_args, with_tokenizer, write_signal_tsv

runner = CliRunner()


# ----------------------------------------------------------------------------------------------- the statistics

def flipped(n: int, k: int, seed: int = 0):
    """(candidate, reference, labels): a binary reference right on every example, a candidate wrong on k of them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    cand = labels.copy()
    cand[rng.choice(n, k, replace=False)] ^= 1
    return cand, labels.copy(), labels


def test_identical_predictions():
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    for metric in ("accuracy", "f1", "matthews_correlation"):
        assert paired_bootstrap(metric, preds, preds, labels, B=200, seed=3) == (0.0, 0.0, 0.0)
    assert agreement(preds, preds) == 1.0
    logits = rng.normal(size=(300, 3))
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert within_noise(0.0, 0.0)


@pytest.mark.parametrize("n, k", [(400, 40), (400, 8), (1000, 100)])
def test_flipping_k_correct_examples(n, k):
    cand, ref, labels = flipped(n, k)
    diff, lo, hi = paired_bootstrap("accuracy", cand, ref, labels, B=1000, seed=0)
    assert diff == pytest.approx(-k / n)
    assert lo <= diff <= hi
    assert hi < 0  # k large enough: the data tell them apart
    assert not within_noise(lo, hi)
    assert agreement(cand, ref) == pytest.approx(1 - k / n)


def test_one_flip_is_within_noise():
    cand, ref, labels = flipped(400, 1)
    diff, lo, hi = paired_bootstrap("accuracy", cand, ref, labels, B=1000, seed=0)
    assert diff == pytest.approx(-1 / 400) and hi == 0.0 and within_noise(lo, hi)


def test_interval_shrinks_like_one_over_sqrt_n():
    widths = []
    for n in (400, 1600, 6400):
        cand, ref, labels = flipped(n, n // 10)
        _, lo, hi = paired_bootstrap("accuracy", cand, ref, labels, B=1000, seed=0)
        widths.append(hi - lo)
    # p = 0.1 flips: width ~ 2 * 1.96 * sqrt(p (1 - p) / n)
    assert widths[0] == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 400), rel=0.15)
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.2)
    assert widths[1] / widths[2] == pytest.approx(2.0, rel=0.2)


def test_deterministic_given_the_seed():
    cand, ref, labels = flipped(300, 30)
    a = paired_bootstrap("f1", cand, ref, labels, B=500, seed=7)
    assert paired_bootstrap("f1", cand, ref, labels, B=500, seed=7) == a
    assert paired_bootstrap("f1", cand, ref, labels, B=500, seed=8) != a


def test_f1_is_recomputed_on_each_resample():
    """The vectorised metrics equal compressor.data.metrics row by row, and a plain callable gives the same
    interval as the batched name."""
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 3, (20, 50)), rng.integers(0, 3, (20, 50))
    x, y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))
    for name, fn, a, b in (("accuracy", M.accuracy, preds, labels), ("f1", M.f1_binary, preds, labels),
                           ("matthews_correlation", M.matthews, preds, labels), ("pearson", M.pearson, x, y),
                           ("spearmanr", M.spearman, x, y)):
        assert BATCHED_METRICS[name](a, b) == pytest.approx([fn(r, s) for r, s in zip(a, b)]), name
    cand, ref, labels = flipped(200, 30, seed=2)
    assert paired_bootstrap(M.f1_binary, cand, ref, labels, B=300, seed=1) == \
        pytest.approx(paired_bootstrap("f1", cand, ref, labels, B=300, seed=1))
    diff, lo, hi = paired_bootstrap("f1", cand, ref, labels, B=300, seed=1)
    assert diff == pytest.approx(M.f1_binary(cand, labels) - 1.0) and lo <= diff <= hi < 0


def test_kl_by_hand():
    # reference (1/2, 1/2), candidate (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    ref = np.array([[0.0, 0.0], [5.0, 5.0]])
    cand = np.array([[math.log(3), 0.0], [7.0, 7.0]])  # the second row: the same distribution, KL 0
    assert mean_kl(ref, cand) == pytest.approx(0.5 * math.log(4 / 3) / 2)
    assert mean_kl(cand, ref) == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)  # not symmetric


def test_regression_agreement_and_compare():
    a = np.linspace(0, 5, 50)
    got = regression_agreement(a, a + 0.5)
    assert got["correlation"] == pytest.approx(1.0) and got["mean_abs_diff"] == pytest.approx(0.5)
    from compressor.data import get_task

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    ref = np.stack([1 - labels, labels], 1).astype(float)  # right on every example
    cand = ref.copy()
    cand[:10] = cand[:10, ::-1]  # wrong on the first 10
    out = compare(get_task("mrpc"), cand, ref, labels, B=200, seed=0)
    assert [d["metric"] for d in out["differences"]] == ["accuracy", "f1"]
    acc = out["differences"][0]
    assert acc["difference"] == pytest.approx(-0.1) and acc["reference"] == 1.0 and not acc["within_noise"]
    assert out["agreement"]["agreement"] == pytest.approx(0.9) and out["agreement"]["examples"] == 100
    stsb = compare(get_task("stsb"), a[:, None], a[:, None] + 0.5, a, B=50, seed=0)
    assert set(stsb["agreement"]) == {"correlation", "mean_abs_diff", "examples"}


def test_read_texts(tmp_path):
    (tmp_path / "t.txt").write_text("one text\n\nanother\n")
    assert read_texts(tmp_path / "t.txt") == [("one text",), ("another",)]
    (tmp_path / "p.tsv").write_text("a\tb\tlabel\nx\ty\t1\nz\tw\t0\n")
    assert read_texts(tmp_path / "p.tsv", "a,b") == [("x", "y"), ("z", "w")]


# ----------------------------------------------------------------------------------------------- the CLI

def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("paired")


@pytest.fixture(scope="module")
def data_file(root):
    return write_signal_tsv(root / "signal.tsv", n_train=100, n_dev=20)


@pytest.fixture(scope="module")
def trained(root, data_file):
    """A tiny model with a head trained on the signal task, and masks pruning half of its heads and neurons."""
    model = with_tokenizer(make_model_dir(root / "model", "bert", "seq_bn", n_adapters=2, fusion="dynamic"))
    out = root / "trained"
    ok(invoke("train", model, *signal_data_args(data_file), "--train", "head", "--max-steps", 4, "--learning-rate",
              0.01, "--out", out))
    masks = root / "masks"
    ok(invoke("prune", out, "--method", "magnitude", "--sparsity", "heads=0.5", "--sparsity", "neurons=0.5",
              "--out", masks))
    return out, masks


def test_against_dense(trained, data_file, tmp_path):
    model, masks = trained
    report = tmp_path / "eval.json"
    result = ok(invoke("eval", model, "--masks", masks, *signal_data_args(data_file), "--against", "dense",
                       "--fidelity-examples", 50, "--bootstrap", 200, "--seed", 1, "--json", report))
    got = json.loads(report.read_text())
    assert got["against"] == "dense" and got["bootstrap"]["resamples"] == 200 and got["bootstrap"]["seed"] == 1
    rows = {d["metric"]: d for d in got["differences"]}
    assert set(rows) == {"accuracy", "f1"}
    for name, d in rows.items():
        assert d["candidate"] == pytest.approx(got["metrics"][name])
        assert d["reference"] == pytest.approx(got["reference_metrics"][name])
        assert d["difference"] == pytest.approx(d["candidate"] - d["reference"])
        assert d["low"] <= d["difference"] <= d["high"]
    assert got["agreement"]["examples"] == 12 and 0 <= got["agreement"]["agreement"] <= 1
    fid = got["fidelity"]
    assert fid["examples"] == 50 and "training rows 59-108 of 108" in fid["source"] and fid["mean_kl"] >= 0
    # the reference is the model before its masks: its metrics are plain `compress eval MODEL`'s
    plain = tmp_path / "plain.json"
    ok(invoke("eval", model, *signal_data_args(data_file), "--json", plain))
    assert json.loads(plain.read_text())["metrics"] == pytest.approx(got["reference_metrics"])
    out = result.stdout
    assert "95% CI" in out and "agreement on the 12 dev examples" in out and "fidelity on 50 unlabeled" in out
    assert "KL(reference || candidate)" in out


def test_against_itself_is_zero_and_within_noise(trained, data_file, tmp_path):
    model, _ = trained
    (tmp_path / "texts.txt").write_text("good alpha beta\nbad gamma\nzeta eta theta good\n")
    report = tmp_path / "self.json"
    result = ok(invoke("eval", model, *signal_data_args(data_file), "--against", model, "--fidelity-data",
                       tmp_path / "texts.txt", "--json", report))
    got = json.loads(report.read_text())
    for d in got["differences"]:
        assert (d["difference"], d["low"], d["high"], d["within_noise"]) == (0.0, 0.0, 0.0, True)
    assert got["agreement"]["agreement"] == 1.0 and got["agreement"]["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert got["fidelity"]["examples"] == 3 and got["fidelity"]["agreement"] == 1.0
    assert "within noise" in result.stdout


def test_int8_graph_against_its_export(trained, data_file, tmp_path):
    model, masks = trained
    export = tmp_path / "onnx"
    ok(invoke("export", model, "--masks", masks, "--onnx", "--quantize", "int8", "--out", export))
    report = tmp_path / "int8.json"
    result = ok(invoke("eval", export / "model.int8.onnx", *signal_data_args(data_file), "--against", export,
                       "--fidelity-examples", 40, "--json", report))
    got = json.loads(report.read_text())
    assert got["model"] == str(export / "model.int8.onnx") and got["reference"] == str(export / "model.onnx")
    assert got["fidelity"]["examples"] == 40 and got["agreement"]["examples"] == 12
    assert "model.int8.onnx" in result.stdout
    # the fp32 graph is the masked PyTorch model: same predictions, KL ~ 0
    fp32 = tmp_path / "fp32.json"
    ok(invoke("eval", model, "--masks", masks, *signal_data_args(data_file), "--against", export,
              "--fidelity-examples", 20, "--json", fp32))
    got = json.loads(fp32.read_text())
    assert got["agreement"]["agreement"] == 1.0 and got["agreement"]["mean_kl"] < 1e-6
    assert got["fidelity"]["agreement"] == 1.0 and got["fidelity"]["mean_kl"] < 1e-6
    assert all(d["difference"] == 0.0 for d in got["differences"])
    # a graph without --against: its dev metrics, as the masked model's
    plain = tmp_path / "plain.json"
    ok(invoke("eval", export, *signal_data_args(data_file), "--json", plain))
    assert json.loads(plain.read_text())["metrics"] == pytest.approx(got["metrics"])


def test_bad_references(trained, data_file, tmp_path):
    model, masks = trained
    args = signal_data_args(data_file)
    one_line_error(invoke("eval", model, *args, "--against", tmp_path / "missing"), "--against", "no such file")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(invoke("eval", model, *args, "--against", tmp_path / "notes.txt"), "not an .onnx file")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph at all")
    one_line_error(invoke("eval", model, *args, "--against", tmp_path / "bad.onnx"), "not an ONNX model")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("eval", model, *args, "--against", tmp_path / "empty"), "neither an export directory")
    one_line_error(invoke("eval", model, *args, "--against", "dense"), "--masks")
    one_line_error(invoke("eval", model, *args, "--fidelity-data", tmp_path / "notes.txt"), "--against")
    one_line_error(invoke("eval", tmp_path / "bad.onnx", *args), "MODEL", "not an ONNX model")
