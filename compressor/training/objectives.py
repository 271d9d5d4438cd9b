"""What methods train against: the task loss on labelled data, the task-agnostic objectives of mask
training (masked language modelling, distillation from the dense model's hidden states), and distillation from a
dense teacher's logits and layer outputs (recovery after pruning, `compress train --teacher`)."""

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


@dataclass(frozen=True)
class KDConfig:
    """Distillation from a dense teacher (`--recover kd`, `compress train --teacher`); the defaults live here.

    loss = logits_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (MSE of the logits for a
           regression head; Hinton et al.'s T^2 keeps the gradient scale independent of T)
         + hidden_weight * mean over `layers` of the MSE of the layer outputs, over real tokens only
    The student keeps the teacher's hidden size and layer count (pruning removes heads, neurons and adapters,
    never hidden dimensions), so layer i of one aligns with layer i of the other."""

    temperature: float = 2.0
    logits_weight: float = 1.0
    hidden_weight: float = 1.0
    layers: Optional[tuple] = None  # 0-based encoder layers whose outputs are matched; None: every layer

    def __post_init__(self):
        if not self.temperature > 0:
            raise TrainingError(f"--kd-temperature must be > 0, got {self.temperature}")
        if self.logits_weight < 0 or self.hidden_weight < 0 or self.logits_weight + self.hidden_weight == 0:
            raise TrainingError(f"the KD weights must be >= 0 and not both 0, got logits {self.logits_weight}, "
                                f"hidden {self.hidden_weight}")

    @classmethod
    def parse_layers(cls, text: Optional[str]) -> Optional[tuple]:
        """`--kd-layers`: 'all' (or None) or comma-separated 0-based layer indices."""
        if text is None or str(text).strip() == "all":
            return None
        try:
            layers = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
        except ValueError:
            layers = ()
        if not layers or min(layers) < 0:
            raise TrainingError(f"--kd-layers must be 'all' or 0-based layer numbers like 1,3,5, got {text!r}")
        return layers


def _logits(out) -> Optional[torch.Tensor]:
    return getattr(out, "logits", None)


def distill_terms(student_out, teacher_out, attention_mask: torch.Tensor, config: KDConfig) -> dict:
    """The unweighted KD terms ("logits", "hidden") of two forward outputs (with hidden_states when the hidden
    term is used)."""
    terms = {}
    s_logits, t_logits = _logits(student_out), _logits(teacher_out)
    if config.logits_weight > 0:
        if s_logits is None or t_logits is None:
            raise TrainingError("KD on logits needs a prediction head on the student and the teacher: "
                                "set --kd-logits-weight 0, or train a head first")
        s_logits, t_logits = s_logits.float(), t_logits.float()
        if s_logits.shape[-1] == 1:  # regression: no distribution to match
            terms["logits"] = F.mse_loss(s_logits, t_logits)
        else:
            T = config.temperature
            terms["logits"] = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                                       log_target=True, reduction="batchmean") * T * T
    if config.hidden_weight > 0:
        s_states, t_states = student_out.hidden_states[1:], teacher_out.hidden_states[1:]
        layers = range(len(t_states)) if config.layers is None else config.layers
        if max(layers) >= len(t_states) or len(s_states) != len(t_states):
            raise TrainingError(f"--kd-layers {','.join(map(str, layers))}: the models have {len(s_states)} and "
                                f"{len(t_states)} layers (0-based numbers below that)")
        mask = attention_mask.to(t_states[0].dtype).unsqueeze(-1)
        per_token = mask.sum() * t_states[0].shape[-1]
        terms["hidden"] = sum(((s_states[i] - t_states[i]) ** 2 * mask).sum() / per_token
                              for i in layers) / len(layers)
    return terms


class Distillation:
    """The KD loss as the training loop's loss_fn(model, batch). The teacher is frozen, in eval mode, run without
    gradients, and follows the batches to the student's device; it is never prepared by accelerate (it does not
    train, so DDP has nothing to synchronise)."""

    def __init__(self, teacher: nn.Module, config: Optional[KDConfig] = None):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.config = config or KDConfig()

    def outputs(self, model: nn.Module, batch: dict) -> tuple:
        """(student output, teacher output) on `batch`, hidden states included when the hidden term is used."""
        inputs = model_inputs(batch)
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        extra = dict(output_hidden_states=True) if self.config.hidden_weight > 0 else {}
        with torch.no_grad():
            target = self.teacher(**inputs, **extra)
        return model(**inputs, **extra), target

    def terms(self, model: nn.Module, batch: dict) -> dict:
        student, teacher = self.outputs(model, batch)
        return distill_terms(student, teacher, batch["attention_mask"], self.config)

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        terms = self.terms(model, batch)
        weights = dict(logits=self.config.logits_weight, hidden=self.config.hidden_weight)
        return sum(weights[k] * v for k, v in terms.items())


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
