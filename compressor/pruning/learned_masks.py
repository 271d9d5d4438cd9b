"""Learned masks over frozen pretrained weights.

- `adapt-by-pruning` (Gao, Colombo and Wang, "Adapting by Pruning: A Case Study on BERT"): a score theta per
  weight (or head / FFN neuron), forward mask sigmoid(t theta) with a large t (nearly binary), straight-through
  backward through the soft sigmoid(s theta), a constant push on theta towards pruning, positive
  initialisation (everything kept at first), pruned connections free to come back; training stops when the
  pruned fraction reaches the target, and the saved mask keeps exactly the top (1 - target) scores.
  By default (variant adam) the scores learn with Adam and the push is applied after each step (decoupled, like
  AdamW's weight decay), theta -= mask_lr * push. Added to the gradient instead, it would pass through Adam's
  per-coordinate normalisation, which turns "gradient + push" into the same step for every score: they would all
  cross zero together whatever the loss says (measured: a random-quality mask on SST-2).
  Measured on MiniLM + an SST-2 adapter (benchmarks/results/adapt_by_pruning.md): the scores learn from g * w, and
  the weights whose g * w most favours removal are the ones whose removal hurts most, so the mask ends at chance
  accuracy at every budget tried; extra["trace"] (loss and pruned fraction every TRACE_EVERY steps) shows it.
  `--option variant=paper` is the paper's own update (its Eq. 7 and appendix Table 1): plain gradient steps on the
  scores and the head, theta -= lr_i * (grad + push), the push added to the gradient so that it follows the
  learning-rate schedule like the paper's gamma_i ("max regularisation"); lr 2e-5, gamma 2e-7 (push = gamma / lr),
  temperatures 1e5 / 1, init N(0.01, 0.001) (0.001 read as the standard deviation: as a variance, a third of the
  scores would start pruned, which the paper says harms), 3 epochs on SST-2 at batch 8. On MiniLM + the SST-2
  adapter its loss moves the scores far less than their random start spreads them (extra["score_spread"];
  benchmarks/results/adapt_by_pruning.md, part 4), so there the mask is the random start's; on small models at
  a fitted rate it learns (tests).
- `tamt` (Liu et al., "Learning to Win Lottery Tickets in BERT Transfer via Task-agnostic Mask Training",
  NAACL 2022): scores initialised from one-shot magnitude pruning (|w|, normalised per matrix), a per-matrix
  threshold keeping the target exactly, straight-through gradients to the scores, trained on a pretraining
  objective (`mlm`, `kd`: cosine distance to the dense model's hidden states, or `mlm+kd`); the thresholds are
  reset at the end so the saved mask meets the target exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PruningConfigError
from ..masks import MaskSet
from ..training import train
from ..training.heads import ensure_head, head_parameters
from ..training.objectives import MLMHead, kd_loss, mask_tokens, encoder_states
from ..units import fingerprint, iter_units
from .methods import PruningMethod, global_prune, register_method

OBJECTIVES = ("mlm", "kd", "mlm+kd")


def encoder_weight_units(model: nn.Module) -> list:
    """Weight units of the pretrained encoder (attention, FFN, sub-layer outputs), not adapters or fusions."""
    return [u for u in iter_units(model) if u.kind == "weights"
            and ".adapters." not in u.module_path and ".adapter_fusion_layer." not in u.module_path]


def n_pruned(fraction: float, n: int) -> int:
    return math.floor(Fraction(repr(float(fraction))) * n)


class _Masked(nn.Module):
    """Parametrisation W -> W * mask(scores)."""

    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn

    def forward(self, weight):
        return weight * self.mask_fn()


class LearnedMasks:
    """Score parameters for a set of units and the plumbing that makes the model use mask(scores): weights through
    a parametrisation, heads / neurons through the modules' gates (refreshed by a forward pre-hook)."""

    def __init__(self, model: nn.Module, units: list, init, mask_of):
        self.model, self.units, self.mask_of = model, units, mask_of
        device = next(model.parameters()).device
        self.scores = {u.key: nn.Parameter(init(u).to(device)) for u in units}
        self.holder = nn.ParameterDict({str(i): self.scores[u.key] for i, u in enumerate(units)})
        self.handles = []
        for u in units:
            fn = (lambda key: (lambda: self.mask_of(key, self.scores[key])))(u.key)
            if u.kind == "weights":
                owner_path, attr = u.module_path.rsplit(".", 1)
                parametrize.register_parametrization(model.get_submodule(owner_path), attr, _Masked(fn), unsafe=True)
            else:
                module = model.get_submodule(u.module_path)
                hook = (lambda kind, f: (lambda mod, args: mod.set_gate(kind, f())))(u.kind, fn)
                self.handles.append(module.register_forward_pre_hook(hook))
        # the holder is a submodule so that accelerate / DDP see the scores; removed in `remove`
        model.add_module("learned_mask_scores", self.holder)

    def parameters(self):
        return list(self.scores.values())

    def remove(self) -> None:
        for u in self.units:
            if u.kind == "weights":
                owner_path, attr = u.module_path.rsplit(".", 1)
                parametrize.remove_parametrizations(self.model.get_submodule(owner_path), attr, leave_parametrized=False)
            else:
                self.model.get_submodule(u.module_path).set_gate(u.kind, None)
        for h in self.handles:
            h.remove()
        del self.model.learned_mask_scores


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- adapt-by-pruning

