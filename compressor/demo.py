"""`compress demo`: the whole toolkit on the embedded default, in minutes on a laptop CPU.

The default fuses eight GLUE adapters for MRPC. The demo prunes fused adapters with `lottery-fusion` (small
budget), then heads and FFN neurons with `importance` (Taylor scores) and a short recovery training, exports the unpruned and the pruned model
to ONNX (parity-verified), quantizes the pruned one to int8, scores all three on the MRPC dev set with
onnxruntime and times them on the CPU. Everything lands in one directory: masks, exports, bench report, demo.md.

Data: MRPC from `--data-dir`, `$COMPRESSOR_GLUE_DIR` or `../shared/data/glue` when one holds MRPC/, else the rows
packaged in `compressor/default_data/MRPC` (all 408 dev rows; the 320 train rows the demo's seed-0 budget draws
from GLUE's 3,667, see its README.md). The demo never downloads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import OutputExistsError

DEMO_RECORD = "demo.json"
DEMO_STAGES = 8  # the calls of `say`
DEMO_DATA = Path(__file__).resolve().parent / "default_data"  # GLUE layout: MRPC/train.tsv (a subset), MRPC/dev.tsv


@dataclass
class DemoConfig:
    data: str = "glue:mrpc"
    data_dir: Optional[str] = None
    adapters: float = 0.75  # share of each layer's fused adapters pruned (lottery-fusion)
    heads: float = 0.25  # share of each layer's attention heads pruned (importance)
    neurons: float = 0.25  # share of each layer's FFN neurons pruned (importance)
    rounds: int = 2  # lottery rounds
    steps: int = 20  # fusion training steps per lottery stage (dense, then each round)
    batch_size: int = 16
    max_drop: float = 0.02  # lottery-fusion stops pruning when dev falls more than this below the dense model
    examples: int = 256  # training examples the importance scores average over
    recovery_steps: int = 20  # training of the remaining adapters + fusion + head after the structured pruning
    batch_sizes: list = field(default_factory=lambda: [1, 8])
    seq_len: int = 128
    min_time_s: float = 2.0  # per latency measurement
    threads: Optional[int] = None
    seed: int = 0
    dev_examples: Optional[int] = None  # score on the first N dev examples only (quick tries, tests)


@dataclass
class DemoRow:
    name: str
    onnx: str
    metrics: dict
    parameters: int
    onnx_bytes: int
    p50_ms: dict = field(default_factory=dict)  # batch size -> p50 latency
    speedup: dict = field(default_factory=dict)
    speedup_iqr: dict = field(default_factory=dict)  # batch size -> [q1, q3] of the per-round speedup


def prepare_out(out: Path, overwrite: bool, inputs=()) -> None:
    """A previous demo's directory (an output of ours holding demo.json) is replaced; anything else there is
    refused unless --overwrite, and even then never `.`, an ancestor of the working directory, a non-directory or
    a directory we did not write (compressor.io.check_output_dir)."""
    from .io import check_output_dir, is_our_output

    out = Path(out)
    previous_demo = is_our_output(out) and (out / DEMO_RECORD).is_file()
    if out.exists() and not previous_demo and not overwrite:
        raise OutputExistsError(f"{out} exists and is not a demo output; choose another --out or pass --overwrite")
    check_output_dir(out, overwrite=overwrite or previous_demo, inputs=inputs)


def demo_train_rows(n_train: int, config: Optional["DemoConfig"] = None) -> list:
    """The indices (file order) of the train examples the demo reads from a train set of `n_train` rows.

    Every stage (lottery-fusion's training and fusion-influence scores, importance's Taylor scores, recovery)
    walks the same seeded shuffle from its start, so the demo reads a prefix of one permutation: the first
    max(steps, recovery_steps, ceil(examples / batch), 8) batches."""
    import torch
    from torch.utils.data import DataLoader

    config = config or DemoConfig()
    batches = max(config.steps, config.recovery_steps, -(-config.examples // config.batch_size), 8)
    loader = DataLoader(range(n_train), batch_size=config.batch_size, shuffle=True, collate_fn=list,
                        generator=torch.Generator().manual_seed(config.seed))
    drawn = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        drawn += batch
    return sorted(drawn)


def write_packaged_data(glue_dir, target=DEMO_DATA) -> dict:
    """Rebuild `compressor/default_data/MRPC` from GLUE's MRPC files: dev.tsv whole, train.tsv cut to the rows
    `demo_train_rows` names (the header and each row byte for byte, in file order; no BOM). Returns the counts."""
    src, dst = Path(glue_dir) / "MRPC", Path(target) / "MRPC"
    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in ("train.tsv", "dev.tsv"):
        lines = [line + "\n" for line in (src / name).read_text(encoding="utf-8-sig").split("\n")]
        header, rows = lines[0], [line for line in lines[1:] if line.strip()]  # rows end in "\n" only (MRPC)
        keep = demo_train_rows(len(rows)) if name == "train.tsv" else range(len(rows))
        (dst / name).write_text(header + "".join(rows[i] for i in keep), encoding="utf-8", newline="")
        counts[name] = dict(rows=len(keep), of=len(rows))
    return counts


def describe_data(source: dict) -> str:
    """One phrase for the record and demo.md: how many rows, and from where."""
    if source.get("packaged"):
        where = "packaged with compressor (the demo's draw of GLUE MRPC's 3,667 train rows; all dev rows)"
    else:
        where = "from " + (source.get("dir") or ("/".join(source["hf"]) if source.get("hf") else source["spec"]))
    return f"{source['train_rows']} train and {source['dev_rows']} dev rows {where}"


def run_demo(out, config: Optional[DemoConfig] = None, overwrite: bool = False,
             say: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the demo into `out` (written whole or not at all). Returns the record written to demo.json."""
    import torch

    from exporters.accuracy import onnx_dev_metrics
    from exporters.bench import BenchConfig, report_path, run_bench
    from exporters.bench_report import busy_reasons, unsteady_reasons
    from exporters.onnx_export import ExportConfig, export_onnx

    from .api import load_tokenizer, save_prune_result
    from .data import load_data
    from .io import atomic_output_dir
    from .masks import MaskSet, masked_copy
    from .modeling import load_model
    from .pruning import prune
    from .training import TaskContext, TrainConfig, retrain_masked
    from .units import fingerprint

    config = config or DemoConfig()
    out = Path(out)
    prepare_out(out, overwrite, inputs=[config.data_dir] if config.data_dir else ())
    torch.manual_seed(config.seed)
    timings, start = {}, time.perf_counter()

    def stage(name: str):
        timings[name] = time.perf_counter()
        say(name)

    from .default_model import default_model_dir, default_scores

    stage("loading the default model (MiniLM + 8 GLUE adapters + fusion for MRPC)")
    source = default_model_dir()
    model = load_model(source)
    tokenizer = load_tokenizer(source, model)
    train_config = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, learning_rate=5e-4,
                               seed=config.seed)
    # --data-dir, $COMPRESSOR_GLUE_DIR, ../shared/data/glue, else the packaged rows: never the hub
    task_data = load_data(config.data, data_dir=config.data_dir, fallback_dir=DEMO_DATA)
    ctx = TaskContext.build(task_data, tokenizer, train_config, max_dev=config.dev_examples)
    data_note = describe_data(task_data.source)

    with atomic_output_dir(out, overwrite=True) as tmp:
        stage(f"lottery-fusion: pruning {config.adapters:.0%} of the fused adapters ({config.rounds} rounds of "
              f"{config.steps} steps); data: {data_note}")
        lottery = prune(model, "lottery-fusion", {"adapters": config.adapters}, seed=config.seed, data=ctx,
                        options=dict(rounds=config.rounds, max_drop=config.max_drop))
        tuned = lottery.model
        stage(f"importance: pruning {config.heads:.0%} of the heads and {config.neurons:.0%} of the FFN neurons")
        structured = prune(masked_copy(tuned, lottery), "importance",
                           {"heads": config.heads, "neurons": config.neurons}, seed=config.seed, data=ctx,
                           options=dict(examples=config.examples))
        masks = MaskSet({**lottery.masks, **structured.masks}, fingerprint(tuned), "demo",
                        params=dict(lottery=lottery.params, importance=structured.params), data=lottery.data,
                        extra=dict(lottery=lottery.extra, importance=structured.extra))
        stage(f"recovery: {config.recovery_steps} steps of the remaining adapters, fusion and head")
        tuned = masks.model = retrain_masked(tuned, masks, ctx, steps=config.recovery_steps)
        save_prune_result(masks, tmp / "masks", tokenizer_dir=source)  # with the retrained fusion in masks/model

        stage("exporting the unpruned model to ONNX (optimised, parity-verified)")
        dense = export_onnx(model, tmp / "onnx-unpruned", None, ExportConfig(seed=config.seed),
                            tokenizer_dir=source)
        stage("compacting and exporting the pruned model (fp32 and int8, parity-verified)")
        pruned = export_onnx(tuned, tmp / "onnx-pruned", masks, ExportConfig(seed=config.seed, quantize="int8"),
                             tokenizer_dir=source)

        rows = [_row("unpruned", tmp / "onnx-unpruned", dense.files["model"]),
                _row("pruned", tmp / "onnx-pruned", pruned.files["model"]),
                _row("pruned int8", tmp / "onnx-pruned", pruned.files["int8"])]
        stage(f"scoring the three graphs on {ctx.spec.ref} dev ({len(ctx.dev_set)} examples) with onnxruntime")
        for row in rows:
            row.metrics = onnx_dev_metrics(tmp / row.onnx, ctx)

        stage(f"timing on the CPU: batch {', '.join(map(str, config.batch_sizes))} x {config.seq_len} tokens")
        bench_config = BenchConfig(providers=["cpu"], batch_sizes=config.batch_sizes, seq_lens=[config.seq_len],
                                   min_time_s=config.min_time_s, seed=config.seed,
                                   **({"threads": config.threads} if config.threads else {}))
        report = run_bench([tmp / row.onnx for row in rows], bench_config, tmp / "bench",
                           path_base=(tmp, "relative to the demo's output directory"))
        _latencies(rows, report)
        record = dict(config=asdict(config), model=report_path(source), default_scores=default_scores(),
                      task=ctx.spec.ref, main_metric=ctx.spec.main_metric, dev_examples=len(ctx.dev_set),
                      data=dict(task_data.source, description=data_note),
                      masks=masks.counts(), lottery=dict(accepted_round=lottery.extra.get("accepted_round"),
                                                         stopped_early=lottery.extra.get("stopped_early")),
                      parity={name: dict(passed=r.parity["passed"], atol=r.parity["atol"],
                                         max_abs_diff=r.parity["worst"])  # per graph; int8 is recorded, not held
                              for name, r in (("unpruned", dense), ("pruned", pruned))},
                      rows=[asdict(r) for r in rows], machine=report["machine"], timing=report["timing"],
                      busy=busy_reasons(report), unsteady=unsteady_reasons(report),
                      seconds=round(time.perf_counter() - start, 1))
        (tmp / DEMO_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (tmp / "demo.md").write_text(markdown(record))
    return record


def _row(name: str, directory: Path, onnx_file: str) -> DemoRow:
    from exporters.bench import onnx_size_and_params

    path = directory / onnx_file
    size, params = onnx_size_and_params(path)
    return DemoRow(name, f"{directory.name}/{onnx_file}", {}, params, size)


def _latencies(rows: list, report: dict) -> None:
    """p50 per batch, and the speedup over the first row: the median of the per-round speedups where the rounds
    measured it (robust to load that drifts during timing; the ratio of overall p50s is not), else the p50 ratio."""
    by_target, iqr, rounds = {}, {}, {}
    for cell in report["results"]:
        if cell.get("status") == "ok":
            by_target.setdefault(cell["target"], {})[cell["batch_size"]] = cell["p50_ms"]
            r = cell.get("speedup_rounds")
            if r and r["rounds"] >= 2:
                iqr.setdefault(cell["target"], {})[cell["batch_size"]] = [r["q1"], r["q3"]]
                rounds.setdefault(cell["target"], {})[cell["batch_size"]] = r["median"]
    names = [t["name"] for t in report["targets"]]
    base = by_target.get(names[0], {})
    for row, name in zip(rows, names):
        row.p50_ms = by_target.get(name, {})
        row.speedup_iqr = iqr.get(name, {}) if row is not rows[0] else {}
        measured = rounds.get(name, {}) if row is not rows[0] else {}
        row.speedup = {b: measured.get(b, base[b] / ms) for b, ms in row.p50_ms.items() if b in base and ms > 0}


def speedup_cell(row: dict, batch, sep: str = " ") -> str:
    """"1.48x (1.45–1.52)": the median per-round speedup and its interquartile range (`sep` "\n" puts the range
    on a second line, for a narrow terminal)."""
    speedup, iqr = row["speedup"].get(batch), row.get("speedup_iqr", {}).get(batch)
    if speedup is None:
        return "-"
    if not iqr:
        return f"{speedup:.2f}x"
    spread = f"{iqr[0]:.2f}–{iqr[1]:.2f}"
    return f"{speedup:.2f}x" + (f"{sep}{spread}" if sep == "\n" else f"{sep}({spread})")


def busy_warning(reasons: list) -> str:
    """The demo's warning when the machine was busy while timing (rule: exporters.bench_report.BUSY_RULE)."""
    from exporters.bench_report import BUSY_RULE

    return ("**Warning: the machine was busy while timing** (" + "; ".join(reasons) + "): the latencies and "
            "speedups above may be skewed; rerun `compress demo` on a quiet machine. Rule: " + BUSY_RULE + ".")


def markdown(record: dict) -> str:
    metric = record["main_metric"]
    batches = record["config"]["batch_sizes"]
    lines = [f"# compress demo: {record['task']} dev ({record['dev_examples']} examples), CPU latency at "
             f"{record['config']['seq_len']} tokens", "",
             "| model | " + " | ".join([metric, "parameters", "ONNX MB"] + [f"p50 b{b} ms" for b in batches]
                                      + [f"speedup b{b}" for b in batches]) + " |",
             "|---" * (4 + 2 * len(batches)) + "|"]
    for r in record["rows"]:
        cells = [f"{r['metrics'][metric]:.4f}", f"{r['parameters'] / 1e6:.2f}M", f"{r['onnx_bytes'] / 2**20:.1f}"]
        cells += [f"{r['p50_ms'].get(b, float('nan')):.1f}" for b in batches]
        cells += [speedup_cell(r, b) for b in batches]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    counts = record["masks"]
    lines += ["", "Speedup: the median over the timing rounds (in which the three graphs were timed in turn) of the "
              "unpruned graph's median latency / the row's; in brackets its interquartile range over the rounds.", ""]
    if record.get("busy"):
        lines += [busy_warning(record["busy"]), ""]
    if record.get("unsteady"):
        from exporters.bench_report import UNSTEADY_RULE

        lines += ["Unsteady: " + "; ".join(record["unsteady"]) + f" ({UNSTEADY_RULE}).", ""]
    if record.get("data"):
        lines += [f"Data: {record['data']['description']}."]
    lines += ["Kept: " + ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in counts.items()),
              f"Machine: {record['machine'].get('processor') or '?'}, {record['machine'].get('threads')} threads, "
              f"onnxruntime {record['machine'].get('onnxruntime')}; "
              f"{record['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)
