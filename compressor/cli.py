"""`compress`: a thin CLI. Each command parses its options into a request, calls one function of
`compressor.api`, and prints the result's summary table and the paths it wrote. Errors: one line, non-zero exit,
no traceback unless --debug."""

from __future__ import annotations

import contextlib
import signal
import sys
import textwrap
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
    rich_markup_mode=None,  # click's plain help: wraps to the terminal, readable at 80 columns
)
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}
HELP_WIDTH = 76  # pre-wrapped help blocks: 2 columns of indent, within 80

MODEL_ARG = typer.Argument(None, help="Model directory: transformers encoder, AdapterHub full model, or a compacted "
                                      "directory. Default: the embedded MiniLM + 8-adapter fusion.")
ADAPTER_OPT = typer.Option(None, "--adapter", help="AdapterHub adapter directory to add (repeatable).")
FUSION_OPT = typer.Option(None, "--fusion", help="AdapterHub fusion directory.")
SETUP_OPT = typer.Option(None, "--setup", help="Adapter, fusion or Stack to run, e.g. 'a', 'a,b,c', "
                                               "'Stack(lang,task)' or 'Stack(lang,Fuse(a,b))'. Default: the "
                                               "only fusion, else the only adapter.")
HEAD_OPT = typer.Option(None, "--head", help="AdapterHub prediction head to use. Default: the only one.")
TOKENIZER_OPT = typer.Option(None, "--tokenizer", metavar="NAME_OR_DIR", help="Tokenizer directory or hub name, "
                             "for a model saved without tokenizer files. It is written with the outputs.")

# --data and its companions (prune, train, eval, export)
DATA_HELP = ("Task data: glue:TASK (local GLUE files under --data-dir, else downloaded), a GLUE task directory, or "
             "a CSV / TSV / JSONL file (with --text-columns and --label-column; a fixed 10% is the dev set).")
DATA_OPT = typer.Option(None, "--data", help=DATA_HELP + " Needed by the methods marked 'needs --data'.")
DATA_REQUIRED_OPT = typer.Option(..., "--data", help=DATA_HELP)
DATA_DIR_OPT = typer.Option(None, "--data-dir", help="Directory holding the GLUE task directories (RTE/, SST-2/, ...) "
                                                     "for --data glue:TASK. Default: $COMPRESSOR_GLUE_DIR, else "
                                                     "the hub (HF_HUB_OFFLINE=1: never).")
TASK_OPT = typer.Option(None, "--task", help="GLUE task of a --data directory whose name does not say it, or whose "
                                             "labels and metrics a --data file follows.")
TEXT_COLUMNS_OPT = typer.Option(None, "--text-columns", help="Text column(s) of a --data file, comma-separated: "
                                                             "one text or a pair, e.g. 'premise,hypothesis'.")
LABEL_COLUMN_OPT = typer.Option(None, "--label-column", help="Label column of a --data file.")
MAX_TRAIN_OPT = typer.Option(None, "--max-train-examples", min=1, help="Use only the first N training examples.")
MAX_DEV_OPT = typer.Option(None, "--max-dev-examples", min=1, help="Evaluate on the first N dev examples only.")

# the training budget (prune methods that train, and train)
MAX_STEPS_OPT = typer.Option(None, "--max-steps", min=0, help="Optimiser steps per training stage; overrides "
                                                              "--epochs.")
EPOCHS_OPT = typer.Option(1.0, "--epochs", help="Epochs per training stage (without --max-steps).")
BATCH_SIZE_OPT = typer.Option(16, "--batch-size", min=1, help="Training batch size.")
LEARNING_RATE_OPT = typer.Option(1e-4, "--learning-rate", help="AdamW learning rate (linear decay).")
MAX_LENGTH_OPT = typer.Option(None, "--max-length", min=1, help="Truncate inputs to this many tokens. Default: "
                                                               "128, or the model's positions when fewer.")
CHECKPOINT_DIR_OPT = typer.Option(None, "--checkpoint-dir", help="Save each training stage's final state there "
                                                                  "(and resume from it with --resume).")
RESUME_OPT = typer.Option(False, "--resume", help="Continue an interrupted run from --checkpoint-dir: finished "
                                                  "stages are loaded, not trained again.")

# distillation from a dense teacher (prune --recover kd, train --teacher); the loss and its defaults are
# described once, in training.objectives.KDConfig (README points there)
KD_TEMPERATURE_OPT = typer.Option(None, "--kd-temperature", help="KD: softmax temperature T of the logits KL "
                                                                 "(scaled by T^2).")
KD_LOGITS_OPT = typer.Option(None, "--kd-logits-weight", help="KD: weight of the logits KL.")
KD_HIDDEN_OPT = typer.Option(None, "--kd-hidden-weight", help="KD: weight of the layer-output MSE (real tokens).")
KD_LAYERS_OPT = typer.Option(None, "--kd-layers", help="KD: layers whose outputs are matched, 0-based, e.g. 1,3,5. "
                                                       "Default: all.")


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
    import inspect as pyinspect
    import re

    own = cls.__dict__.get("__doc__")
    if own:
        return _first_sentence(pyinspect.cleandoc(own).split("\n\n")[0])
    module_doc = pyinspect.getdoc(sys.modules.get(cls.__module__)) or ""
    for block in re.split(r"\n\s*\n|\n(?=- )", module_doc):
        text = " ".join(block.split()).lstrip("- ")
        if text.startswith(f"`{name}`"):
            text = text[len(name) + 2:].lstrip(" :")
            if text.startswith("(") and text.find("):") > 0:  # "`tamt` (Authors, "Title"): how it works": the paper
                return _first_sentence(text[1:text.find("):")])
            text = _first_sentence(text)
            head, sep, _ = text.partition(": ")  # "iterative magnitude pruning: train the weights ...": the name
            return head if sep and len(head) >= 15 else text
    inherited = pyinspect.getdoc(cls)
    if inherited:
        return f"{_first_sentence(inherited)} (criterion: {cls.criterion})"
    return _first_sentence(module_doc.split("\n\n")[0])


