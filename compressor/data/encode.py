"""Examples -> model inputs, with the model's own tokenizer; batches padded to their longest member."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .tasks import TaskSpec


class TokenizedDataset(Dataset):
    """Tokenises every example once up front; items are dicts of python lists plus an int/float "labels"."""

    def __init__(self, examples, tokenizer, max_length: int = 128):
        examples = list(examples)
        widths = {len(e.texts) for e in examples}
        if len(widths) > 1:
            raise DataError("examples mix single texts and text pairs; use one --text-columns setting per dataset")
        first = [e.texts[0] for e in examples]
        second = [e.texts[1] for e in examples] if widths == {2} else None
        # One batched call (fast tokenizers parallelise it); no padding here: the collate pads per batch.
        enc = tokenizer(first, second, truncation=True, max_length=max_length) if examples else {}
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.items = [{**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(tokenizer):
    """A collate_fn padding input_ids / attention_mask / token_type_ids to the batch's longest sequence.

    Written by hand rather than with DataCollatorWithPadding: `tokenizer.pad` on a fast tokenizer logs an
    advice warning on every run, and we want the labels dtype fixed (float for regression, long otherwise).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}

    def collate_fn(items):
        longest = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key, value in pad_values.items():
            if key not in items[0]:
                continue
            rows = []
            for it in items:
                pad = [value] * (longest - len(it[key]))
                rows.append(pad + list(it[key]) if left else list(it[key]) + pad)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        labels = [it["labels"] for it in items]
        regression = any(isinstance(y, float) for y in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return batch

    return collate_fn


def check_labels(spec: TaskSpec, num_labels: int) -> None:
    """DataError when a model head's output size does not fit the task (regression needs 1 output)."""
    if num_labels != spec.num_labels:
        kind = "is a regression task (1 output)" if spec.is_regression else f"has {spec.num_labels}"
        raise DataError(f"the model's head has {num_labels} label{'s' if num_labels != 1 else ''}, {spec.ref} "
                        f"{kind}: train a new head with `compress train --train head`")


def max_positions(model) -> int:
    """How many tokens the model's position embeddings hold (RoBERTa-style models reserve padding_idx + 1)."""
    from ..modeling.descriptions import max_positions as of_config

    return of_config(model.base_model.config)


def check_max_length(model, max_length: int) -> None:
    """DataError, before any work, when --max-length exceeds what the model's position embeddings hold
    (the forward would fail deep inside with an index error)."""
    n = max_positions(model)
    if n and max_length > n:
        raise DataError(f"--max-length {max_length} is more than this model's {n} positions: pass --max-length "
                        f"{n} or less")
