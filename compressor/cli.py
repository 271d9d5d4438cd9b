"""`compress`: a thin CLI. Each command parses, calls one library function, prints a summary table and the
paths it wrote. Errors: one line, non-zero exit, no traceback unless --debug."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import CompressorError

app = typer.Typer(
    help="Prune, compact and export adapter-based transformer models (bottleneck adapters, AdapterFusion).\n\n"
    "With no MODEL, commands use the embedded default: all-MiniLM-L6-v2 with eight bottleneck adapters and an "
    "AdapterFusion over them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

MODEL_ARG = typer.Argument(None, help="Model directory: transformers encoder, AdapterHub full model, or a compacted "
                                      "directory. Default: the embedded MiniLM + 8-adapter fusion.")
ADAPTER_OPT = typer.Option(None, "--adapter", help="AdapterHub adapter directory to add (repeatable).")
FUSION_OPT = typer.Option(None, "--fusion", help="AdapterHub fusion directory (adapter_fusion_config.json).")
SETUP_OPT = typer.Option(None, "--setup", help="Adapter or fusion to run, e.g. 'a' or 'a,b,c'. Default: the only "
                                               "fusion, else the only adapter.")
HEAD_OPT = typer.Option(None, "--head", help="AdapterHub prediction head to use. Default: the only one.")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    STATE["debug"] = debug


@contextlib.contextmanager
def user_errors():
    """Turn our typed errors (and Ctrl-C) into one line on stderr and a non-zero exit."""
    try:
        yield
    except CompressorError as e:
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130)


@contextlib.contextmanager
def step(description: str):
    """A spinner while a step runs; yields a function that renames the step (for multi-stage work)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=f"{description}: {text}")


def _load(model, adapters, fusion, setup, head):
    from .modeling import load_model

    with step("loading model"):
        return load_model(model, adapters=adapters, fusion=fusion, setup=setup, head=head)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


@app.command()
def inspect(
    model: Optional[Path] = MODEL_ARG,
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
    seq_len: int = typer.Option(128, help="Sequence length for the FLOPs of attention scores."),
):
    """Show layers, heads, adapters, fusions, parameters and FLOPs per token, so you see where the cost is."""
    with user_errors():
        from .flops import layer_costs, total_cost

        m = _load(model, adapter, fusion, setup, head)
        rows, total = layer_costs(m, seq_len), total_cost(m, seq_len)
        table = Table(title=f"{type(m).__name__}, setup {m.compress_manifest.get('setup')!s} "
                            f"(FLOPs per token at sequence length {seq_len})")
        for col in ("layer", "heads", "FFN", "adapters (width)", "fusion", "params", "attn", "FFN FLOPs",
                    "adapter FLOPs", "fusion FLOPs"):
            table.add_column(col, justify="right" if col not in ("adapters (width)", "fusion") else "left")
        for r in rows:
            desc, fus = [], []
            for s, c in r["sites"].items():
                if c["adapters"]:
                    tag = "attn" if s == "mh_adapter" else "ffn"
                    desc.append(f"{tag}: {len(c['adapters'])}x({','.join(map(str, sorted(set(c['widths']))))})")
                    if c["fused"]:
                        fus.append(f"{tag}: {len(c['adapters'])}")
            table.add_row(str(r["layer"]), str(r["heads"]), str(r["ffn"]), "; ".join(desc) or "-", "; ".join(fus) or "-",
                          _fmt(r["base_params"] + r["adapter_params"]), _fmt(r["attention_flops"]), _fmt(r["ffn_flops"]),
                          _fmt(r["adapter_flops"]), _fmt(r["fusion_flops"]))
        flops = total["flops_per_token"]
        table.add_row("total", "", "", "", "", _fmt(total["params"]), _fmt(total["attention_flops"]),
                      _fmt(total["ffn_flops"]), _fmt(total["adapter_flops"]), _fmt(total["fusion_flops"]), style="bold")
        console.print(table)
        shares = ", ".join(f"{k.split('_')[0]} {100 * total[k] / flops:.0f}%"
                           for k in ("attention_flops", "ffn_flops", "adapter_flops", "fusion_flops"))
        console.print(f"{_fmt(flops)} FLOPs per token in the encoder layers ({shares}); {_fmt(total['params'])} parameters.")