def _block(text: str, indent: str = "") -> str:
    """A help paragraph click prints as it is (\\b): wrapped here to HELP_WIDTH, never at a hyphen."""
    lines = textwrap.wrap(" ".join(text.split()), HELP_WIDTH, subsequent_indent=indent, break_on_hyphens=False,
                          break_long_words=False)
    return "\b\n" + "\n".join(lines)


def _methods_help() -> str:
    """One paragraph per method: its name and description first, then what it prunes and its options."""
    from .api import method_options_help
    from .pruning import METHODS

    blocks = []
    for name, cls in sorted(METHODS.items()):
        tag = " (needs --data)" if cls.needs_data else ""
        blocks.append(_block(f"{name}{tag}: {method_description(name, cls)}. Prunes {', '.join(cls.kinds)}; "
                             f"options: {method_options_help(cls)}.", indent="    "))
    return "\n\n".join(blocks)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    from .io import exit_cleanly_on_signals

    STATE["debug"] = debug
    exit_cleanly_on_signals()


def _print_error(e: CompressorError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)


def _interrupted(e: KeyboardInterrupt):
    signum = getattr(e, "signum", signal.SIGINT)
    err_console.print(f"[bold red]interrupted[/] ({signal.Signals(signum).name}): nothing was written",
                      highlight=False)
    raise typer.Exit(128 + int(signum))


@contextlib.contextmanager
def user_errors():
    """Our typed errors, environment errors (a full disk) and interrupts as one line on stderr and a non-zero
    exit; anything else is a bug and keeps its traceback."""
    try:
        yield
    except CompressorError as e:
        if STATE["debug"]:
            raise
        _print_error(e)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except Exception as e:
        from .errors import as_user_error
        from .io import interruption_in

        if interruption_in(e) is not None:  # a library turned the signal into its own error
            _interrupted(interruption_in(e))
        err = as_user_error(e)
        if err is None or STATE["debug"]:
            raise
        _print_error(err)
        raise typer.Exit(err.exit_code) from e


