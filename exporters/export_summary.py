"""`export.md`: what an export directory holds, in a page a person reads."""

from __future__ import annotations

from pathlib import Path

from compressor.flops import total_cost

from .variants import VARIANTS


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def attention_rows(result) -> list:
    """(layer, kept heads, fused Attention nodes, their num_heads, ok) per layer."""
    rows = []
    for i, heads in enumerate(result.heads):
        nodes = result.attention.get(i, [])
        ok = (not nodes) if heads == 0 else nodes == [heads]
        rows.append((i, heads, len(nodes), nodes, ok))
    return rows


def parity_row(target: str, worst: float, parity: dict) -> str:
    """One row of the parity table: what the target was held to (parity.json's `targets`) and the verdict."""
    info = parity.get("targets", {}).get(target, {})
    tol = info.get("tolerance", parity["atol"])
    held = "recorded only" if tol is None else f"{tol:g}"
    verdict = "recorded" if tol is None else ("ok" if info.get("passed", worst <= tol) else "MISMATCH")
    return f"| {target} | {info.get('provider') or '-'} | {held} | {worst:.2e} | {verdict} |"


def write_export_md(result, compacted, path: Path, optimized: bool) -> None:
    cost = total_cost(compacted, 128)
    lines = ["# ONNX export", "",
             "| file | size |", "|---|---|"]
    lines += [f"| `{name}` | {_mb(size)} |" for name, size in result.sizes.items()]
    lines += ["", f"Compacted model: {cost['params']:,} parameters, {cost['flops_per_token']:,} FLOPs per token at "
              "sequence 128 (the PyTorch weights beside the graph reload with `compressor.load_model`).", ""]
    if optimized:
        rows = attention_rows(result)
        lines += ["## Attention fusion (onnxruntime transformer optimizer, raw attention mask)", "",
                  "| layer | kept heads | fused Attention nodes | num_heads | ok |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {h} | {n} | {', '.join(map(str, heads)) or '-'} | {'yes' if ok else 'NO'} |"
                  for i, h, n, heads, ok in rows]
        bad = [r[0] for r in rows if not r[4]]
        lines += ["", "Every layer that keeps heads has one fused Attention node with its own head count." if not bad
                  else f"WARNING: layers {bad} did not fuse as expected; the graph is exact (see parity) but slower."]
    else:
        lines += ["The graph is not optimised (`--no-optimize`): onnxruntime applies its generic optimisations "
                  "at load only."]
    p = result.parity
    lines += ["", "## Parity against the masked PyTorch model", "",
              f"{len(p['checks'])} checks (right-, left- and randomly padded rows; two batch sizes and two "
              f"sequence lengths), atol {p['atol']:g}, seed {p['seed']}: **{'passed' if p['passed'] else 'FAILED'}**.",
              "", "| target | provider | held to | worst max abs diff | verdict |", "|---|---|---|---|---|"]
    lines += [parity_row(t, d, p) for t, d in p["worst"].items()]
    for name, entry in result.variants.items():  # each registered variant writes its own section
        variant = VARIANTS[name]()
        lines += ["", f"## {variant.title}", ""] + variant.summary(entry, result.sizes)
        if "accuracy" in entry:
            acc = entry["accuracy"]
            lines += ["", f"Dev metrics on {entry['data']}:", "", f"| metric | fp32 | {name} | change |",
                      "|---|---|---|---|"]
            lines += [f"| {k} | {acc['fp32'][k]:.4f} | {acc[name][k]:.4f} | {acc['change'][k]:+.4f} |"
                      for k in acc["fp32"]]
    t = result.timings
    lines += ["", "Timings: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items()), ""]
    Path(path).write_text("\n".join(lines))


SPEEDUP_FILE = "speedup.json"


def add_speedup(out, extra: dict, measured: dict) -> dict:
    """The measured speedup (exporters/speedup.py) beside the prediction of the masks' latency target (masks.json
    `extra`): written to OUT/speedup.json and as a section of OUT/export.md. Returns the record."""
    import json

    record = dict(measured, target_speedup=extra.get("target_speedup"),
                  predicted_speedup=extra.get("predicted_speedup"), latency_model=extra.get("latency_model"))
    record["measured_vs_predicted"] = round(record["speedup"] / record["predicted_speedup"] - 1, 4) \
        if record["predicted_speedup"] else None
    out = Path(out)
    (out / SPEEDUP_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    lines = ["## Speedup over the dense model (plain onnxruntime CPU sessions)", "",
             "| shape | dense ms | model.onnx ms | measured | predicted | target |", "|---|---|---|---|---|---|",
             f"| {record['shape']} | {record['dense_ms']:.3f} | {record['pruned_ms']:.3f} | {record['speedup']:.2f}x | "
             f"{record['predicted_speedup']:.2f}x | {record['target_speedup']:g}x |", "",
             f"Timed interleaved ({record['rounds']} rounds, medians of per-round ratios); the prediction is the "
             f"latency model's ({record['latency_model']}, compressor/latency.py).", ""]
    with open(out / "export.md", "a") as f:
        f.write("\n".join(lines))
    return record


def speedup_table(record: dict):
    """export's console table of add_speedup's record."""
    from rich.table import Table

    table = Table(title=f"speedup over dense, plain onnxruntime CPU sessions, {record['shape']}")
    for col in ("dense ms", "model.onnx ms", "measured", "predicted", "target"):
        table.add_column(col, justify="right")
    table.add_row(f"{record['dense_ms']:.3f}", f"{record['pruned_ms']:.3f}", f"{record['speedup']:.2f}x",
                  f"{record['predicted_speedup']:.2f}x", f"{record['target_speedup']:g}x")
    return table
