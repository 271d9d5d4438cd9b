"""Tiny learnable tasks and a tiny tokenizer for the method and training tests (offline, seconds on a CPU)."""

from __future__ import annotations

import contextlib
import functools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compressor.data import Example, TaskData, TaskSpec

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lam", "mu",
         "nu", "xi", "omi", "pi", "rho", "sig", "tau", "ups"]
SIGNAL = ("good", "bad")


@contextlib.contextmanager
def single_thread():
    """One intra-op thread while the tiny models train: they gain nothing from more, and on a busy machine two
    OpenMP threads spin-waiting on each other make the method tests several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer(directory) -> object:
    """A WordPiece tokenizer whose vocabulary fits the tiny models (vocab_size 100)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SIGNAL, *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def with_tokenizer(model_dir) -> Path:
    """The tiny tokenizer's vocab.txt plus a tokenizer_config.json: AutoTokenizer loads it from the model dir."""
    import json

    model_dir = Path(model_dir)
    tiny_tokenizer(model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    return model_dir


def write_signal_tsv(path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """The signal task as a `--data` file (sentence, label): read with SIGNAL_DATA_ARGS."""
    task = signal_task(n_train=n_train, n_dev=n_dev, seed=seed)
    rows = ["sentence\tlabel"] + [f"{e.texts[0]}\t{task.spec.label_list[e.label]}" for e in task.train + task.dev]
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


def signal_data_args(path) -> tuple:
    return ("--data", path, "--text-columns", "sentence", "--label-column", "label")


def signal_task(n_train: int = 256, n_dev: int = 128, seed: int = 0, length: int = 8) -> TaskData:
    """Binary task: label 1 when the sentence holds 'good', 0 when it holds 'bad', among random filler words."""
    rng = random.Random(seed)

    def example():
        label = rng.randrange(2)
        words = [rng.choice(WORDS) for _ in range(length - 1)]
        words.insert(rng.randrange(length), SIGNAL[0] if label else SIGNAL[1])
        return Example((" ".join(words),), label)

    spec = TaskSpec(name="signal", text_columns=("sentence",), label_column="label", label_list=("bad", "good"),
                    metrics=("accuracy",), main_metric="accuracy")
    return TaskData(spec, [example() for _ in range(n_train)], [example() for _ in range(n_dev)],
                    dict(spec="synthetic:signal", seed=seed))


def train_with_planted_heads(model, context, keep: dict, steps: int = 80, learning_rate: float = 3e-3):
    """Fine-tune the whole model (encoder and head) on `context`'s task with every attention head masked except
    those in `keep` (heads-unit key -> head indices), then unmask. The task signal then flows through the kept
    heads only; the other heads keep their random initial weights, so a method that finds the heads that matter
    must keep the planted ones. In place; returns the training summary."""
    import torch

    from compressor.training import train
    from compressor.training.trainable import select_trainable
    from compressor.units import iter_units

    heads = [u for u in iter_units(model) if u.kind == "heads"]
    for u in heads:
        mask = torch.zeros(u.shape, dtype=torch.bool)
        mask[list(keep.get(u.key, ()))] = True
        model.get_submodule(u.module_path).set_mask("heads", mask)
    try:
        summary = train(model, context.train_set, context.collate, context.loss, context.config,
                        select_trainable(model, "all"), stage="planted", steps=steps, learning_rate=learning_rate)
    finally:
        for u in heads:
            model.get_submodule(u.module_path).set_mask("heads", None)
        for p in model.parameters():
            p.requires_grad_(False)
    return summary


def signal_context(tokenizer, max_steps: int = 20, seed: int = 0, learning_rate: float = 1e-3, task_seed: int = 0):
    """A TaskContext on signal_task(seed=task_seed): batch size 16, `max_steps` optimiser steps per training stage,
    `seed` for the data order (as `compress prune --seed` sets it)."""
    from compressor.training import TaskContext, TrainConfig

    return TaskContext.build(signal_task(seed=task_seed), tokenizer,
                             TrainConfig(max_steps=max_steps, batch_size=16, learning_rate=learning_rate, seed=seed))


@dataclass
class PlantedModel:
    model: object  # a FlexHeadModel (bert, seq_bn adapters a0..a2 in a dynamic fusion, head 'signal'), frozen
    tokenizer: object
    keep: dict  # heads-unit key -> the indices of the heads the task signal flows through
    dev_accuracy: float


@functools.lru_cache(maxsize=None)
def planted_signal_model(seed: int = 0) -> PlantedModel:
    """The learnable setting of the method tests, built once per process (do not modify it: deep-copy first).

    The tiny random-weight models cannot learn signal_task by training adapters alone (their 0.02-std attention
    carries almost nothing to [CLS]), so the whole model is fine-tuned first, with one planted head per layer
    (train_with_planted_heads): dev accuracy 1.0, the signal in known heads, weights and neurons that matter."""
    import compressor
    from compressor.training.heads import ensure_head
    from compressor.units import iter_units
    from factories import make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp) / "tokenizer")
        model = compressor.load_model(make_model_dir(Path(tmp) / "model", "bert", "seq_bn", 3, "dynamic", seed=seed))
    context = signal_context(tokenizer, seed=seed, task_seed=seed)
    model = ensure_head(model, context.spec, seed=seed)
    heads = [u for u in iter_units(model) if u.kind == "heads"]
    keep = {u.key: ((i + 1 + seed) % u.shape[0],) for i, u in enumerate(heads)}
    train_with_planted_heads(model, context, keep)
    model.eval()
    return PlantedModel(model, tokenizer, keep, context.main_metric(context.evaluate(model)))
