"""Compaction benchmark on the embedded default (MiniLM + 8-adapter fusion).

Measures, in one run: load + prune (random: adapters 0.75, heads 0.5, neurons 0.5, bottleneck 0.5) + compact
wall time (imports excluded); parameters and FLOPs per token before and after; PyTorch CPU latency of the
masked vs the compacted model at batch 8, sequence 128, interleaved, median over repeats, next to the
FLOP-ideal ratio. Writes benchmarks/results/compaction.{json,md}.

    python benchmarks/compaction.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import compressor
from compressor.compaction import compact
from compressor.flops import total_cost
from compressor.modeling.architecture import layer_parts
from compressor.masks import masked_copy
from compressor.pruning import prune

SPARSITY = dict(adapters=0.75, heads=0.5, neurons=0.5, bottleneck=0.5)


def adapterhub_value_flops(model) -> int:
    """FLOPs/token AdapterHub adds over our standard fusion: value_before_softmax applies V to each of the n
    fused adapters, our module once to their mix (equal outputs, V being linear and bias-free)."""
    hidden, extra = model.base_model.config.hidden_size, 0
    for parts in layer_parts(model):
        for site in (parts.mh_site, parts.out_site):
            for f in site.active.fuses() if site.active is not None else ():
                if hasattr(site.adapter_fusion_layer[f.name], "value"):
                    extra += 2 * (len(f.names) - 1) * hidden * hidden
    return extra


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    compressor.load_default_model()  # build the cached default once, outside the timing

    t0 = time.perf_counter()
    model = compressor.load_default_model()
    t1 = time.perf_counter()
    masks = prune(model, "random", SPARSITY, seed=0)
    t2 = time.perf_counter()
    compacted = compact(model, masks)
    t3 = time.perf_counter()

    masked = masked_copy(model, masks)
    before, after = total_cost(model, args.seq), total_cost(compacted, args.seq)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(1000, 30000, (args.batch, args.seq), generator=gen),
                  attention_mask=torch.ones(args.batch, args.seq, dtype=torch.long),
                  token_type_ids=torch.zeros(args.batch, args.seq, dtype=torch.long))
    with torch.inference_mode():
        diff = (masked(**inputs).last_hidden_state - compacted(**inputs).last_hidden_state).abs().max().item()
        for _ in range(3):
            masked(**inputs), compacted(**inputs)
        times = {"masked": [], "compacted": []}
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            for name, m in (("masked", masked), ("compacted", compacted)):
                s = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - s)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    spread = {k: (statistics.quantiles(v, n=10)[0] * 1000, statistics.quantiles(v, n=10)[-1] * 1000)
              for k, v in times.items()}
    ideal = before["flops_per_token"] / after["flops_per_token"]
    hub_flops = before["flops_per_token"] + adapterhub_value_flops(model)
    speedup = med["masked"] / med["compacted"]
    result = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), threads=args.threads,
                     torch=torch.__version__),
        sparsity=SPARSITY, wall_s=dict(load=t1 - t0, prune=t2 - t1, compact=t3 - t2, total=t3 - t0),
        params=dict(before=before["params"], after=after["params"]),
        flops_per_token=dict(before=before["flops_per_token"], after=after["flops_per_token"]),
        flops_breakdown=dict(before={k: before[k] for k in before if k.endswith("_flops")},
                             after={k: after[k] for k in after if k.endswith("_flops")}),
        latency_ms=dict(median=med, p10_p90=spread, batch=args.batch, seq=args.seq, repeats=args.repeats),
        adapterhub_form_flops_per_token=hub_flops, flop_ideal_speedup=ideal, measured_speedup=speedup, fraction_of_ideal=speedup / ideal,
        max_abs_diff_masked_vs_compacted=diff,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compaction.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Compaction benchmark (embedded default: all-MiniLM-L6-v2 + 8-adapter fusion)",
        "",
        f"Command: `python benchmarks/compaction.py --repeats {args.repeats} --threads {args.threads}`; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads.",
        f"Random pruning: {', '.join(f'{k} {v}' for k, v in SPARSITY.items())} (seed 0).",
        "",
        "| | before | after | ratio |",
        "|---|---|---|---|",
        f"| parameters | {before['params']:,} | {after['params']:,} | {before['params'] / after['params']:.2f}x |",
        f"| FLOPs/token (seq {args.seq}) | {before['flops_per_token']:,} | {after['flops_per_token']:,} | {ideal:.2f}x |",
        f"| PyTorch CPU latency, batch {args.batch} x seq {args.seq}, median ms (masked vs compacted) | "
        f"{med['masked']:.1f} | {med['compacted']:.1f} | {speedup:.2f}x |",
        "",
        f"Measured speedup {speedup:.2f}x = {100 * speedup / ideal:.0f}% of the FLOP-ideal {ideal:.2f}x "
        "(target: at least 80%).",
        f"Load + prune + compact wall time: {t3 - t0:.2f} s (load {t1 - t0:.2f}, prune {t2 - t1:.2f}, "
        f"compact {t3 - t2:.2f}; target under 10 s).",
        f"Max abs diff masked vs compacted: {diff:.2e}.",
        "",
        "FLOPs count what each timed model computes. The masked model's fusion already applies its value "
        "projection once, to the mixed context; AdapterHub applies it to every fused adapter "
        f"(value_before_softmax), {hub_flops:,} FLOPs/token, so against AdapterHub's form the FLOP ratio is "
        f"{hub_flops / after['flops_per_token']:.2f}x.",
        "",
    ]
    (args.out / "compaction.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
