"""What methods train against: the task loss on labelled data, and the task-agnostic objectives of mask
training (masked language modelling, distillation from the dense model's hidden states)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import TrainingError
from .config import TrainConfig


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def task_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**model_inputs(batch))
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TrainingError("the model has no prediction head: give it one (compress train --train head)")
    labels = batch["labels"]
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def encoder_states(model: nn.Module, batch: dict) -> torch.Tensor:
    return _unwrap(model).base_model(**model_inputs(batch)).last_hidden_state


def kd_loss(model: nn.Module, batch: dict, teacher: nn.Module) -> torch.Tensor:
    """Cosine distance between the masked model's and the dense teacher's last hidden states, over real tokens
    (TAMT's task-agnostic distillation objective)."""
    with torch.no_grad():
        target = encoder_states(teacher, batch)
    student = encoder_states(model, batch)
    mask = batch["attention_mask"].to(student.dtype)
    cos = F.cosine_similarity(student, target, dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum()


class MLMHead(nn.Module):
    """BERT's MLM head (transform + decoder tied to the word embeddings). Sentence-embedding checkpoints such as
    all-MiniLM-L6-v2 ship without one; the transform is then freshly initialised and learned with the masks."""

    def __init__(self, embeddings: nn.Embedding, hidden_act=F.gelu, eps: float = 1e-12):
        super().__init__()
        hidden = embeddings.weight.shape[1]
        self.dense = nn.Linear(hidden, hidden)
        self.act = hidden_act
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.embeddings = embeddings
        self.bias = nn.Parameter(torch.zeros(embeddings.weight.shape[0]))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(states))), self.embeddings.weight, self.bias)


def mask_tokens(batch: dict, tokenizer, probability: float, generator: torch.Generator) -> tuple:
    """BERT's 80/10/10 masking of non-special tokens; labels -100 elsewhere."""
    ids = batch["input_ids"].clone()
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in ids.tolist()], dtype=torch.bool)
    candidates = ~special & batch["attention_mask"].bool()
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & candidates
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[randomise] = torch.randint(len(tokenizer), ids.shape, generator=generator)[randomise]
    return ids, labels


@dataclass
class TaskContext:
    """Everything a data-driven criterion or method needs: the task, tokenised splits, the loss, the budget."""

    data: object  # compressor.data.TaskData
    tokenizer: object
    train_set: object
    dev_set: object
    collate: object
    config: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def build(cls, data, tokenizer, config: Optional[TrainConfig] = None, max_train: Optional[int] = None,
              max_dev: Optional[int] = None) -> "TaskContext":
        from ..data import TokenizedDataset, collate

        config = config or TrainConfig()
        train = data.train[:max_train] if max_train else data.train
        dev = data.dev[:max_dev] if max_dev else data.dev
        return cls(data, tokenizer, TokenizedDataset(train, tokenizer, config.max_length),
                   TokenizedDataset(dev, tokenizer, config.max_length), collate(tokenizer), config)

    @property
    def spec(self):
        return self.data.spec

    def batches(self, n: Optional[int] = None, batch_size: Optional[int] = None, seed: Optional[int] = None):
        """`n` training batches (all when None) in a seeded order: what criteria average their scores over."""
        gen = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        loader = DataLoader(self.train_set, batch_size=batch_size or self.config.batch_size, shuffle=True,
                            collate_fn=self.collate, generator=gen)
        for i, batch in enumerate(loader):
            if n is not None and i >= n:
                return
            yield batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        return task_loss(model, {k: v.to(device) for k, v in batch.items()})

    def evaluate(self, model: nn.Module) -> dict:
        from .loop import evaluate

        return evaluate(model, self.dev_set, self.collate, self.spec, self.config.eval_batch_size)

    def main_metric(self, metrics: dict) -> float:
        return float(metrics[self.spec.main_metric])

    def describe(self) -> dict:
        return dict(source=self.data.source, train_examples=len(self.train_set), dev_examples=len(self.dev_set))