@contextlib.contextmanager
def step(description: str):
    """A spinner while a command runs; yields the progress callback of the api (it renames the step)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=text)


def _notes(notes) -> None:
    for note in notes:
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


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


def _model(model, adapter, fusion, setup, head) -> dict:
    return dict(model=model, adapters=list(adapter or ()), fusion=fusion, setup=setup, head=head)


def _data(data, data_dir, task, text_columns, label_column, tokenizer, max_train=None, max_dev=None) -> dict:
    return dict(data=data, data_dir=data_dir, task=task, text_columns=text_columns, label_column=label_column,
                tokenizer=tokenizer, max_train_examples=max_train, max_dev_examples=max_dev)


def _budget(max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume) -> dict:
    return dict(max_steps=max_steps, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                max_length=max_length, checkpoint_dir=checkpoint_dir, resume=resume)


def _kd(temperature, logits_weight, hidden_weight, layers) -> dict:
    return dict(kd_temperature=temperature, kd_logits_weight=logits_weight, kd_hidden_weight=hidden_weight,
                kd_layers=layers)


# ----------------------------------------------------------------------------------------------- inspect

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
        from . import api
        from .requests import InspectRequest

        with step("inspecting") as say:
            r = api.inspect(InspectRequest(**_model(model, adapter, fusion, setup, head), seq_len=seq_len), say)
        table = Table(title=f"{r.model_class}, setup {r.setup!s} (FLOPs per token at sequence length {r.seq_len})")
        for col in ("layer", "heads", "FFN", "adapters (width)", "fusion", "params", "attn", "FFN FLOPs",
                    "adapter FLOPs", "fusion FLOPs"):
            table.add_column(col, justify="right" if col not in ("adapters (width)", "fusion") else "left")
        for row in r.layers:
            desc, fus = [], []
            for s, c in row["sites"].items():
                if c["adapters"]:
                    tag = "attn" if s == "mh_adapter" else "ffn"
                    desc.append(f"{tag}: {len(c['adapters'])}x({','.join(map(str, sorted(set(c['widths']))))})")
                    if c["fused"]:
                        fus.append(f"{tag}: {len(c['adapters'])}")
            table.add_row(str(row["layer"]), str(row["heads"]), str(row["ffn"]), "; ".join(desc) or "-",
                          "; ".join(fus) or "-", _fmt(row["base_params"] + row["adapter_params"]),
                          _fmt(row["attention_flops"]), _fmt(row["ffn_flops"]), _fmt(row["adapter_flops"]),
                          _fmt(row["fusion_flops"]))
        total = r.total
        flops = total["flops_per_token"]
        table.add_row("total", "", "", "", "", _fmt(total["params"]), _fmt(total["attention_flops"]),
                      _fmt(total["ffn_flops"]), _fmt(total["adapter_flops"]), _fmt(total["fusion_flops"]), style="bold")
        console.print(table)
        shares = ", ".join(f"{k.split('_')[0]} {100 * total[k] / flops:.0f}%"
                           for k in ("attention_flops", "ffn_flops", "adapter_flops", "fusion_flops"))
        console.print(f"{_fmt(flops)} FLOPs per token in the encoder layers ({shares}); {_fmt(total['params'])} parameters.")
        inv = r.invertible
        if inv:  # MAD-X: on the embeddings, outside the layers; kept whole (not a pruning unit)
            console.print(f"invertible adapter on the embeddings: {inv['active']} ({inv['block']}, widths "
                          f"{'/'.join(map(str, inv['widths']))}, {_fmt(inv['params'])} parameters, "
                          f"{_fmt(inv['flops_per_token'])} FLOPs per token); held by: {', '.join(inv['held'])}"
                          if inv["active"] else f"invertible adapters held by {', '.join(inv['held'])}: none runs "
                          "under this setup (its first adapter has none)")


# ----------------------------------------------------------------------------------------------- prune

def _prune_help() -> str:
    intro = [
        "Score units and write a MaskSet (True = keep) for the model.",
        "Methods that need --data take the task from --data, the training budget from --max-steps / --epochs / "
        "--batch-size / --learning-rate, and their own settings from the method options (only the ones you give "
        "are passed; a method rejects options it does not have). A method that trains weights (a new head, "
        "adapters, a fusion) also writes the trained model to OUT/model; compact, export and eval with --masks "
        "OUT then use it instead of MODEL. --recover task|kd then trains the pruned model with the masks held "
        "(kd: distils the dense model; --kd-* options) and writes it to OUT/model too.",
        "Methods (--method NAME), what they prune and their options:",
    ]
    examples = [
        "compress prune --sparsity heads=0.5 --sparsity adapters=0.75 --out masks",
        "compress prune --method lottery-fusion --sparsity adapters=0.5 --data glue:rte --rounds 3 "
        "--max-steps 500 --out masks",
        "compress prune --method post-training --target-speedup 2 --data glue:sst2 --out masks",
        "compress prune --method importance --sparsity heads=0.5 --sparsity neurons=0.5 --data glue:mrpc "
        "--recover kd --recover-steps 100 --out masks",
        "compress prune MODEL --method sparse-adapter --sparsity weights=0.8 --criterion snip --widen "
        "--data train.csv --text-columns text --label-column label --out masks",
    ]
    return "\n\n".join([*intro, _methods_help(), "Examples:",
                        *(_block(e, indent="    ") for e in examples)])


def _recovery_kinds() -> str:
    from .training.recovery import RECOVERY

    return " or ".join(f"{r.name} ({r.description})" for r in RECOVERY.values())


@app.command(help=_prune_help())
def prune(
    model: Optional[Path] = MODEL_ARG,
    method: str = typer.Option("magnitude", "--method", help="Pruning method (see the list above)."),
    sparsity: List[str] = typer.Option([], "--sparsity", metavar="KIND=FRACTION", help="Share pruned per unit "
                                       "group, repeatable. Kinds: heads, neurons, adapters, bottleneck, weights. "
                                       "Target-driven methods (post-training): KIND=0 names the kinds that "
                                       "compete (default: all four structured kinds)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same inputs and seed give byte-identical masks."),
    allow_empty: bool = typer.Option(False, help="Allow a unit group to lose every member. "
                                                                  "Default: keep at least one."),
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
    tokenizer: Optional[str] = TOKENIZER_OPT,
    max_train_examples: Optional[int] = MAX_TRAIN_OPT,
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: float = EPOCHS_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    learning_rate: float = LEARNING_RATE_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    criterion: Optional[str] = typer.Option(None, "--criterion", help="sparse-adapter: random | magnitude | snip | "
                                            "grasp | synflow; importance: its score."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="lottery-fusion: prune-rewind-retrain rounds."),
    rewind_step: Optional[int] = typer.Option(None, "--rewind-step", help="lottery-fusion: the training step the "
                                              "survivors rewind to (0: before training)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="lottery-fusion: largest tolerated drop of "
                                             "the dev metric (0.01 = one point)."),
    widen: Optional[bool] = typer.Option(None, "--widen/--no-widen", help="sparse-adapter: widen the adapters by "
                                         "1/(1 - sparsity) at the same non-zero budget."),
    objective: Optional[str] = typer.Option(None, "--objective", help="tamt: mlm | kd | mlm+kd; imp: also task."),
    examples: Optional[int] = typer.Option(None, "--examples", help="head-importance, importance: examples the "
                                           "importance is measured on."),
    adapter_width: Optional[int] = typer.Option(None, "--adapter-width", help="head-importance: mean bottleneck "
                                                "width of the adapters it adds."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="post-training: predicted "
                                                   "speedup over the dense model on --on at --shape (> 1)."),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="post-training: fraction of the "
                                                 "dense model's FLOPs per token to keep."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="post-training: fraction of the "
                                                  "dense model's parameters to keep."),
    on: Optional[str] = typer.Option(None, "--on", help="post-training: the latency model's provider: cpu "
                                     "(default), cuda, torch-cpu, torch-cuda."),
    shape: Optional[str] = typer.Option(None, "--shape", help="post-training: the latency model's batch x "
                                        "sequence length (default 1x128)."),
    option: List[str] = typer.Option([], "--option", metavar="KEY=VALUE", help="Any other method option "
                                     "(repeatable), e.g. --option rate=0.2 for imp."),
    recover: Optional[str] = typer.Option(None, "--recover", help="Then train the pruned model with the masks "
                                          f"held: {_recovery_kinds()}. Needs --data."),
    recover_steps: Optional[int] = typer.Option(None, "--recover-steps", min=0, help="Recovery steps. Default: "
                                                "--max-steps / --epochs."),
    what: Optional[str] = typer.Option(None, "--train", help="What recovery trains, as in `compress train`. "
                                       "Default: adapters,fusion (and the head)."),
    kd_temperature: Optional[float] = KD_TEMPERATURE_OPT,
    kd_logits_weight: Optional[float] = KD_LOGITS_OPT,
    kd_hidden_weight: Optional[float] = KD_HIDDEN_OPT,
    kd_layers: Optional[str] = KD_LAYERS_OPT,
):
    with user_errors():
        from . import api
        from .requests import PruneRequest

        request = PruneRequest(
            **_model(model, adapter, fusion, setup, head),
            **_data(data, data_dir, task, text_columns, label_column, tokenizer, max_train_examples,
                    max_dev_examples),
            **_budget(max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume),
            method=method, sparsity=sparsity, seed=seed, allow_empty=allow_empty, out=out, overwrite=overwrite,
            criterion=criterion, rounds=rounds, rewind_step=rewind_step, max_drop=max_drop, widen=widen,
            objective=objective, examples=examples, adapter_width=adapter_width, target_speedup=target_speedup,
            target_flops=target_flops, target_params=target_params, on=on, shape=shape, options=option,
            recover=recover, recover_steps=recover_steps, train=what,
            **_kd(kd_temperature, kd_logits_weight, kd_hidden_weight, kd_layers))
        with step("pruning") as say:
            r = api.prune(request, say)
        table = Table(title=f"masks ({r.method}, seed {r.seed})")
        for col in ("kind", "groups", "kept", "total", "pruned"):
            table.add_column(col, justify="right")
        for kind, c in r.counts.items():
            table.add_row(kind, str(r.groups[kind]), str(c["kept"]), str(c["total"]),
                          f"{100 * (1 - c['kept'] / c['total']):.1f}%")
        console.print(table)
        if r.metrics:
            where = f" on {escape(r.task)} ({r.dev_examples} examples)" if r.task is not None else ""
            _print_metrics(f"dev metrics{where}", r.metrics)
        if r.stopped_early:
            console.print(f"stopped early: {escape(r.stopped_early)}", highlight=False)
        for warning in r.warnings:
            console.print(f"warning: {escape(warning)}", highlight=False)
        if r.trained_model is not None:
            console.print(f"wrote {out}/masks.safetensors, {out}/masks.json and {out}/model (the trained model: "
                          f"compact, export and eval with --masks {out} use it)")
        else:
            console.print(f"wrote {out}/masks.safetensors and {out}/masks.json")


# ----------------------------------------------------------------------------------------------- compact

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
    tokenizer: Optional[str] = TOKENIZER_OPT,
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Physically remove pruned heads, FFN neurons, bottleneck neurons and fusion adapters; outputs equal the
    masked model's."""
    with user_errors():
        from . import api
        from .requests import CompactRequest

        request = CompactRequest(**_model(model, adapter, fusion, setup, head), masks=masks, out=out,
                                 adapterhub=adapterhub, overwrite=overwrite, tokenizer=tokenizer)
        with step("compacting") as say:
            r = api.compact(request, say)
        _notes(r.notes)
        table = Table(title="compaction")
        for col in ("", "before", "after", "ratio"):
            table.add_column(col, justify="right")
        for label, key in (("parameters", "params"), ("FLOPs/token (seq 128)", "flops_per_token"),
                           ("  attention", "attention_flops"), ("  FFN", "ffn_flops"),
                           ("  adapters", "adapter_flops"), ("  fusion", "fusion_flops")):
            ratio = f"{r.before[key] / r.after[key]:.2f}x" if r.after[key] else "-"
            table.add_row(label, _fmt(r.before[key]), _fmt(r.after[key]), ratio)
        console.print(table)
        console.print(f"wrote {out}" + (f" and {out}/adapterhub" if adapterhub else ""))


