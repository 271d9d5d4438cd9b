"""Library entry points behind the CLI commands: one function per command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .compaction import compact, write_compacted
from .io import atomic_output_dir
from .masks import MaskSet


def model_source_dir(source) -> Path:
    """Where a model (and its tokenizer files) came from; None is the embedded default."""
    if source is None:
        from .default_model import default_model_dir
        return default_model_dir()
    return Path(source)


def compact_to_dir(model: nn.Module, maskset: Optional[MaskSet], out, overwrite: bool = False,
                   adapterhub: bool = False, source=None) -> nn.Module:
    """Compact `model` under `maskset` and write it to `out` (and `out/adapterhub` in AdapterHub's format)."""
    compacted = compact(model, maskset)
    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(compacted, tmp, tokenizer_dir=model_source_dir(source))
        if adapterhub:
            from .adapterhub_export import write_adapterhub
            write_adapterhub(model, maskset, tmp / "adapterhub", reference=compacted)
    return compacted


# ----------------------------------------------------------------------------------------------- data and tokenizer

TRAINED_MODEL_DIR = "model"  # where `compress prune` writes the trained model beside the masks
TRAIN_RECORD = "train.json"


def load_tokenizer(model_dir, model: Optional[nn.Module] = None):
    """The tokenizer saved in `model_dir` (AutoTokenizer); a clear error when the directory has none, or when
    its vocabulary does not fit `model`'s embeddings."""
    from .compaction import TOKENIZER_FILES
    from .errors import ModelLoadError

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the "
                             "tokenizer of its base checkpoint into it (tokenizer.save_pretrained(DIR))")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {type(e).__name__}: {first}") from e
    if model is not None:
        vocab = model.base_model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ModelLoadError(f"the tokenizer in {model_dir} has {len(tokenizer)} tokens, the model's embeddings "
                                 f"only {vocab}: they do not belong together")
    return tokenizer


def load_task(data, tokenizer, config=None, data_dir=None, task=None, text_columns=None, label_column=None,
              max_train: Optional[int] = None, max_dev: Optional[int] = None):
    """`--data` read and tokenised: a training.TaskContext (the train / dev split of a single file is fixed,
    independent of --seed, so prune, train and eval see the same dev examples)."""
    from .data import load_data
    from .training import TaskContext

    task_data = load_data(data, data_dir=data_dir, task=task, text_columns=text_columns, label_column=label_column)
    return TaskContext.build(task_data, tokenizer, config, max_train=max_train, max_dev=max_dev)


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


def save_prune_result(maskset: MaskSet, out, overwrite: bool = False, tokenizer_dir=None) -> Path:
    """Write the mask directory and, when the method trained weights (`maskset.model`), the trained model in
    OUT/model (reloadable, with the tokenizer files of `tokenizer_dir`), recorded in masks.json as
    `trained_model`. Both appear together or not at all."""
    if maskset.model is not None:
        maskset.check(maskset.model)  # the masks belong to the trained model: a method bug otherwise
        maskset.extra["trained_model"] = TRAINED_MODEL_DIR
    with atomic_output_dir(out, overwrite) as tmp:
        maskset.write(tmp)
        if maskset.model is not None:
            (tmp / TRAINED_MODEL_DIR).mkdir()
            write_compacted(maskset.model, tmp / TRAINED_MODEL_DIR, tokenizer_dir=tokenizer_dir)
    return Path(out)


def read_masks(masks_dir) -> tuple:
    """(MaskSet, the directory of the trained model the masks belong to, or None when they belong to the
    model they were made from)."""
    from .errors import MaskError

    maskset = MaskSet.load(masks_dir)
    rel = maskset.extra.get("trained_model")
    if rel is None:
        return maskset, None
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise MaskError(f"{Path(masks_dir) / 'masks.json'}: trained_model must name a directory inside the mask "
                        f"directory, got {rel!r}")
    path = Path(masks_dir) / rel
    if not path.is_dir():
        raise MaskError(f"the masks in {masks_dir} belong to the trained model in {path}, which is missing: copy "
                        "the whole mask directory")
    return maskset, path


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


def train_model(model: nn.Module, ctx, what, new_head: bool = False, seed: int = 0) -> tuple:
    """Give `model` a head that fits the task (a fresh one with `new_head`), train `what` on ctx's training
    data, evaluate on dev before and after. Returns (model, record)."""
    from .training import train
    from .training.heads import ensure_head
    from .training.trainable import select_trainable

    parts = parse_train_choice(what)
    if new_head:
        model = drop_head(model)
    model = ensure_head(model, ctx.spec, seed=seed)
    before = ctx.evaluate(model)
    params = select_trainable(model, parts)
    summary = train(model, ctx.train_set, ctx.collate, ctx.loss, ctx.config, params, stage="train")
    after = ctx.evaluate(model)
    for p in model.parameters():
        p.requires_grad_(False)
    record = dict(train=parts, new_head=new_head, head=getattr(model, "active_head", None),
                  trainable_parameters=sum(p.numel() for p in params), config=ctx.config.to_dict(),
                  data=dict(ctx.describe(), task=ctx.spec.ref, main_metric=ctx.spec.main_metric),
                  steps=summary["steps"], loss=summary["loss"], seconds=summary["seconds"],
                  resumed=summary["resumed"], dev_before=before, dev_after=after)
    return model.eval(), record


def save_trained(model: nn.Module, record: dict, out, overwrite: bool = False, tokenizer_dir=None) -> Path:
    """OUT: the trained model (reloadable, with tokenizer files) and train.json, whole or not at all."""
    import json

    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(model, tmp, tokenizer_dir=tokenizer_dir)
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(out)


def write_json(path, data: dict, overwrite: bool = False) -> Path:
    """Write a JSON file whole or not at all."""
    import json
    import os
    import tempfile

    from .errors import OutputExistsError

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another --json or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
