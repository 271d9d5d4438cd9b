"""Bottleneck-space fusion against today's folded fusion on the compacted embedded default (MiniLM + 8 adapters
of width 24 + their AdapterFusion, nothing pruned).

Both models come from the same `compact` call, once as it chooses (bottleneck space where it costs fewer FLOPs)
and once inside `compaction.folded_fusions_only()` (today's form everywhere). Reports FLOPs per token of both
(compressor.flops: as computed), the max abs diff of each against the uncompacted model, and latency of
PyTorch eager and of onnxruntime CPU sessions of their exports (exporters.onnx_export.export_onnx, parity-
verified, into temporary directories) at batch 1 and 8 x 128 tokens: rounds interleave A, B, A, B, medians.

    python benchmarks/fusion_space.py [--rounds 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import compressor
from compressor.compaction import compact, folded_fusions_only
from compressor.flops import total_cost


def inputs_for(batch: int, seq: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:  # some padding, like real batches
        mask[1:, seq - seq // 4:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros(batch, seq, dtype=torch.long))


def interleaved(runs: dict, rounds: int, warmup: int = 3) -> dict:
    """Median seconds per call of each runner, rounds interleaved (A, B, A, B, ...) so drift hits both alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def output(model, x) -> torch.Tensor:
    out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def fusion_part(cost: dict) -> int:
    return cost["adapter_flops"] + cost["fusion_flops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fusion_space.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    model = compressor.load_default_model().eval()
    with folded_fusions_only():
        old = compact(model)
    new = compact(model)
    forms = {}
    for name, m in (("folded", old), ("bottleneck", new)):
        forms[name] = sorted({f.get("bottleneck_space", False) for layer in m.compress_manifest["layers"]
                              for site in layer["sites"].values() for f in site["fusions"].values()})
    assert forms == {"folded": [False], "bottleneck": [True]}, forms
    cost = {"folded": total_cost(old, args.seq), "bottleneck": total_cost(new, args.seq)}

    check = inputs_for(2, 37)
    with torch.inference_mode():
        ref = output(model, check)
        diff = {k: (output(m, check) - ref).abs().max().item()
                for k, m in (("folded", old), ("bottleneck", new))}

    torch_ms = {}
    with torch.inference_mode():
        for b in batches:
            x = inputs_for(b, args.seq)
            med = interleaved({"folded": lambda: old(**x), "bottleneck": lambda: new(**x)}, args.rounds)
            torch_ms[b] = {k: v * 1000 for k, v in med.items()}

    from exporters.onnx_export import export_onnx
    from exporters.runtime import make_session

    ort_ms, parity = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        with folded_fusions_only():
            r_old = export_onnx(model, Path(tmp) / "folded")
        r_new = export_onnx(model, Path(tmp) / "bottleneck")
        sessions = {}
        for name, r in (("folded", r_old), ("bottleneck", r_new)):
            parity[name] = max(c["max_abs_diff"] for c in r.parity["checks"] if c["target"] == "model.onnx")
            sessions[name] = make_session(r.out / r.files["model"], "cpu", threads=args.threads)
        for b in batches:
            x = inputs_for(b, args.seq)
            feeds = {}
            for name, s in sessions.items():
                wanted = {i.name for i in s.get_inputs()}
                feeds[name] = {k: v.numpy().astype(np.int64) for k, v in x.items() if k in wanted}
            med = interleaved({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}, args.rounds)
            ort_ms[b] = {k: v * 1000 for k, v in med.items()}

    f_old, f_new = cost["folded"]["flops_per_token"], cost["bottleneck"]["flops_per_token"]
    p_old, p_new = fusion_part(cost["folded"]), fusion_part(cost["bottleneck"])
    import onnxruntime

    md = [
        "# Bottleneck-space fusion vs today's folded fusion (compacted embedded default)",
        "",
        f"Command: `python benchmarks/fusion_space.py --rounds {args.rounds} --threads {args.threads}`; "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}. Model: all-MiniLM-L6-v2 (h = 384, 6 layers) with 8 adapters of width "
        "24 and their fusion at each layer's output site, compacted without pruning: `folded` inside "
        "`compaction.folded_fusions_only()` (every fusion in today's form), `bottleneck` as `compact` chooses "
        "(every fusion in bottleneck space). Latency: median of "
        f"{args.rounds} interleaved rounds (folded, bottleneck, folded, ...) after 3 warm-up rounds, seq {args.seq}; "
        "batch 8 has a quarter of 7 rows padded.",
        "",
        "| | folded | bottleneck | ratio |",
        "|---|---|---|---|",
        f"| FLOPs/token, whole encoder (seq {args.seq}) | {f_old:,} | {f_new:,} | {f_old / f_new:.3f}x |",
        f"| FLOPs/token, adapters + fusions | {p_old:,} | {p_new:,} | {p_old / p_new:.2f}x |",
        f"| parameters | {cost['folded']['params']:,} | {cost['bottleneck']['params']:,} | |",
        f"| max abs diff vs uncompacted (PyTorch, 2 x 37) | {diff['folded']:.1e} | {diff['bottleneck']:.1e} | |",
        f"| export parity, model.onnx worst | {parity['folded']:.1e} | {parity['bottleneck']:.1e} | |",
    ]
    for label, table in (("PyTorch eager", torch_ms), ("onnxruntime CPU", ort_ms)):
        for b in batches:
            t = table[b]
            md.append(f"| {label}, batch {b} x {args.seq}, median ms | {t['folded']:.2f} | {t['bottleneck']:.2f} | "
                      f"{t['folded'] / t['bottleneck']:.3f}x |")
    md += [
        "",
        "FLOPs count what each model computes (compressor.flops). Per fusion site and token, the folded form "
        "computes the 8 up projections (2hK, K = 192), the folded query-key projection (2h^2), scores and mix "
        "(4nh) and the value projection (2h^2); the bottleneck form one h -> K + n score projection, the block "
        "dot products (K + 2Kn), the weighting (K) and one K + n -> h mix holding V U_i and V b_i. The 8 down "
        "projections (2hK) are the same in both. The FLOP-ideal whole-model ratio is "
        f"{f_old / f_new:.3f}x; attention and FFN dominate the rest.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
