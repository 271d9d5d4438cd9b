"""Peak memory of `compress export --onnx` (issue 13, item 6) on BERT-base- and BERT-large-shaped fusions.

Builds each shape from its config (transformers BertConfig with the standard sizes, random init,
`compressor.default_model.add_fusion`: eight bottleneck adapters and a dynamic AdapterFusion, AdapterHub's
full-model layout; config.json + model.safetensors, no tokenizer), then runs `compressor.api.export` in a child
process whose progress callback prints timestamped stage names, while this process samples the RSS of that child
and of any process it starts (summed) every ~20 ms. Per shape: the model's fp32 bytes, peak RSS (sampled, and
the kernel's high-water mark `ru_maxrss` of the child), their ratio to the fp32 size, the stage at the peak, the
peak per stage and the wall time. The child also reports its RSS after `import torch, onnxruntime,
transformers` and the compressor (the import baseline). `--ab-graph-stages` instead times the stock and the
low-memory ONNX export and optimisation, interleaved; `--ab-int8` the stock and the low-memory int8 stage.

    python benchmarks/export_memory.py [--shapes base,large] [--variants int8] [--out-md FILE] [--label after]
    python benchmarks/export_memory.py --shapes base --ab-graph-stages
    python benchmarks/export_memory.py --shapes base --ab-int8

Needs free memory: ~2 GB for base, ~4.5 GB for large (benchmarks/results/export_memory.md).
"""

from __future__ import annotations

import argparse
import bisect
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {  # the standard BERT sizes
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
SAMPLE_S = 0.02


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def rss_of(pid: int) -> int:
    """Resident set size in bytes of the process and all its descendants at this moment, summed (a stage run in
    a child process counts with its parent; pages they share count twice, so the sum is an upper bound)."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            total += _rss(p)
        except OSError:  # exited between the listing and the read
            pass
    return total


def build(shape: str, directory: Path) -> int:
    """Write the shape's fusion model to `directory` (reused when there); returns its fp32 bytes."""
    meta = directory / "fp32_bytes.json"
    if meta.exists():
        return json.loads(meta.read_text())["bytes"]
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from compressor.default_model import add_fusion

    torch.manual_seed(0)
    config = BertConfig(**SHAPES[shape])
    state = {k: v for k, v in BertModel(config).state_dict().items() if not k.endswith("position_ids")}
    config_dict = config.to_dict()
    config_dict, state = add_fusion(config_dict, state)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    meta.write_text(json.dumps(dict(bytes=nbytes, parameters=sum(v.numel() for v in state.values()))))
    return nbytes


def child(model: str, out: str, variants: str) -> None:
    """The measured process: imports, then compressor.api.export with a progress callback on stdout."""
    def say(stage: str) -> None:
        print(f"STAGE {time.time():.4f} {stage}", flush=True)

    say("start (interpreter)")
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from compressor.api import export
    from compressor.requests import ExportRequest

    say("imported torch, onnxruntime, transformers, compressor")
    time.sleep(0.2)  # a few samples of the import baseline
    names = [v for v in variants.split(",") if v]
    export(ExportRequest(model=model, out=out, variants=names, seed=0), progress=say)
    say("done")
    import resource

    print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)