# The two variants' settings; an option given explicitly overrides its variant's value.
ABP_VARIANTS = {
    # Adam on the scores, the push decoupled from it (theta -= mask_lr * push after each step): an untouched score
    # crosses zero after init / (mask_lr * push) = 200 steps
    "adam": dict(temperature=1000.0, slope=5.0, push=0.1, init=0.2, init_std=0.0, mask_lr=0.01),
    # the paper's: plain gradient steps, lr 2e-5 for scores and head, gamma = mask_lr * push = 2e-7
    "paper": dict(temperature=1e5, slope=1.0, push=0.01, init=0.01, init_std=0.001, mask_lr=2e-5),
}


@dataclass
class AdaptByPruningOptions:
    variant: str = "adam"  # adam (ours) or paper (plain gradient steps, the paper's hyperparameters)
    temperature: Optional[float] = None  # forward: sigmoid(temperature * theta), nearly binary
    slope: Optional[float] = None  # backward: the gradient of sigmoid(slope * theta), soft
    push: Optional[float] = None  # every step theta moves mask_lr * push towards pruning
    init: Optional[float] = None  # positive initial theta (mean): every connection starts kept
    init_std: Optional[float] = None  # spread of the initial theta, N(init, init_std)
    mask_lr: Optional[float] = None  # learning rate of the scores (adam: the head uses --learning-rate)

    def __post_init__(self):
        if self.variant not in ABP_VARIANTS:
            raise PruningConfigError(f"adapt-by-pruning: --option variant must be one of: {', '.join(ABP_VARIANTS)} "
                                     f"(got {self.variant!r})")
        for key, value in ABP_VARIANTS[self.variant].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.temperature <= 0 or self.slope <= 0 or self.init <= 0 or self.mask_lr <= 0:
            raise PruningConfigError("adapt-by-pruning: temperature, slope, init and mask_lr must be > 0")
        if self.push < 0 or self.init_std < 0:
            raise PruningConfigError("adapt-by-pruning: push and init_std must be >= 0")


