"""tradeoff.md (points, claim verdicts, the latency goal) and tradeoff.png (Pareto plot) from tradeoff.py's points."""

from __future__ import annotations

import sys
from pathlib import Path

GOAL_SPEEDUP, GOAL_DROP, CLOSE = 2.5, 0.01, 0.01
NOISE = 0.01  # one seed: differences under a point are not claims
MODELS = {"fusion": "MiniLM + 8-adapter AdapterFusion, MRPC dev accuracy (408)",
          "single": "MiniLM + SST-2 adapter, SST-2 dev accuracy (872)"}


def _find(points, model, method, target=None):
    for p in points:
        if p["model"] == model and p["method"] == method and (target is None or p["target"] == target):
            return p
    return None


def pareto(points):
    """Points no other point beats on both latency (batch 1) and accuracy."""
    points = [p for p in points if p.get("p50_ms", {}).get(1)]
    front = []
    for p in points:
        if not any(q["p50_ms"][1] <= p["p50_ms"][1] and q["metric"] >= p["metric"] and
                   (q["p50_ms"][1] < p["p50_ms"][1] or q["metric"] > p["metric"]) for q in points):
            front.append(p)
    return sorted(front, key=lambda p: p["p50_ms"][1])


def _verdict(margin: float) -> str:
    """A claim that A beats (or keeps up with) B by `margin` points: within NOISE either way is inconclusive."""
    return "confirmed" if margin > NOISE else "not confirmed" if margin < -NOISE else "inconclusive (within noise)"


def verdicts(points) -> list:
    """(claim, verdict, evidence) per seed paper, from the measured points. "Keeps accuracy" means within CLOSE
    of the reference; "beats" needs a margin over NOISE (one seed, a few hundred dev examples)."""
    out = []
    pct = lambda p: f"{100 * p['metric']:.1f}"  # noqa: E731
    dense_f, dense_s = _find(points, "fusion", "dense"), _find(points, "single", "dense")
    lottery = [p for p in points if p["model"] == "fusion" and p["method"] == "lottery-fusion"]
    if dense_f and lottery:
        final = max(lottery, key=lambda p: p["notes"].get("round", 0))  # the ticket the method returns
        out.append(("Pruned AdapterFusion keeps accuracy while most adapters go (lottery-fusion's final ticket, 7 of "
                    "8 fused adapters pruned per layer, within 1 point of the dense fusion)",
                    "confirmed" if dense_f["metric"] - final["metric"] <= CLOSE else "not confirmed",
                    f"{final['target']}: {pct(final)} vs dense {pct(dense_f)}; the earlier rounds (30 steps each): "
                    + ", ".join(f"{p['target']}: {pct(p)}" for p in lottery if p is not final)))
    sa = {p["target"]: p for p in points if p["method"] == "sparse-adapter (snip)"}
    ref = sa.get("adapter weights=0.0")
    high = [p for t, p in sa.items() if t != "adapter weights=0.0" and float(t.split("=")[1]) >= 0.8]
    if ref and high:
        ok = all(ref["metric"] - p["metric"] <= CLOSE for p in high)
        out.append(("Sparse adapters stay close to dense up to high sparsity (SparseAdapter, snip at init, >= 80% of "
                    "adapter weights pruned, within 1 point of the dense adapter trained the same way)",
                    "confirmed" if ok else "not confirmed", "; ".join(f"{t}: {pct(p)}" for t, p in sa.items())))
    omp, abp = _find(points, "single", "omp + probe"), _find(points, "single", "adapt-by-pruning + probe")
    if omp and abp:
        out.append(("Learned masks beat magnitude masks at the same sparsity (adapt-by-pruning vs one-shot "
                    "magnitude on the encoder weights)", _verdict(abp["metric"] - omp["metric"]),
                    f"adapt-by-pruning {pct(abp)} vs omp {pct(omp)} ({abp['target']})"))
    tamt, imp = _find(points, "single", "tamt + probe"), _find(points, "single", "imp + probe")
    if tamt and imp and omp:
        out.append(("Mask training beats IMP and one-shot magnitude (TAMT vs IMP and OMP, same sparsity)",
                    _verdict(min(tamt["metric"] - imp["metric"], tamt["metric"] - omp["metric"])),
                    f"tamt {pct(tamt)}, imp {pct(imp)}, omp {pct(omp)} ({tamt['target']})"))
    hi, imp_h = _find(points, "single", "head-importance"), _find(points, "single", "importance")
    if hi and dense_s:
        out.append(("Head pruning plus adapters keeps accuracy (head-importance: half the heads, a new adapter sized "
                    "by layer importance, within 1 point of the dense adapter model)",
                    "confirmed" if dense_s["metric"] - hi["metric"] <= CLOSE else "not confirmed",
                    f"{pct(hi)} vs dense {pct(dense_s)} ({hi['target']})"
                    + (f"; the same heads pruned by importance, keeping the trained SST-2 adapter: {pct(imp_h)}"
                       if imp_h else "")))
    return out


