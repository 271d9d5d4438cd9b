"""TrainConfig: the budget and optimiser settings shared by `compress train` and every method that trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import TrainingError


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # optimiser steps; overrides epochs when given
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_length: int = 128
    seed: int = 0
    eval_batch_size: int = 64
    checkpoint_dir: Optional[str] = None  # where `--resume` finds finished stages and step checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end of each stage)
    resume: bool = False

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 0:
            raise TrainingError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.epochs <= 0 and not self.max_steps:
            raise TrainingError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise TrainingError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise TrainingError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.resume and not self.checkpoint_dir:
            raise TrainingError("--resume needs the checkpoint directory of the run to resume (--checkpoint-dir)")

    def steps_for(self, n_examples: int, processes: int = 1) -> int:
        """Optimiser steps of a stage: --max-steps, else --epochs passes over `n_examples`, where one step takes
        --batch-size examples on each of `processes` processes (the global batch)."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = -(-n_examples // (self.batch_size * processes))
        return max(1, int(round(self.epochs * per_epoch)))

    def to_dict(self) -> dict:
        return asdict(self)
