"""Pruning methods against random and magnitude on the real MiniLM and real GLUE data (RTE, MRPC, SST-2).

Protocol (sized for 2 CPU cores; raise the budgets on a bigger machine):
1. Start model M0 per task: the embedded default (all-MiniLM-L6-v2 + 8-adapter fusion) with a new task head
   trained as a probe (`--probe-steps`). Its dev score is the "dense" row.
2. Each method prunes M0 at each sparsity, with its own training where it has one (`--steps` per stage).
3. Every result is then scored the same way: masks applied to the method's model (or M0), the head
   re-trained as a probe for `--probe-steps`, dev metric. Rows compare methods on the same unit kind.

    python benchmarks/methods.py --tasks rte,mrpc,sst2 --sparsities 0.5,0.75 --out benchmarks/results/methods.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import compressor
from compressor.api import drop_head
from compressor.data import load_data
from compressor.masks import apply_masks
from compressor.default_model import default_model_dir, default_version
from compressor.pruning import prune
from compressor.training import TaskContext, TrainConfig, train
from compressor.training.heads import ensure_head, head_parameters

# (group, unit kind, method, options): the rows of one sparsity
PLAN = [
    ("fusion adapters", "adapters", "random", {}),
    ("fusion adapters", "adapters", "magnitude", {}),
    ("fusion adapters", "adapters", "lottery-fusion", dict(rounds=2, max_drop=1.0)),
    ("heads", "heads", "random", {}),
    ("heads", "heads", "magnitude", {}),
    ("heads", "heads", "head-importance", dict(adapter_width=24)),
    ("heads", "heads", "adapt-by-pruning", {}),
    ("encoder weights", "weights", "random", {}),
    ("encoder weights", "weights", "magnitude", {}),
    ("encoder weights", "weights", "omp", {}),
    ("encoder weights", "weights", "imp", dict(objective="kd", rate=0.25)),
    ("encoder weights", "weights", "tamt", dict(objective="kd")),
    ("encoder weights", "weights", "adapt-by-pruning", {}),
    ("adapter weights", "weights", "sparse-adapter", dict(criterion="random")),
    ("adapter weights", "weights", "sparse-adapter", dict(criterion="magnitude")),
    ("adapter weights", "weights", "sparse-adapter", dict(criterion="snip")),
]
ENCODER_ONLY = {"random", "magnitude"}  # per-group baselines would also prune adapter weights: restrict them


def probe(model, ctx: TaskContext, steps: int) -> dict:
    """Re-train the head only (cheap: no backward through the encoder) and score on dev."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_parameters(model)
    for p in head:
        p.requires_grad_(True)
    train(model, ctx.train_set, ctx.collate, ctx.loss, ctx.config, head, stage="probe", steps=steps,
          learning_rate=1e-3)
    return ctx.evaluate(model)


