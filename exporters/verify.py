"""Parity (docs/design.md invariant 2): the masked PyTorch model is the reference; the compacted model and every
onnxruntime graph are compared with it on fresh random inputs: right-padded, left-padded and randomly masked
rows, two batch sizes, two sequence lengths. Per output: name, shapes, max abs diff against atol.

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
    atol: float
    ok: bool


@dataclass
class ParityReport:
    seed: int
    atol: float
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def worst(self, target: Optional[str] = None) -> float:
        diffs = [c.max_abs_diff for c in self.checks if target is None or c.target == target]
        return max(diffs) if diffs else float("nan")

    def to_dict(self) -> dict:
        targets = sorted({c.target for c in self.checks})
        return dict(seed=self.seed, atol=self.atol, passed=self.passed,
                    worst={t: self.worst(t) for t in targets},
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


def compare(reference: Callable, candidates: dict, input_names, vocab: int, type_vocab: int = 2,
            atol: float = 1e-4, seed: Optional[int] = None, shapes=SHAPES, paddings=PADDINGS,
            record_only: tuple = ()) -> ParityReport:
    """Run `reference` and each candidate (name -> runner) on the same inputs. Candidates in `record_only`
    (int8) are measured but never fail the report."""
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    report = ParityReport(seed=seed, atol=atol)
    for batch, seq in shapes:
        for padding in paddings:
            feeds = make_inputs(input_names, batch, seq, padding, rng, vocab, type_vocab)
            expected = reference(feeds)
            for target, run in candidates.items():
                got = run(feeds)
                for name, ref in expected.items():
                    out = got.get(name)
                    shape = list(out.shape) if out is not None else []
                    same = out is not None and list(out.shape) == list(ref.shape)
                    diff = float(np.abs(out.astype(np.float64) - ref).max()) if same else float("inf")
                    ok = target in record_only or (same and diff <= atol)
                    report.checks.append(Check(target, batch, seq, padding, name, list(ref.shape), shape, diff,
                                               atol, ok))
    return report


def raise_on_failure(report: ParityReport) -> None:
    bad = [c for c in report.checks if not c.ok]
    if not bad:
        return
    worst = max(bad, key=lambda c: c.max_abs_diff)
    what = (f"output '{worst.output}' has shape {worst.shape}, expected {worst.reference_shape}"
            if worst.shape != worst.reference_shape else
            f"max abs diff {worst.max_abs_diff:.2e} > atol {worst.atol:g} on '{worst.output}'")
    raise ParityError(
        f"parity failed for {worst.target} ({len(bad)} of {len(report.checks)} checks; worst: {what}, batch "
        f"{worst.batch} x seq {worst.seq}, {worst.padding} padding, seed {report.seed}); nothing was written. "
        "Re-run with --allow-mismatch to keep the export and inspect parity.json")


def write_report(report: ParityReport, path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
