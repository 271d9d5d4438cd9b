"""Recovery training after structured pruning: train what the user allows (default: the remaining adapters, fusion
and head) with the masks held, then hand back plain weights (masks removed) so that the MaskSet applies them again
at compaction. Pruned units get no gradient (their outputs are masked), so they stay pruned.

The recovery kinds (`compress prune --recover KIND`) are the entries of RECOVERY: what the student trains
against. A new kind is one more entry."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..errors import TrainingError
from .loop import train
from .objectives import Distillation, KDConfig
from .trainable import select_trainable

DEFAULT_PARTS = ("adapters", "fusion")  # with the head (select_trainable trains the head with them)


@dataclass(frozen=True)
class Recovery:
    name: str
    description: str
    stage: str  # the training stage's name: its checkpoints live under --checkpoint-dir/<stage>
    loss: Callable  # (TaskContext, dense teacher, KDConfig) -> loss_fn(model, batch)
    distils: bool = False  # learns from the dense teacher (takes the --kd-* options)


RECOVERY = {r.name: r for r in (
    Recovery("task", "the task loss", "recover", lambda ctx, teacher, kd: ctx.loss),
    Recovery("kd", "distil the dense model", "recover-kd", lambda ctx, teacher, kd: Distillation(teacher, kd),
             distils=True),
)}


def get_recovery(name: str) -> Recovery:
    if name not in RECOVERY:
        raise TrainingError(f"--recover {name!r} is not one of: {', '.join(RECOVERY)}")
    return RECOVERY[name]


def check_teacher(student: nn.Module, teacher: nn.Module, kd: Optional[KDConfig] = None, labels: bool = True) -> None:
    """TrainingError (one line) unless `teacher` can teach `student`: same model type, hidden size, layer count
    and vocabulary, and (`labels`) the same number of labels when the logits are distilled."""
    from ..modeling.architecture import base_config_of
    from .heads import num_labels_of

    kd = kd or KDConfig()
    s, t = base_config_of(student), base_config_of(teacher)
    hint = "distil from the dense model the student was pruned from"
    for field, what in (("model_type", "architecture"), ("hidden_size", "hidden size"),
                        ("num_hidden_layers", "number of layers"), ("vocab_size", "vocabulary size")):
        if getattr(s, field, None) != getattr(t, field, None):
            raise TrainingError(f"the teacher's {what} is {getattr(t, field, None)}, the student's "
                                f"{getattr(s, field, None)}: {hint}")
    if kd.hidden_weight > 0 and kd.layers and max(kd.layers) >= t.num_hidden_layers:
        raise TrainingError(f"--kd-layers {','.join(map(str, kd.layers))}: the model has {t.num_hidden_layers} "
                            f"layers, numbered 0 to {t.num_hidden_layers - 1}")
    if labels and kd.logits_weight > 0 and num_labels_of(student) != num_labels_of(teacher):
        raise TrainingError(f"the teacher's head has {num_labels_of(teacher)} labels, the student's "
                            f"{num_labels_of(student)}: use a teacher trained on the same task, or "
                            "--kd-logits-weight 0")


def remove_masks(model: nn.Module, maskset) -> nn.Module:
    """Take `maskset`'s structured masks off `model` (in place): plain weights, for writing beside the masks."""
    from ..units import units_by_key

    units = units_by_key(model)
    for key in maskset.masks:
        model.get_submodule(units[key].module_path).set_mask(units[key].kind, None)
    return model


def recover(model: nn.Module, maskset, data, kind: str = "task", parts=DEFAULT_PARTS, steps: Optional[int] = None,
            teacher: Optional[nn.Module] = None, kd: Optional[KDConfig] = None) -> tuple:
    """(a trained copy of `model`, the loop's summary): `parts` (and the head) trained for `steps` (default:
    data.config's budget) on `data` (a TaskContext) under `maskset`'s structured masks, against RECOVERY[kind].
    `teacher` (kd): the dense model before the masks, default `model` itself; it is not modified beyond being
    frozen and put in eval mode."""
    from ..masks import apply_masks

    recovery = get_recovery(kind)
    if any(maskset.kind_of(k) == "weights" for k in maskset.masks):
        raise TrainingError("recovery training holds structured masks only (weight masks: use sparse-adapter)")
    teacher = model if teacher is None else teacher
    student = apply_masks(copy.deepcopy(model), maskset)
    if recovery.distils:
        check_teacher(student, teacher, kd)
    params = select_trainable(student, list(parts))
    summary = train(student, data.train_set, data.collate, recovery.loss(data, teacher, kd), data.config, params,
                    stage=recovery.stage, steps=steps)
    remove_masks(student, maskset)
    for p in student.parameters():
        p.requires_grad_(False)
    return student.eval(), summary


def retrain_masked(model: nn.Module, maskset, data, parts=DEFAULT_PARTS, steps=None) -> nn.Module:
    """Task-loss recovery (`recover(..., "task")`): the trained copy only."""
    return recover(model, maskset, data, "task", parts, steps)[0]