def goal(points) -> tuple:
    """The fastest fusion point within GOAL_DROP of the dense fusion, and whether it is GOAL_SPEEDUP faster."""
    ok = [p for p in points if p["model"] == "fusion" and p.get("drop", 1) <= GOAL_DROP and p["method"] != "dense"
          and len(p.get("speedup", {})) == 2]
    best = max(ok, key=lambda p: p["speedup"][1], default=None)
    return best, bool(best and min(best["speedup"].values()) >= GOAL_SPEEDUP)


def write_report(points, machine, args, out: Path, commands=None) -> None:
    commands = commands or [f"python benchmarks/tradeoff.py {' '.join(sys.argv[1:])}".strip()]
    lines = ["# Accuracy against ONNX CPU latency on the embedded default", "",
             f"Commands, in order: {', then '.join(f'`{c}`' for c in commands)} · machine: "
             f"{machine.get('processor')}, {machine.get('threads')} threads, onnxruntime {machine.get('onnxruntime')}"
             f" · latency: onnxruntime CPU p50, 128 tokens · budgets: {args.steps} steps per training stage "
             f"({getattr(args, 'mask_steps', args.steps)} for adapt-by-pruning's mask learning), head "
             f"probe {args.probe_steps} steps, batch {args.batch_size}, seed {args.seed}. One seed: a point on MRPC's "
             "408 dev examples moves by 0.25 per example, so differences under about 2 points are noise.", ""]
    for model, title in MODELS.items():
        rows = [p for p in points if p["model"] == model]
        if not rows:
            continue
        lines += [f"## {title}", "", "| method | target | accuracy | lost (pts) | p50 b1 ms | p50 b8 ms | speedup b1 "
                  "| speedup b8 | kept | scored by |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in rows:
            kept = ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in p["counts"].items() if k != "weights")
            if "weights" in p["counts"]:
                w = p["counts"]["weights"]
                kept = (kept + ", " if kept else "") + f"weights {100 * w['kept'] / max(w['total'], 1):.0f}%"
            scored = p["notes"].get("source", "onnxruntime")
            ms, up = p.get("p50_ms", {}), p.get("speedup", {})
            lines.append(f"| {p['method']} | {p['target']} | {100 * p['metric']:.1f} | {100 * p.get('drop', 0):+.1f} | "
                         + " | ".join(f"{ms[b]:.1f}" if ms.get(b) else "failed" for b in (1, 8)) + " | "
                         + " | ".join(f"{up[b]:.2f}x" if up.get(b) else "-" for b in (1, 8))
                         + f" | {kept or '-'} | {scored} |")
        lines += ["", "Pareto front (batch 1): " + " → ".join(f"{p['method']} {p['target']}" for p in pareto(rows)), ""]
    lines += ["## The seed papers' claims on this model", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for claim, verdict, evidence in verdicts(points):
        lines.append(f"| {claim} | {verdict} | {evidence} |")
    best, met = goal(points)
    lines += ["", "## Goal: 2.5x lower CPU latency than the unpruned fusion at <= 1 point of dev accuracy lost", ""]
    if best is None:
        lines.append("Not met: no pruned fusion point stays within 1 point of the dense fusion.")
    else:
        lines.append(f"{'Met' if met else 'Not met'}: the fastest fusion point within 1 point is {best['method']} "
                     f"{best['target']} at {100 * best['metric']:.1f} ({100 * best['drop']:+.1f} pts), "
                     f"{best['speedup'][1]:.2f}x at batch 1 and {best['speedup'][8]:.2f}x at batch 8.")
    (out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    plot(points, out / "tradeoff.png")
    print((out / "tradeoff.md").read_text())


def plot(points, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (model, title) in zip(axes, MODELS.items()):
        rows = [p for p in points if p["model"] == model and p.get("p50_ms", {}).get(1)]
        for method in dict.fromkeys(p["method"] for p in rows):
            ps = [p for p in rows if p["method"] == method]
            ax.scatter([p["p50_ms"][1] for p in ps], [100 * p["metric"] for p in ps], label=method, s=40)
        front = pareto(rows)
        ax.plot([p["p50_ms"][1] for p in front], [100 * p["metric"] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("onnxruntime CPU p50 latency, batch 1 x 128 tokens (ms)")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
