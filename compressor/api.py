"""The library surface: one function per `compress` command. Each takes a request dataclass (its fields are the
command's options, see `compressor.requests`) and an optional `progress(text)` callback, does all the work (model
source, masks, tokenizer, data, checks, writing) and returns a result dataclass holding what the command prints.

    from compressor import PruneRequest, prune
    result = prune(PruneRequest(model="my-model", sparsity={"heads": 0.5}, out="masks"))

Every check that can fail runs before any work; errors are CompressorError subclasses with a one-line message."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from .compaction import write_compacted
from .compaction import compact as compact_model
from .io import atomic_output_dir, atomic_write_json, check_output_dir, check_output_file
from .masks import MaskSet
from .tokenizers import load_tokenizer, tokenizer_dir_for_outputs
from .requests import (
    BenchRequest, BenchResult, CompactRequest, CompactResult, DemoRequest, DemoResult, EvalRequest, EvalResult,
    ExportRequest, ExportResult, InspectRequest, InspectResult, ModelOptions, PruneRequest, PruneResult,
    TrainRequest, TrainResult,
)

Progress = Optional[Callable[[str], None]]

TRAINED_MODEL_DIR = "model"  # where `compress prune` writes the trained model beside the masks
TRAIN_RECORD = "train.json"


def _say(progress: Progress) -> Callable[[str], None]:
    return progress or (lambda _text: None)


# ----------------------------------------------------------------------------------------------- models

def model_source_dir(source) -> Path:
    """Where a model (and its tokenizer files) comes from: `source`, or the embedded default for None."""
    if source is None:
        from .default_model import default_model_dir
        return default_model_dir()
    return Path(source)


def load_default_model(adapters=None, fusion=None, setup: Optional[str] = None, head: Optional[str] = None):
    """The embedded default (all-MiniLM-L6-v2 + eight adapters + their fusion), built into the cache on first use."""
    from .modeling import load_model

    return load_model(model_source_dir(None), adapters=adapters, fusion=fusion, setup=setup, head=head)


def _load(req: ModelOptions, progress: Progress) -> tuple:
    """(model, the directory it came from)."""
    from .modeling import load_model

    _say(progress)("loading model")
    source = model_source_dir(req.model)
    return load_model(source, adapters=list(req.adapters or ()) or None, fusion=req.fusion, setup=req.setup,
                      head=req.head), source


def _load_with_masks(req: ModelOptions, masks, progress: Progress) -> tuple:
    """(model, MaskSet or None, the directory the model and its tokenizer come from, notes). Masks whose method
    trained weights belong to the trained model saved with them (masks.json `trained_model`): that model is
    loaded instead of MODEL."""
    from .modeling import load_model

    maskset, trained = read_masks(masks) if masks is not None else (None, None)
    if trained is None:
        model, source = _load(req, progress)
        return model, maskset, source, []
    ignored = [name for name, value in (("MODEL", req.model), ("--adapter", req.adapters), ("--fusion", req.fusion),
                                        ("--setup", req.setup), ("--head", req.head)) if value]
    notes = [f"the masks belong to the model trained with them: using {trained}, not {', '.join(ignored)}"] \
        if ignored else []
    _say(progress)("loading model")
    return load_model(trained), maskset, trained, notes


def _inputs(req, *extra) -> list:
    """Every input path of a request: `--overwrite` may not replace any of them."""
    paths = [getattr(req, "model", None), *(getattr(req, "adapters", None) or ()), getattr(req, "fusion", None),
             getattr(req, "masks", None), getattr(req, "checkpoint_dir", None), getattr(req, "data_dir", None), *extra]
    for name in ("data", "tokenizer"):
        value = getattr(req, name, None)
        if value is not None and Path(str(value)).exists():
            paths.append(value)
    return [Path(p) for p in paths if p is not None]


DEFAULT_MAX_LENGTH = 128


def _max_length(model: nn.Module, requested: Optional[int]) -> int:
    """--max-length checked against the model's position embeddings; None: 128, or fewer when the model holds
    fewer positions."""
    from .data.encode import check_max_length, max_positions

    if requested is None:
        return min(DEFAULT_MAX_LENGTH, max_positions(model) or DEFAULT_MAX_LENGTH)
    check_max_length(model, requested)
    return requested


def compact_to_dir(model: nn.Module, maskset: Optional[MaskSet], out, overwrite: bool = False,
                   adapterhub: bool = False, source=None, inputs=()) -> nn.Module:
    """Compact `model` under `maskset` and write it to `out` (and `out/adapterhub` in AdapterHub's format), with
    the tokenizer files of the directory `source` (None: the default's)."""
    compacted = compact_model(model, maskset)
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        write_compacted(compacted, tmp, tokenizer_dir=model_source_dir(source))
        if adapterhub:
            from .adapterhub_export import write_adapterhub
            write_adapterhub(model, maskset, tmp / "adapterhub", reference=compacted)
    return compacted


# ----------------------------------------------------------------------------------------------- tokenizer and data

def load_task(data, tokenizer, config=None, data_dir=None, task=None, text_columns=None, label_column=None,
              max_train: Optional[int] = None, max_dev: Optional[int] = None):
    """`--data` read and tokenised: a training.TaskContext (the train / dev split of a single file is fixed,
    independent of --seed, so prune, train and eval see the same dev examples)."""
    from .data import load_data
    from .training import TaskContext

    task_data = load_data(data, data_dir=data_dir, task=task, text_columns=text_columns, label_column=label_column)
    return TaskContext.build(task_data, tokenizer, config, max_train=max_train, max_dev=max_dev)


def _load_task(req, tokenizer, config, max_train, max_dev, progress: Progress):
    _say(progress)("reading data")
    return load_task(req.data, tokenizer, config, data_dir=req.data_dir, task=req.task,
                     text_columns=req.text_columns, label_column=req.label_column, max_train=max_train,
                     max_dev=max_dev)


def train_config(req, seed: int = 0, **extra):
    """The training.TrainConfig of a request's training budget."""
    from .training import TrainConfig

    return TrainConfig(max_steps=req.max_steps, epochs=req.epochs, batch_size=req.batch_size,
                       learning_rate=req.learning_rate, max_length=req.max_length or DEFAULT_MAX_LENGTH, seed=seed,
                       resume=req.resume,
                       checkpoint_dir=str(req.checkpoint_dir) if req.checkpoint_dir is not None else None, **extra)


# ----------------------------------------------------------------------------------------------- method options

# the CLI flag of each method option that has one; any other is `--option KEY=VALUE`
METHOD_FLAGS = {"criterion": "--criterion", "rounds": "--rounds", "rewind_step": "--rewind-step",
                "max_drop": "--max-drop", "widen": "--widen", "objective": "--objective", "examples": "--examples",
                "adapter_width": "--adapter-width", "target_speedup": "--target-speedup",
                "target_flops": "--target-flops", "target_params": "--target-params", "on": "--on", "shape": "--shape"}


def method_options_help(cls) -> str:
    """A method's options as the CLI spells them, e.g. '--rounds, --option train=V'."""
    fields = list(cls.Options.__dataclass_fields__)
    return ", ".join(METHOD_FLAGS.get(f, f"--option {f}=V") for f in fields) or "none"


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


def method_options(method: str, flags: dict, raw=()) -> dict:
    """The method options given (`flags` whose value is not None, plus `raw`: "KEY=VALUE" strings or a mapping),
    checked against the method's Options; a method without one of them is an error listing the options it has.
    The one place where method options are parsed and validated."""
    from .errors import PruningConfigError
    from .pruning import METHODS

    cls = METHODS.get_or_fail(method)
    fields = cls.Options.__dataclass_fields__
    given = {key: value for key, value in flags.items() if value is not None}
    origin = {key: METHOD_FLAGS.get(key, f"--option {key}") for key in given}
    items = [(str(k), v, f"{k}={v}", False) for k, v in raw.items()] if hasattr(raw, "items") else \
        [(*str(item).partition("=")[::2], str(item), not str(item).partition("=")[1]) for item in raw or ()]
    for key, value, item, no_sep in items:
        key = key.strip().replace("-", "_")
        if no_sep or not key:
            raise PruningConfigError(f"--option takes KEY=VALUE, got {item!r}")
        if key in given:
            raise PruningConfigError(f"option {key} is given twice ({origin[key]} and --option {item})")
        origin[key] = f"--option {item}"
        if isinstance(value, str) and key in fields:
            value = _convert_option(method, key, value, fields[key])
        given[key] = value
    unknown = [key for key in given if key not in fields]
    if unknown:
        raise PruningConfigError(f"method '{method}' has no option {origin[unknown[0]]} (its options: "
                                 f"{method_options_help(cls)})")
    return given


# ----------------------------------------------------------------------------------------------- inspect

def inspect(req: InspectRequest, progress: Progress = None) -> InspectResult:
    """`compress inspect`: layers, heads, FFN widths, adapters, fusions, parameters and FLOPs per token."""
    from .flops import layer_costs, total_cost
    from .modeling.invertible import summary

    model, _ = _load(req, progress)
    return InspectResult(model_class=type(model).__name__, setup=model.compress_manifest.get("setup"),
                         seq_len=req.seq_len, layers=layer_costs(model, req.seq_len),
                         total=total_cost(model, req.seq_len), invertible=summary(model))


# ----------------------------------------------------------------------------------------------- prune

def check_prune_args(method: str, sparsity: dict, seed: int = 0, min_keep: int = 1, options: Optional[dict] = None,
                     has_data: bool = False):
    """Fail before any work on what the method would reject: unknown method, kinds, options, missing data.
    Returns the method's class."""
    from .errors import PruningConfigError
    from .pruning.methods import METHODS, PruneConfig

    cls = METHODS.get_or_fail(method)
    if cls.needs_data and not has_data:
        raise PruningConfigError(f"method '{method}' needs data: pass --data (glue:TASK, a GLUE task directory, or a "
                                 "CSV / TSV / JSONL file with --text-columns and --label-column)")
    cls(PruneConfig(sparsity=dict(sparsity), seed=seed, min_keep=min_keep), options)  # checks kinds and options
    return cls


def prune(req: PruneRequest, progress: Progress = None) -> PruneResult:
    """`compress prune`: score units and write a MaskSet to `req.out` (and the trained model to OUT/model when the
    method trains weights, with the tokenizer used)."""
    from .pruning import parse_sparsity
    from .pruning import prune as run_prune

    from .pruning import METHODS

    say = _say(progress)
    sparsity = req.sparsity
    # a method that prunes to a target (post-training) needs no --sparsity: every kind it prunes competes
    fractions = {} if not sparsity and getattr(METHODS.get_or_fail(req.method), "targeted", False) else parse_sparsity([f"{k}={v}" for k, v in sparsity.items()] if hasattr(sparsity, "items")
                               else ([sparsity] if isinstance(sparsity, str) else sparsity))
    flags = {key: getattr(req, key) for key in METHOD_FLAGS}
    options = method_options(req.method, flags, req.options)
    min_keep = 0 if req.allow_empty else 1
    check_prune_args(req.method, fractions, seed=req.seed, min_keep=min_keep, options=options,
                     has_data=req.data is not None)
    recovery = _check_recover(req, fractions)
    config = train_config(req, seed=req.seed)
    inputs = _inputs(req)
    check_output_dir(req.out, req.overwrite, inputs=inputs)
    model, source = _load(req, progress)
    ctx, tokenizer = None, None
    if req.data is not None or req.tokenizer is not None:
        tokenizer = load_tokenizer(source, model, req.tokenizer)
    if req.data is not None:
        config = replace(config, max_length=_max_length(model, req.max_length))
        ctx = _load_task(req, tokenizer, config, req.max_train_examples, req.max_dev_examples, progress)
    say(f"pruning ({req.method})")
    masks = run_prune(model, req.method, fractions, seed=req.seed, min_keep=min_keep, data=ctx, options=options)
    if recovery is not None:
        say(f"recovery ({req.recover})")
        _recover(req, model, masks, ctx, *recovery)
    say("writing")
    with contextlib.ExitStack() as stack:
        tokenizer_dir = tokenizer_dir_for_outputs(stack, tokenizer if req.tokenizer is not None else None, source)
        save_prune_result(masks, req.out, overwrite=req.overwrite, tokenizer_dir=tokenizer_dir, inputs=inputs)
    return _prune_result(req, masks, ctx)


def kd_config(req):
    """The training.KDConfig of a request's DistillOptions (None fields: KDConfig's defaults)."""
    from .training.objectives import KDConfig

    given = dict(temperature=req.kd_temperature, logits_weight=req.kd_logits_weight,
                 hidden_weight=req.kd_hidden_weight, layers=KDConfig.parse_layers(req.kd_layers))
    return KDConfig(**{k: v for k, v in given.items() if v is not None})


def _kd_options_given(req) -> bool:
    return any(getattr(req, f) is not None for f in ("kd_temperature", "kd_logits_weight", "kd_hidden_weight",
                                                     "kd_layers"))


def _check_recover(req: PruneRequest, fractions: Optional[dict] = None) -> Optional[tuple]:
    """(recovery kind, what trains, KDConfig) of `--recover`, checked before any work; None without it."""
    from .errors import TrainingError
    from .training.recovery import DEFAULT_PARTS, get_recovery

    if req.recover is None:
        if req.train is not None or req.recover_steps is not None or _kd_options_given(req):
            raise TrainingError("--train, --recover-steps and --kd-* set up recovery training: add --recover "
                                "kd (or --recover task)")
        return None
    recovery = get_recovery(req.recover)
    if req.data is None:
        raise TrainingError(f"--recover {req.recover} trains on the task's training texts: pass --data")
    if "weights" in (fractions or {}):
        raise TrainingError("--recover holds structured masks (heads, neurons, adapters, bottleneck), not weight "
                            "masks: drop --recover, or prune structured kinds")
    if req.recover_steps is not None and req.recover_steps < 0:
        raise TrainingError(f"--recover-steps must be >= 0, got {req.recover_steps}")
    if not recovery.distils and _kd_options_given(req):
        raise TrainingError(f"the --kd-* options apply to --recover kd, not --recover {req.recover}")
    parts = parse_train_choice(req.train) if req.train is not None else list(DEFAULT_PARTS)
    return recovery, parts, kd_config(req) if recovery.distils else None


def _recover(req: PruneRequest, model: nn.Module, masks: MaskSet, ctx, recovery, parts, kd) -> None:
    """Recovery training of the pruned model (the one the method trained, if any) under `masks`, the dense
    `model` as the teacher; the result becomes `masks.model` (written to OUT/model), recorded in masks.json."""
    from dataclasses import asdict

    from .masks import masked_copy
    from .training.heads import num_labels_of
    from .training.recovery import recover

    student = masks.model if masks.model is not None else model
    recovered, summary = recover(student, masks, ctx, recovery.name, parts, steps=req.recover_steps, teacher=model,
                                 kd=kd)
    masks.model = recovered
    record = dict(kind=recovery.name, train=parts, steps=summary["steps"], loss=summary["loss"],
                  resumed=summary["resumed"], kd=asdict(kd) if kd is not None else None)
    if num_labels_of(recovered) is not None:
        record["dev_metrics"] = ctx.evaluate(masked_copy(recovered, masks))
    masks.extra["recovery"] = record


def _prune_result(req: PruneRequest, masks: MaskSet, ctx) -> PruneResult:
    from .masks import META_FILE, TENSORS_FILE

    out = Path(req.out)
    groups = {}
    for key in masks.masks:
        groups[masks.kind_of(key)] = groups.get(masks.kind_of(key), 0) + 1
    extra = masks.extra
    main = ctx.spec.main_metric if ctx is not None else "metric"
    rows = [(f"{main}, dense", extra["dense_metric"])] if extra.get("dense_metric") is not None else []
    dev = extra.get("dev_metrics") or {}
    if extra.get("metric") is not None and main not in dev:
        rows.append((f"{main}, pruned", extra["metric"]))
    rows += [(f"{name}, pruned", value) for name, value in dev.items()]
    recovery = extra.get("recovery")
    rows += [(f"{name}, recovered ({recovery['kind']})", value)
             for name, value in ((recovery or {}).get("dev_metrics") or {}).items()]
    trained = out / TRAINED_MODEL_DIR if masks.model is not None else None
    return PruneResult(out=out, method=req.method, seed=req.seed, masks=masks, groups=groups, counts=masks.counts(),
                       metrics=rows, task=ctx.spec.ref if ctx is not None else None,
                       dev_examples=len(ctx.dev_set) if ctx is not None else None,
                       stopped_early=str(extra["stopped_early"]) if extra.get("stopped_early") else None,
                       warnings=[str(w) for w in extra.get("warnings") or []], trained_model=trained, recovery=recovery,
                       files=[out / TENSORS_FILE, out / META_FILE] + ([trained] if trained is not None else []))


def _main_process() -> bool:
    """False on the other processes of an `accelerate launch` run: they hold the same model, one process writes."""
    from accelerate import PartialState

    return PartialState().is_main_process


def save_prune_result(maskset: MaskSet, out, overwrite: bool = False, tokenizer_dir=None, inputs=()) -> Path:
    """Write the mask directory and, when the method trained weights (`maskset.model`), the trained model in
    OUT/model (reloadable, with the tokenizer files of `tokenizer_dir`), recorded in masks.json as
    `trained_model`. Both appear together or not at all."""
    if maskset.model is not None:
        maskset.check(maskset.model)  # the masks belong to the trained model: a method bug otherwise
        maskset.extra["trained_model"] = TRAINED_MODEL_DIR
    if not _main_process():
        return Path(out)
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        maskset.write(tmp)
        if maskset.model is not None:
            (tmp / TRAINED_MODEL_DIR).mkdir()
            write_compacted(maskset.model, tmp / TRAINED_MODEL_DIR, tokenizer_dir=tokenizer_dir)
    return Path(out)


def read_masks(masks_dir) -> tuple:
    """(MaskSet, the directory of the trained model the masks belong to, or None when they belong to the
    model they were made from). The trained model must lie inside the mask directory, symlinks resolved."""
    from .errors import MaskError

    maskset = MaskSet.load(masks_dir)
    rel = maskset.extra.get("trained_model")
    if rel is None:
        return maskset, None
    where = Path(masks_dir) / "masks.json"
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise MaskError(f"{where}: trained_model must name a directory inside the mask directory, got {rel!r}")
    path = Path(masks_dir) / rel
    root = Path(masks_dir).resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise MaskError(f"{where}: trained_model {rel!r} leads out of the mask directory (to {resolved}); refusing "
                        "to load a model from there: copy the trained model into the mask directory")
    if not path.is_dir():
        raise MaskError(f"the masks in {masks_dir} belong to the trained model in {path}, which is missing: copy "
                        "the whole mask directory")
    return maskset, path


# ----------------------------------------------------------------------------------------------- compact

def compact(req: CompactRequest, progress: Progress = None) -> CompactResult:
    """`compress compact`: physically remove what the masks prune; writes a model directory that reloads, with
    the tokenizer (of --tokenizer, else the model's own files)."""
    from .flops import total_cost

    check_output_dir(req.out, req.overwrite, inputs=_inputs(req))
    model, maskset, source, notes = _load_with_masks(req, req.masks, progress)
    tokenizer = load_tokenizer(source, model, req.tokenizer) if req.tokenizer is not None else None
    _say(progress)("compacting")
    with contextlib.ExitStack() as stack:
        compacted = compact_to_dir(model, maskset, req.out, overwrite=req.overwrite, adapterhub=req.adapterhub,
                                   source=tokenizer_dir_for_outputs(stack, tokenizer, source), inputs=_inputs(req))
    out = Path(req.out)
    return CompactResult(out=out, before=total_cost(model), after=total_cost(compacted),
                         adapterhub=out / "adapterhub" if req.adapterhub else None, notes=notes)


# ----------------------------------------------------------------------------------------------- export

def export(req: ExportRequest, progress: Progress = None) -> ExportResult:
    """`compress export`: compact, export to ONNX, optimise and verify parity; the compacted model and the
    tokenizer are written beside the graph."""
    from exporters.onnx_export import ExportConfig, export_onnx

    from .errors import ExportError
    from .training import TrainConfig

    if req.format != "onnx":
        raise ExportError("choose a format: --onnx (the only one supported)")
    config = ExportConfig(optimize=req.optimize, sparse=req.sparse, quantize=req.quantize, atol=req.atol,
                          allow_mismatch=req.allow_mismatch, seed=req.seed, variants=req.variants)
    inputs = _inputs(req)
    check_output_dir(req.out, req.overwrite, inputs=inputs)
    _check_int8_options(req, config)
    if req.data is not None:
        from exporters.variants import VARIANTS

        scored = [name for name, cls in VARIANTS.items() if cls.scored]
        if not set(scored) & set(config.variants):
            raise ExportError(f"--data scores a variant graph ({', '.join(scored)}) against the fp32 one: add "
                              "--quantize int8 or --variant " + " or --variant ".join(n for n in scored if n != "int8"))
    model, maskset, source, notes = _load_with_masks(req, req.masks, progress)
    tokenizer, eval_data = None, None
    if req.data is not None or req.tokenizer is not None:
        tokenizer = load_tokenizer(source, model, req.tokenizer)
    if req.data is not None:
        data_config = TrainConfig(max_length=_max_length(model, req.max_length))
        eval_data = _load_task(req, tokenizer, data_config, None, req.max_dev_examples, progress)
        check_head(model, eval_data.spec)
    _say(progress)("exporting")
    speedup = None
    with contextlib.ExitStack() as stack:
        tokenizer_dir = tokenizer_dir_for_outputs(stack, tokenizer if req.tokenizer is not None else None, source)
        stack.enter_context(_int8_setup(req, config, eval_data, progress, _max_length(model, req.max_length)))
        # masks pruned to a cpu speed target: the dense graph, for the measured speedup (exporters/speedup.py)
        dense_graph = _dense_graph_for_speedup(model, maskset, stack)
        # owned: the model was loaded here and is not used after, so it is compacted in place, not copied
        result = export_onnx(model, req.out, maskset, config, overwrite=req.overwrite, tokenizer_dir=tokenizer_dir,
                             progress=progress, eval_data=eval_data, owned=True)
        del model
        if dense_graph is not None:
            from exporters.export_summary import add_speedup
            from exporters.speedup import measure_speedup

            from .latency import parse_shape

            _say(progress)(f"timing the dense and the pruned graph (cpu, {maskset.extra['shape']})")
            speedup = add_speedup(req.out, maskset.extra, measure_speedup(
                None, Path(req.out) / result.files["model"], parse_shape(maskset.extra["shape"]),
                dense_graph=dense_graph))
    attention = []
    if req.optimize:
        from exporters.export_summary import attention_rows
        attention = attention_rows(result)
    return ExportResult(out=Path(req.out), export=result, optimize=req.optimize, atol=req.atol, attention=attention,
                        notes=notes, speedup=speedup)


def _dense_graph_for_speedup(model: nn.Module, maskset, stack) -> Optional[Path]:
    """The dense model's graph in a temporary directory of `stack` when `maskset` carries a latency target on
    cpu (post-training --target-speedup): export then reports the measured speedup beside the predicted one."""
    if maskset is None or maskset.extra.get("target") != "target_speedup" or maskset.extra.get("on") != "cpu":
        return None
    import tempfile

    from .compaction import compact
    from .latency import onnx_graph

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dense-graph-")))
    return onnx_graph(compact(model), tmp / "dense.onnx")


def _check_int8_options(req: ExportRequest, config) -> set:
    """The int8 variants asked for; their options checked (one-line errors before any work)."""
    from exporters.quantization import Int8Setup

    from .errors import ExportError

    wants = {"int8", "int8-static"} & set(config.variants)
    Int8Setup(keep=req.int8_keep_fp32, calibration_examples=req.calibration_examples)
    if req.int8_keep_fp32 is not None and not (wants and (req.data is not None or "int8-static" in wants)):
        raise ExportError("--int8-keep-fp32 applies to a measured int8 graph: add --data with --quantize int8, or "
                          "--variant int8-static")
    return wants


def _int8_setup(req: ExportRequest, config, eval_data, progress: Progress, max_length: int):
    """What the int8 variants calibrate and measure on (exporters/quantization.py): with --data, the task's
    training rows in one seeded shuffle (seed 0), never its dev rows."""
    import random

    from exporters import quantization as q

    wants = _check_int8_options(req, config)
    if not wants or eval_data is None:
        return q.int8_setup(q.Int8Setup(keep=req.int8_keep_fp32, calibration_examples=req.calibration_examples,
                                        max_length=max_length, progress=_say(progress)))
    rows = list(eval_data.data.train)
    random.Random(0).shuffle(rows)
    setup = q.setup_from_examples(rows, eval_data.tokenizer, eval_data.config.max_length,
                                  f"{eval_data.spec.ref} training rows", req.calibration_examples,
                                  search=True, keep=req.int8_keep_fp32, progress=_say(progress))
    return q.int8_setup(setup)


# ----------------------------------------------------------------------------------------------- train and eval

def drop_head(model: nn.Module) -> nn.Module:
    """Remove the active prediction head so that a fresh one can be added (`compress train --new-head`). A
    ...ForSequenceClassification model becomes a flex-head model without a head (same module paths)."""
    from .modeling.architecture import FlexHeadModel

    manifest = model.compress_manifest
    if isinstance(model, FlexHeadModel):
        if model.active_head is not None:
            del model.heads[model.active_head]
            manifest.get("heads", {}).pop(model.active_head, None)
        model.active_head = None
        manifest["active_head"] = None
        return model
    if manifest.get("model_class") == "sequence_classification":
        flex = FlexHeadModel(model.base_model, {}, None)
        flex.compress_manifest = manifest
        manifest.update(model_class="flex", heads={}, active_head=None)
        return flex.eval()
    return model  # an encoder: no head to drop


def check_head(model: nn.Module, spec=None) -> None:
    """DataError unless the model has a prediction head (that fits the task `spec`, when given)."""
    from .errors import DataError
    from .training.heads import num_labels_of

    have = num_labels_of(model)
    if have is None:
        raise DataError("the model has no prediction head: train a head first: compress train MODEL --data ... "
                        "--train head")
    if spec is not None and have != spec.num_labels:
        raise DataError(f"the model's head has {have} output{'s' if have != 1 else ''}, {spec.ref} needs "
                        f"{spec.num_labels}: train a new head with `compress train --train head --new-head`")


def parse_train_choice(what) -> list:
    """`--train adapters,head` -> ["adapters", "head"], checked."""
    from .errors import TrainingError
    from .training.trainable import TRAIN_CHOICES

    parts = [p.strip() for p in (what.split(",") if isinstance(what, str) else what) if p.strip()]
    bad = [p for p in parts if p not in TRAIN_CHOICES]
    if bad or not parts:
        raise TrainingError(f"--train {bad[0] if bad else what!r} is not one of: {', '.join(TRAIN_CHOICES)} "
                            "(comma-separate to combine)")
    return parts


def train_model(model: nn.Module, ctx, what, new_head: bool = False, seed: int = 0, teacher: nn.Module = None,
                kd=None, maskset: Optional[MaskSet] = None) -> tuple:
    """Give `model` a head that fits the task (a fresh one with `new_head`), train `what` on ctx's training
    data (against the task loss, or by distillation from `teacher` with `kd`, a training.KDConfig), under
    `maskset`'s structured masks when given (taken off again after), evaluate on dev before and after.
    Returns (model, record)."""
    from .evaluation import mean_kl
    from .masks import apply_masks
    from .training import train
    from .training.heads import ensure_head
    from .training.loop import predict
    from .training.objectives import Distillation
    from .training.recovery import check_teacher, remove_masks
    from .training.trainable import select_trainable

    parts = parse_train_choice(what)
    if maskset is not None and model.compress_manifest["model_class"] == "encoder":
        from .errors import TrainingError  # a new head would re-root the module paths the masks name
        raise TrainingError("--masks: the model has no prediction head; train one first (compress train "
                            "--train head), then prune it")
    if new_head:
        model = drop_head(model)
    model = ensure_head(model, ctx.spec, seed=seed)
    if maskset is not None:
        apply_masks(model, maskset)
    loss, kl = ctx.loss, {}
    if teacher is not None:
        check_teacher(model, teacher, kd)
        loss = Distillation(teacher, kd)
        reference = predict(teacher, ctx.dev_set, ctx.collate)[0] if kd.logits_weight > 0 else None
    before = ctx.evaluate(model)
    if teacher is not None and reference is not None:
        kl["dev_kl_before"] = mean_kl(reference, predict(model, ctx.dev_set, ctx.collate)[0])
    params = select_trainable(model, parts)
    summary = train(model, ctx.train_set, ctx.collate, loss, ctx.config, params, stage="train")
    after = ctx.evaluate(model)
    if teacher is not None and reference is not None:
        kl["dev_kl_after"] = mean_kl(reference, predict(model, ctx.dev_set, ctx.collate)[0])
    for p in model.parameters():
        p.requires_grad_(False)
    record = dict(train=parts, new_head=new_head, head=getattr(model, "active_head", None),
                  trainable_parameters=sum(p.numel() for p in params), config=ctx.config.to_dict(),
                  data=dict(ctx.describe(), task=ctx.spec.ref, main_metric=ctx.spec.main_metric),
                  steps=summary["steps"], loss=summary["loss"], seconds=summary["seconds"],
                  resumed=summary["resumed"], dev_before=before, dev_after=after, **kl)
    if teacher is not None:
        from dataclasses import asdict
        record["kd"] = asdict(kd)
    if maskset is not None:
        remove_masks(model, maskset)
    return model.eval(), record


def save_trained(model: nn.Module, record: dict, out, overwrite: bool = False, tokenizer_dir=None,
                 inputs=()) -> Path:
    """OUT: the trained model (reloadable, with tokenizer files) and train.json, whole or not at all."""
    import json

    if not _main_process():
        return Path(out)
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        write_compacted(model, tmp, tokenizer_dir=tokenizer_dir)
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(out)


def train(req: TrainRequest, progress: Progress = None) -> TrainResult:
    """`compress train`: train adapters, the fusion and / or a head on a task; dev metrics before and after;
    writes the trained model with its tokenizer and train.json."""
    from .errors import TrainingError

    parts = parse_train_choice(req.train)
    config = train_config(req, seed=req.seed)
    if req.teacher is None and _kd_options_given(req):
        raise TrainingError("the --kd-* options set up distillation: add --teacher DIR (the dense model)")
    kd = kd_config(req) if req.teacher is not None else None
    inputs = _inputs(req, req.teacher)
    check_output_dir(req.out, req.overwrite, inputs=inputs)
    model, maskset, source, notes = _load_with_masks(req, req.masks, progress)
    teacher = None
    if req.teacher is not None:
        from .modeling import load_model

        from .training.recovery import check_teacher

        _say(progress)("loading the teacher")
        teacher = load_model(req.teacher)
        check_teacher(model, teacher, kd, labels=False)  # the labels once the student has its head
    tokenizer = load_tokenizer(source, model, req.tokenizer)
    config = replace(config, max_length=_max_length(model, req.max_length))
    ctx = _load_task(req, tokenizer, config, req.max_train_examples, req.max_dev_examples, progress)
    _say(progress)(f"training ({','.join(parts)}{', distilled' if teacher is not None else ''})")
    model, record = train_model(model, ctx, parts, new_head=req.new_head, seed=req.seed, teacher=teacher, kd=kd,
                                maskset=maskset)
    if maskset is not None:  # the masks are part of the result: pruned units removed (invariant 1)
        model = compact_model(model, maskset)
        record["masks"] = dict(path=str(req.masks), method=maskset.method, counts=maskset.counts())
    if req.teacher is not None:
        record["teacher"] = str(req.teacher)
    record["model"] = str(req.model) if req.model is not None else "default"
    if req.tokenizer is not None:
        record["tokenizer"] = str(req.tokenizer)
    _say(progress)("writing")
    with contextlib.ExitStack() as stack:
        tokenizer_dir = tokenizer_dir_for_outputs(stack, tokenizer if req.tokenizer is not None else None, source)
        save_trained(model, record, req.out, overwrite=req.overwrite, tokenizer_dir=tokenizer_dir, inputs=inputs)
    return TrainResult(out=Path(req.out), parts=parts, record=record, task=ctx.spec.ref,
                       train_examples=len(ctx.train_set), dev_examples=len(ctx.dev_set), notes=notes)


DENSE = "dense"  # `compress eval --against dense`: the model before its --masks
_REF_HINT = ("give a model directory, an export directory (model.onnx), an .onnx file, or 'dense' (the model "
             "before its --masks)")


class _EvalSide:
    """One model `compress eval` scores: a PyTorch model or an ONNX graph (run by onnxruntime on the CPU), and the
    directory of its tokenizer."""

    def __init__(self, name: str, model: Optional[nn.Module] = None, graph: Optional[Path] = None,
                 tokenizer_dir: Optional[Path] = None):
        self.name, self.model, self.graph, self.tokenizer_dir = name, model, graph, tokenizer_dir
        self.session, self.tokenizer = None, None

    def positions(self) -> Optional[int]:
        """How many tokens the model holds (a graph: from the config.json beside it, None without one)."""
        import json

        from .data.encode import max_positions

        if self.model is not None:
            return max_positions(self.model)
        config = self.graph.parent / "config.json"
        if not config.is_file():
            return None
        from .modeling.descriptions import max_positions as of_config

        return of_config(json.loads(config.read_text())) or None

    def logits(self, dataset, collate_fn, batch_size: int) -> tuple:
        if self.graph is not None:
            from exporters.accuracy import onnx_logits

            return onnx_logits(self.session, dataset, collate_fn, batch_size)
        from .training.loop import predict

        return predict(self.model, dataset, collate_fn, batch_size)


def _graph_path(path: Path, what: str) -> Optional[Path]:
    """The ONNX graph `path` names (an .onnx file, or an export directory's model.onnx), checked; None for a model
    directory; a one-line error for anything else."""
    import onnx

    from .errors import ExportError, ModelLoadError

    if not path.exists():
        raise ModelLoadError(f"{what} {path}: no such file or directory; {_REF_HINT}")
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise ExportError(f"{what} {path} is not an .onnx file; {_REF_HINT}")
        graph = path
    elif (path / "model.onnx").is_file():
        graph = path / "model.onnx"
    elif (path / "config.json").is_file():
        return None
    else:
        raise ModelLoadError(f"{what} {path} is neither an export directory (model.onnx) nor a model directory "
                             f"(config.json); {_REF_HINT}")
    try:
        proto = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ExportError(f"{what} {graph} is not an ONNX model ({type(e).__name__}); {_REF_HINT}") from None
    if not proto.graph.node or not proto.graph.input:  # an empty file parses as an empty ModelProto
        raise ExportError(f"{what} {graph} is not an ONNX model (no graph); {_REF_HINT}")
    return graph


def _check_eval_request(req: EvalRequest) -> tuple:
    """Everything `compress eval` can refuse before any work: (the candidate's graph or None, the reference: None,
    DENSE, a graph path or a model directory)."""
    from .errors import DataError, MaskError, ModelLoadError

    if req.bootstrap < 1:
        raise DataError(f"--bootstrap must be >= 1 resample, got {req.bootstrap}")
    if req.fidelity_examples < 0:
        raise DataError(f"--fidelity-examples must be >= 0 (0: no fidelity), got {req.fidelity_examples}")
    if req.against is None and req.fidelity_data is not None:
        raise DataError("--fidelity-data compares two models: add --against REF")
    graph = _graph_path(Path(req.model), "MODEL") if req.model is not None else None
    if graph is not None and req.masks is not None:
        raise MaskError(f"--masks apply to a model directory, not to the ONNX graph {graph}: export the masked model "
                        "(compress export --masks) and evaluate its export")
    if graph is not None and (req.adapters or req.fusion or req.setup or req.head):
        raise ModelLoadError(f"--adapter, --fusion, --setup and --head choose what a model directory runs; the "
                             f"graph {graph} is fixed")
    if req.against is None:
        return graph, None
    if str(req.against) == DENSE:
        if req.masks is None:
            raise MaskError("--against dense compares the masked model with the model before its masks: give --masks")
        return graph, DENSE
    ref = Path(req.against)
    return graph, _graph_path(ref, "--against") or ref


def _eval_side(name: str, graph: Optional[Path], model_dir: Optional[Path], req: EvalRequest) -> _EvalSide:
    """A graph's session, or a model directory loaded (with its prediction head checked); its tokenizer."""
    from .modeling import load_model

    if graph is not None:
        from exporters.runtime import make_session

        side = _EvalSide(name, graph=graph, tokenizer_dir=graph.parent)
        side.session = make_session(graph, "cpu")
        side.tokenizer = load_tokenizer(graph.parent, None, req.tokenizer)
        return side
    model = load_model(model_dir)
    check_head(model)
    side = _EvalSide(name, model=model, tokenizer_dir=Path(model_dir))
    side.tokenizer = load_tokenizer(model_dir, model, req.tokenizer)
    return side


def _check_graph_head(side: _EvalSide, spec) -> None:
    from .errors import DataError

    if side.session is None:
        check_head(side.model, spec)
        return
    out = side.session.get_outputs()[0]
    if out.name != "logits":
        raise DataError(f"{side.graph}'s output is {out.name}, not logits: the model has no prediction head; "
                        "train a head first: compress train MODEL --data ... --train head")
    width = out.shape[-1] if out.shape else None
    if isinstance(width, int) and width != spec.num_labels:
        raise DataError(f"{side.graph} has {width} output{'s' if width != 1 else ''}, {spec.ref} needs "
                        f"{spec.num_labels}")


def _eval_max_length(sides, requested: Optional[int]) -> int:
    """--max-length checked against every side's positions; None: 128, or fewer when a side holds fewer."""
    from .errors import DataError

    limits = [(side, side.positions()) for side in sides]
    if requested is not None:
        for side, n in limits:
            if n is not None and requested > n:
                raise DataError(f"--max-length {requested} is more than {side.name} holds ({n} positions); "
                                f"use --max-length {n} or less")
        return requested
    return min([DEFAULT_MAX_LENGTH] + [n for _, n in limits if n])


def _fidelity_pool(req: EvalRequest, data) -> tuple:
    """(examples, where they come from): the unlabeled texts fidelity compares the two models on. Default: the
    last --fidelity-examples rows of the task's training split (after the first --max-train-examples, which
    training used); --fidelity-data: the first rows of that file."""
    from .data import Example
    from .evaluation import read_texts

    n = req.fidelity_examples
    label = 0.0 if data.spec.is_regression else 0
    if n == 0:
        return [], None
    if req.fidelity_data is not None:
        texts = read_texts(req.fidelity_data, req.fidelity_columns or req.text_columns)[:n]
        return [Example(t, label) for t in texts], f"{req.fidelity_data}, rows 1-{len(texts)}"
    train = data.train
    used = min(req.max_train_examples or 0, len(train))
    first = max(used, len(train) - n)
    if first >= len(train):
        return [], None
    after = f", after the first {used} (--max-train-examples)" if used else ""
    return ([Example(e.texts, label) for e in train[first:]],
            f"{data.spec.ref} training rows {first + 1}-{len(train)} of {len(train)}{after}, labels unused")


def evaluate(req: EvalRequest, progress: Progress = None) -> EvalResult:
    """`compress eval`: the dev metrics of a model with a prediction head (masked when `req.masks` is given), or
    of an ONNX graph (an export directory's model.onnx, or an .onnx file, on onnxruntime's CPU provider); also
    written to `req.json` when given.

    With `req.against` (a model directory, an export directory, an .onnx file, or "dense": the model before its
    masks), the reference is scored on the same dev examples and compared (compressor.evaluation): per metric
    the paired difference (candidate - reference) with a 95% bootstrap interval, the agreement of the two
    models' predictions, and their fidelity on unlabeled text (agreement and mean KL(reference || candidate))."""
    from .data import TokenizedDataset, compute_metrics
    from .data import collate as make_collate
    from .masks import masked_copy
    from .training import TaskContext, TrainConfig

    graph, against = _check_eval_request(req)
    inputs = _inputs(req, *[p for p in (req.fidelity_data, against if against not in (None, DENSE) else None)
                            if p is not None])
    if req.json is not None:
        check_output_file(req.json, req.overwrite, inputs=inputs)
    say = _say(progress)
    maskset, notes = None, []
    if graph is not None:
        say("loading model")
        source = graph
        cand = _eval_side(str(graph), graph, None, req)
    else:
        model, maskset, source, notes = _load_with_masks(req, req.masks, progress)
        check_head(model)
        cand = _EvalSide(str(source) + (f" masked by {req.masks}" if req.masks is not None else ""),
                         model=masked_copy(model, maskset) if maskset is not None else model,
                         tokenizer_dir=Path(source))
        cand.tokenizer = load_tokenizer(source, model, req.tokenizer)
    ref = None
    if against == DENSE:
        dense, dense_source = model, source
        if req.masks is not None and read_masks(req.masks)[1] is not None:
            # the masks' method changed weights (mask tuning, recovery): dense is the model they were pruned from,
            # MODEL as given, not the changed weights without their masks
            dense, dense_source = _load(req, progress)
            maskset.check(dense)
            notes.append(f"--against dense: {dense_source}, the model the masks were made from (the candidate's "
                         "weights were changed with them)")
        ref = _EvalSide(f"{dense_source} (dense)", model=dense, tokenizer_dir=cand.tokenizer_dir)
        ref.tokenizer = cand.tokenizer
    elif against is not None:
        say("loading the reference")
        is_graph = Path(against).suffix.lower() == ".onnx"
        ref = _eval_side(str(against), Path(against) if is_graph else None, None if is_graph else Path(against),
                         req)
    sides = [cand] + ([ref] if ref is not None else [])
    max_length = _eval_max_length(sides, req.max_length)
    config = TrainConfig(max_length=max_length, eval_batch_size=req.batch_size)
    ctx = _load_task(req, cand.tokenizer, config, 1, req.max_dev_examples, progress)
    for side in sides:
        _check_graph_head(side, ctx.spec)
    # the dev set and the fidelity pool tokenised once per tokenizer directory
    dev_sets = {cand.tokenizer_dir.resolve(): (ctx.dev_set, ctx.collate)}

    def dev_of(side):
        key = side.tokenizer_dir.resolve()
        if key not in dev_sets:
            other = TaskContext.build(ctx.data, side.tokenizer, config, max_train=1, max_dev=req.max_dev_examples)
            dev_sets[key] = (other.dev_set, other.collate)
        return dev_sets[key]

    say("evaluating")
    cand_logits, labels = cand.logits(*dev_of(cand), req.batch_size)
    metrics = compute_metrics(ctx.spec, cand_logits, labels)
    result = EvalResult(model=Path(source), masks=Path(req.masks) if req.masks is not None else None,
                        masks_method=maskset.method if maskset is not None else None, task=ctx.spec.ref,
                        main_metric=ctx.spec.main_metric, dev_examples=len(ctx.dev_set), metrics=metrics,
                        notes=notes)
    if ref is not None:
        from .evaluation import compare, fidelity

        say("evaluating the reference")
        ref_logits, _ = ref.logits(*dev_of(ref), req.batch_size)
        compared = compare(ctx.spec, cand_logits, ref_logits, labels, B=req.bootstrap, seed=req.seed)
        pool, where = _fidelity_pool(req, ctx.data)
        fid = dict(examples=0, source=None)
        if pool:
            say(f"fidelity on {len(pool)} texts")
            pools = {}
            for side in sides:
                key = side.tokenizer_dir.resolve()
                if key not in pools:
                    pools[key] = (TokenizedDataset(pool, side.tokenizer, max_length), make_collate(side.tokenizer))
            pool_cand = cand.logits(*pools[cand.tokenizer_dir.resolve()], req.batch_size)[0]
            pool_ref = ref.logits(*pools[ref.tokenizer_dir.resolve()], req.batch_size)[0]
            fid = fidelity(pool_cand, pool_ref, ctx.spec.is_regression, where)
        result.against, result.reference = str(req.against), ref.name
        result.reference_metrics, result.differences = compared["reference"], compared["differences"]
        result.agreement, result.fidelity, result.bootstrap = compared["agreement"], fid, compared["bootstrap"]
    if req.json is not None:
        record = dict(model=str(source), masks=str(req.masks) if req.masks is not None else None,
                      masks_method=result.masks_method, data=dict(ctx.data.source, dev_examples=len(ctx.dev_set)),
                      task=ctx.spec.ref, main_metric=ctx.spec.main_metric, metrics=metrics,
                      max_length=max_length)
        if req.tokenizer is not None:
            record["tokenizer"] = str(req.tokenizer)
        if ref is not None:
            record.update(against=result.against, reference=result.reference,
                          reference_metrics=result.reference_metrics, differences=result.differences,
                          agreement=result.agreement, fidelity=result.fidelity, bootstrap=result.bootstrap)
        result.json = Path(atomic_write_json(req.json, record, overwrite=req.overwrite, inputs=inputs))
    return result


# ----------------------------------------------------------------------------------------------- bench and demo

def bench(req: BenchRequest, progress: Progress = None) -> BenchResult:
    """`compress bench`: latency and throughput of export directories, .onnx files or model directories; writes
    report.json, report.md and latency.png."""
    import os

    from exporters.bench import BenchConfig, BenchConfigError, run_bench

    if req.threads is not None and req.threads < 1:
        raise BenchConfigError(f"--threads must be >= 1, got {req.threads}; leave it out to use every core "
                               f"({os.cpu_count() or 1} here)")
    config = BenchConfig(providers=list(req.providers), batch_sizes=req.batch_sizes, seq_lens=req.seq_lens,
                         threads=req.threads or os.cpu_count() or 1, warmup=req.warmup, min_time_s=req.min_time,
                         seed=req.seed, rounds=req.rounds, device=req.device, dtype=req.dtype)
    check_output_dir(req.out, req.overwrite, inputs=[Path(t) for t in req.targets])
    say = _say(progress)
    report = run_bench(list(req.targets), config, req.out, overwrite=req.overwrite,
                       progress=lambda label, done, total: say(f"{label} ({done}/{total})"))
    failed = sum(c["status"] == "failed" for c in report["results"])
    from exporters.bench_report import busy_reasons, unsteady_reasons

    return BenchResult(out=Path(req.out), report=report, threads=config.threads, failed=failed,
                       busy=busy_reasons(report), unsteady=unsteady_reasons(report))


def demo(req: DemoRequest, progress: Progress = None) -> DemoResult:
    """`compress demo`: the best point reachable in minutes on the SST-2 fusion default (compressor.demo.run_demo);
    `progress` gets each stage's description."""
    from .demo import DemoConfig, prepare_out, run_demo

    if req.threads is not None and req.threads < 1:
        from exporters.bench import BenchConfigError
        raise BenchConfigError(f"--threads must be >= 1, got {req.threads}; leave it out to use every core")
    config = DemoConfig(data_dir=str(req.data_dir) if req.data_dir else None, target_speedup=req.target_speedup,
                        latency=req.latency, min_time_s=req.min_time, threads=req.threads, seed=req.seed)
    out = Path(req.out)
    prepare_out(out, req.overwrite)
    record = run_demo(out, config, overwrite=True, say=_say(progress))
    return DemoResult(out=out, config=config, record=record)


__all__ = [
    "inspect", "prune", "compact", "export", "train", "evaluate", "bench", "demo", "load_default_model",
    "load_tokenizer", "load_task", "read_masks", "method_options", "model_source_dir",
]
