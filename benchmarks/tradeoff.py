"""Accuracy against ONNX CPU latency: the pruning methods at a range of targets, on the embedded default.

Two models, both from the packaged default weights:
- fusion: all-MiniLM-L6-v2 + the 8-adapter AdapterFusion with its MRPC head (dev: MRPC, 408 examples);
- single: all-MiniLM-L6-v2 + the SST-2 adapter with its head (dev: SST-2, 872 examples).
Every point is pruned, compacted, exported to ONNX (parity-verified) and scored on the full dev set with
onnxruntime; latency is onnxruntime CPU p50 at batch 1 and 8 x 128 tokens, all graphs timed in one run at the
end. Points whose masks prune single weights only (zeros a dense graph keeps) are scored in PyTorch and share the
dense graph's latency. Then each seed paper's claim is checked on these numbers (thresholds in CLAIMS).

    python benchmarks/tradeoff.py [--steps 30] [--probe-steps 100] [--out benchmarks/results]

Writes tradeoff.md (table, claim verdicts), tradeoff.json and tradeoff.png (Pareto plot) into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from compressor.api import load_task  # noqa: E402
from compressor.default_model import PACKAGED, default_model_dir, minilm_dir  # noqa: E402
from compressor.masks import MaskSet, masked_copy  # noqa: E402
from compressor import load_model  # noqa: E402
from compressor.pruning import prune  # noqa: E402
from compressor.training import TrainConfig, retrain_masked, train  # noqa: E402
from compressor.training.heads import head_parameters  # noqa: E402
from compressor.units import fingerprint  # noqa: E402

GOAL_SPEEDUP, GOAL_DROP = 2.5, 0.01  # the goal: 2.5x lower CPU latency at <= 1 point of dev accuracy lost
CLOSE = 0.01  # "keeps accuracy" / "close to dense": within one point


def probe(model, ctx, steps: int, lr: float = 1e-3) -> None:
    """Re-train the head only (the same short recovery for every weight-pruning method)."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_parameters(model)
    for p in head:
        p.requires_grad_(True)
    train(model, ctx.train_set, ctx.collate, ctx.loss, ctx.config, head, stage="probe", steps=steps,
          learning_rate=lr)
    for p in head:
        p.requires_grad_(False)


class Study:
    def __init__(self, args):
        self.args, self.points, self.work = args, [], args.work
        self.work.mkdir(parents=True, exist_ok=True)

    def export(self, name: str, model, masks) -> Path:
        from exporters.onnx_export import ExportConfig, export_onnx

        out = self.work / name
        export_onnx(model, out, masks, ExportConfig(seed=0), overwrite=True, tokenizer_dir=minilm_dir())
        return out / "model.onnx"

    def add(self, model_name: str, method: str, target: str, ctx, model, masks=None, graph: str = None,
            metrics=None, notes=None, start=None):
        """Score one point: export (structured masks) or reuse `graph`; dev metrics with onnxruntime."""
        from exporters.accuracy import onnx_dev_metrics

        name = f"{model_name}-{method}-{target}".replace("=", "").replace(",", "-").replace(" ", "")
        if graph is None:
            onnx = self.export(name, model, masks)
            metrics = metrics or onnx_dev_metrics(onnx, ctx)
        else:
            onnx = Path(graph)
            if metrics is None:
                metrics = ctx.evaluate(masked_copy(model, masks) if masks is not None else model)
        notes = dict(notes or {})
        notes.setdefault("source", "onnxruntime" if graph is None else "PyTorch; latency of the dense graph")
        point = dict(model=model_name, method=method, target=target, metric=metrics[ctx.spec.main_metric],
                     metrics=metrics, onnx=str(onnx), counts=masks.counts() if masks is not None else {},
                     notes=notes, seconds=round(time.perf_counter() - start, 1) if start else None)
        self.points.append(point)
        print(f"{model_name:7s} {method:28s} {target:22s} {point['metric']:.4f}  ({point['seconds']} s)", flush=True)
        self.save()
        return point

    def save(self):
        (self.args.out / "tradeoff.json").write_text(json.dumps(dict(args={k: str(v) for k, v in
                                                                         vars(self.args).items()},
                                                                    commands=self.commands,
                                                                    points=self.points), indent=1) + "\n")