@app.command()
def prune(
    model: Optional[Path] = MODEL_ARG,
    method: str = typer.Option("magnitude", help="Pruning method: random | magnitude."),
    sparsity: List[str] = typer.Option(..., "--sparsity", help="KIND=FRACTION pruned per unit group, repeatable. "
                                       "Kinds: heads, neurons, adapters, bottleneck, weights. e.g. --sparsity "
                                       "heads=0.5 --sparsity adapters=0.75"),
    seed: int = typer.Option(0, help="Random seed: same inputs and seed give byte-identical masks."),
    allow_empty: bool = typer.Option(False, help="Allow a unit group to lose every member (a layer with no "
                                                 "heads, a fusion with no adapter). Default: keep at least one."),
    out: Path = typer.Option(..., "--out", help="Mask directory to write (masks.safetensors + masks.json)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Score units and write a MaskSet (True = keep) for the model."""
    with user_errors():
        from .io import check_output_dir
        from .pruning import parse_sparsity, prune as run_prune

        fractions = parse_sparsity(sparsity)
        check_output_dir(out, overwrite)
        m = _load(model, adapter, fusion, setup, head)
        with step(f"pruning ({method})"):
            masks = run_prune(m, method, fractions, seed=seed, min_keep=0 if allow_empty else 1)
        masks.save(out, overwrite=overwrite)
        table = Table(title=f"masks ({method}, seed {seed})")
        for col in ("kind", "groups", "kept", "total", "pruned"):
            table.add_column(col, justify="right")
        groups = {}
        for key in masks.masks:
            groups[masks.kind_of(key)] = groups.get(masks.kind_of(key), 0) + 1
        for kind, c in masks.counts().items():
            table.add_row(kind, str(groups[kind]), str(c["kept"]), str(c["total"]),
                          f"{100 * (1 - c['kept'] / c['total']):.1f}%")
        console.print(table)
        console.print(f"wrote {out}/masks.safetensors and {out}/masks.json")


@app.command()
def compact(
    model: Optional[Path] = MODEL_ARG,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`. Without it, "
                                         "only folds (fusion rewrite, scalings)."),
    out: Path = typer.Option(..., "--out", help="Directory for the compacted model (reloads with load_model)."),
    adapterhub: bool = typer.Option(False, "--adapterhub", help="Also write OUT/adapterhub: the pruned model in "
                                    "AdapterHub's full-model format, loadable by the `adapters` library."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Physically remove pruned heads, FFN neurons, bottleneck neurons and fusion adapters; outputs equal the
    masked model's."""
    with user_errors():
        from .api import compact_to_dir
        from .flops import total_cost
        from .io import check_output_dir
        from .masks import MaskSet

        check_output_dir(out, overwrite)
        maskset = MaskSet.load(masks) if masks is not None else None
        m = _load(model, adapter, fusion, setup, head)
        with step("compacting"):
            compacted = compact_to_dir(m, maskset, out, overwrite=overwrite, adapterhub=adapterhub, source=model)
        before, after = total_cost(m), total_cost(compacted)
        table = Table(title="compaction")
        for col in ("", "before", "after", "ratio"):
            table.add_column(col, justify="right")
        for label, key in (("parameters", "params"), ("FLOPs/token (seq 128)", "flops_per_token"),
                           ("  attention", "attention_flops"), ("  FFN", "ffn_flops"),
                           ("  adapters", "adapter_flops"), ("  fusion", "fusion_flops")):
            ratio = f"{before[key] / after[key]:.2f}x" if after[key] else "-"
            table.add_row(label, _fmt(before[key]), _fmt(after[key]), ratio)
        console.print(table)
        console.print(f"wrote {out}" + (f" and {out}/adapterhub" if adapterhub else ""))


@app.command()
def export(
    model: Optional[Path] = MODEL_ARG,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`: the model "
                                         "is compacted first. Without it, only folds (fusion rewrite, scalings)."),
    out: Path = typer.Option(..., "--out", help="Export directory to write."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format for now; required)."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Fuse the graph with onnxruntime's "
                                  "transformer optimizer (Attention per layer, SkipLayerNorm, Gelu)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Also write model.int8.onnx by onnxruntime "
                                           "dynamic quantization ('int8'); its deviation is reported, not held "
                                           "to --atol."),
    sparse: bool = typer.Option(False, "--sparse", help="Also write model.sparse.onnx, with weights pruned by "
                                "`--sparsity weights=...` stored as sparse initializers (smaller on disk only)."),
    atol: float = typer.Option(1e-4, help="Parity tolerance (max abs diff per output) against the masked model."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Keep the export even when parity fails "
                                        "(see parity.json). Default: fail and write nothing."),
    seed: Optional[int] = typer.Option(None, help="Seed of the parity inputs. Default: fresh random inputs each "
                                       "run (the seed used is in parity.json)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Compact, export to ONNX, optimise and verify parity with onnxruntime.

    Writes OUT/model.onnx (the graph to deploy), the compacted PyTorch model and tokenizer beside it (OUT loads
    with optimum's ORTModelForSequenceClassification / ORTModelForFeatureExtraction), parity.json and export.md.

    Example: compress prune --sparsity heads=0.5 --sparsity adapters=0.75 --out masks && compress export --masks
    masks --onnx --quantize int8 --out exported
    """
    with user_errors():
        from exporters.export_summary import attention_rows
        from exporters.onnx_export import ExportConfig, export_onnx

        from .api import model_source_dir
        from .errors import ExportError
        from .io import check_output_dir
        from .masks import MaskSet

        if not onnx:
            raise ExportError("choose a format: --onnx (the only one supported)")
        config = ExportConfig(optimize=optimize, sparse=sparse, quantize=quantize, atol=atol,
                              allow_mismatch=allow_mismatch, seed=seed)
        check_output_dir(out, overwrite)
        maskset = MaskSet.load(masks) if masks is not None else None
        m = _load(model, adapter, fusion, setup, head)
        with step("exporting") as update:
            result = export_onnx(m, out, maskset, config, overwrite=overwrite,
                                 tokenizer_dir=model_source_dir(model), progress=update)
        table = Table(title=f"ONNX export ({'optimised' if optimize else 'not optimised'})")
        for col in ("file", "size", "worst max abs diff vs masked model", "parity"):
            table.add_column(col, justify="right")
        worst = result.parity["worst"]
        for role, name in result.files.items():
            verdict = "recorded" if role == "int8" else ("ok" if worst[name] <= atol else "MISMATCH")
            table.add_row(name, f"{result.sizes[name] / 2**20:.2f} MB", f"{worst[name]:.2e}", verdict)
        table.add_row("compacted (PyTorch)", "", f"{worst['compacted (PyTorch)']:.2e}",
                      "ok" if worst["compacted (PyTorch)"] <= atol else "MISMATCH")
        console.print(table)
        if optimize:
            rows = attention_rows(result)
            console.print("fused Attention per layer (heads): " + ", ".join(
                f"{i}:{n}x({h})" + ("" if ok else " NOT FUSED") for i, h, n, _, ok in rows))
        console.print(f"wrote {out} (model.onnx, parity.json, export.md, compacted model, tokenizer)")


@app.command()
def bench(
    targets: List[Path] = typer.Argument(..., help="Export directories (runs model.onnx), .onnx files, or model "
                                         "directories (PyTorch only), e.g. a baseline first and its pruned export."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="cpu | cuda | tensorrt | torch; repeatable or "
                                       "comma-separated. A provider not available here is reported as skipped."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma-separated batch sizes."),
    seq_lens: str = typer.Option("32,128", "--seq-lens", help="Comma-separated sequence lengths (no padding)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for onnxruntime and PyTorch. "
                                          "Default: os.cpu_count() (logical cores); on a shared machine use fewer."),
    min_time: float = typer.Option(1.0, "--min-time", help="Minimum timed seconds per cell (at least 10 runs)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing each cell."),
    seed: int = typer.Option(0, help="Seed of the random token ids."),
    out: Path = typer.Option(..., "--out", help="Report directory: report.json, report.md, latency.png."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Measure latency (p50/p90/p99/mean/std ms) and throughput of exported and PyTorch models.

    Each target runs on each --provider at each batch size x sequence length, after warm-up, with pinned threads,
    until --min-time and 10 runs are reached. Speedups are against the first target.

    The report also records size, parameters, FLOPs per token, the machine, library versions, and which ONNX
    nodes fell back to the CPU.

    Examples:

      compress bench exported --out bench-cpu

      compress bench base-export pruned-export --provider cpu,torch --seq-lens 128 --out bench

      compress bench pruned-export pruned-export/model.int8.onnx --batch-sizes 1,32 --threads 4 --out bench-int8
    """
    with user_errors():
        import os

        from rich.progress import BarColumn, MofNCompleteColumn

        from exporters.bench import BenchConfig, run_bench
        from exporters.bench_report import not_run

        config = BenchConfig(providers=provider, batch_sizes=batch_sizes, seq_lens=seq_lens,
                             threads=threads or os.cpu_count() or 1, warmup=warmup, min_time_s=min_time, seed=seed)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True,
                      disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task("loading targets", total=None)
            report = run_bench(targets, config, out, overwrite=overwrite,
                               progress=lambda label, done, total: bar.update(task, description=label,
                                                                              completed=done, total=total))
        table = Table(title=f"latency per batch, ms ({config.threads} threads; speedup vs "
                            f"{report['targets'][0]['name']})")
        for col in ("target", "provider", "batch", "seq", "p50", "p99", "seq/s", "speedup"):
            table.add_column(col, justify="left" if col in ("target", "provider") else "right")
        for c in report["results"]:
            if c["status"] == "ok":
                table.add_row(escape(c["target"]), c["provider"], str(c["batch_size"]), str(c["seq_len"]),
                              f"{c['p50_ms']:.3f}", f"{c['p99_ms']:.3f}", f"{c['seq_per_s']:.1f}",
                              f"{c['speedup_p50']:.2f}x" if c["speedup_p50"] else "-")
        console.print(table)
        for target, prov, status, reason, shapes in not_run(report):
            console.print(f"{status}: {escape(target)} on {prov} ({shapes}): {escape(reason)}", highlight=False,
                          style="red" if status == "failed" else "yellow")
        console.print(f"wrote {out}/report.json, {out}/report.md and {out}/latency.png")
        failed = sum(c["status"] == "failed" for c in report["results"])
        if failed:  # the report is complete and says what failed; the exit status says so too
            err_console.print(f"[bold red]error:[/] {failed} of {len(report['results'])} cells failed; see "
                              f"{escape(str(out))}/report.md", highlight=False)
            raise typer.Exit(1)


if __name__ == "__main__":
    app()