def measure(model_dir: Path, variants: str) -> dict:
    """Run the export of `model_dir` in a child process; sample its RSS until it exits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "onnx"
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(model_dir), str(out), variants],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stages, extra, err = [], {}, []

        def read_stdout():
            for line in proc.stdout:
                if line.startswith("STAGE "):
                    _, t, name = line.rstrip("\n").split(" ", 2)
                    stages.append((float(t), name))
                elif line.startswith("MAXRSS "):
                    extra["maxrss"] = int(line.split()[1])

        def read_stderr():
            err.extend(proc.stderr)

        readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
        for r in readers:
            r.start()
        samples, t0 = [], time.time()
        while proc.poll() is None:
            try:
                samples.append((time.time(), rss_of(proc.pid)))
            except (OSError, ProcessLookupError, Exception):  # exited between poll and read
                pass
            time.sleep(SAMPLE_S)
        for r in readers:
            r.join()
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"export of {model_dir} failed:\n{''.join(err[-30:])}")
        sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()} if out.exists() else {}
    samples = [s for s in samples if s[1] > 0]
    times = [t for t, _ in stages]

    def stage_at(t: float) -> str:
        i = bisect.bisect_right(times, t) - 1
        return stages[i][1] if i >= 0 else "start (interpreter)"

    per_stage = {}
    for t, rss in samples:
        name = stage_at(t)
        per_stage[name] = max(per_stage.get(name, 0), rss)
    peak_t, peak = max(samples, key=lambda s: s[1])
    baseline = per_stage.get("imported torch, onnxruntime, transformers, compressor", 0)
    start = next((t for t, n in stages if n.startswith("exporting")), times[0] if times else t0)
    end = next((t for t, n in stages if n == "done"), t0 + wall)
    return dict(peak_rss=peak, maxrss=extra.get("maxrss"), peak_stage=stage_at(peak_t), per_stage=per_stage,
                import_baseline=baseline, wall_s=wall, export_s=end - start, samples=len(samples),
                timeline=[(round(t - t0, 3), n) for t, n in stages], files=sizes)


def ab_graph_stages(model_dir: Path, repeats: int = 2) -> dict:
    """Wall time of the two graph stages this work changed, interleaved (stock, new, stock, new...) on one
    compacted model: torch.onnx.export with its parameters vs `export_graph(external=True)`, and onnxruntime's
    optimizer on the inline graph + `OnnxModel.save_model_to_file` vs `optimize_graph` on the external one."""
    import logging
    import statistics
    import warnings

    import torch

    import compressor
    from compressor.compaction import compact
    from exporters import onnx_export as oe
    from exporters import optimize as go
    from exporters.runtime import release_memory

    model = compact(compressor.load_model(str(model_dir)), in_place=True)
    inputs, output = oe.io_names(model)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    _, FusionOptions, optimize_model = go._optimizer_modules()
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def stock_export():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(oe._Graph(model, inputs, output).eval(), tuple(
                    torch.ones(2, 8, dtype=torch.long) for _ in inputs), str(d / "stock.onnx"), dynamo=False,
                    opset_version=oe.OPSET, input_names=inputs, output_names=[output], dynamic_axes=axes,
                    do_constant_folding=True)

        def stock_optimise():
            options = FusionOptions("bert")
            options.use_raw_attention_mask(True)
            options.enable_skip_layer_norm = False
            m = optimize_model(str(d / "stock.onnx"), model_type="bert", num_heads=0, hidden_size=0,
                               optimization_options=options, opt_level=0)
            go.adapter_attention_fusion(m).apply()
            go.residual_sums(m.model)
            m.topological_sort()
            m.save_model_to_file(str(d / "stock_opt.onnx"))

        arms = {"export stock": stock_export,
                "export new": lambda: oe.export_graph(model, d / "raw.onnx", external=True),
                "optimise stock": stock_optimise,
                "optimise new": lambda: go.optimize_graph(d / "raw.onnx", d / "opt.onnx")}
        times = {k: [] for k in arms}
        for _ in range(repeats):
            for name, run in arms.items():
                release_memory()
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(times=times, export_ratio=med["export new"] / med["export stock"],
                optimise_ratio=med["optimise new"] / med["optimise stock"])


def ab_int8(model_dir: Path, repeats: int = 3) -> dict:
    """Wall time of the int8 stage, interleaved (stock, new, stock, new...) on one optimised graph: the stock
    recipe (the graph loaded whole, saved with external data, onnxruntime's `quantize_dynamic`) vs
    `quantization.preprocess` + `quantization.quantize` (one tensor at a time, weights left on disk)."""
    import statistics

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    from compressor.api import export
    from compressor.requests import ExportRequest
    from exporters import quantization as q
    from exporters.runtime import release_memory

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export(ExportRequest(model=str(model_dir), out=str(d / "onnx"), variants=[], seed=0))
        deploy = d / "onnx" / "model.onnx"

        def stock(work: Path):
            model = onnx.load(str(deploy))
            add_pre_process_metadata(model)
            onnx.save_model(model, str(work / "pre.onnx"), save_as_external_data=True, location="pre.onnx.data")
            del model
            graph = onnx.load(str(work / "pre.onnx"), load_external_data=False)
            q.type_contrib_outputs(graph)
            onnx.save_model(graph, str(work / "pre.onnx"))
            quantize_dynamic(str(work / "pre.onnx"), str(work / "q.onnx"), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

        def new(work: Path):
            q.quantize(q.preprocess(deploy, work / "pre.onnx"), work / "q.onnx", q.DEFAULT)

        times = {"stock": [], "new": []}
        for i in range(repeats):
            for name, run in (("stock", stock), ("new", new)):
                work = d / f"{name}{i}"
                work.mkdir()
                release_memory()
                t = time.perf_counter()
                run(work)
                times[name].append(time.perf_counter() - t)
                shutil.rmtree(work)
    return dict(times=times, ratio=statistics.median(times["new"]) / statistics.median(times["stock"]))


def gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n else "-"


def report(label: str, variants: str, results: dict) -> str:
    lines = [f"### {label}", "",
             f"`python benchmarks/export_memory.py --shapes {','.join(results)} --variants {variants}`", "",
             "| shape | parameters | fp32 model | import baseline | peak RSS (sampled) | ru_maxrss | peak / fp32 "
             "| stage at peak | export wall (stages) | process wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, r in results.items():
        ratio = max(r["peak_rss"], r["maxrss"] or 0) / r["fp32_bytes"]
        lines.append(f"| {shape} | {r['parameters'] / 1e6:.0f}M | {gb(r['fp32_bytes'])} | {gb(r['import_baseline'])} "
                     f"| {gb(r['peak_rss'])} | {gb(r['maxrss'])} | {ratio:.2f}x | {r['peak_stage']} "
                     f"| {r['export_s']:.0f} s | {r['wall_s']:.0f} s |")
    for shape, r in results.items():
        lines += ["", f"Peak RSS per stage, {shape}:", "", "| stage | peak RSS | / fp32 |", "|---|---|---|"]
        lines += [f"| {name} | {gb(v)} | {v / r['fp32_bytes']:.2f}x |" for name, v in r["per_stage"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,large")
    ap.add_argument("--variants", default="int8", help="comma-separated export variants (default int8)")
    ap.add_argument("--out-md", type=Path, default=None, help="write the tables to this Markdown file")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--label", default="export memory")
    ap.add_argument("--ab-graph-stages", action="store_true",
                    help="instead: time the stock and the low-memory graph stages, interleaved")
    ap.add_argument("--ab-int8", action="store_true",
                    help="instead: time the stock and the low-memory int8 stage, interleaved")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "export_memory_models",
                    help="where the built models are kept (reused between runs)")
    args = ap.parse_args()
    results = {}
    ab = ab_int8 if args.ab_int8 else ab_graph_stages if args.ab_graph_stages else None
    if ab is not None:  # stock against low-memory stages, interleaved
        for shape in args.shapes.split(","):
            build(shape, args.work_dir / shape)
            r = ab(args.work_dir / shape)
            ratios = ", ".join(f"{k.removesuffix('ratio').rstrip('_') or 'stage'} {v:.2f}"
                               for k, v in r.items() if k.endswith("ratio"))
            print(f"{shape}: " + "; ".join(f"{k} {', '.join(f'{t:.1f}' for t in v)} s" for k, v in r["times"].items())
                  + f"; new/stock median: {ratios}")
        return
    for shape in args.shapes.split(","):
        directory = args.work_dir / shape
        fp32 = build(shape, directory)
        params = json.loads((directory / "fp32_bytes.json").read_text())["parameters"]
        print(f"{shape}: {params / 1e6:.0f}M parameters, {fp32 / 1e9:.2f} GB fp32; exporting...", flush=True)
        r = measure(directory, args.variants)
        r.update(fp32_bytes=fp32, parameters=params)
        results[shape] = r
        ratio = max(r["peak_rss"], r["maxrss"] or 0) / fp32
        print(f"  peak {gb(r['peak_rss'])} (ru_maxrss {gb(r['maxrss'])}) = {ratio:.2f}x fp32 in "
              f"'{r['peak_stage']}'; import baseline {gb(r['import_baseline'])}; {r['wall_s']:.0f} s", flush=True)
        for name, v in r["per_stage"].items():
            print(f"    {v / 1e9:6.2f} GB  {name}", flush=True)
    text = report(args.label, args.variants, results)
    print(text)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(text)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
