"""`export.md`: what an export directory holds, in a page a person reads."""

from __future__ import annotations

from pathlib import Path

from compressor.flops import total_cost


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
              "", "| target | worst max abs diff |", "|---|---|"]
    lines += [f"| {t} | {d:.2e} |" for t, d in p["worst"].items()]
    if result.int8 is not None:
        dense, q = result.sizes[result.files["model"]], result.sizes[result.files["int8"]]
        lines += ["", "## int8 (onnxruntime dynamic quantization: optimise, pre-process, quantize)", "",
                  f"`model.int8.onnx`: {_mb(q)} ({dense / q:.2f}x smaller than `model.onnx`). Output deviation from "
                  f"the reference: max abs diff {result.int8['max_abs_diff']:.3e}; recorded, not held to atol. "
                  "Measure its latency with `compress bench`."]
        if "accuracy" in result.int8:
            acc = result.int8["accuracy"]
            lines += ["", f"Dev metrics on {result.int8['data']}:", "", "| metric | fp32 | int8 | change |", "|---|---|---|---|"]
            lines += [f"| {k} | {acc['fp32'][k]:.4f} | {acc['int8'][k]:.4f} | {acc['change'][k]:+.4f} |" for k in acc["fp32"]]
    if result.sparse is not None and "sparse" not in result.files:
        lines += ["", "## Sparse initializers", "",
                  f"No `model.sparse.onnx` written: no weight tensor is below the break-even density "
                  f"{result.sparse['break_even_density']:.3f} (fp32 values with int64 indices). Prune single weights "
                  "(`--sparsity weights=...`) to leave zeros that compaction cannot remove."]
    elif result.sparse is not None:
        s = result.sparse
        dense, sp = result.sizes[result.files["model"]], result.sizes[result.files["sparse"]]
        density = s["nonzero"] / s["elements"] if s["elements"] else float("nan")
        lines += ["", "## Sparse initializers", "",
                  f"`model.sparse.onnx`: {_mb(sp)} against {_mb(dense)} dense ({dense / sp:.2f}x). "
                  f"{len(s['tensors'])} weight tensors stored sparse ({s['nonzero']:,} non-zeros of "
                  f"{s['elements']:,}, density {density:.3f}). Break-even density: {s['break_even_density']:.3f} "
                  "(fp32 values with int64 indices); denser tensors stay dense.",
                  "", "This is a disk-size format, not a speed format: onnxruntime densifies sparse initializers "
                  "when it loads the model, so latency and memory at run time equal the dense graph's."]
    t = result.timings
    lines += ["", "Timings: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items()), ""]
    Path(path).write_text("\n".join(lines))