def restrict_to_encoder(maskset):
    maskset.masks = {k: v for k, v in maskset.masks.items()
                     if maskset.kind_of(k) != "weights" or (".adapters." not in k and ".adapter_fusion_layer." not in k)}
    return maskset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="rte,mrpc,sst2")
    ap.add_argument("--sparsities", default="0.5,0.75")
    ap.add_argument("--steps", type=int, default=20, help="training steps per method stage")
    ap.add_argument("--probe-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--dev-examples", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated method names to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/methods.md"))
    ap.add_argument("--merge", action="store_true", help="add to the rows already in --out's .json (same budgets "
                    "required); rows this run repeats are replaced")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = compressor.load_tokenizer(default_model_dir())
    base = compressor.load_default_model()
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=1e-3,
                         max_length=args.max_length, seed=args.seed)
    only = set(args.only.split(",")) if args.only else None
    json_path = args.out.with_suffix(".json")
    command = f"python benchmarks/methods.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    args.model = default_version()  # rows of another default model do not compare
    results, commands = merged_rows(json_path, args) if args.merge else ([], [])
    commands.append(command)
    for task in args.tasks.split(","):
        data = load_data(f"glue:{task}", seed=args.seed)
        ctx = TaskContext.build(data, tokenizer, config, max_train=args.train_examples, max_dev=args.dev_examples)
        m0 = ensure_head(drop_head(copy.deepcopy(base)), data.spec, seed=args.seed)  # a new head per task
        t0 = time.perf_counter()
        dense = probe(m0, ctx, args.probe_steps)
        results = [r for r in results if (r["task"], r["method"]) != (task, "dense (probe)")]
        results.append(dict(task=task, group="dense", method="dense (probe)", sparsity=0.0, metric=dense,
                            seconds=round(time.perf_counter() - t0, 1)))
        print(task, "dense", dense, flush=True)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for group, kind, method, options in PLAN:
                if only and method not in only:
                    continue
                t0 = time.perf_counter()
                ms = prune(m0, method, {kind: sparsity}, seed=args.seed, data=ctx, options=options)
                if method in ENCODER_ONLY and group == "encoder weights":
                    ms = restrict_to_encoder(ms)
                model = copy.deepcopy(ms.model if ms.model is not None else m0)
                apply_masks(model, ms)
                metric = probe(model, ctx, args.probe_steps)
                label = method + (f" ({options['criterion']})" if "criterion" in options else "")
                results = [r for r in results if (r["task"], r["group"], r["method"], r["sparsity"]) !=
                           (task, group, label, sparsity)]
                row = dict(task=task, group=group, method=label, sparsity=sparsity, metric=metric,
                           counts=ms.counts(), seconds=round(time.perf_counter() - t0, 1),
                           notes={k: ms.extra[k] for k in ("stopped_early", "reached_target_in_training",
                                                            "changed_from_magnitude") if k in ms.extra})
                results.append(row)
                print(task, group, label, sparsity, metric, row["seconds"], "s", flush=True)
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                     commands=commands, results=results), indent=1))
    write_table(results, args, args.out, commands)


BUDGET_ARGS = ("model", "steps", "probe_steps", "batch_size", "max_length", "train_examples", "dev_examples", "seed")


def merged_rows(json_path: Path, args) -> tuple:
    """The rows and commands of an earlier run with the same budgets (so that rows compare)."""
    if not json_path.is_file():
        return [], []
    saved = json.loads(json_path.read_text())
    differ = [k for k in BUDGET_ARGS if saved["args"].get(k) != str(getattr(args, k))]
    if differ:
        sys.exit(f"--merge: {json_path} was made with another model or budgets ({', '.join(differ)}); "
                 "re-run without --merge or with the same budgets")
    old = f"python benchmarks/methods.py --tasks {saved['args']['tasks']} --sparsities {saved['args']['sparsities']}"
    return saved["results"], saved.get("commands", [old])


def write_table(results, args, out: Path, commands):
    tasks = list(dict.fromkeys(r["task"] for r in results))
    order = {(g, m + (f" ({o['criterion']})" if "criterion" in o else "")): i for i, (g, _, m, o) in enumerate(PLAN)}
    results = sorted(results, key=lambda r: (r["sparsity"], order.get((r["group"], r["method"]), -1)))
    lines = ["# Pruning methods on MiniLM + 8-adapter fusion, real GLUE dev data", "",
             "Commands, in order (later rows replace earlier ones): "
             + ", then ".join(f"`{c}`" for c in commands), "",
             f"Budgets: {args.steps} steps per training stage, head probe {args.probe_steps} steps, batch "
             f"{args.batch_size}, max length {args.max_length}, at most {args.train_examples} train and "
             f"{args.dev_examples} dev examples, seed {args.seed}. Dev metric: accuracy (MRPC also F1).", ""]
    header = "| group | method | sparsity | " + " | ".join(tasks) + " |"
    lines += [header, "|" + "---|" * (3 + len(tasks))]
    keys = list(dict.fromkeys((r["group"], r["method"], r["sparsity"]) for r in results))
    for g, m, s in keys:
        cells = []
        for t in tasks:
            r = next((r for r in results if (r["task"], r["group"], r["method"], r["sparsity"]) == (t, g, m, s)), None)
            cells.append("-" if r is None else f"{100 * r['metric']['accuracy']:.1f}")
        lines.append(f"| {g} | {m} | {s:g} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
