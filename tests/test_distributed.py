"""Multi-process training: `compress train` under `accelerate launch` with two CPU processes (gloo) against one
process with the same global batch, on a tiny model, through the real CLI in subprocesses.

Both runs train for `--epochs 1`. Checked: (a) both ranks end with identical trainable weights, (b) the ranks
consumed different examples at every step, and together exactly the examples of the one-process step, (c) the
two-process result matches the one-process result within TOLERANCE, and the command writes its output once and
exits 0; and an epoch is one pass over the data whatever the number of processes.

Global batch: `--batch-size` is PER PROCESS. The loop builds one DataLoader of `--batch-size` and accelerate shards
it (split_batches=False): every process draws the same seeded permutation, cut into batches of b, and process i
takes batches i, i + n, i + 2n, ... So with n processes one optimiser step sees n * b examples, and the step-k
batches of the two ranks are together batch k of a one-process run with `--batch-size 2b` and the same seed; the
gradients are averaged across ranks (DDP all-reduce), which equals the mean over 2b examples when every rank holds
b of them (the test keeps every step full: the training set is a multiple of 2b). An epoch is N / 2b steps.

Why not exact: the one-process loss is one mean over 2b examples; the two-process gradient is the mean of two
means, summed by gloo's all-reduce, and the per-rank matmuls run on b rows instead of 2b. Float32 sums in another
order differ in the last bits (~1e-7 relative), and AdamW divides by sqrt of the second moment, which carries
those differences into every update. Over STEPS steps the trained weights stay within TOLERANCE (measured: about
1e-7 here; a data-order, averaging or schedule bug gives differences of the order of the learning rate, 1e-2).
(c) also catches a learning-rate schedule that runs num_processes times too fast: accelerate steps a prepared
scheduler num_processes times per optimiser step, so the loop must give it num_processes x the steps.

Launcher: `accelerate launch --cpu --num_processes 2` does NOT start two processes: on the CPU, accelerate's simple
launcher runs one Python process unless an MPI hostfile is given (`--mpirun_hostfile`). Two local processes come
from the torchrun-based launcher (`--multi_gpu`), which ACCELERATE_USE_CPU=1 keeps on the CPU with gloo; the trace
asserts world size 2 and the gloo backend, so a silent single-process run fails here.

Per-rank evidence comes from the loop's debugging hook: COMPRESSOR_TRAIN_TRACE=DIR makes every process write
DIR/<stage>.rank-<i>.json (example indices and loss per step, sha256 and sum of its trainable parameters).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from factories import make_model_dir
from task_factories import signal_task, tiny_tokenizer

PER_PROCESS_BATCH = 4
PROCESSES = 2
N_TRAIN = 72  # training examples: a multiple of the global batch, so every step is full
STEPS = N_TRAIN // (PROCESSES * PER_PROCESS_BATCH)  # one epoch
LEARNING_RATE = 1e-2  # large, so that training moves the weights far beyond TOLERANCE
TOLERANCE = 1e-5  # max abs difference of the trained weights, two processes vs one (see the module docstring)
LOSS_TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, trace: Path) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf"),  # no user accelerate config is read
               OMP_NUM_THREADS="1", COMPRESSOR_TRAIN_TRACE=str(trace))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _train_args(model: Path, data: Path, batch_size: int, out: Path) -> list:
    return ["train", str(model), "--data", str(data), "--text-columns", "sentence", "--label-column", "label",
            "--train", "adapters", "--epochs", "1", "--batch-size", str(batch_size),
            "--learning-rate", str(LEARNING_RATE), "--max-length", "32", "--seed", "3", "--out", str(out)]


def _run(cmd: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _traces(directory: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("train.rank-*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = make_model_dir(root / "model", "bert", "seq_bn", n_adapters=2, fusion="dynamic")
    config = json.loads((model / "config.json").read_text())
    # no dropout: its random masks would differ between a batch of 2b and two batches of b
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(model)
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    task = signal_task(n_train=N_TRAIN, n_dev=8, seed=0)  # 80 rows: the file reader holds 10% out as dev
    data = root / "signal.tsv"
    data.write_text("\n".join(["sentence\tlabel"] + [f"{e.texts[0]}\t{task.spec.label_list[e.label]}"
                                                      for e in task.train + task.dev]) + "\n")
    assert N_TRAIN % (PROCESSES * PER_PROCESS_BATCH) == 0

    multi = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(PROCESSES), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
                  "-m", "compressor", *_train_args(model, data, PER_PROCESS_BATCH, root / "out-2")],
                 _env(root, root / "trace-2"))
    single = _run([sys.executable, "-m", "compressor",
                   *_train_args(model, data, PROCESSES * PER_PROCESS_BATCH, root / "out-1")],
                  _env(root, root / "trace-1"))
    assert single.returncode == 0, single.stdout + single.stderr
    ranks = _traces(root / "trace-2")
    assert len(ranks) == PROCESSES, f"expected {PROCESSES} rank traces, got {len(ranks)}:\n{multi.stderr[-3000:]}"
    return dict(root=root, model=model, multi=multi, ranks=ranks, one=_traces(root / "trace-1"))


def test_two_processes_really_ran_with_gloo(runs):
    for i, rank in enumerate(runs["ranks"]):
        assert (rank["rank"], rank["world_size"], rank["backend"]) == (i, PROCESSES, "gloo"), rank
        assert rank["distributed_type"].endswith("MULTI_CPU")
    (one,) = runs["one"]
    assert one["world_size"] == 1


def test_ranks_end_with_identical_weights(runs):
    r0, r1 = runs["ranks"]
    assert r0["params_numel"] == r1["params_numel"] > 0
    assert r0["params_sha256"] == r1["params_sha256"], (r0["params_sum"], r1["params_sum"])


def test_ranks_saw_different_examples_that_make_the_global_batch(runs):
    """Step by step over the first epoch (the steps both runs have)."""
    r0, r1 = runs["ranks"]
    (one,) = runs["one"]
    assert len(one["indices"]) == STEPS
    seen = []
    for step, (a, b, together) in enumerate(zip(r0["indices"], r1["indices"], one["indices"])):
        assert len(a) == len(b) == PER_PROCESS_BATCH, (step, a, b)
        assert not set(a) & set(b), f"step {step}: both ranks consumed {sorted(set(a) & set(b))}"
        assert sorted(a + b) == sorted(together), f"step {step}: ranks {a} + {b}, one process {together}"
        seen += a + b
    assert sorted(seen) == list(range(N_TRAIN)), "the first epoch did not see every example once"


def test_an_epoch_is_one_pass_over_the_data_on_any_number_of_processes(runs):
    r0, r1 = runs["ranks"]
    consumed = [i for step in r0["indices"] + r1["indices"] for i in step]
    assert len(r0["indices"]) == len(r1["indices"]) == STEPS, (
        f"--epochs 1 ran {len(r0['indices'])} steps on {PROCESSES} processes, {len(consumed)} examples for "
        f"{N_TRAIN} training examples; expected {STEPS} steps: the step count of an epoch must count global "
        f"batches ({PROCESSES} x --batch-size), not one process's")
    assert sorted(consumed) == list(range(N_TRAIN))


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    multi = runs["multi"]
    assert multi.returncode == 0, f"accelerate launch failed:\n{multi.stdout[-2000:]}\n{multi.stderr[-3000:]}"
    r0, r1 = runs["ranks"]
    (one,) = runs["one"]
    assert len(r0["losses"]) == len(one["losses"]), "another number of steps: see the epoch test"
    # the global loss of a step is the mean of the ranks' losses (equal-sized shards)
    for step, (a, b, together) in enumerate(zip(r0["losses"], r1["losses"], one["losses"])):
        assert abs((a + b) / 2 - together) <= LOSS_TOLERANCE, \
            f"step {step}: mean rank loss {(a + b) / 2} vs one process {together} (learning-rate schedule or " \
            "gradient averaging differs)"
    two = load_file(str(runs["root"] / "out-2" / "model.safetensors"))
    single = load_file(str(runs["root"] / "out-1" / "model.safetensors"))
    initial = load_file(str(runs["model"] / "model.safetensors"))
    assert two.keys() == single.keys()
    worst = max((two[k] - single[k]).abs().max().item() for k in two)
    assert worst <= TOLERANCE, f"max abs weight difference {worst:.3g} > {TOLERANCE}"
    adapter_keys = [k for k in initial if ".adapters." in k]
    moved = max((two["bert." + k] - initial[k]).abs().max().item() for k in adapter_keys)
    assert moved > 100 * TOLERANCE, f"training hardly moved the adapters ({moved:.3g}): the comparison is vacuous"
    assert abs(one["params_sum"] - r0["params_sum"]) <= TOLERANCE * one["params_numel"]
    assert not [p.name for p in runs["root"].iterdir() if ".partial" in p.name]