def run_fusion(study: Study, args) -> None:
    source = default_model_dir()
    model = load_model(source)
    from compressor.api import load_tokenizer
    ctx = load_task("glue:mrpc", load_tokenizer(source, model), _config(args), data_dir=args.glue_dir)
    t = time.perf_counter()
    study.add("fusion", "dense", "-", ctx, model, start=t)

    t = time.perf_counter()
    ms = prune(model, "random", {"adapters": 0.75}, seed=args.seed)
    study.add("fusion", "random (no retraining)", "adapters=0.75", ctx, model, ms, start=t)

    # lottery-fusion: one run of 3 rounds to 7/8 of the adapters; every round is a point (its dev score comes from
    # the run's own evaluation of that round, its latency from an export with that round's masks)
    t = time.perf_counter()
    lottery = prune(model, "lottery-fusion", {"adapters": 0.875}, seed=args.seed, data=ctx,
                    options=dict(rounds=3, max_drop=1.0))
    tuned = lottery.model
    for h in lottery.extra["history"][1:]:
        masks = {}
        for key, kept in h["kept_adapters"].items():
            m = torch.zeros(8, dtype=torch.bool)
            m[kept] = True
            masks[key] = m
        ms = MaskSet(masks, fingerprint(tuned), "lottery-fusion")
        if h["round"] > lottery.extra["accepted_round"]:
            break
        final = h["round"] == lottery.extra["accepted_round"]
        study.add("fusion", "lottery-fusion", f"adapters={h['fraction']:.2f}", ctx, tuned, ms,
                  metrics=None if final else {ctx.spec.main_metric: h["metric"]},
                  notes=dict(round=h["round"], **({} if final else {"source": "the round's own dev eval (PyTorch)"})),
                  start=t)
    # then heads and FFN neurons by importance, with a short recovery of the remaining adapter + fusion + head
    for frac in args.structured:
        t = time.perf_counter()
        structured = prune(masked_copy(tuned, lottery), "importance", {"heads": frac, "neurons": frac},
                           seed=args.seed, data=ctx, options=dict(examples=256))
        ms = MaskSet({**lottery.masks, **structured.masks}, fingerprint(tuned), "lottery+importance")
        study.add("fusion", "lottery+importance", f"adapters=0.88,heads={frac},neurons={frac}", ctx, tuned, ms,
                  start=t)
        t = time.perf_counter()
        recovered = retrain_masked(tuned, ms, ctx, steps=args.steps * 2)
        study.add("fusion", "lottery+importance+recovery", f"adapters=0.88,heads={frac},neurons={frac}", ctx,
                  recovered, ms, start=t, notes=dict(recovery_steps=args.steps * 2))


def run_single(study: Study, args) -> None:
    model = load_model(minilm_dir(), adapters=[PACKAGED / "sst2"], setup="sst2", head="sst2")
    from compressor.api import load_tokenizer
    ctx = load_task("glue:sst2", load_tokenizer(minilm_dir(), model), _config(args), data_dir=args.glue_dir)
    t = time.perf_counter()
    dense = study.add("single", "dense", "-", ctx, model, start=t)
    t = time.perf_counter()
    probed = copy.deepcopy(model)
    probe(probed, ctx, args.probe_steps)
    study.add("single", "dense + probe", "-", ctx, probed, graph=dense["onnx"], start=t)

    # SparseAdapter: adapters re-initialised, pruned at initialisation, trained with the mask fixed
    for s in [0.0] + args.sparse_adapter:
        t = time.perf_counter()
        with budget(ctx, args.steps * 4):
            ms = prune(model, "sparse-adapter", {"weights": s}, seed=args.seed, data=ctx,
                       options=dict(criterion="snip"))
        study.add("single", "sparse-adapter (snip)", f"adapter weights={s}", ctx, ms.model, ms,
                  graph=dense["onnx"], notes=dict(train_steps=args.steps * 4), start=t)

    # pretrained-weight masks at the same sparsity, each followed by the same head probe
    for method, options in (("omp", {}), ("imp", dict(objective="kd", rate=0.25)), ("tamt", dict(objective="kd")),
                            ("adapt-by-pruning", {})):
        t = time.perf_counter()
        steps = args.mask_steps if method == "adapt-by-pruning" else args.steps  # learns from everything kept
        with budget(ctx, steps):
            ms = prune(model, method, {"weights": args.weights}, seed=args.seed, data=ctx, options=options)
        m = masked_copy(ms.model if ms.model is not None else model, ms)
        probe(m, ctx, args.probe_steps)
        notes = {k: ms.extra[k] for k in ("stopped_early", "reached_target_in_training") if k in ms.extra}
        study.add("single", f"{method} + probe", f"encoder weights={args.weights}", ctx, m, ms,
                  graph=dense["onnx"], notes=dict(notes, train_steps=steps), start=t)

    # heads: a new adapter sized by layer importance (head pruning + adapters) vs importance alone vs random
    for method, options in (("head-importance", dict(adapter_width=24)), ("importance", dict(examples=256)),
                            ("random", {})):
        t = time.perf_counter()
        ms = prune(model, method, {"heads": args.heads}, seed=args.seed, data=ctx if method != "random" else None,
                   options=options or None)
        study.add("single", method, f"heads={args.heads}", ctx, ms.model if ms.model is not None else model, ms,
                  start=t)
    for frac in args.structured:
        t = time.perf_counter()
        ms = prune(model, "importance", {"heads": frac, "neurons": frac}, seed=args.seed, data=ctx,
                   options=dict(examples=256))
        recovered = retrain_masked(model, ms, ctx, parts=("adapters",), steps=args.steps * 2)
        study.add("single", "importance+recovery", f"heads={frac},neurons={frac}", ctx, recovered, ms, start=t,
                  notes=dict(recovery_steps=args.steps * 2))


