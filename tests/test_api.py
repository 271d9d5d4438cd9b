"""The library surface (`compressor.api`, exported from `compressor`): one function per command, a request in and
a result out, the same checks as the CLI; `import compressor` stays light and loading has no import cycle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import compressor
from compressor import api
from compressor.errors import ModelLoadError, OutputExistsError, PruningConfigError
from compressor.masks import MaskSet
from factories import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("api") / "model", "bert", "seq_bn", n_adapters=3, fusion="dynamic")


def test_surface_is_exported():
    for name in ("inspect", "prune", "compact", "export", "train", "evaluate", "bench", "load_default_model",
                 "load_model", "PruneRequest", "PruneResult", "EvalRequest", "BenchRequest", "DemoRequest"):
        assert name in compressor.__all__ and getattr(compressor, name) is not None
    assert compressor.prune is api.prune and callable(api.demo)


def test_import_is_light_and_loading_has_no_cycle():
    code = ("import sys, compressor, compressor.modeling.loading; "
            "assert 'compressor.api' not in sys.modules; assert 'compressor.default_model' not in sys.modules; "
            "assert 'compressor.cli' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_model_needs_a_path():
    with pytest.raises(ModelLoadError, match="load_default_model"):
        compressor.load_model(None)


def test_inspect_prune_compact(model_dir, tmp_path):
    seen = []
    info = api.inspect(compressor.InspectRequest(model=model_dir, seq_len=16), seen.append)
    assert info.layers and info.total["params"] > 0 and info.seq_len == 16 and "loading model" in seen
    r = api.prune(compressor.PruneRequest(model=model_dir, sparsity={"heads": 0.5, "adapters": 0.34}, seed=1,
                                          out=tmp_path / "masks"), seen.append)
    assert r.out == tmp_path / "masks" and all(f.is_file() for f in r.files) and r.trained_model is None
    assert r.counts["heads"]["kept"] * 2 == r.counts["heads"]["total"] and r.groups["heads"] > 0
    assert isinstance(r.masks, MaskSet) and r.metrics == []
    # the CLI's list form of --sparsity gives the same masks
    again = api.prune(compressor.PruneRequest(model=model_dir, sparsity=["heads=0.5", "adapters=0.34"], seed=1,
                                              out=tmp_path / "again"))
    assert (r.out / "masks.safetensors").read_bytes() == (again.out / "masks.safetensors").read_bytes()
    c = api.compact(compressor.CompactRequest(model=model_dir, masks=r.out, out=tmp_path / "compact"))
    assert c.after["params"] < c.before["params"] and (c.out / "model.safetensors").is_file()
    with pytest.raises(OutputExistsError):  # checked before any work
        api.compact(compressor.CompactRequest(model=model_dir, masks=r.out, out=tmp_path / "compact"))


def test_method_options_are_validated_in_the_api():
    assert api.method_options("imp", {}, ["rate=0.2"]) == {"rate": 0.2}
    assert api.method_options("imp", {}, {"rate": "0.2"}) == {"rate": 0.2}
    assert api.method_options("lottery-fusion", {"rounds": 2, "criterion": None}) == {"rounds": 2}
    with pytest.raises(PruningConfigError, match="--option rate=V"):
        api.method_options("imp", {}, {"frobnicate": 1})
    with pytest.raises(PruningConfigError, match="has no option --rounds"):
        api.method_options("omp", {"rounds": 2})
    with pytest.raises(PruningConfigError, match="given twice"):
        api.method_options("lottery-fusion", {"rounds": 2}, ["rounds=3"])


def test_prune_request_errors_before_work(model_dir, tmp_path):
    with pytest.raises(PruningConfigError, match="needs data"):
        api.prune(compressor.PruneRequest(model=model_dir, method="lottery-fusion", sparsity={"adapters": 0.5},
                                          out=tmp_path / "o"))
    with pytest.raises(PruningConfigError, match="no option"):
        api.prune(compressor.PruneRequest(model=model_dir, method="omp", sparsity={"weights": 0.5}, rounds=2,
                                          out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_train_then_evaluate(tmp_path):
    """A model saved without a tokenizer: train with `tokenizer=`; the trained model carries it to evaluate."""
    from task_factories import signal_task, tiny_tokenizer

    model = make_model_dir(tmp_path / "model", "bert", "seq_bn", n_adapters=2, fusion="dynamic")
    tok = tmp_path / "tok"
    tiny_tokenizer(tok)
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                            "do_lower_case": True, "model_max_length": 64}))
    task = signal_task(n_train=40, n_dev=20, seed=0)
    data = tmp_path / "signal.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{e.texts[0]}\t{task.spec.label_list[e.label]}\n"
                                                  for e in task.train + task.dev))
    columns = dict(data=str(data), text_columns="sentence", label_column="label")
    with pytest.raises(ModelLoadError, match="pass --tokenizer NAME_OR_DIR"):
        api.train(compressor.TrainRequest(model=model, **columns, train="head", out=tmp_path / "t"))
    steps = []
    t = api.train(compressor.TrainRequest(model=model, **columns, tokenizer=str(tok), train="head", max_steps=3,
                                          batch_size=8, out=tmp_path / "trained"), steps.append)
    assert t.parts == ["head"] and t.record["steps"] == 3 and "training (head)" in steps
    assert t.record["config"]["max_length"] == 64  # the default: 128, or the model's positions when fewer
    request = compressor.EvalRequest(model=t.out, **columns, json=tmp_path / "eval.json")
    r = api.evaluate(request)
    assert r.json == tmp_path / "eval.json" and r.metrics == t.record["dev_after"]
    assert json.loads(r.json.read_text())["metrics"] == r.metrics
    with pytest.raises(OutputExistsError):
        api.evaluate(request)


@pytest.mark.parametrize("env,needle", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
                                        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "unreachable")])
def test_hub_tokenizer_offline_is_one_clear_error(model_dir, tmp_path, monkeypatch, env, needle):
    import time

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not a local directory") as info:
        api.compact(compressor.CompactRequest(model=model_dir, tokenizer="some-org/no-such-tokenizer",
                                              out=tmp_path / "o"))
    assert time.monotonic() - start < 5  # no retry loop (about 25 s of backoff otherwise)
    assert "\n" not in str(info.value) and "--tokenizer" in str(info.value) and needle in str(info.value)
    assert not (tmp_path / "o").exists()
