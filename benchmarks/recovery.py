"""Recovery after structured pruning: task loss against distillation from the dense model, at the same budget.

On the embedded default (all-MiniLM-L6-v2 + the 8-adapter AdapterFusion with its MRPC head), `importance` prunes
heads and FFN neurons at --sparsity (same masks for every row: same scores, same seed); then no recovery, task-loss
recovery (`--recover task`) and KD recovery (`--recover kd`, training.objectives.KDConfig's defaults) train the
remaining adapters, fusion and head for --steps steps. Each row is scored against the dense default with the paired
evaluation of `compress eval --against` (compressor/evaluation.py): MRPC dev (408 examples), bootstrap CI of the
difference, agreement and KL(dense || pruned) on dev, and fidelity KL on --fidelity-examples unlabeled training
texts. The rows run through the library functions behind `compress prune` and `compress eval`; the report lists
the equivalent commands.

    python benchmarks/recovery.py [--steps 100] [--sparsity 0.5] [--data-dir DIR] [--out benchmarks/results]

Writes recovery.md and recovery.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from compressor import api  # noqa: E402
from compressor.default_model import default_model_dir  # noqa: E402
from compressor.requests import EvalRequest, PruneRequest  # noqa: E402

KINDS = ("none", "task", "kd")


def prune_once(args, work: Path) -> Path:
    """`compress prune --method importance` without recovery: the masks every row shares."""
    out = work / "none"
    frac = args.sparsity
    api.prune(PruneRequest(model=args.model, method="importance", sparsity={"heads": frac, "neurons": frac},
                           data="glue:mrpc",
                           data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, max_steps=args.steps, out=out))
    return out


def recover_from(args, masks_dir: Path, kind: str, work: Path) -> float:
    """What `compress prune ... --recover KIND --recover-steps N` adds to the pruning, on the saved masks (the
    importance scores are not computed again): recovery, then masks + recovered model written as prune writes
    them. Returns the recovery's seconds."""
    from compressor import load_model
    from compressor.api import _recover, load_task, save_prune_result, train_config
    from compressor.masks import MaskSet
    from compressor.tokenizers import load_tokenizer

    req = PruneRequest(method="importance", data="glue:mrpc", data_dir=args.data_dir, seed=args.seed,
                       batch_size=args.batch_size, learning_rate=args.learning_rate, max_steps=args.steps,
                       out=work / kind, recover=kind, recover_steps=args.steps)
    recovery = api._check_recover(req)
    model = load_model(args.model)
    ctx = load_task("glue:mrpc", load_tokenizer(args.model, model), train_config(req, seed=args.seed),
                    data_dir=args.data_dir)
    masks = MaskSet.load(masks_dir)
    t0 = time.perf_counter()
    _recover(req, model, masks, ctx, *recovery)
    seconds = time.perf_counter() - t0
    save_prune_result(masks, work / kind, tokenizer_dir=args.model)
    return seconds


def score(args, kind: str, out: Path, seconds) -> dict:
    r = api.evaluate(EvalRequest(model=args.model, masks=out, data="glue:mrpc", data_dir=args.data_dir,
                                 against=args.model,
                                 bootstrap=args.bootstrap, fidelity_examples=args.fidelity_examples))
    recovery = json.loads((out / "masks.json").read_text()).get("recovery")
    return dict(kind=kind, metrics=r.metrics, reference_metrics=r.reference_metrics, differences=r.differences,
                agreement=r.agreement, fidelity={k: v for k, v in r.fidelity.items() if k != "source"},
                dev_examples=r.dev_examples, recovery_seconds=None if seconds is None else round(seconds, 1),
                recovery=None if recovery is None else {k: recovery[k] for k in ("steps", "loss", "train", "kd")})


def commands(args) -> list:
    frac = args.sparsity
    base = (f"compress prune --method importance --sparsity heads={frac} --sparsity neurons={frac} --data glue:mrpc "
            f"--batch-size {args.batch_size} --learning-rate {args.learning_rate} --max-steps {args.steps} "
            f"--seed {args.seed}")
    out = [f"{base} --out none"] + [f"{base} --recover {k} --recover-steps {args.steps} --out {k}"
                                      for k in KINDS[1:]]
    return out + [f"compress eval --masks {k} --data glue:mrpc --against DEFAULT_MODEL_DIR --bootstrap "
                  f"{args.bootstrap} --fidelity-examples {args.fidelity_examples}   # k = none, task, kd"
                  for k in ("$k",)]