def _initial_scores(opts: AdaptByPruningOptions, seed: int):
    """theta_0 ~ N(init, init_std), drawn unit after unit from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return lambda u: opts.init + opts.init_std * torch.randn(u.shape, generator=gen)


def _score_spread(units, scores: dict, opts: AdaptByPruningOptions, seed: int) -> dict:
    """Per kind, the standard deviation of the initial scores and of what training added to them. The push moves
    every score alike, so the second is the loss's doing; when it is far below the first, the final ranking (and
    the mask) is the random initialisation's, not the task's. theta_0 is drawn again unit after unit, as training
    drew it, and both spreads are summed as they go (nothing the size of the model is kept)."""
    initial, sums = _initial_scores(opts, seed), {}
    for u in units:
        theta0 = initial(u).double()
        moved = scores[u.key].double() - theta0
        acc = sums.setdefault(u.kind, torch.zeros(5, dtype=torch.float64))
        acc += torch.stack([torch.tensor(float(theta0.numel()), dtype=torch.float64), theta0.sum(),
                            theta0.square().sum(), moved.sum(), moved.square().sum()])

    def std(n, total, squares):
        return math.sqrt(max(float(squares - total * total / n), 0.0) / max(float(n) - 1, 1))

    return {kind: dict(initial=std(a[0], a[1], a[2]), learned=std(a[0], a[3], a[4])) for kind, a in sums.items()}


def _abp_warnings(targets: dict, fractions: dict, spread: dict) -> list:
    """What the user of a learned mask should know: training ended short of the target (the final top-k chose the
    rest), or the loss moved the scores too little to outrank their random start (the mask is the start's)."""
    out = []
    for kind, target in targets.items():
        if fractions[kind] < target:
            out.append(f"adapt-by-pruning: training ended with {fractions[kind]:.1%} of the {kind} pruned, short of "
                       f"the {target:.0%} target; the final top-k by score pruned the rest (train longer, or raise "
                       "--option push)")
        s = spread[kind]
        if s["initial"] > 0 and s["learned"] < 0.01 * s["initial"]:
            ratio = s["initial"] / max(s["learned"], 1e-30)
            out.append(f"adapt-by-pruning: the loss moved the {kind} scores {ratio:.0f} times less than their random "
                       "start spreads them: the mask is the random start's (raise --option mask_lr)")
    return out


TRACE_EVERY = 10  # steps between two points of adapt-by-pruning's training trace


@register_method("adapt-by-pruning")
class AdaptByPruning(PruningMethod):
    criterion = "learned"
    needs_data = True
    kinds = ("weights", "heads", "neurons")
    scope = "global"
    Options = AdaptByPruningOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        model = ensure_head(copy.deepcopy(model), data.spec, seed=cfg.seed)
        _freeze(model)
        encoder = {u.key for u in encoder_weight_units(model)}
        units = [u for u in iter_units(model) if u.kind in cfg.sparsity and (u.kind != "weights" or u.key in encoder)]

        def mask_of(key, theta):
            hard = torch.sigmoid(opts.temperature * theta).detach()
            soft = torch.sigmoid(opts.slope * theta)
            return hard + soft - soft.detach()  # forward: hard; backward: the soft slope

        learned = LearnedMasks(model, units, _initial_scores(opts, cfg.seed), mask_of)
        head = head_parameters(model)
        for p in head:
            p.requires_grad_(True)
        totals = {kind: sum(u.size for u in units if u.kind == kind) for kind in cfg.sparsity}

        thetas = learned.parameters()
        recent, trace = [], []  # the loss and pruned fraction along training (extra["trace"]: is the mask any good?)

        def loss(m, batch):
            value = data.loss(m, batch)
            recent.append(float(value.detach()))
            return value

        paper = opts.variant == "paper"

        @torch.no_grad()
        def push_in_gradient(step):  # paper: gamma_i = lr_i * push, through the optimiser and its schedule
            for theta in thetas:
                if theta.grad is not None:
                    theta.grad.add_(opts.push)

        @torch.no_grad()
        def push(step):
            if not paper:  # decoupled from Adam (see the module docstring)
                for theta in thetas:
                    theta.sub_(opts.mask_lr * opts.push)
            if step % TRACE_EVERY == 0:
                trace.append(dict(step=step, loss=round(sum(recent) / len(recent), 4),
                                  pruned={k: round(pruned_fraction(k), 4) for k in cfg.sparsity}))
                recent.clear()

        def pruned_fraction(kind):
            return sum(int((learned.scores[u.key] <= 0).sum()) for u in units if u.kind == kind) / totals[kind]

        def reached(step):
            return all(pruned_fraction(k) >= f for k, f in cfg.sparsity.items())

        # the scores' learning rate follows the linear decay, the push does not: the loss decides early, and the push
        # completes the pruning as the loss's pull fades (with Adam, a small but steady gradient moves a score as
        # fast as a large one, so under a constant rate scores with push < 1 step may never fall)
        groups = [dict(params=thetas, lr=opts.mask_lr, weight_decay=0.0)]
        if head:  # the paper steps the head (its p) at the scores' rate too (Table 1: alpha = beta = 2e-5)
            groups.append(dict(params=head, lr=opts.mask_lr, weight_decay=0.0) if paper else dict(params=head))
        summary = train(model, data.train_set, data.collate, loss, data.config, groups, stage="masks",
                        after_backward=push_in_gradient if paper else None, after_step=push, should_stop=reached,
                        optimizer="sgd" if paper else "adamw")
        fractions = {k: pruned_fraction(k) for k in cfg.sparsity}
        scores = {u.key: learned.scores[u.key].detach().cpu().clone() for u in units}
        spread = _score_spread(units, scores, opts, cfg.seed)
        learned.remove()
        _freeze(model)
        masks = {}
        for kind, fraction in cfg.sparsity.items():
            part = {u.key: u for u in units if u.kind == kind}
            masks.update(global_prune({k: scores[k] for k in part}, part, fraction,
                                      0 if kind == "weights" else cfg.min_keep))
        extra = dict(train=summary, reached_target_in_training=reached(0), pruned_fraction_at_stop=fractions,
                     trace=trace, score_spread=spread, warnings=_abp_warnings(cfg.sparsity, fractions, spread))
        return MaskSet(masks, fingerprint(model), self.name, extra=extra, model=model.eval())


# ----------------------------------------------------------------------------------------------- tamt

@dataclass
class TamtOptions:
    objective: str = "kd"
    mlm_probability: float = 0.15
    mask_lr: float = 0.01

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise PruningConfigError(f"--objective must be one of: {', '.join(OBJECTIVES)} (got {self.objective!r})")


def topk_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep-mask of the top scores of one matrix, pruning exactly floor(fraction * n) (ties by position)."""
    flat = scores.detach().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = n_pruned(fraction, flat.numel())
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view(scores.shape)


class PretrainingObjective:
    """Task-agnostic loss on the task's texts: MLM (BERT masking), KD to the dense model, or their sum."""

    def __init__(self, model, objective: str, tokenizer, probability: float, seed: int):
        self.objective, self.tokenizer, self.probability = objective, tokenizer, probability
        self.teacher = copy.deepcopy(model).eval() if "kd" in objective else None
        self.head = None
        if "mlm" in objective:
            if tokenizer.mask_token_id is None:
                raise PruningConfigError("--objective mlm needs a tokenizer with a mask token")
            with torch.random.fork_rng(devices=[]):  # a seeded initialisation: same seed, same masks
                torch.manual_seed(seed)
                self.head = MLMHead(model.base_model.embeddings.word_embeddings).to(next(model.parameters()).device)
            model.add_module("mlm_objective_head", self.head)  # trained with the masks; removed afterwards
        self.generator = torch.Generator().manual_seed(seed)

    def parameters(self):
        return [p for n, p in self.head.named_parameters() if not n.startswith("embeddings")] if self.head else []

    def __call__(self, model, batch):
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        loss = 0.0
        if self.head is not None:
            ids, labels = mask_tokens({k: v.cpu() for k, v in batch.items()}, self.tokenizer, self.probability,
                                      self.generator)
            states = encoder_states(model, dict(batch, input_ids=ids.to(device)))
            inner = getattr(model, "module", model)
            logits = inner.mlm_objective_head(states)
            loss = loss + nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.to(device).view(-1),
                                                      ignore_index=-100)
        if self.teacher is not None:
            loss = loss + kd_loss(model, batch, self.teacher)
        return loss

    def remove(self, model):
        if self.head is not None:
            del model.mlm_objective_head


