"""Tiny learnable tasks and a tiny tokenizer for the method and training tests (offline, seconds on a CPU)."""

from __future__ import annotations

import random
from pathlib import Path

from compressor.data import Example, TaskData, TaskSpec

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lam", "mu",
         "nu", "xi", "omi", "pi", "rho", "sig", "tau", "ups"]
SIGNAL = ("good", "bad")


def tiny_tokenizer(directory) -> object:
    """A WordPiece tokenizer whose vocabulary fits the tiny models (vocab_size 100)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SIGNAL, *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


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