def _config(args) -> TrainConfig:
    return TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=1e-3,
                       max_length=args.max_length, seed=args.seed)


@contextlib.contextmanager
def budget(ctx, steps: int):
    """Train `steps` per stage inside the block."""
    saved = ctx.config
    ctx.config = TrainConfig(**{**saved.to_dict(), "max_steps": steps})
    try:
        yield
    finally:
        ctx.config = saved


INT8_OF = {("fusion", "dense"), ("fusion", "lottery-fusion"), ("fusion", "lottery+importance"), ("single", "dense")}


def int8_points(study: Study, args) -> None:
    """int8 (onnxruntime dynamic quantization) of the exported fusion points and the dense single-task model,
    scored on dev with onnxruntime like the fp32 graphs."""
    from exporters.accuracy import onnx_dev_metrics
    from exporters.variants import write_int8

    contexts = {}
    for p in list(study.points):
        if (p["model"], p["method"]) not in INT8_OF or p["notes"].get("source") != "onnxruntime":
            continue
        src = Path(p["onnx"])
        dst = src.with_name("model.int8.onnx")
        if not dst.is_file():
            write_int8(src, dst)
        if p["model"] not in contexts:
            contexts[p["model"]] = _context(p["model"], args)
        ctx = contexts[p["model"]]
        metrics = onnx_dev_metrics(dst, ctx)
        study.points.append(dict(p, method=f"{p['method']} int8", onnx=str(dst), metrics=metrics,
                                 metric=metrics[ctx.spec.main_metric], notes=dict(p["notes"], quantized="int8")))
        print(f"{p['model']:7s} {p['method'] + ' int8':28s} {p['target']:22s} {study.points[-1]['metric']:.4f}",
              flush=True)
    study.save()


def _context(model_name: str, args):
    from compressor.api import load_tokenizer

    task = "glue:mrpc" if model_name == "fusion" else "glue:sst2"
    return load_task(task, load_tokenizer(minilm_dir()), _config(args), data_dir=args.glue_dir)


def bench(study: Study, args) -> None:
    from exporters.bench import BenchConfig, run_bench

    graphs = list(dict.fromkeys(p["onnx"] for p in study.points))
    report = run_bench(graphs, BenchConfig(providers=["cpu"], batch_sizes=[1, 8], seq_lens=[128],
                                           min_time_s=args.min_time, threads=args.threads),
                       study.work / "bench", overwrite=True)
    by_graph = {}
    for target, info in zip(graphs, report["targets"]):
        by_graph[target] = info["name"]
    p50 = {(c["target"], c["batch_size"]): c["p50_ms"] for c in report["results"] if c["status"] == "ok"}
    study.machine = report["machine"]
    for p in study.points:
        name = by_graph[p["onnx"]]
        p["p50_ms"] = {b: p50.get((name, b)) for b in (1, 8)}
    for model_name in ("fusion", "single"):
        dense = next((p for p in study.points if p["model"] == model_name and p["method"] == "dense"), None)
        for p in study.points:
            if dense and p["model"] == model_name:
                p["speedup"] = {b: dense["p50_ms"][b] / p["p50_ms"][b] for b in (1, 8)
                                if p["p50_ms"][b] and dense["p50_ms"][b]}
                p["drop"] = dense["metric"] - p["metric"]
    study.save()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glue-dir", default=str(ROOT.parent.parent / "shared" / "data" / "glue"))
    ap.add_argument("--steps", type=int, default=30, help="training steps per method stage")
    ap.add_argument("--mask-steps", type=int, default=200,
                    help="adapt-by-pruning's budget: its scores start equal and need steps to separate")
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--weights", type=float, default=0.5, help="encoder weight sparsity of the mask methods")
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--structured", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    ap.add_argument("--sparse-adapter", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.8, 0.95])
    ap.add_argument("--models", default="fusion,single", help="which models to (re-)run: fusion, single, none")
    ap.add_argument("--keep", action="store_true", help="keep the other models' points from --out/tradeoff.json "
                    "(e.g. --models none --keep: re-time and re-render only)")
    ap.add_argument("--min-time", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT.parent / "out" / "tradeoff")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    saved = args.out / "tradeoff.json"
    study.commands = []
    if args.keep and saved.is_file():  # points of the models not re-run this time
        previous = json.loads(saved.read_text())
        study.points = [p for p in previous["points"]
                        if p["model"] not in args.models.split(",") and "int8" not in p["method"]]
        study.commands = previous.get("commands", [])
    study.commands.append(f"python benchmarks/tradeoff.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip())
    if "fusion" in args.models.split(","):
        run_fusion(study, args)
    if "single" in args.models.split(","):
        run_single(study, args)
    int8_points(study, args)
    bench(study, args)
    from tradeoff_report import write_report
    write_report(study.points, study.machine, args, args.out, study.commands)


if __name__ == "__main__":
    main()