# ----------------------------------------------------------------------------------------------- export

@app.command()
def export(
    model: Optional[Path] = MODEL_ARG,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`: the model "
                                         "is compacted first. Without it, only folds. When the method trained "
                                         "weights (DIR/model), that model is used instead of MODEL."),
    out: Path = typer.Option(..., "--out", help="Export directory to write."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format for now; required)."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Fuse the graph with onnxruntime's "
                                  "transformer optimizer (Attention per layer, Gelu)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Also write model.int8.onnx ('int8', dynamic "
                                           "quantization; with --data the scheme and fp32 fallbacks of least "
                                           "measured cost); its deviation is reported, not held to --atol."),
    sparse: bool = typer.Option(False, "--sparse", help="Also write model.sparse.onnx, with weights pruned by "
                                "--sparsity weights=... stored as sparse initializers."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="Also write this registered variant "
                                                "(repeatable): fp16 (model.fp16.onnx, onnxruntime float16 "
                                                "conversion with fp32 inputs and outputs, for GPUs; held to 1e-2), "
                                                "int8 (= --quantize int8), sparse (= --sparse), or any other "
                                                "registered in exporters/variants.py."),
    calibration_examples: int = typer.Option(128, "--calibration-examples", help="int8: training rows of --data "
                                             "(or of the packaged MRPC sample) static int8 is calibrated on."),
    int8_keep_fp32: Optional[int] = typer.Option(None, "--int8-keep-fp32", help="int8: keep this many units "
                                                 "(the costliest by measured sensitivity) fp32. Default: the "
                                                 "fewest that meet the fidelity bound; 0: none."),
    atol: float = typer.Option(1e-4, "--atol", help="Parity tolerance (max abs diff per output) against the masked "
                               "model."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Keep the export even when parity fails "
                                        "(see parity.json). Default: fail and write nothing."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the parity inputs. Default: fresh random "
                                       "inputs (the seed used is in parity.json)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    data: Optional[str] = typer.Option(None, "--data", help="With --quantize int8 or --variant fp16: score "
                                       "model.onnx and each such variant on this task's dev split (as for prune "
                                       "and eval)."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    tokenizer: Optional[str] = TOKENIZER_OPT,
    max_dev: Optional[int] = MAX_DEV_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
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
        from . import api
        from .requests import ExportRequest

        request = ExportRequest(**_model(model, adapter, fusion, setup, head),
                                **_data(data, data_dir, task, text_columns, label_column, tokenizer, None, max_dev),
                                masks=masks, out=out, format="onnx" if onnx else None, optimize=optimize,
                                quantize=quantize, sparse=sparse, variants=tuple(variant or ()), atol=atol,
                                calibration_examples=calibration_examples, int8_keep_fp32=int8_keep_fp32,
                                allow_mismatch=allow_mismatch, seed=seed, overwrite=overwrite, max_length=max_length)
        with step("exporting") as say:
            r = api.export(request, say)
        _notes(r.notes)
        result = r.export
        table = Table(title=f"ONNX export ({'optimised' if optimize else 'not optimised'})")
        for col in ("file", "size", "worst max abs diff vs masked model", "held to", "parity"):
            table.add_column(col, justify="right")
        worst, targets = result.parity["worst"], result.parity["targets"]
        for name in [*result.files.values(), "compacted (PyTorch)"]:  # model.onnx, each variant's file
            tol = targets[name]["tolerance"]
            verdict = "recorded" if tol is None else ("ok" if targets[name]["passed"] else "MISMATCH")
            size = f"{result.sizes[name] / 2**20:.2f} MB" if name in result.sizes else ""
            table.add_row(name, size, f"{worst[name]:.2e}", "-" if tol is None else f"{tol:g}", verdict)
        console.print(table)
        if r.optimize:
            console.print("fused Attention per layer (heads): " + ", ".join(
                f"{i}:{n}x({h})" + ("" if ok else " NOT FUSED") for i, h, n, _, ok in r.attention))
        for name, entry in result.variants.items():  # int8 chosen by measurement (exporters/quantization.py)
            if "winner" in entry:
                kept = ", ".join(k["unit"] for k in entry["kept_fp32"]) or "none"
                console.print(f"{name}: {entry['winner']} ({entry['choice']}; mean KL {entry['fidelity']['cost']:.2e} "
                              f"against model.onnx); kept fp32: {kept}")
        for name, entry in result.variants.items():  # each variant scored with --data
            if "accuracy" not in entry:
                continue
            acc = entry["accuracy"]
            metrics = Table(title=f"dev metrics on {entry['data']}: fp32 vs {name}")
            for col in ("metric", "model.onnx", entry["file"], "change"):
                metrics.add_column(col, justify="right")
            for k in acc["fp32"]:
                metrics.add_row(k, f"{acc['fp32'][k]:.4f}", f"{acc[name][k]:.4f}", f"{acc['change'][k]:+.4f}")
            console.print(metrics)
        if r.speedup is not None:
            from exporters.export_summary import speedup_table
            console.print(speedup_table(r.speedup))
        console.print(f"wrote {out} (model.onnx, parity.json, export.md, compacted model, tokenizer)")


# ----------------------------------------------------------------------------------------------- train

@app.command()
def train(
    model: Optional[Path] = MODEL_ARG,
    data: str = DATA_REQUIRED_OPT,
    what: str = typer.Option(..., "--train", help="What trains: adapters | fusion | head | all, comma-separated "
                             "to combine (adapters and fusion train the head too); the rest stays frozen."),
    new_head: bool = typer.Option(False, "--new-head", help="Replace the model's prediction head by a fresh one "
                                  "sized for the task. A model without a head always gets one."),
    out: Path = typer.Option(..., "--out", help="Directory for the trained model (reloads with load_model; "
                                                "tokenizer files and train.json beside it)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new head's initialisation and of the data order."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    tokenizer: Optional[str] = TOKENIZER_OPT,
    max_train_examples: Optional[int] = MAX_TRAIN_OPT,
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: float = EPOCHS_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    learning_rate: float = LEARNING_RATE_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Distil from this model directory (the dense "
                                           "model: logits KL + layer-output MSE) instead of the task loss."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Train under these masks (pruned units stay "
                                         "pruned); OUT is then the compacted trained model."),
    kd_temperature: Optional[float] = KD_TEMPERATURE_OPT,
    kd_logits_weight: Optional[float] = KD_LOGITS_OPT,
    kd_hidden_weight: Optional[float] = KD_HIDDEN_OPT,
    kd_layers: Optional[str] = KD_LAYERS_OPT,
):
    """Train adapters, the fusion and / or a prediction head on a task; evaluate on dev before and after.

    A model without a head gets a classification head sized for the task (the embedded default has an MRPC head:
    use --new-head for another task).

    Example: compress train --data glue:rte --train head --max-steps 200 --out rte-head && compress eval rte-head
    --data glue:rte

    Distillation: compress train pruned/model --masks pruned --teacher DENSE --data glue:mrpc --train
    adapters,fusion --max-steps 100 --out recovered
    """
    with user_errors():
        from . import api
        from .requests import TrainRequest

        request = TrainRequest(
            **_model(model, adapter, fusion, setup, head),
            **_data(data, data_dir, task, text_columns, label_column, tokenizer, max_train_examples,
                    max_dev_examples),
            **_budget(max_steps, epochs, batch_size, learning_rate, max_length, checkpoint_dir, resume),
            train=what, new_head=new_head, out=out, overwrite=overwrite, seed=seed, teacher=teacher, masks=masks,
            **_kd(kd_temperature, kd_logits_weight, kd_hidden_weight, kd_layers))
        with step("training") as say:
            r = api.train(request, say)
        _notes(r.notes)
        record = r.record
        console.print(f"dev metrics on {escape(r.task)} ({r.dev_examples} examples), before and after training",
                      highlight=False)
        table = Table()
        for col in ("metric", "before", "after"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for name, after in record["dev_after"].items():
            table.add_row(name, _metric(record["dev_before"].get(name)), _metric(after))
        console.print(table)
        loss = record["loss"]
        console.print(f"trained {','.join(r.parts)} ({_fmt(record['trainable_parameters'])} parameters) for "
                      f"{record['steps']} steps on {r.train_examples} examples"
                      + (f", final loss {loss:.4f}" if isinstance(loss, float) else "")
                      + (" (resumed)" if record["resumed"] else ""))
        if "dev_kl_after" in record:
            console.print(f"KL(teacher || model) on dev: {record['dev_kl_before']:.4g} before, "
                          f"{record['dev_kl_after']:.4g} after", highlight=False)
        what_out = "the compacted model" if "masks" in record else "model"
        console.print(f"wrote {out} ({what_out}, tokenizer, train.json)")


# ----------------------------------------------------------------------------------------------- eval

@app.command(name="eval")
def evaluate(
    model: Optional[Path] = typer.Argument(None, help="Model directory (as for the other commands), or an export "
                                           "directory (runs its model.onnx) or an .onnx file (e.g. model.int8.onnx), "
                                           "run by onnxruntime on the CPU. Default: the embedded default."),
    data: str = DATA_REQUIRED_OPT,
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask directory from `compress prune`: evaluate the "
                                         "masked model. When the method trained weights (DIR/model), that model "
                                         "is used instead of MODEL."),
    against: Optional[str] = typer.Option(None, "--against", metavar="REF", help="Compare with REF on the same "
                                          "examples: a model directory, an export directory, an .onnx file, or "
                                          "'dense' (the model before its --masks). Prints both models' metrics, "
                                          "the paired difference with a 95% bootstrap interval, their agreement "
                                          "and their fidelity on unlabeled text."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=1, help="Bootstrap resamples of the dev examples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    fidelity_examples: int = typer.Option(5000, "--fidelity-examples", min=0, help="Unlabeled texts for fidelity "
                                          "(agreement and mean KL of the two models' outputs): the last N rows of "
                                          "the training split (after --max-train-examples), or the first N of "
                                          "--fidelity-data. 0: none."),
    fidelity_data: Optional[Path] = typer.Option(None, "--fidelity-data", help="Texts for fidelity instead of the "
                                                 "training split: .txt (one per line, a tab between a pair) or "
                                                 "CSV / TSV / JSONL (--fidelity-columns)."),
    fidelity_columns: Optional[str] = typer.Option(None, "--fidelity-columns", help="Text column(s) of "
                                                   "--fidelity-data. Default: --text-columns, else 'text'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics (and the comparison) to "
                                            "this JSON file."),
    overwrite: bool = typer.Option(False, help="Replace --json if it exists."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    task: Optional[str] = TASK_OPT,
    text_columns: Optional[str] = TEXT_COLUMNS_OPT,
    label_column: Optional[str] = LABEL_COLUMN_OPT,
    tokenizer: Optional[str] = TOKENIZER_OPT,
    max_train_examples: Optional[int] = typer.Option(None, "--max-train-examples", min=1, help="The first N "
                                                     "training rows were used for training or pruning: fidelity "
                                                     "draws from the rows after them."),
    max_dev_examples: Optional[int] = MAX_DEV_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Evaluation batch size."),
    adapter: Optional[List[Path]] = ADAPTER_OPT,
    fusion: Optional[Path] = FUSION_OPT,
    setup: Optional[str] = SETUP_OPT,
    head: Optional[str] = HEAD_OPT,
):
    """Evaluate a model with a prediction head (masked with --masks), or an exported graph, on the dev split of
    --data; with --against, compare it with a reference on the same examples.

    Example: compress eval --masks masks --data glue:rte --against dense --json rte.json
    """
    with user_errors():
        from . import api
        from .requests import EvalRequest

        request = EvalRequest(**_model(model, adapter, fusion, setup, head),
                              **_data(data, data_dir, task, text_columns, label_column, tokenizer,
                                      max_train_examples, max_dev_examples),
                              masks=masks, json=json_out, overwrite=overwrite, max_length=max_length,
                              batch_size=batch_size, against=against, bootstrap=bootstrap, seed=seed,
                              fidelity_examples=fidelity_examples, fidelity_data=fidelity_data,
                              fidelity_columns=fidelity_columns)
        with step("evaluating") as say:
            r = api.evaluate(request, say)
        _notes(r.notes)
        what = str(r.model) + (f" masked by {r.masks} ({r.masks_method})" if r.masks is not None else "")
        if r.against is None:
            _print_metrics(f"{escape(what)} on {escape(r.task)} dev ({r.dev_examples} examples)", r.metrics.items())
        else:
            _print_comparison(what, r)
        if r.json is not None:
            console.print(f"wrote {r.json}")


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _print_comparison(what: str, r) -> None:
    """`compress eval --against`: one table (metric, candidate, reference, difference, 95% CI) and the agreement and
    fidelity lines."""
    b = r.bootstrap
    console.print(f"candidate: {escape(what)}\nreference: {escape(r.reference)}", highlight=False, soft_wrap=True)
    console.print(f"{escape(r.task)} dev, {r.dev_examples} examples; difference = candidate - reference, paired; "
                  f"{round(100 * b['confidence'])}% percentile bootstrap interval over {b['resamples']} resamples "
                  f"of the examples (seed {b['seed']})", highlight=False)
    table = Table(box=None, pad_edge=False)  # no rules: the six columns fit in 80
    for name, justify in (("metric", "left"), ("candidate", "right"), ("reference", "right"),
                          ("difference", "right"), (f"{round(100 * b['confidence'])}% CI", "left"), ("", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for d in r.differences:
        table.add_row(escape(d["metric"]), _metric(d["candidate"]), _metric(d["reference"]),
                      _signed(d["difference"]), f"[{_signed(d['low'])}, {_signed(d['high'])}]",
                      "within noise" if d["within_noise"] else "")
    console.print(table)
    console.print(_agreement_line(f"agreement on the {r.dev_examples} dev examples", r.agreement), highlight=False,
                  soft_wrap=True)
    fid = r.fidelity or {}
    if fid.get("examples"):
        console.print(_agreement_line(f"fidelity on {fid['examples']} unlabeled texts ({escape(fid['source'])})",
                                      fid), highlight=False, soft_wrap=True)
    else:
        console.print("fidelity: no unlabeled texts (--fidelity-examples 0, or no training rows left)",
                      highlight=False)


def _agreement_line(title: str, a: dict) -> str:
    if "correlation" in a:  # regression: no labels to agree on, no distributions to compare
        return (f"{title}: correlation of the predictions {a['correlation']:.4f}, mean absolute difference "
                f"{a['mean_abs_diff']:.4f}")
    same = round(a["agreement"] * a["examples"])
    return (f"{title}: same predicted label {a['agreement']:.4f} ({same} of {a['examples']}), mean KL(reference || "
            f"candidate) {a['mean_kl']:.3g} nats")


# ----------------------------------------------------------------------------------------------- bench

@app.command()
def bench(
    targets: List[Path] = typer.Argument(..., help="Export directories (runs model.onnx), .onnx files, or model "
                                         "directories (PyTorch only), e.g. a baseline first and its pruned export."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="cpu | cuda | tensorrt | torch; repeatable or "
                                       "comma-separated. One not available here is reported as skipped."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma-separated batch sizes."),
    seq_lens: str = typer.Option("32,128", "--seq-lens", help="Comma-separated sequence lengths (no padding)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads for onnxruntime and "
                                          "PyTorch (>= 1). Default: every logical core; on a shared machine use "
                                          "fewer."),
    min_time: float = typer.Option(1.0, "--min-time", help="Minimum timed seconds per cell (at least 10 runs)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing each cell."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token ids."),
    rounds: int = typer.Option(10, "--rounds", min=1, help="Slices per target: the targets are timed in turn, "
                               "each for --min-time / ROUNDS s per round, until --min-time and 10 runs."),
    device: str = typer.Option("cpu", "--device", help="The torch provider's device: cpu | cuda (a missing "
                               "CUDA is reported as skipped)."),
    dtype: str = typer.Option("fp32", "--dtype", help="The torch provider's precision: fp32 | fp16 | bf16."),
    out: Path = typer.Option(..., "--out", help="Report directory: report.json, report.md, latency.png."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Measure latency (p50/p90/p99/mean/std ms) and throughput of exported and PyTorch models.

    Each target runs on each --provider at each batch size x sequence length, after warm-up, with pinned threads,
    until --min-time and 10 runs are reached; the targets of a provider and shape are timed in turn (rounds of
    short slices), so machine load hits them alike. Speedups are against the first target, with the
    interquartile range of the per-round ratio.

    The report also records size, parameters, FLOPs per token, the machine, library versions, and which ONNX
    nodes fell back to the CPU.

    Examples:

    \b
      compress bench exported --out bench-cpu
      compress bench base-export pruned-export --provider cpu,torch
          --seq-lens 128 --out bench
      compress bench pruned-export pruned-export/model.int8.onnx
          --batch-sizes 1,32 --threads 4 --out bench-int8
    """
    with user_errors():
        from exporters.bench_report import not_run, speedup_text

        from . import api
        from .requests import BenchRequest

        request = BenchRequest(targets=targets, providers=provider, batch_sizes=batch_sizes, seq_lens=seq_lens,
                               threads=threads, min_time=min_time, warmup=warmup, seed=seed, out=out,
                               overwrite=overwrite, rounds=rounds, device=device, dtype=dtype)
        with step("benchmarking") as say:
            r = api.bench(request, say)
        report = r.report
        table = Table(title=f"latency per batch, ms ({r.threads} threads; speedup vs "
                            f"{report['targets'][0]['name']}, in brackets its interquartile range over rounds)")
        for col in ("target", "provider", "batch", "seq", "p50", "p99", "seq/s", "speedup"):
            table.add_column(col, justify="left" if col in ("target", "provider") else "right")
        for c in report["results"]:
            if c["status"] == "ok":
                table.add_row(escape(c["target"]), c["provider"], str(c["batch_size"]), str(c["seq_len"]),
                              f"{c['p50_ms']:.3f}", f"{c['p99_ms']:.3f}", f"{c['seq_per_s']:.1f}",
                              speedup_text(c))
        console.print(table)
        if r.busy:
            console.print("warning: the machine was busy while timing: " + escape("; ".join(r.busy)),
                          style="yellow", highlight=False)
        if r.unsteady:
            console.print("note: " + escape("; ".join(r.unsteady)), highlight=False)
        for target, prov, status, reason, shapes in not_run(report):
            console.print(f"{status}: {escape(target)} on {prov} ({shapes}): {escape(reason)}", highlight=False,
                          style="red" if status == "failed" else "yellow")
        console.print(f"wrote {out}/report.json, {out}/report.md and {out}/latency.png")
        if r.failed:  # the report is complete and says what failed; the exit status says so too
            err_console.print(f"[bold red]error:[/] {r.failed} of {len(report['results'])} cells failed; see "
                              f"{escape(str(out))}/report.md", highlight=False)
            raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------- demo

@app.command()
def demo(
    out: Path = typer.Option(Path("compress-demo"), "--out", help="Directory for everything the demo writes "
                             "(masks, exports, bench report, demo.md, demo.json). A previous demo's is replaced."),
    overwrite: bool = typer.Option(False, help="Replace --out when it is another output of compress."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="GLUE directory holding SST-2/. Default: "
                                            "the SST-2 rows packaged with compressor (never the hub)."),
    target_speedup: float = typer.Option(1.5, "--target-speedup", help="post-training's predicted speedup "
                                         "(cpu 1x128); 1.5 is the study's best point."),
    latency: str = typer.Option("table", "--latency", help="table: the cached latency model, built when "
                                "missing; flops: prune to 1/target of the FLOPs."),
    min_time: float = typer.Option(2.0, "--min-time", help="Seconds each latency measurement runs at least."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads (>= 1). "
                                          "Default: all cores."),
    seed: int = typer.Option(0, help="Seed of the training order, the scores and the parity inputs."),
):
    """Show the best accuracy / speed point the toolkit reaches in minutes: prune, compact, export, quantize,
    evaluate, benchmark.

    The model is all-MiniLM-L6-v2 with eight adapters trained on GLUE tasks and an AdapterFusion over them
    trained on SST-2. The demo prunes it post-training to a predicted 1.5x (no retraining), exports the dense
    and the pruned model to ONNX (parity-verified) and int8, scores dense, int8 alone and pruned + int8 on
    SST-2's 872 dev rows paired against dense (95% CI), times them at batch 1 and 8 on the CPU, and prints one
    table. Example: compress demo && cat compress-demo/demo.md
    """
    with user_errors():
        from . import api
        from .demo import DEMO_STAGES, difference_cell, speedup_cell
        from .requests import DemoRequest

        n = [0]

        def say(text: str) -> None:
            n[0] += 1
            err_console.print(f"[bold]\\[{n[0]}/{DEMO_STAGES}][/] {escape(text)}", highlight=False)

        r = api.demo(DemoRequest(out=out, overwrite=overwrite, data_dir=data_dir, target_speedup=target_speedup,
                                 latency=latency, min_time=min_time, threads=threads, seed=seed), say)
        record, config = r.record, r.config
        metric = record["main_metric"]
        table = Table(title=f"{record['task']} dev ({record['dev_examples']} rows): accuracy, paired difference "
                            "to dense in points [95% CI], agreement with dense; onnxruntime CPU p50 at batch b x "
                            f"{config.seq_len} tokens ({record['machine']['threads']} threads) and speedup over "
                            "dense (median over the interleaved timing rounds; below it the interquartile range)")
        batches = config.batch_sizes
        for col in ["graph", metric[:8], "vs dense", "agree", "MB"] + [f"b{b} ms" for b in batches] + \
                [f"b{b} gain" for b in batches]:
            table.add_column(col, justify="left" if col == "graph" else "right")
        for row in record["rows"]:
            table.add_row(row["name"], f"{row['metrics'][metric]:.4f}", difference_cell(row).replace(" [", "\n["),
                          f"{row['difference'].get('agreement', 1):.3f}", f"{row['onnx_bytes'] / 2**20:.1f}",
                          *[f"{row['p50_ms'][b]:.1f}" if b in row["p50_ms"] else "failed" for b in batches],
                          *[speedup_cell(row, b, sep="\n") for b in batches])
        console.print(table)
        if record.get("busy"):
            console.print("warning: the machine was busy while timing (" + escape("; ".join(record["busy"]))
                          + "): the latencies and gains may be skewed; rerun on a quiet machine", style="yellow",
                          highlight=False)
        if record.get("unsteady"):
            console.print("note: " + escape("; ".join(record["unsteady"])), highlight=False)
        console.print("kept: " + ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in record["masks"].items())
                      + f"; {escape(record['latency']['note'])}; {record['seconds']:.0f} s in all", highlight=False)
        console.print(f"wrote {out}/demo.md, {out}/demo.json, {out}/masks, {out}/onnx-dense, {out}/onnx-pruned "
                      f"(model.onnx, model.int8.onnx, export.md, parity.json) and {out}/bench (report.md, "
                      "latency.png)", highlight=False)


if __name__ == "__main__":
    app()
