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

# --data and its companions (prune, train, eval)
DATA_HELP = ("Task data: glue:TASK (e.g. glue:rte; local GLUE files under --data-dir, else downloaded), a GLUE-layout "
             "task directory, or a CSV / TSV / JSONL file (with --text-columns and --label-column; 10% of its rows, "
             "a fixed split, are the dev set).")
DATA_OPT = typer.Option(None, "--data", help=DATA_HELP + " Needed by the methods marked 'needs --data'.")
DATA_REQUIRED_OPT = typer.Option(..., "--data", help=DATA_HELP)
DATA_DIR_OPT = typer.Option(None, "--data-dir", help="Directory holding the GLUE task directories (RTE/, SST-2/, ...) "
                                                     "for --data glue:TASK. Default: $COMPRESSOR_GLUE_DIR.")
TASK_OPT = typer.Option(None, "--task", help="GLUE task of a --data directory whose name does not say it, or whose "
                                             "labels and metrics a --data file follows.")
TEXT_COLUMNS_OPT = typer.Option(None, "--text-columns", help="Comma-separated text column(s) of a --data file: one "
                                                             "text or a pair, e.g. 'premise,hypothesis'.")
LABEL_COLUMN_OPT = typer.Option(None, "--label-column", help="Label column of a --data file.")
MAX_TRAIN_OPT = typer.Option(None, "--max-train-examples", min=1, help="Use only the first N training examples "
                                                                       "(to size the budget).")
MAX_DEV_OPT = typer.Option(None, "--max-dev-examples", min=1, help="Evaluate on the first N dev examples only.")

# the training budget (prune methods that train, and train): builds a training.TrainConfig
MAX_STEPS_OPT = typer.Option(None, "--max-steps", min=0, help="Optimiser steps per training stage; overrides "
                                                              "--epochs.")
EPOCHS_OPT = typer.Option(1.0, "--epochs", help="Epochs per training stage (when --max-steps is not given).")
BATCH_SIZE_OPT = typer.Option(16, "--batch-size", min=1, help="Training batch size.")
LEARNING_RATE_OPT = typer.Option(1e-4, "--learning-rate", help="AdamW learning rate (linear decay).")
MAX_LENGTH_OPT = typer.Option(128, "--max-length", min=1, help="Truncate inputs to this many tokens.")
CHECKPOINT_DIR_OPT = typer.Option(None, "--checkpoint-dir", help="Save each training stage's final state (and "
                                                                  "resume from it with --resume).")
RESUME_OPT = typer.Option(False, "--resume", help="Continue an interrupted run from --checkpoint-dir: finished "
                                                  "stages are loaded, not trained again.")

# method options: passed to the method only when given; a method without the option says so
METHOD_FLAGS = {"criterion": "--criterion", "rounds": "--rounds", "rewind_step": "--rewind-step",
                "max_drop": "--max-drop", "widen": "--widen", "objective": "--objective", "examples": "--examples",
                "adapter_width": "--adapter-width"}


