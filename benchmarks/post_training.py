"""Post-training pruning against `importance` and `random` at the same speed (issue 14's table).

The single-task default (all-MiniLM-L6-v2 + the packaged SST-2 adapter with its head; dev: SST-2, 872 rows): for
each target, `post-training` (Kwon et al. 2022: Fisher mask search, mask tuning, no retraining) prunes heads, FFN
neurons and adapter bottleneck neurons; `importance` (Taylor scores, global) and `random` then keep exactly as many
units of each kind, so that the three graphs do the same work. No method retrains. Every point is exported to ONNX
(parity-verified), all graphs are timed in one interleaved `compress bench` run (onnxruntime CPU, plain sessions,
batch 1 and 8 x 128 tokens), and each is compared with the dense graph on the same dev rows (`compress eval
--against`: paired bootstrap CI of the accuracy difference, prediction agreement, KL fidelity on held-out SST-2
training rows).

    python benchmarks/post_training.py [--targets 1.5,2] [--examples 1024] [--out benchmarks/results]

--targets are speedups over dense on the CPU at batch 1 x 128 (post-training's `target_speedup`) when the method
has that option, else fractions of dense FLOPs 1/X (`target_flops`): the table says which.
Writes post_training.md and post_training.json into --out; work files go to --work (default out/post-training).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from paired import export  # noqa: E402  (shared with tradeoff.py)

from compressor import load_model  # noqa: E402
from compressor.api import evaluate, load_task, load_tokenizer  # noqa: E402
from compressor.default_model import PACKAGED, minilm_dir  # noqa: E402
from compressor.pruning import METHODS, prune  # noqa: E402
from compressor.requests import EvalRequest  # noqa: E402
from compressor.training import TrainConfig  # noqa: E402

KINDS = ("heads", "neurons", "bottleneck")


def target_option(x: float) -> tuple:
    fields = METHODS["post-training"].Options.__dataclass_fields__
    if "target_speedup" in fields:
        return "target_speedup", dict(target_speedup=x)
    return "target_flops", dict(target_flops=round(1.0 / x, 4))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="1.5,2")
    ap.add_argument("--examples", type=int, default=1024, help="post-training's and importance's task examples")
    ap.add_argument("--fidelity-examples", type=int, default=2000)
    ap.add_argument("--glue-dir", type=Path, default=ROOT.parent.parent / "shared" / "data" / "glue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=ROOT.parent / "out" / "post-training")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    model = load_model(minilm_dir(), adapters=[PACKAGED / "sst2"], setup="sst2", head="sst2")
    ctx = load_task("glue:sst2", load_tokenizer(minilm_dir(), model), TrainConfig(max_length=128),
                    data_dir=args.glue_dir)
    points = [dict(method="dense", target="-", dir=export(model, None, args.work / "dense"), counts={}, seconds=0)]
    targets = [float(t) for t in args.targets.split(",")]
    for x in targets:
        name, options = target_option(x)
        t = time.perf_counter()
        ms = prune(model, "post-training", {k: 0 for k in KINDS}, seed=args.seed, data=ctx,
                   options=dict(options, examples=args.examples))
        pruned = ms.model if ms.model is not None else model
        points.append(dict(method="post-training", target=f"{name}={options[name]}", counts=ms.counts(),
                           dir=export(pruned, ms, args.work / f"post-training-{x}"),
                           seconds=round(time.perf_counter() - t, 1),
                           extra={k: v for k, v in ms.extra.items() if k in ("seconds", "flops_fraction", "predicted",
                                                                              "predicted_speedup", "target_met")}))
        shares = {k: 1 - v["kept"] / v["total"] for k, v in ms.counts().items()}
        for method, opts in (("importance", dict(scope="global", examples=args.examples)), ("random", None)):
            t = time.perf_counter()
            other = prune(model, method, shares, seed=args.seed, data=ctx if method == "importance" else None,
                          options=opts)
            points.append(dict(method=method, target=f"same counts as post-training at {x}x", counts=other.counts(),
                               dir=export(model, other, args.work / f"{method}-{x}"),
                               seconds=round(time.perf_counter() - t, 1)))
        print(f"target {x}: pruned and exported ({time.perf_counter() - start:.0f} s)", flush=True)

    from exporters.bench import BenchConfig, run_bench

    report = run_bench([p["dir"] for p in points], BenchConfig(providers=["cpu"], batch_sizes=[1, 8], seq_lens=[128],
                                                               threads=args.threads, min_time_s=args.min_time),
                       args.work / "bench", overwrite=True)
    speed = {}
    for c in report["results"]:
        if c["status"] == "ok":
            speed.setdefault(c["target"], {})[c["batch_size"]] = (c["p50_ms"], c.get("speedup_p50"),
                                                                   c.get("speedup_rounds"))
    dense_dir = points[0]["dir"]
    for p in points:
        p["speed"] = speed.get(p["dir"].name, {})
        if p["method"] == "dense":
            continue
        r = evaluate(EvalRequest(model=p["dir"], data="glue:sst2", data_dir=args.glue_dir, against=dense_dir,
                                 fidelity_examples=args.fidelity_examples, seed=args.seed))
        p.update(metrics=r.metrics, differences=r.differences, agreement=r.agreement, fidelity=r.fidelity,
                 reference_metrics=r.reference_metrics)
    write(points, args, targets, report, time.perf_counter() - start)


def write(points, args, targets, report, seconds) -> None:
    for p in points:
        p["dir"] = p["dir"].name
    (args.out / "post_training.json").write_text(json.dumps(dict(points=points, machine=report["machine"],
                                                                 seconds=round(seconds)), indent=1, default=str) + "\n")
    lines = ["# Post-training pruning against importance and random at the same speed (issue 14)", "",
             "Single-task default: all-MiniLM-L6-v2 + the packaged SST-2 adapter and head; dev SST-2 (872 rows). "
             "No method retrains; `importance` (Taylor, global) and `random` keep as many units of each kind as "
             "post-training did. ONNX fp32 graphs, onnxruntime CPU plain sessions, timed interleaved in one run; "
             "speedup = dense p50 / p50 (median per-round ratio, IQR). Accuracy difference to dense: paired, 95% "
             f"bootstrap CI; agreement with dense's predictions; fidelity = mean KL to dense on {args.fidelity_examples} "
             "held-out SST-2 training rows.", "",
             f"    python benchmarks/post_training.py --targets {args.targets} --examples {args.examples}", "",
             f"Dense: accuracy {points[1].get('reference_metrics', {}).get('accuracy', float('nan')):.4f}.", "",
             "| method | target | kept heads / neurons / bottleneck | b1 speedup | b8 speedup | accuracy | "
             "difference, points [95% CI] | dev agreement | fidelity: agreement, KL |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for p in points:
        if p["method"] == "dense":
            continue
        kept = " / ".join(f"{p['counts'][k]['kept']}/{p['counts'][k]['total']}" for k in KINDS if k in p["counts"])
        sp = [f"{p['speed'][b][1]:.2f}x" if b in p["speed"] and p["speed"][b][1] else "-" for b in (1, 8)]
        d = next((d for d in p.get("differences", []) if d["metric"] == "accuracy"), None)
        diff = f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]" if d else "-"
        dev, fid = p.get("agreement") or {}, p.get("fidelity") or {}
        lines.append(f"| {p['method']} | {p['target']} | {kept} | {sp[0]} | {sp[1]} | "
                     f"{p['metrics'].get('accuracy', float('nan')):.4f} | {diff} | {dev.get('agreement', float('nan')):.3f} | "
                     f"{fid.get('agreement', float('nan')):.3f}, {fid.get('mean_kl', float('nan')):.4f} |")
    lines += ["", f"Machine: {report['machine'].get('processor')}, {args.threads} threads, onnxruntime "
              f"{report['machine'].get('onnxruntime')}; {seconds:.0f} s in all.", ""]
    (args.out / "post_training.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
