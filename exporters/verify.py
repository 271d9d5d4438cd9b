"""Parity (docs/design.md invariant 2): the masked PyTorch model is the reference; the compacted model and every
onnxruntime graph are compared with it on fresh random inputs: right-padded, left-padded and randomly masked
rows, two batch sizes, two sequence lengths. Per output: name, shapes, max abs diff against the tolerance its
target is held to: `--atol` for the compacted model and `model.onnx`, a variant's own (exporters/variants.py): atol,
a stated tolerance (fp16), or none (int8: recorded only).

Unlike optimum's validation, a mismatch is an error (ParityError), never a warning.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from compressor.errors import ParityError

SHAPES = ((2, 16), (5, 37))  # (batch, seq): two of each, one odd length
PADDINGS = ("right", "left", "random")


@dataclass
class Check:
    target: str
    batch: int
    seq: int
    padding: str
    output: str
    reference_shape: list
    shape: list
    max_abs_diff: float
    atol: Optional[float]  # the max abs diff this target is held to; None: recorded only (never fails)
    ok: bool


@dataclass
class ParityReport:
    seed: int
    atol: float
    checks: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)  # target -> dict(tolerance, held, provider)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def worst(self, target: Optional[str] = None) -> float:
        diffs = [c.max_abs_diff for c in self.checks if target is None or c.target == target]
        return max(diffs) if diffs else float("nan")

    def to_dict(self) -> dict:
        targets = list(dict.fromkeys(c.target for c in self.checks))  # reference order: compacted, graphs
        described = {t: dict(self.targets.get(t, dict(tolerance=self.atol, held=True, provider=None)),
                             worst=self.worst(t), passed=all(c.ok for c in self.checks if c.target == t))
                     for t in targets}
        return dict(seed=self.seed, atol=self.atol, passed=self.passed,
                    worst={t: self.worst(t) for t in targets}, targets=described,
                    checks=[asdict(c) for c in self.checks])


def make_inputs(input_names, batch: int, seq: int, padding: str, rng: np.random.Generator, vocab: int,
                type_vocab: int = 2) -> dict:
    """int64 numpy inputs; every row keeps at least one token (a fully masked row has no defined output)."""
    ids = rng.integers(5, max(6, vocab), size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # one full row, so the longest case is covered
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, :n] = 1
        elif padding == "left":
            mask[row, seq - n:] = 1
        else:
            mask[row] = rng.random(seq) < 0.7
            mask[row, rng.integers(seq)] = 1
    feeds = dict(input_ids=ids, attention_mask=mask,
                 token_type_ids=rng.integers(0, max(1, type_vocab), size=(batch, seq), dtype=np.int64))
    return {k: v for k, v in feeds.items() if k in input_names}


def torch_runner(model: torch.nn.Module, output_name: str) -> Callable[[dict], dict]:
    def run(feeds: dict) -> dict:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {output_name: getattr(out, output_name).float().numpy()}
    return run


def session_runner(session) -> Callable[[dict], dict]:
    """Feeds only the inputs the graph declares: the exporter drops an unused one (attention_mask when every
    head of every layer is pruned, token_type_ids when nothing reads them)."""
    names = [o.name for o in session.get_outputs()]
    declared = {i.name for i in session.get_inputs()}

    def run(feeds: dict) -> dict:
        return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in declared})))
    return run


@dataclass
class Case:
    """One parity input: its shape, padding and feeds (int64 numpy arrays)."""
    batch: int
    seq: int
    padding: str
    feeds: dict


def parity_cases(input_names, vocab: int, type_vocab: int = 2, seed: Optional[int] = None, shapes=SHAPES,
                 paddings=PADDINGS) -> tuple:
    """(seed, [Case]): the parity inputs, drawn from `seed` (None: a fresh one) in the order `compare` uses, so
    that the reference and each target can be run separately (one model or session in memory at a time)."""
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    return seed, [Case(batch, seq, padding, make_inputs(input_names, batch, seq, padding, rng, vocab, type_vocab))
                  for batch, seq in shapes for padding in paddings]


def run_cases(run: Callable[[dict], dict], cases: list) -> list:
    """The outputs of a runner (torch_runner, session_runner) on every case, in order."""
    return [run(case.feeds) for case in cases]


def build_report(seed: int, cases: list, expected: list, outputs: dict, atol: float = 1e-4,
                 record_only: tuple = (), tolerances: Optional[dict] = None,
                 providers: Optional[dict] = None) -> ParityReport:
    """The report of `compare` from outputs computed beforehand: `expected` (the reference's, per case) and
    `outputs` (target -> its outputs per case), the checks in `compare`'s order (per case, per target)."""
    limits = {t: (None if t in record_only else (tolerances or {}).get(t, atol)) for t in outputs}
    report = ParityReport(seed=seed, atol=atol, targets={
        t: dict(tolerance=limits[t], held=limits[t] is not None, provider=(providers or {}).get(t))
        for t in outputs})
    for i, case in enumerate(cases):
        for target, got_all in outputs.items():
            got = got_all[i]
            for name, ref in expected[i].items():
                out = got.get(name)
                shape = list(out.shape) if out is not None else []
                same = out is not None and list(out.shape) == list(ref.shape)
                diff = float(np.abs(out.astype(np.float64) - ref).max()) if same else float("inf")
                limit = limits[target]
                ok = limit is None or (same and diff <= limit)
                report.checks.append(Check(target, case.batch, case.seq, case.padding, name, list(ref.shape), shape,
                                           diff, limit, ok))
    return report


class Outputs(list):
    """A target's (or the reference's) outputs per case, computed beforehand with `run_cases` on the
    `parity_cases` of the same seed: `compare` takes them as they are."""


@dataclass
class OnDemand:
    """A target whose runner is made only when `compare` reaches it and dropped right after its cases (then
    `after` is called): one onnxruntime session, with its copy of the weights, in memory at a time."""
    open: Callable[[], Callable[[dict], dict]]
    after: Optional[Callable[[], None]] = None


def _outputs_of(target, cases: list) -> list:
    if isinstance(target, Outputs):
        return list(target)
    if isinstance(target, OnDemand):
        run = target.open()
        try:
            return run_cases(run, cases)
        finally:
            del run
            if target.after is not None:
                target.after()
    return run_cases(target, cases)


def compare(reference, candidates: dict, input_names, vocab: int, type_vocab: int = 2,
            atol: float = 1e-4, seed: Optional[int] = None, shapes=SHAPES, paddings=PADDINGS,
            record_only: tuple = (), tolerances: Optional[dict] = None,
            providers: Optional[dict] = None) -> ParityReport:
    """Run `reference` and each candidate (name -> runner) on the same inputs. `tolerances` (target -> max abs
    diff, or None: recorded only) overrides `atol` per target; candidates in `record_only` are measured but never
    fail the report (the same as a None tolerance). `providers` (target -> onnxruntime provider) is recorded.
    The reference and each candidate are run on all the inputs in turn, one after the other; each may also be
    `Outputs` computed beforehand (same seed) or `OnDemand` (made when reached, released after)."""
    seed, cases = parity_cases(input_names, vocab, type_vocab, seed, shapes, paddings)
    expected = _outputs_of(reference, cases)
    outputs = {target: _outputs_of(run, cases) for target, run in candidates.items()}
    return build_report(seed, cases, expected, outputs, atol=atol, record_only=record_only, tolerances=tolerances,
                        providers=providers)


def raise_on_failure(report: ParityReport) -> None:
    bad = [c for c in report.checks if not c.ok]
    if not bad:
        return
    worst = max(bad, key=lambda c: c.max_abs_diff)
    what = (f"output '{worst.output}' has shape {worst.shape}, expected {worst.reference_shape}"
            if worst.shape != worst.reference_shape else
            f"max abs diff {worst.max_abs_diff:.2e} > {'atol' if worst.atol == report.atol else 'tolerance'} "
            f"{worst.atol:g} on '{worst.output}'")
    raise ParityError(
        f"parity failed for {worst.target} ({len(bad)} of {len(report.checks)} checks; worst: {what}, batch "
        f"{worst.batch} x seq {worst.seq}, {worst.padding} padding, seed {report.seed}); nothing was written. "
        "Re-run with --allow-mismatch to keep the export and inspect parity.json")


def write_report(report: ParityReport, path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