@register_method("tamt")
class TaskAgnosticMaskTraining(PruningMethod):
    criterion = "magnitude"  # initialisation
    needs_data = True  # texts for the pretraining objective (labels are not used)
    kinds = ("weights",)
    Options = TamtOptions

    def run(self, model: nn.Module, data=None) -> MaskSet:
        opts, cfg = self.options, self.config
        fraction = cfg.sparsity["weights"]
        model = copy.deepcopy(model)
        _freeze(model)
        units = encoder_weight_units(model)

        def init(u):
            w = model.get_parameter(u.module_path).detach().abs().cpu()
            return w / w.mean().clamp_min(1e-12)  # magnitude order; a scale the score learning rate fits

        def mask_of(key, scores):
            return topk_keep(scores, fraction).to(scores.dtype) + scores - scores.detach()  # straight-through

        objective = PretrainingObjective(model, opts.objective, data.tokenizer, opts.mlm_probability, cfg.seed)
        learned = LearnedMasks(model, units, init, mask_of)  # after the teacher copy: the teacher stays dense
        initial = {u.key: topk_keep(learned.scores[u.key], fraction).cpu() for u in units}
        groups = [dict(params=learned.parameters(), lr=opts.mask_lr, weight_decay=0.0)]
        if objective.parameters():
            groups.append(dict(params=objective.parameters()))
        for p in objective.parameters():
            p.requires_grad_(True)
        summary = train(model, data.train_set, data.collate, objective, data.config, groups, stage="tamt")
        masks = {u.key: topk_keep(learned.scores[u.key], fraction).cpu() for u in units}  # threshold reset
        learned.remove()
        objective.remove(model)
        changed = sum(int((masks[k] != initial[k]).sum()) for k in masks)
        extra = dict(train=summary, objective=opts.objective, changed_from_magnitude=changed,
                     mlm_head="fresh transform, decoder tied to the word embeddings" if "mlm" in opts.objective else None)
        return MaskSet(masks, fingerprint(model), self.name, extra=extra)