def report(args, rows: list) -> str:
    dense = rows[0]["reference_metrics"]
    lines = [
        "# Recovery after structured pruning: task loss vs distillation",
        "",
        f"Embedded default (all-MiniLM-L6-v2 + 8-adapter AdapterFusion, MRPC head), `importance` pruning of heads "
        f"and FFN neurons at {args.sparsity}, then {args.steps} recovery steps of the remaining adapters, fusion "
        f"and head (batch {args.batch_size}, AdamW lr {args.learning_rate}, seed {args.seed}); the importance "
        f"scores and masks are the same in every row. KD: `KDConfig` defaults (T = 2, logits KL x T^2 + layer-"
        "output MSE over every layer, weights 1 and 1). Paired evaluation against the dense default on MRPC dev "
        f"({rows[0]['dev_examples']} examples, {args.bootstrap} bootstrap resamples, 95% CI of the difference); "
        f"fidelity on {args.fidelity_examples} unlabeled MRPC training texts. Ran on: {args.note}",
        "",
        f"Dense: accuracy {100 * dense['accuracy']:.1f}, F1 {100 * dense['f1']:.1f}.",
        "",
        "| recovery | accuracy | diff vs dense [95% CI] | F1 | diff vs dense [95% CI] | agreement | "
        "KL(dense‖pruned) dev | fidelity KL | fidelity agreement | final loss | recovery s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diffs = {d["metric"]: d for d in row["differences"]}

        def cell(metric):
            d = diffs[metric]
            return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"

        rec = row["recovery"] or {}
        loss = f"{rec['loss']:.4f}" if rec.get("loss") is not None else "-"
        lines.append(
            f"| {row['kind']} | {100 * row['metrics']['accuracy']:.1f} | {cell('accuracy')} | "
            f"{100 * row['metrics']['f1']:.1f} | {cell('f1')} | {100 * row['agreement']['agreement']:.1f}% | "
            f"{row['agreement']['mean_kl']:.4f} | {row['fidelity'].get('mean_kl', float('nan')):.4f} | "
            f"{100 * row['fidelity'].get('agreement', float('nan')):.1f}% | {loss} | "
            f"{'-' if row['recovery_seconds'] is None else round(row['recovery_seconds'])} |")
    if getattr(args, "verdict", ""):
        lines += ["", args.verdict]
    lines += ["", "The loss column is each objective's own (task: cross-entropy; kd: the KD loss), not comparable "
              "across rows. Seconds: the recovery training alone (kd also runs the teacher forward), on a shared "
              "machine: not a speed measurement. The script prunes once and recovers from the saved masks with the "
              "code behind `--recover` (the same as the commands below, without scoring importance three times).",
              "", "Commands:", "", "```", *commands(args), "```", "",
              f"Made by: `python benchmarks/recovery.py --steps {args.steps} --sparsity {args.sparsity} "
              f"--fidelity-examples {args.fidelity_examples}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--fidelity-examples", type=int, default=500)
    p.add_argument("--data-dir", default=os.environ.get("COMPRESSOR_GLUE_DIR"))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--model", type=Path, default=None, help="default: the embedded default's directory")
    p.add_argument("--note", default="CPU (PyTorch fp32).", help="where and how it ran, for the report")
    p.add_argument("--verdict", default="", help="a reading of the numbers, added to the report")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    args.model = args.model or default_model_dir()
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        work = Path(tmp)
        masks = prune_once(args, work)
        for kind in args.kinds.split(","):
            seconds = None if kind == "none" else recover_from(args, masks, kind, work)
            rows.append(score(args, kind, masks if kind == "none" else work / kind, seconds))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "recovery.json").write_text(json.dumps(dict(
                args={k: str(v) for k, v in vars(args).items() if k not in ("out", "data_dir")}, rows=rows),
                indent=1) + "\n")
            (args.out / "recovery.md").write_text(report(args, rows))


if __name__ == "__main__":
    main()
