"""How accurate is the latency model (compressor/latency.py)? Predicted vs measured speedup of exported graphs.

Two models from the packaged default weights: the embedded default (all-MiniLM-L6-v2 + the 8-adapter MRPC
fusion with its head) and the single-task default (all-MiniLM-L6-v2 + the SST-2 adapter with its head). Per
model and shape (batch 1 and 8 x 128 tokens): the latency model on onnxruntime's CPU provider, then mask sets
(post-training at 1.5x, 2x and 2.5x predicted, Fisher on --examples task examples, no mask tuning: only the
structure matters for speed; and --random seeded random structured masks, every unit group keeping a uniform
share in [1/8, 1]). Each is compacted and exported as `compress export --onnx` does; the dense graph and all
pruned graphs of one model and shape are timed in plain onnxruntime sessions, interleaved (medians of per-round
ratios to the dense graph).

    python benchmarks/latency_model.py [--rounds 10] [--examples 128] [--random 3] [--out benchmarks/results]

Writes latency_model.md and latency_model.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from compressor import load_model  # noqa: E402
from compressor.api import load_task, load_tokenizer  # noqa: E402
from compressor.compaction import compact  # noqa: E402
from compressor.errors import PruningConfigError  # noqa: E402
from compressor.default_model import PACKAGED, default_model_dir, minilm_dir  # noqa: E402
from compressor.latency import latency_model, make_runner, time_interleaved  # noqa: E402
from compressor.masks import MaskSet  # noqa: E402
from compressor.pruning import prune  # noqa: E402
from compressor.training import TrainConfig  # noqa: E402
from compressor.units import fingerprint, iter_units  # noqa: E402
from exporters.bench import machine_info  # noqa: E402
from exporters.runtime import release_memory  # noqa: E402

STRUCTURED = ("heads", "neurons", "bottleneck", "adapters")
unreachable = []  # targets above the latency model's predicted maximum
TARGETS = (1.5, 2.0, 2.5)


def models(args):
    def task(name, model, source):
        if args.no_data:
            return None
        return load_task(name, load_tokenizer(source, model), _config(), data_dir=args.glue_dir)

    if "fusion" in args.models:
        fusion_dir = default_model_dir()
        fusion = load_model(fusion_dir)
        yield "fusion (MRPC)", fusion, task("glue:mrpc", fusion, fusion_dir)
    if "single" in args.models:
        single = load_model(minilm_dir(), adapters=[PACKAGED / "sst2"], setup="sst2", head="sst2")
        yield "single (SST-2)", single, task("glue:sst2", single, minilm_dir())


def _config() -> TrainConfig:
    return TrainConfig(batch_size=32, max_length=128, seed=0)


def random_masks(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for u in iter_units(model):
        if u.kind not in STRUCTURED:
            continue
        share = 1 / 8 + torch.rand((), generator=g).item() * 7 / 8
        keep = max(1, round(share * u.size))
        m = torch.zeros(u.size, dtype=torch.bool)
        m[torch.randperm(u.size, generator=g)[:keep]] = True
        out[u.key] = m.view(u.shape)
    return out


def run_shape(name, model, ctx, shape, args, tmp: Path) -> list:
    b, s = shape
    on = args.on
    t0 = time.perf_counter()
    lm = latency_model(model, on, f"{b}x{s}", rounds=args.rounds)
    build_s = time.perf_counter() - t0
    sets = []
    for target in TARGETS if ctx is not None else ():
        t = time.perf_counter()
        try:
            ms = prune(model, "post-training", {}, seed=0, data=ctx,
                       options=dict(target_speedup=target, on=on, shape=f"{b}x{s}", examples=args.examples,
                                    tune=False))
        except PruningConfigError as e:  # above the predicted maximum: say so in the table
            print(f"{name} {b}x{s} {target}x: {e}", flush=True)
            unreachable.append(f"{name}, {b}x{s}, {target}x: {e}")
            continue
        sets.append((f"post-training {target}x", ms.masks, dict(prune_s=round(time.perf_counter() - t, 1))))
    for seed in range(args.random):
        sets.append((f"random structured (seed {seed})", random_masks(model, seed), {}))
    # the graphs (cpu, cuda) or compacted models (torch-*) as the latency model runs them
    runs = {"dense": make_runner(compact(model), on, shape, tmp, "dense")}
    for i, (label, masks, _) in enumerate(sets):
        runs[label] = make_runner(compact(model, MaskSet(masks, fingerprint(model))), on, shape, tmp, f"p{i}")
        release_memory()
    measured = time_interleaved(runs, args.rounds, args.slice_s * b, "dense")
    fastest = time_interleaved(runs, args.rounds, args.slice_s * b, "dense", stat=min)
    rows = []
    for label, masks, notes in sets:
        p = lm.predict(model, masks)
        m = measured["dense"] / measured[label]
        f = fastest["dense"] / fastest[label]
        rows.append(dict(model=name, shape=f"{b}x{s}", on=on, masks=label, predicted=round(p["speedup"], 3),
                         measured=round(m, 3), error=round(p["speedup"] / m - 1, 4), measured_fastest=round(f, 3),
                         error_fastest=round(p["speedup"] / f - 1, 4),
                         predicted_ms=round(p["latency_ms"], 3), measured_ms=round(measured[label], 3),
                         dense_predicted_ms=round(p["dense_ms"], 3), dense_measured_ms=round(measured["dense"], 3),
                         latency_model=lm.key, build_s=round(build_s, 1), **notes))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list, args, info: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(dict(rows=rows, machine=info), indent=1) + "\n")
    lines = ["# Latency model accuracy: predicted vs measured speedup", "",
             "Command: `python benchmarks/latency_model.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Machine: {info['processor']}, {info['cpu_count']} cores, load average {info['load_average']}, "
             f"GPU {info['gpu']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}. Provider `{args.on}` "
             "(cpu: plain onnxruntime sessions of the exported graphs, onnxruntime's default threads; torch-*: "
             "PyTorch eager on the compacted models). Each model and shape: the dense model and every pruned one timed "
             f"interleaved, {args.rounds} rounds; speedup = median of per-round ratios to the dense graph. The "
             "prediction is the latency model's (compressor/latency.py), built on the same machine and shape. "
             "`measured`: per-round medians; `fastest`: a second interleaved pass reading each round's fastest "
             "run (what the latency model is built from).", "",
             "| model | provider | shape | masks | predicted | measured | error | fastest | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['on']} | {r['shape']} | {r['masks']} | {r['predicted']:.2f}x | "
              f"{r['measured']:.2f}x | "
              f"{100 * r['error']:+.1f}% | {r['measured_fastest']:.2f}x | {100 * r['error_fastest']:+.1f}% |"
              for r in rows]
    for what, col in (("medians", "error"), ("fastest runs", "error_fastest")):
        errors = [abs(r[col]) for r in rows]
        lines += ["", f"Against {what}: mean absolute error {100 * statistics.mean(errors):.1f}%, worst "
                  f"{100 * max(errors):.1f}%, within 10%: {sum(e <= 0.10 for e in errors)} of {len(errors)}."]
    lines += [""] + [f"- unreachable: {u}" for u in unreachable] + [""]
    builds = {(r["model"], r["shape"]): r["build_s"] for r in rows}
    lines += ["Latency model build time (s, 0 when cached): " + ", ".join(f"{m} {s}: {v}" for (m, s), v in
                                                                          builds.items()), ""]
    (out / f"{args.name}.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--slice-s", type=float, default=0.1, help="timed seconds per graph and round at batch 1")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--shapes", default="1x128,8x128")
    ap.add_argument("--glue-dir", type=Path, default=None)
    ap.add_argument("--on", default="cpu", help="the latency model's provider: cpu, cuda, torch-cpu, torch-cuda")
    ap.add_argument("--models", default="fusion,single")
    ap.add_argument("--no-data", action="store_true", help="random masks only (no GLUE data for post-training)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="latency_model", help="file names of the report: NAME.md, NAME.json")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for name, model, ctx in models(args):
        for shape in shapes:
            with tempfile.TemporaryDirectory(prefix="latency-bench-") as tmp:
                rows += run_shape(name, model, ctx, shape, args, Path(tmp))
            write(rows, args, machine_info(0))
    write(rows, args, machine_info(0))


if __name__ == "__main__":
    main()