def _first_sentence(text: str, limit: int = 110) -> str:
    import re

    text = " ".join(text.split())
    m = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    text = text[:m.start()] if m else text
    if len(text) > limit:
        cut = text.rfind(", ", 0, limit)
        text = text[:cut if cut > limit // 2 else text.rfind(" ", 0, limit)] + "..."
    return text


def method_description(name: str, cls) -> str:
    """One line about a registered pruning method: its own docstring, else the paragraph or bullet of its module's
    docstring that names it, else the docstring it inherits."""
    import inspect
    import re

    own = cls.__dict__.get("__doc__")
    if own:
        return _first_sentence(inspect.cleandoc(own).split("\n\n")[0])
    module_doc = inspect.getdoc(sys.modules.get(cls.__module__)) or ""
    for block in re.split(r"\n\s*\n|\n(?=- )", module_doc):
        text = " ".join(block.split()).lstrip("- ")
        if text.startswith(f"`{name}`"):
            text = text[len(name) + 2:].lstrip(" :")
            if text.startswith("(") and text.find("):") > 0:  # "`tamt` (Authors, "Title"): how it works": the paper
                return _first_sentence(text[1:text.find("):")])
            text = _first_sentence(text)
            head, sep, _ = text.partition(": ")  # "iterative magnitude pruning: train the weights ...": the name
            return head if sep and len(head) >= 15 else text
    inherited = inspect.getdoc(cls)
    if inherited:
        return f"{_first_sentence(inherited)} (criterion: {cls.criterion})"
    return _first_sentence(module_doc.split("\n\n")[0])


def _method_options_help(cls) -> str:
    fields = list(cls.Options.__dataclass_fields__)
    return ", ".join(METHOD_FLAGS.get(f, f"--option {f}=V") for f in fields) or "none"


def _methods_help() -> tuple:
    from .pruning import METHODS

    lines, data, detail = [], [], []
    for name, cls in sorted(METHODS.items()):
        tag = " (needs --data)" if cls.needs_data else ""
        lines.append(f"{name}{tag}: {method_description(name, cls)}.")
        if cls.needs_data:
            data.append(name)
        detail.append(f"* {name}: prunes {', '.join(cls.kinds)}; options: {_method_options_help(cls)}")
    return "\n\n".join(lines), data, "\n\n".join(detail)


METHODS_HELP, DATA_METHODS, METHOD_DETAILS = _methods_help()


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


def _train_config(seed, max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume):
    from .training import TrainConfig

    return TrainConfig(max_steps=max_steps, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       max_length=max_length, seed=seed, resume=resume,
                       checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None)


def _convert_option(method: str, key: str, raw: str, field):
    """An `--option KEY=VALUE` string as the type of the method option's default (or its annotation)."""
    from dataclasses import MISSING

    from .errors import PruningConfigError

    default = field.default if field.default is not MISSING else None
    kind = type(default).__name__ if default is not None else str(field.type).replace("Optional[", "").rstrip("]")
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("true", "1", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise PruningConfigError(f"--option {key}={raw}: {method}'s option {key} takes a {kind}") from None
    return raw


def _method_options(method: str, flags: dict, raw: list) -> dict:
    """The method options the user gave (flags not None, plus --option KEY=VALUE), checked against the method's
    Options; a method without one of them is an error that lists the options it has."""
    from .errors import PruningConfigError
    from .pruning import METHODS

    cls = METHODS.get_or_fail(method)
    fields = cls.Options.__dataclass_fields__
    given = {key: value for key, value in flags.items() if value is not None}
    origin = {key: METHOD_FLAGS[key] for key in given}
    for item in raw:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PruningConfigError(f"--option takes KEY=VALUE, got {item!r}")
        if key in given:
            raise PruningConfigError(f"option {key} is given twice ({origin[key]} and --option {item})")
        origin[key] = f"--option {item}"
        given[key] = _convert_option(method, key, value, fields[key]) if key in fields else value
    unknown = [key for key in given if key not in fields]
    if unknown:
        raise PruningConfigError(f"method '{method}' has no option {origin[unknown[0]]} (its options: "
                                 f"{_method_options_help(cls)})")
    return given


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _print_metrics(title: str, rows) -> None:
    """A metrics table under a one-line title (long titles would wrap inside a narrow table)."""
    console.print(title, highlight=False)
    table = Table()
    table.add_column("metric", justify="left")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(escape(str(name)), _metric(value))
    console.print(table)


PRUNE_HELP = f"""Score units and write a MaskSet (True = keep) for the model.

Methods that need --data take the task from --data, the training budget from --max-steps /
--epochs / --batch-size / --learning-rate, and their own settings from the method options below (only the ones
you give are passed; a method rejects options it does not have). A method that trains weights (a new head,
adapters, a fusion) also writes the trained model to OUT/model; `compress compact`, `compress export` and
`compress eval` with --masks OUT then use it instead of MODEL.

Methods and their options:

{METHOD_DETAILS}

Examples:

  compress prune --sparsity heads=0.5 --sparsity adapters=0.75 --out masks

  compress prune --method lottery-fusion --sparsity adapters=0.5 --data glue:rte --rounds 3 --max-steps 500 --out masks

  compress prune MODEL --method sparse-adapter --sparsity weights=0.8 --criterion snip --widen --data train.csv
--text-columns text --label-column label --out masks
"""


@app.command(help=PRUNE_HELP)
def prune(
    model: Optional[Path] = MODEL_ARG,
    method: str = typer.Option("magnitude", help="Pruning method:\n\n" + METHODS_HELP),
    sparsity: List[str] = typer.Option(..., "--sparsity", help="KIND=FRACTION pruned per unit group, repeatable. "
                                       "Kinds: heads, neurons, adapters, bottleneck, weights. e.g. --sparsity "
                                       "heads=0.5 --sparsity adapters=0.75"),
    seed: int = typer.Option(0, help="Random seed: same inputs and seed give byte-identical masks."),
    allow_empty: bool = typer.Option(False, help="Allow a unit group to lose every member (a layer with no "
                                                 "heads, a fusion with no adapter). Default: keep at least one."),
    out: Path = typer.Option(..., "--out", help="Mask directory to write (masks.safetensors + masks.json, and "
                                                "model/ when the method trains weights)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
    data: Optional[str] = DATA_OPT,
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    max_train_examples: Optional[int] = MAX_TRAIN_OPT,
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: float = EPOCHS_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    learning_rate: float = LEARNING_RATE_OPT,
    max_length: int = MAX_LENGTH_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    criterion: Optional[str] = typer.Option(None, "--criterion", help="sparse-adapter: the pruning-at-"
                                            "initialisation score: random | magnitude | snip | grasp | synflow."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="lottery-fusion: prune-rewind-retrain rounds."),
    rewind_step: Optional[int] = typer.Option(None, "--rewind-step", help="lottery-fusion: the training step whose "
                                              "weights the survivors rewind to (0: before training)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="lottery-fusion: largest tolerated drop of "
                                             "the dev metric (absolute, 0.01 = one point)."),
    widen: Optional[bool] = typer.Option(None, "--widen/--no-widen", help="sparse-adapter: Large-Sparse, widen "
                                         "the adapters by 1/(1 - sparsity) at the same non-zero budget."),
    objective: Optional[str] = typer.Option(None, "--objective", help="tamt: mlm | kd | mlm+kd; imp: also task."),
    examples: Optional[int] = typer.Option(None, "--examples", help="head-importance: task examples the head "
                                           "importance is measured on."),
    adapter_width: Optional[int] = typer.Option(None, "--adapter-width", help="head-importance: mean bottleneck "
                                                "width of the adapters it adds."),
    option: List[str] = typer.Option([], "--option", help="Any method option as KEY=VALUE (repeatable), e.g. "
                                     "--option rate=0.2 for imp. See the list of methods and their options above."),
):
    with user_errors():
        from .api import check_prune_args, load_task, load_tokenizer, model_source_dir, save_prune_result
        from .io import check_output_dir
        from .pruning import parse_sparsity, prune as run_prune

        fractions = parse_sparsity(sparsity)
        options = _method_options(method, dict(criterion=criterion, rounds=rounds, rewind_step=rewind_step,
                                               max_drop=max_drop, widen=widen, objective=objective,
                                               examples=examples, adapter_width=adapter_width), option)
        min_keep = 0 if allow_empty else 1
        check_prune_args(method, fractions, seed=seed, min_keep=min_keep, options=options, has_data=data is not None)
        config = _train_config(seed, max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume)
        check_output_dir(out, overwrite)
        m = _load(model, adapter, fusion, setup, head)
        source = model_source_dir(model)
        ctx = None
        if data is not None:
            tokenizer = load_tokenizer(source, m)
            with step("reading data"):
                ctx = load_task(data, tokenizer, config, data_dir=data_dir, task=task, text_columns=text_columns,
                                label_column=label_column, max_train=max_train_examples, max_dev=max_dev_examples)
        with step(f"pruning ({method})"):
            masks = run_prune(m, method, fractions, seed=seed, min_keep=min_keep, data=ctx, options=options)
        with step("writing"):
            save_prune_result(masks, out, overwrite=overwrite, tokenizer_dir=source)
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
        extra = masks.extra
        main = ctx.spec.main_metric if ctx is not None else "metric"
        rows = [(f"{main}, dense", extra["dense_metric"])] if extra.get("dense_metric") is not None else []
        dev = extra.get("dev_metrics") or {}
        if extra.get("metric") is not None and main not in dev:
            rows.append((f"{main}, pruned", extra["metric"]))
        rows += [(f"{name}, pruned", value) for name, value in dev.items()]
        if rows:
            where = f" on {escape(ctx.spec.ref)} ({len(ctx.dev_set)} examples)" if ctx is not None else ""
            _print_metrics(f"dev metrics{where}", rows)
        if extra.get("stopped_early"):
            console.print(f"stopped early: {escape(str(extra['stopped_early']))}", highlight=False)
        written = f"wrote {out}/masks.safetensors and {out}/masks.json"
        if masks.model is not None:
            written = (f"wrote {out}/masks.safetensors, {out}/masks.json and {out}/model (the trained model: compact, "
                       f"export and eval with --masks {out} use it)")
        console.print(written)


def _load_with_masks(model, masks, adapter, fusion, setup, head):
    """(model, MaskSet or None, the directory the model and its tokenizer come from). Masks whose method trained
    weights belong to the trained model saved with them (masks.json `trained_model`): that model is loaded
    instead of MODEL."""
    from .api import model_source_dir, read_masks

    maskset, trained = read_masks(masks) if masks is not None else (None, None)
    if trained is None:
        return _load(model, adapter, fusion, setup, head), maskset, model_source_dir(model)
    ignored = [name for name, value in (("MODEL", model), ("--adapter", adapter), ("--fusion", fusion),
                                        ("--setup", setup), ("--head", head)) if value]
    if ignored:
        err_console.print(f"note: the masks belong to the model trained with them: using {escape(str(trained))}, "
                          f"not {', '.join(ignored)}", highlight=False, soft_wrap=True)
    return _load(trained, None, None, None, None), maskset, trained


@app.command()
def compact(
    model: Optional[Path] = MODEL_ARG,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`. Without it, "
                                         "only folds (fusion rewrite, scalings). When the method trained weights "
                                         "(DIR/model), that model is compacted instead of MODEL."),
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

        check_output_dir(out, overwrite)
        m, maskset, source = _load_with_masks(model, masks, adapter, fusion, setup, head)
        with step("compacting"):
            compacted = compact_to_dir(m, maskset, out, overwrite=overwrite, adapterhub=adapterhub, source=source)
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
                                         "is compacted first. Without it, only folds (fusion rewrite, scalings). "
                                         "When the method trained weights (DIR/model), that model is used instead "
                                         "of MODEL."),
    out: Path = typer.Option(..., "--out", help="Export directory to write."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format for now; required)."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Fuse the graph with onnxruntime's "
                                  "transformer optimizer (Attention per layer, Gelu; residual Add + LayerNorm "
                                  "stay unfused, the faster pair on the CPU)."),
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
    data: Optional[str] = typer.Option(None, "--data", help="With --quantize int8: score model.onnx and "
                                       "model.int8.onnx on this task's dev split and report the accuracy change "
                                       "(glue:TASK, a GLUE task directory, or a CSV / TSV / JSONL file)."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    max_dev: Optional[int] = MAX_DEV_OPT,
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

        from .errors import ExportError
        from .io import check_output_dir

        if not onnx:
            raise ExportError("choose a format: --onnx (the only one supported)")
        config = ExportConfig(optimize=optimize, sparse=sparse, quantize=quantize, atol=atol,
                              allow_mismatch=allow_mismatch, seed=seed)
        check_output_dir(out, overwrite)
        if data is not None and quantize != "int8":
            raise ExportError("--data scores the int8 graph against the fp32 one: add --quantize int8")
        m, maskset, source = _load_with_masks(model, masks, adapter, fusion, setup, head)
        eval_data = None
        if data is not None:
            from .api import check_head, load_task, load_tokenizer

            eval_data = load_task(data, load_tokenizer(source, m), data_dir=data_dir, task=task,
                                  text_columns=text_columns, label_column=label_column, max_dev=max_dev)
            check_head(m, eval_data.spec)
        with step("exporting") as update:
            result = export_onnx(m, out, maskset, config, overwrite=overwrite, tokenizer_dir=source, progress=update,
                                 eval_data=eval_data)
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
        if result.int8 is not None and "accuracy" in result.int8:
            acc = result.int8["accuracy"]
            metrics = Table(title=f"dev metrics on {result.int8['data']}: fp32 vs int8")
            for col in ("metric", "model.onnx", "model.int8.onnx", "change"):
                metrics.add_column(col, justify="right")
            for k in acc["fp32"]:
                metrics.add_row(k, f"{acc['fp32'][k]:.4f}", f"{acc['int8'][k]:.4f}", f"{acc['change'][k]:+.4f}")
            console.print(metrics)
        console.print(f"wrote {out} (model.onnx, parity.json, export.md, compacted model, tokenizer)")


@app.command()
def train(
    model: Optional[Path] = MODEL_ARG,
    data: str = DATA_REQUIRED_OPT,
    what: str = typer.Option(..., "--train", help="What trains: adapters (the active adapters) | fusion (the "
                             "active fusion) | head | all; comma-separate to combine. adapters and fusion train "
                             "the head too. The rest stays frozen."),
    new_head: bool = typer.Option(False, "--new-head", help="Replace the model's prediction head by a fresh one "
                                  "sized for the task (needed when its label count differs). A model without a "
                                  "head always gets a new one."),
    out: Path = typer.Option(..., "--out", help="Directory for the trained model (reloads with load_model; "
                                                "tokenizer files and train.json beside it)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = typer.Option(0, help="Seed of the new head's initialisation and of the data order."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    max_train_examples: Optional[int] = MAX_TRAIN_OPT,
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: float = EPOCHS_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    learning_rate: float = LEARNING_RATE_OPT,
    max_length: int = MAX_LENGTH_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Train adapters, the fusion and / or a prediction head on a task; evaluate on dev before and after.

    A model without a head gets a classification head sized for the task (the embedded default has an MRPC head:
    use --new-head for another task).

    Example: compress train --data glue:rte --train head --max-steps 200 --out rte-head && compress eval rte-head
    --data glue:rte
    """
    with user_errors():
        from .api import load_task, load_tokenizer, model_source_dir, parse_train_choice, save_trained, train_model
        from .io import check_output_dir

        parts = parse_train_choice(what)
        config = _train_config(seed, max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume)
        check_output_dir(out, overwrite)
        m = _load(model, adapter, fusion, setup, head)
        source = model_source_dir(model)
        tokenizer = load_tokenizer(source, m)
        with step("reading data"):
            ctx = load_task(data, tokenizer, config, data_dir=data_dir, task=task, text_columns=text_columns,
                            label_column=label_column, max_train=max_train_examples, max_dev=max_dev_examples)
        with step(f"training ({','.join(parts)})"):
            m, record = train_model(m, ctx, parts, new_head=new_head, seed=seed)
        record["model"] = str(model) if model is not None else "default"
        with step("writing"):
            save_trained(m, record, out, overwrite=overwrite, tokenizer_dir=source)
        console.print(f"dev metrics on {escape(ctx.spec.ref)} ({len(ctx.dev_set)} examples), before and after "
                      "training", highlight=False)
        table = Table()
        for col in ("metric", "before", "after"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for name, after in record["dev_after"].items():
            table.add_row(name, _metric(record["dev_before"].get(name)), _metric(after))
        console.print(table)
        loss = record["loss"]
        console.print(f"trained {','.join(parts)} ({_fmt(record['trainable_parameters'])} parameters) for "
                      f"{record['steps']} steps on {len(ctx.train_set)} examples"
                      + (f", final loss {loss:.4f}" if isinstance(loss, float) else "")
                      + (" (resumed)" if record["resumed"] else ""))
        console.print(f"wrote {out} (model, tokenizer, train.json)")


@app.command(name="eval")
def evaluate(
    model: Optional[Path] = MODEL_ARG,
    data: str = DATA_REQUIRED_OPT,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`: evaluate the "
                                         "masked model. When the method trained weights (DIR/model), that model "
                                         "is used instead of MODEL."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    overwrite: bool = typer.Option(False, help="Replace --json if it exists."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_length: int = MAX_LENGTH_OPT,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Evaluation batch size."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Evaluate a model with a prediction head (masked with --masks) on the dev split of --data.

    Example: compress eval --masks masks --data glue:rte --json rte.json
    """
    with user_errors():
        from .api import check_head, load_task, load_tokenizer, write_json
        from .errors import OutputExistsError
        from .masks import masked_copy
        from .training import TrainConfig

        if json_out is not None and json_out.exists() and not overwrite:
            raise OutputExistsError(f"{json_out} already exists; choose another --json or pass --overwrite")
        m, maskset, source = _load_with_masks(model, masks, adapter, fusion, setup, head)
        check_head(m)
        if maskset is not None:
            m = masked_copy(m, maskset)
        tokenizer = load_tokenizer(source, m)
        config = TrainConfig(max_length=max_length, eval_batch_size=batch_size)
        with step("reading data"):
            ctx = load_task(data, tokenizer, config, data_dir=data_dir, task=task, text_columns=text_columns,
                            label_column=label_column, max_train=1, max_dev=max_dev_examples)
        check_head(m, ctx.spec)
        with step("evaluating"):
            metrics = ctx.evaluate(m)
        what = str(source) + (f" masked by {masks} ({maskset.method})" if maskset is not None else "")
        _print_metrics(f"{escape(what)} on {escape(ctx.spec.ref)} dev ({len(ctx.dev_set)} examples)",
                       metrics.items())
        if json_out is not None:
            record = dict(model=str(source), masks=str(masks) if masks is not None else None,
                          masks_method=maskset.method if maskset is not None else None,
                          data=dict(ctx.data.source, dev_examples=len(ctx.dev_set)), task=ctx.spec.ref,
                          main_metric=ctx.spec.main_metric, metrics=metrics, max_length=max_length)
            write_json(json_out, record, overwrite=overwrite)
            console.print(f"wrote {json_out}")


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



@app.command()
def demo(
    out: Path = typer.Option(Path("compress-demo"), "--out", help="Directory for everything the demo writes "
                             "(masks, exports, bench report, demo.md, demo.json). A previous demo's is replaced."),
    overwrite: bool = typer.Option(False, help="Replace --out even when it is not a demo's output."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="GLUE directory holding MRPC/. Default: "
                                            "$COMPRESSOR_GLUE_DIR, ../shared/data/glue, else downloaded."),
    adapters: float = typer.Option(0.75, help="Share of each layer's fused adapters to prune (lottery-fusion)."),
    heads: float = typer.Option(0.25, help="Share of each layer's attention heads to prune (importance)."),
    neurons: float = typer.Option(0.25, help="Share of each layer's FFN neurons to prune (importance)."),
    rounds: int = typer.Option(2, min=1, help="lottery-fusion rounds."),
    steps: int = typer.Option(20, min=0, help="Fusion training steps per lottery stage (dense, then each round)."),
    min_time: float = typer.Option(2.0, "--min-time", help="Seconds each latency measurement runs at least."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads. Default: all cores."),
    seed: int = typer.Option(0, help="Seed of the training order, the scores and the parity inputs."),
):
    """Show the whole toolkit on the embedded default in a few minutes: prune, compact, export, verify, evaluate,
    benchmark.

    The default is all-MiniLM-L6-v2 with eight adapters trained on GLUE tasks and an AdapterFusion over them
    trained on MRPC. The demo prunes fused adapters with lottery-fusion (a small training budget), heads and
    FFN neurons by Taylor importance, exports the unpruned and the pruned model to ONNX (parity-verified, the
    pruned one also as int8), scores them on the MRPC dev set with onnxruntime, times them at batch 1 and 8 on
    the CPU, and prints one table. Example: compress demo && cat compress-demo/demo.md
    """
    with user_errors():
        from .demo import DEMO_STAGES, DemoConfig, prepare_out, run_demo

        config = DemoConfig(data_dir=str(data_dir) if data_dir else None, adapters=adapters, heads=heads,
                            neurons=neurons, rounds=rounds, steps=steps, min_time_s=min_time, threads=threads,
                            seed=seed)
        prepare_out(out, overwrite)
        n = [0]

        def say(text: str) -> None:
            n[0] += 1
            err_console.print(f"[bold]\\[{n[0]}/{DEMO_STAGES}][/] {escape(text)}", highlight=False)

        record = run_demo(out, config, overwrite=True, say=say)
        metric = record["main_metric"]
        table = Table(title=f"{record['task']} dev ({record['dev_examples']} examples); ONNX size; onnxruntime CPU "
                            f"p50 latency at batch b x {config.seq_len} tokens ({record['machine']['threads']} "
                            "threads) and speedup over the unpruned model")
        batches = config.batch_sizes
        for col in ["model", metric[:8], "params", "MB"] + [f"b{b} ms" for b in batches] + \
                [f"b{b} gain" for b in batches]:
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in record["rows"]:
            table.add_row(r["name"], f"{r['metrics'][metric]:.4f}", _fmt(r["parameters"]),
                          f"{r['onnx_bytes'] / 2**20:.1f}",
                          *[f"{r['p50_ms'][b]:.1f}" if b in r["p50_ms"] else "failed" for b in batches],
                          *[f"{r['speedup'][b]:.2f}x" if b in r["speedup"] else "-" for b in batches])
        console.print(table)
        console.print("kept: " + ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in record["masks"].items())
                      + f"; {record['seconds']:.0f} s in all", highlight=False)
        console.print(f"wrote {out}/demo.md, {out}/demo.json, {out}/masks, {out}/onnx-unpruned, {out}/onnx-pruned "
                      f"(export.md, parity.json) and {out}/bench (report.md, latency.png)", highlight=False)


if __name__ == "__main__":
    app()
