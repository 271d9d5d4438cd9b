"""Our exports against the peers a user would pick today, on the embedded default (MiniLM + 8-adapter fusion).

In one run, with `compress bench`'s library (same inputs, warm-up, pinned threads, medians):
- PyTorch eager, unpruned (the loaded default, our modules: the same computation as AdapterHub's);
- optimum: `onnx_export_from_model` of the unpruned model, then `ORTOptimizer` at O2 (if optimum refuses the
  model, the reason is recorded instead);
- ours, unpruned: `compress export --onnx` with no masks (fusion folded, optimised);
- ours, compacted: pruned as in benchmarks/compaction.py (random: adapters 0.75, heads 0.5, neurons 0.5,
  bottleneck 0.5), compacted, exported and optimised; and its int8 file.
p50 at batch 1 and 8, sequence 128, next to the FLOP-ideal speedups. Writes benchmarks/results/peers.{md,json}
and the full bench report under benchmarks/results/peers-bench/.

    python benchmarks/peers.py [--threads 2] [--min-time 3] [--providers cpu,torch]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import compressor
from compressor.default_model import default_model_dir
from compressor.flops import total_cost
from compressor.pruning import prune
from exporters.bench import BenchConfig, run_bench
from exporters.onnx_export import ExportConfig, export_onnx

SPARSITY = dict(adapters=0.75, heads=0.5, neurons=0.5, bottleneck=0.5)
RESULTS = Path(__file__).parent / "results"


def optimum_peer(model, work: Path):
    """optimum's export + ORTOptimizer O2 of the unpruned model: (onnx path, None) or (None, why it failed)."""
    try:
        from optimum.exporters.onnx import onnx_export_from_model
        from optimum.onnxruntime import ORTOptimizer
        from optimum.onnxruntime.configuration import AutoOptimizationConfig

        onnx_export_from_model(model.base_model, output=work / "optimum-export", task="feature-extraction")
        ORTOptimizer.from_pretrained(work / "optimum-export").optimize(
            save_dir=work / "optimum-O2", optimization_config=AutoOptimizationConfig.O2())
        path = work / "optimum-O2" / "optimum-O2.onnx"
        (work / "optimum-O2" / "model_optimized.onnx").rename(path)
        return path, None
    except Exception as e:  # the point is to record why the peer refused, not to crash
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed runs per cell")
    ap.add_argument("--providers", default="cpu,torch", help="add cuda where onnxruntime-gpu and a GPU exist")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    model = compressor.load_default_model()
    masks = prune(model, "random", SPARSITY, seed=0)
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        eager = work / "pytorch-eager-unpruned"
        eager.symlink_to(default_model_dir(), target_is_directory=True)
        optimum_path, optimum_error = optimum_peer(model, work)
        ours = export_onnx(model, work / "ours-unpruned", None, ExportConfig(seed=0))
        compacted = export_onnx(model, work / "ours-compacted", masks, ExportConfig(quantize="int8", seed=0))
        int8 = work / "ours-compacted-int8.onnx"
        int8.symlink_to(compacted.out / "model.int8.onnx")
        roles = ["pytorch-eager-unpruned"] + (["optimum-O2.onnx"] if optimum_path else []) + \
            ["ours-unpruned", "ours-compacted", "ours-compacted-int8.onnx"]
        targets = [eager] + ([optimum_path] if optimum_path else []) + [ours.out, compacted.out, int8]
        config = BenchConfig(providers=[args.providers], batch_sizes=[1, 8], seq_lens=[128], threads=args.threads,
                             min_time_s=args.min_time, min_repeats=10)
        report = run_bench(targets, config, work / "bench")
        shutil.rmtree(args.out / "peers-bench", ignore_errors=True)
        shutil.copytree(work / "bench", args.out / "peers-bench")
        flops = {
            "pytorch-eager-unpruned": total_cost(model)["flops_per_token"],
            "optimum-O2.onnx": total_cost(model)["flops_per_token"],  # the same standard-form model
            "ours-unpruned": total_cost(compressor.load_model(ours.out))["flops_per_token"],
            "ours-compacted": total_cost(compressor.load_model(compacted.out))["flops_per_token"],
        }
        flops["ours-compacted-int8.onnx"] = flops["ours-compacted"]
        # bench names targets by path (prefixing a parent where names clash): map them back to roles
        names = {t["name"]: role for t, role in zip(report["targets"], roles)}
        for cell in report["results"]:
            cell["target"] = names[cell["target"]]
        write_tables(report, flops, optimum_error, compacted, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_tables(report: dict, flops: dict, optimum_error, compacted, args) -> None:
    cells = {(c["target"], c["provider"], c["batch_size"]): c for c in report["results"] if c["status"] == "ok"}
    rows = [("PyTorch eager, unpruned", "pytorch-eager-unpruned", "torch"),
            ("optimum export + ORTOptimizer O2, unpruned", "optimum-O2.onnx", "cpu"),
            ("ours, unpruned export", "ours-unpruned", "cpu"),
            ("ours, compacted export", "ours-compacted", "cpu"),
            ("ours, compacted export, int8", "ours-compacted-int8.onnx", "cpu"),
            ("PyTorch eager, compacted", "ours-compacted", "torch")]
    base = flops["pytorch-eager-unpruned"]
    p50 = {(t, p, b): cells[(t, p, b)]["p50_ms"] for (t, p, b) in cells}
    lines = ["# Peers: our exports against PyTorch and optimum (embedded default, MiniLM + 8-adapter fusion)", "",
             f"Command: `python benchmarks/peers.py --threads {args.threads} --min-time {args.min_time} --providers "
             f"{args.providers}`; {report['machine'].get('processor') or report['machine'].get('machine', '')}, "
             f"onnxruntime {report['machine'].get('onnxruntime')}, torch {report['machine'].get('torch')}, "
             f"{args.threads} threads, sequence 128, p50 over at least {args.min_time} s of runs per cell.",
             f"Pruned: random, {', '.join(f'{k} {v}' for k, v in SPARSITY.items())} (seed 0).", "",
             "| model | runtime | FLOPs/token | FLOP-ideal speedup | p50 ms, batch 1 | p50 ms, batch 8 | speedup b1 | speedup b8 |",
             "|---|---|---|---|---|---|---|---|"]
    ref = {b: p50.get(("pytorch-eager-unpruned", "torch", b)) for b in (1, 8)}
    notes = []
    for label, target, provider in rows:
        f = flops.get(target)
        vals = [p50.get((target, provider, b)) for b in (1, 8)]
        if all(v is None for v in vals):
            reason = optimum_error if target == "optimum-O2.onnx" and optimum_error else "not run"
            lines.append(f"| {label} | - | {f:,} | {base / f:.2f}x | - | - | - | - |")
            notes.append(f"{label}: {reason}")
            continue
        ms = [f"{v:.1f}" if v else "-" for v in vals]
        sp = [f"{ref[b] / v:.2f}x" if v and ref[b] else "-" for b, v in zip((1, 8), vals)]
        lines.append(f"| {label} | {'onnxruntime CPU' if provider == 'cpu' else 'PyTorch CPU'} | {f:,} | "
                     f"{base / f:.2f}x | {ms[0]} | {ms[1]} | {sp[0]} | {sp[1]} |")
    lines += ["", "Speedups are against PyTorch eager, unpruned, at the same batch size. FLOPs count what each "
              "model computes (our unpruned export folds the fusion's key projection into one matrix, so it "
              "computes fewer FLOPs than the same model in optimum's export)."] + [f"Not run: {n}" for n in notes]
    checks = []
    for b in (1, 8):
        ours, comp, peer = (p50.get((t, "cpu", b)) for t in ("ours-unpruned", "ours-compacted", "optimum-O2.onnx"))
        if ours and comp:
            ideal = flops["ours-unpruned"] / flops["ours-compacted"]
            got = ours / comp
            checks.append(f"- batch {b}: compacted vs our unpruned export {got:.2f}x, FLOP-ideal {ideal:.2f}x, "
                          f"{100 * got / ideal:.0f}% of ideal (target >= 80%): {'met' if got >= 0.8 * ideal else 'NOT met'}")
        if peer and comp:
            ideal = flops["optimum-O2.onnx"] / flops["ours-compacted"]
            got = peer / comp
            checks.append(f"- batch {b}: compacted vs optimum O2 {got:.2f}x, FLOP ratio {ideal:.2f}x, "
                          f"{100 * got / ideal:.0f}% of it (target >= 80%): {'met' if got >= 0.8 * ideal else 'NOT met'}")
    if optimum_error:
        checks.append(f"- optimum refused the model: {optimum_error}")
    worst = compacted.parity["worst"]
    lines += ["", "## Targets", ""] + checks + [
        "", f"Parity of the compacted export against the masked model: {worst['model.onnx']:.2e} (atol 1e-4); "
        f"int8 max abs deviation {worst['model.int8.onnx']:.2e} on last_hidden_state (recorded, not held to atol).",
        f"Load average when timing started: {report['machine'].get('load_average')}. Full report: "
        "`peers-bench/report.md`.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text("\n".join(lines))
    (args.out / "peers.json").write_text(json.dumps(dict(flops=flops, optimum_error=optimum_error, checks=checks,
                                                         p50_ms={f"{t}|{p}|{b}": v for (t, p, b), v in p50.items()}),
                                                    indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
