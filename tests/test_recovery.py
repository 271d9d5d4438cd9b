"""Recovery after structured pruning (compressor/training/recovery.py), on the planted tiny model of the method
tests: distillation from the dense model lowers KL(teacher || student) on dev batches, pruned units stay pruned,
the recovered model compacts exactly (invariant 1), and the KD loss is zero for a student equal to its teacher.

Multi-process: recovery runs on the one training loop (tests/test_distributed.py covers it under two processes);
the KD loss only adds a frozen teacher that follows the batches to the student's device, so it is tested here in
one process."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.compaction import compact
from compressor.errors import TrainingError
from compressor.evaluation import mean_kl
from compressor.masks import masked_copy
from compressor.pruning import prune
from compressor.training.loop import predict
from compressor.training.objectives import Distillation, KDConfig
from compressor.training.recovery import RECOVERY, check_teacher, recover
from factories import make_model_dir, random_inputs
from task_factories import signal_context

SEED = 0
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: also `planted`


@pytest.fixture(scope="module")
def pruned(planted):
    """Half of the heads and FFN neurons pruned at random (data-free), and the dev context."""
    masks = prune(planted.model, "random", {"heads": 0.5, "neurons": 0.5}, seed=SEED)
    ctx = signal_context(planted.tokenizer, max_steps=STEPS, learning_rate=3e-3)
    return masks, ctx


def dev_kl(teacher, student, ctx) -> float:
    ref, _ = predict(teacher, ctx.dev_set, ctx.collate)
    cand, _ = predict(student, ctx.dev_set, ctx.collate)
    return mean_kl(ref, cand)


@pytest.fixture(scope="module")
def recovered(planted, pruned):
    masks, ctx = pruned
    teacher = copy.deepcopy(planted.model)
    model, summary = recover(planted.model, masks, ctx, "kd", teacher=teacher)  # adapters, fusion, head
    return model, summary


def test_kd_recovery_lowers_kl_to_the_teacher(planted, pruned, recovered):
    masks, ctx = pruned
    model, summary = recovered
    before = dev_kl(planted.model, masked_copy(planted.model, masks), ctx)
    after = dev_kl(planted.model, masked_copy(model, masks), ctx)
    assert summary["steps"] == STEPS
    assert before > 1e-4, before  # pruning moved the outputs (KL 1.4e-3 at seed 0)
    assert after < 0.5 * before, (before, after)  # measured: about 10x lower


def test_recovery_keeps_pruned_units_pruned(planted, pruned, recovered):
    """The masks are not touched and a pruned head or neuron still contributes nothing: the recovered model under
    the masks equals its compaction (invariant 1), which has physically removed them."""
    masks, _ = pruned
    model, _ = recovered
    snapshot = {k: v.clone() for k, v in masks.masks.items()}
    assert all(torch.equal(snapshot[k], masks.masks[k]) for k in snapshot)
    assert any(not m.all() for m in masks.masks.values())
    masks.check(model)
    inputs = random_inputs("bert", 3, 10, "random", seed=1)
    with torch.no_grad():
        ref = masked_copy(model, masks)(**inputs).logits
        out = compact(model, masks)(**inputs).logits
    assert (out - ref).abs().max().item() <= 1e-5
    # the weights moved (it trained), the dense teacher did not
    moved = [n for (n, p), q in zip(model.named_parameters(), planted.model.parameters()) if not torch.equal(p, q)]
    assert moved


def test_kd_loss_is_zero_for_the_teacher_itself(planted, pruned):
    _, ctx = pruned
    batch = next(iter(ctx.batches(1)))
    for kd in (KDConfig(), KDConfig(temperature=4.0, hidden_weight=3.0, layers=(0,))):
        loss = Distillation(copy.deepcopy(planted.model), kd)(planted.model, batch)
        assert abs(float(loss)) < 1e-6
    pruned_loss = Distillation(copy.deepcopy(planted.model))(masked_copy(planted.model, pruned[0]), batch)
    assert float(pruned_loss) > 1e-4


def test_task_recovery_is_the_registered_default(planted, pruned):
    assert set(RECOVERY) == {"task", "kd"}
    masks, ctx = pruned
    model, summary = recover(planted.model, masks, ctx, "task", steps=2)
    assert summary["steps"] == 2 and summary["stage"] == "recover"
    masks.check(model)


def test_teacher_must_fit_the_student(planted, tmp_path):
    import compressor

    student = planted.model
    roberta = compressor.load_model(make_model_dir(tmp_path / "r", "roberta", "seq_bn", 3, "dynamic"))
    with pytest.raises(TrainingError, match="architecture is roberta"):
        check_teacher(student, roberta)
    vocab = copy.deepcopy(student)
    vocab.base_model.resize_token_embeddings(120)
    with pytest.raises(TrainingError, match="vocabulary size is 120"):
        check_teacher(student, vocab)
    three = compressor.load_model(make_model_dir(tmp_path / "f", "bert", "seq_bn", 3, "dynamic", head="flex"))
    with pytest.raises(TrainingError, match="teacher's head has 3 labels"):
        check_teacher(student, three)
    check_teacher(student, three, KDConfig(logits_weight=0))  # layer outputs only: any head
    with pytest.raises(TrainingError, match="numbered 0 to 1"):
        check_teacher(student, student, KDConfig(layers=(2,)))
    with pytest.raises(TrainingError, match="kd-layers"):
        KDConfig.parse_layers("1,x")
    assert KDConfig.parse_layers("3,1") == (1, 3) and KDConfig.parse_layers("all") is None
