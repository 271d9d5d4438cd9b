"""The training loop: accelerate for devices and distribution, rich for progress, per-stage checkpoints.

A method trains in named stages ("dense", "round-2", ...). With a checkpoint directory each stage saves its
final state under `<dir>/<stage>/final` (and `<dir>/<stage>/step-N` every `checkpoint_every` steps); with
`resume`, a finished stage loads its final state instead of training again and an unfinished one continues
from its last step checkpoint. Methods are deterministic for a seed, so a resumed run reaches the same masks.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import TrainingError
from .config import TrainConfig

Hook = Callable[[int], None]

TRACE_ENV = "COMPRESSOR_TRAIN_TRACE"  # debugging hook, see _Trace


def _progress(total: int, description: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=not sys.stderr.isatty())


def _stage_dir(config: TrainConfig, stage: str) -> Optional[Path]:
    return Path(config.checkpoint_dir) / stage if config.checkpoint_dir else None


def _latest_step(stage_dir: Path) -> Optional[Path]:
    steps = list(stage_dir.glob("step-*"))
    odd = [p.name for p in steps if not p.name[len("step-"):].isdigit() or not p.is_dir()]
    if odd:
        raise TrainingError(f"{stage_dir} holds {odd[0]}, which is not a step checkpoint (step-N directories): "
                            "remove it, or drop --resume to start over")
    return max(steps, key=lambda p: int(p.name[len("step-"):])) if steps else None


def _load_step(accelerator, directory: Path) -> None:
    """accelerate's load_state, with its failures (a pickle that weights_only refuses, a truncated file) as one
    line. accelerate loads optimizer and RNG states with torch.load; a file that is not plain tensors is refused."""
    try:
        accelerator.load_state(str(directory))
    except Exception as e:  # UnpicklingError, RuntimeError, KeyError, OSError...: all mean "cannot resume"
        import pickle

        why = ("it holds a pickle with more than tensors, which is never loaded" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise TrainingError(f"cannot resume from {directory}: {why}; remove that checkpoint, or drop --resume "
                            "to start over") from e


def train(model: nn.Module, dataset, collate_fn, loss_fn: Callable, config: TrainConfig,
          params: Optional[Iterable[nn.Parameter]] = None, stage: str = "train",
          after_backward: Optional[Hook] = None, after_step: Optional[Hook] = None,
          steps: Optional[int] = None, learning_rate: Optional[float] = None,
          should_stop: Optional[Callable[[int], bool]] = None, optimizer: str = "adamw") -> dict:
    """Train `params` (default: those with requires_grad) of `model` in place on `dataset` to minimise
    `loss_fn(model, batch)`. Hooks get the step number: `after_backward` before the optimiser step (gradient
    surgery), `after_step` after it (mask projection, schedules). `optimizer`: adamw, or sgd (plain gradient steps,
    no momentum; a method that follows a paper's update rule). Returns a summary dict."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    params = list(params if params is not None else model.parameters())
    if params and isinstance(params[0], dict):  # parameter groups, e.g. mask scores at their own learning rate
        params = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError(f"stage '{stage}': nothing to train (every parameter is frozen)")
    accelerator = Accelerator()
    total = steps if steps is not None else config.steps_for(len(dataset), accelerator.num_processes)
    summary = dict(stage=stage, steps=total, examples=len(dataset), loss=None, seconds=0.0, resumed=False)
    stage_dir = _stage_dir(config, stage)
    if config.resume and stage_dir is not None and (stage_dir / "final" / "model.pt").is_file():
        _load_final(model, stage_dir / "final")
        summary.update(resumed=True, loss=_read_loss(stage_dir / "final"))
        return summary
    if total == 0:
        return summary
    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    trace = _Trace(os.environ[TRACE_ENV]) if os.environ.get(TRACE_ENV) else None
    if trace is not None:  # same sampler, same order: only the indices are noted on their way through
        dataset, collate_fn = trace.wrap(dataset, collate_fn)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate_fn, generator=gen)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    lr = learning_rate or config.learning_rate
    optimizer = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay))
    # accelerate steps a prepared scheduler once per process at every optimiser step (split_batches=False, the
    # global batch is num_processes x --batch-size): give it num_processes times the steps so that the schedule
    # spans `total` optimiser steps, as in one process
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total) * n, total * n)
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start = 0
    if config.resume and stage_dir is not None and (last := _latest_step(stage_dir)) is not None:
        _load_step(accelerator, last)
        start = int(last.name.split("-")[1])
        summary["resumed"] = True
    prepared.train()
    t0, step, loss_value = time.perf_counter(), start, math.nan
    with _progress(total, stage) as bar:
        task = bar.add_task(stage, total=total, completed=start, loss="")
        epoch_batches = len(loader)
        while step < total:
            # skip what a resumed run already consumed of this epoch, with the same shuffling
            skip = step % epoch_batches
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in epoch_loader:
                loss = loss_fn(prepared, batch)
                accelerator.backward(loss)
                if after_backward is not None:
                    after_backward(step)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if after_step is not None:
                    after_step(step)
                loss_value = float(loss.detach())
                if trace is not None:
                    trace.step(loss_value)
                bar.update(task, advance=1, loss=f"loss {loss_value:.4f}")
                if stage_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                        and step < total:
                    accelerator.save_state(str(stage_dir / f"step-{step}"))
                if step >= total or (should_stop is not None and should_stop(step)):
                    total = step
                    break
    prepared.eval()
    model.eval()
    summary.update(loss=loss_value, seconds=time.perf_counter() - t0, steps=step)
    if trace is not None:
        trace.write(accelerator, stage, accelerator.unwrap_model(prepared), params)
    if stage_dir is not None and accelerator.is_main_process:
        _save_final(accelerator.unwrap_model(prepared), stage_dir / "final", loss_value)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return summary


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _Trace:
    """Debugging hook for multi-process runs: with COMPRESSOR_TRAIN_TRACE=DIR in the environment, every process
    writes DIR/<stage>.rank-<i>.json at the end of a stage (the last run of a stage name wins): its rank, the
    world size and backend, the dataset indices of the examples it consumed at each step, its local loss at each
    step, and a sha256 and sum of its trainable parameters, which data parallelism must keep equal on every
    rank. tests/test_distributed.py reads it. Indices travel from the dataset to the collate function beside
    the examples; the loader prefetches, so they queue until their batch is consumed."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.pending = collections.deque()
        self.indices, self.losses = [], []

    def wrap(self, dataset, collate_fn):
        def collate(items):
            self.pending.append([int(i) for i, _ in items])
            return collate_fn([item for _, item in items])
        return _Indexed(dataset), collate

    def step(self, loss: float) -> None:
        self.indices.append(self.pending.popleft())
        self.losses.append(loss)

    def write(self, accelerator, stage: str, model: nn.Module, params: list) -> None:
        trainable = {id(p) for g in params for p in (g["params"] if isinstance(g, dict) else [g])}
        digest, total, count = hashlib.sha256(), 0.0, 0
        for name, p in model.named_parameters():
            if id(p) in trainable:
                value = p.detach().float().cpu().contiguous()
                digest.update(name.encode() + value.numpy().tobytes())
                total, count = total + float(value.double().sum()), count + value.numel()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        record = dict(stage=stage, rank=accelerator.process_index, world_size=accelerator.num_processes,
                      distributed_type=str(accelerator.distributed_type),
                      backend=torch.distributed.get_backend() if dist else None, indices=self.indices,
                      losses=self.losses, params_sha256=digest.hexdigest(), params_sum=total, params_numel=count)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{stage}.rank-{accelerator.process_index}.json"
        path.write_text(json.dumps(record) + "\n")


def _save_final(model: nn.Module, directory: Path, loss: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    (directory / "loss.txt").write_text(f"{loss}\n")
    tmp.replace(directory / "model.pt")  # last: a stage without model.pt is not finished


def _load_final(model: nn.Module, directory: Path) -> None:
    from ..errors import ModelLoadError
    from ..modeling.loading import read_weights

    try:
        state = read_weights(directory / "model.pt")
    except ModelLoadError as e:
        raise TrainingError(f"cannot resume: {e}; remove {directory}, or drop --resume to start over") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise TrainingError(f"checkpoint {directory} does not fit this model ({len(unexpected)} unknown tensors): "
                            "resume with the same model and method, or drop --resume")


def _read_loss(directory: Path) -> Optional[float]:
    try:
        return float((directory / "loss.txt").read_text())
    except (OSError, ValueError):
        return None


@torch.no_grad()
def predict(model: nn.Module, dataset, collate_fn, batch_size: int = 64):
    """Logits and labels over `dataset`, in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, dataset, collate_fn, spec, batch_size: int = 64) -> dict:
    from ..data import compute_metrics

    logits, labels = predict(model, dataset, collate_fn, batch_size)
    return compute_metrics(spec, logits, labels)
