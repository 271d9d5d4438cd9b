"""Read `--data`: `glue:TASK`, a GLUE-layout task directory, or a user CSV / TSV / JSONL file.

Everything comes back as a `TaskData`: the task spec, train and dev examples, and a JSON-able `source`
recorded in masks.json so a MaskSet says which data made it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import DataError
from ..hub import hub_offline_flag, hub_unreachable
from .tasks import TaskSpec, find_task, get_task, glue_task_names

GLUE_ENV = "COMPRESSOR_GLUE_DIR"
DEFAULT_GLUE_DIR = Path("..") / "shared" / "data" / "glue"  # relative to the working directory
USER_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_HF_SPLITS = {"train": "train", "dev": "validation"}
_HF_DEV = {"mnli": "validation_matched"}


@dataclass(frozen=True)
class Example:
    texts: tuple  # one text, or a pair
    label: Union[int, float]  # class id, or a float target for regression


@dataclass
class TaskData:
    spec: TaskSpec
    train: list
    dev: list
    source: dict  # JSON-able; goes into masks.json


def load_data(spec: str, data_dir=None, task: Optional[str] = None, text_columns=None, label_column=None,
              label_list=None, dev_fraction: float = 0.1, seed: int = 0, fallback_dir=None) -> TaskData:
    """Load `--data`. `text_columns` / `label_list` take a sequence or a comma-separated string.

    `glue:TASK` reads `data_dir`, else `$COMPRESSOR_GLUE_DIR`, else `../shared/data/glue` (from the working
    directory) when it exists, else downloads with `datasets`. With `fallback_dir` (a GLUE-layout directory, e.g.
    the demo's packaged rows) that directory replaces the download: the hub is never asked."""
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"--dev-fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    text_columns, label_list = _names(text_columns), _names(label_list)
    if text_columns is not None and len(text_columns) not in (1, 2):
        raise DataError(f"--text-columns takes 1 or 2 column names (a text or a text pair), got {len(text_columns)}")
    split = dict(dev_fraction=dev_fraction, seed=seed)
    spec = str(spec)
    if spec.lower().startswith("glue:"):
        task_spec = _override(get_task(spec[5:]), text_columns, label_column, label_list)
        return _load_glue(task_spec, spec, data_dir, split, fallback_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        task_spec = get_task(task) if task else find_task(path.name)
        if task_spec is None:
            raise DataError(f"cannot tell which GLUE task {path} holds from its name: pass --task "
                            f"(one of {glue_task_names()})")
        return _load_task_dir(_override(task_spec, text_columns, label_column, label_list), path, spec, split)
    if path.is_file():
        if path.suffix.lower() not in USER_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(USER_SUFFIXES)}")
        return _load_user_file(path, task, text_columns, label_column, label_list, split)
    hint = f" (did you mean glue:{find_task(spec).name}?)" if find_task(spec) else ""
    raise DataError(f"--data {spec!r} is neither glue:TASK nor an existing directory or file{hint}; "
                    f"GLUE tasks: {glue_task_names()}")


# ------------------------------------------------------------------ GLUE


def local_glue_root(data_dir=None) -> Optional[Path]:
    """The GLUE directory `glue:TASK` reads: `data_dir`, `$COMPRESSOR_GLUE_DIR`, `../shared/data/glue` if it
    exists (relative to the working directory), else None (download)."""
    explicit = data_dir if data_dir is not None else os.environ.get(GLUE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return DEFAULT_GLUE_DIR if DEFAULT_GLUE_DIR.is_dir() else None


def _load_glue(spec: TaskSpec, ref: str, data_dir, split, fallback_dir=None) -> TaskData:
    explicit = data_dir if data_dir is not None else os.environ.get(GLUE_ENV)
    root = local_glue_root(data_dir)
    if root is not None:
        task_dir = root / spec.dir_name
        if task_dir.is_dir():
            return _load_task_dir(spec, task_dir, ref, split)
        if explicit:  # the user named this directory: do not silently go online instead
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else "it does not exist"
            raise DataError(f"no {spec.dir_name} directory in {root} (found: {have}); pass --data-dir with a "
                            f"GLUE-layout directory that has {spec.dir_name}/")
    if fallback_dir is not None:  # packaged rows instead of the hub
        task_dir = Path(fallback_dir) / spec.dir_name
        if not task_dir.is_dir():
            raise DataError(f"no local GLUE data for {spec.dir_name}: pass --data-dir with a GLUE-layout directory "
                            f"holding {spec.dir_name}/ (or set {GLUE_ENV})")
        data = _load_task_dir(spec, task_dir, ref, split)
        data.source["packaged"] = True
        return data
    return _load_online(spec, ref, split)


def _load_task_dir(spec: TaskSpec, task_dir: Path, ref: str, split) -> TaskData:
    present = {s: task_dir / f for s, f in spec.files.items() if (task_dir / f).is_file()}
    if not present:
        raise DataError(f"{task_dir} has none of {', '.join(spec.files.values())} (it holds: "
                        f"{', '.join(sorted(p.name for p in task_dir.iterdir())) or 'nothing'})")
    rows = {s: _read_glue_tsv(p, spec) for s, p in present.items()}
    split_of = None
    if len(present) == len(spec.files):
        train, dev = rows["train"], rows["dev"]
    else:  # e.g. QNLI here ships dev.tsv only: split it deterministically
        (only, path), = present.items()
        train, dev = _split(rows[only], path, **split)
        split_of = path.name
    return _data(spec, train, dev, ref, split_of, split, dir=str(task_dir.resolve()))


def _read_glue_tsv(path: Path, spec: TaskSpec) -> list:
    # GLUE TSVs carry unescaped quotes (MRPC) and a BOM: tabs only, no quoting, utf-8-sig.
    header, rows = _read_delimited(path, "\t", csv.QUOTE_NONE, has_header=spec.has_header)
    if header is None:  # CoLA: field indices; every row as wide as the first
        width = len(rows[0][1]) if rows else 0
        cols = list(spec.text_columns) + [spec.label_column]
        if rows and max(cols) >= width:
            raise DataError(f"{path}: rows have {width} fields but {spec.ref} reads field {max(cols)}")
        texts, label = tuple(spec.text_columns), spec.label_column
    else:
        texts, label = _resolve(path, header, spec.text_columns, spec.label_column)
    return _examples(path, rows, texts, label, _labeler(spec.label_list))


def _load_online(spec: TaskSpec, ref: str, split) -> TaskData:
    fix = f"pass --data-dir with a GLUE-layout directory holding {spec.dir_name}/ (or set {GLUE_ENV})"
    hub = "/".join(spec.hf_name)
    offline = hub_offline_flag()
    if not offline:
        why = hub_unreachable()
        if why is not None:
            raise DataError(f"no local GLUE data for {spec.dir_name} and the Hugging Face hub is unreachable ({why}): "
                            f"{fix}; or set HF_HUB_OFFLINE=1 to use a copy `datasets` cached earlier")
    try:
        import datasets  # optional: only for online GLUE
    except ImportError:
        raise DataError(f"no local GLUE data for {spec.name} and the `datasets` package is not installed: {fix}")
    if offline and getattr(getattr(datasets, "config", None), "HF_HUB_OFFLINE", True) is False:
        # `datasets` was imported before the flag was set and would go online: fail as offline mode would
        raise DataError(f"no local GLUE data for {spec.dir_name} and {offline} is set: {fix}")
    try:
        ds = datasets.load_dataset(*spec.hf_name)
    except Exception as e:  # no network, hub errors: all mean the same to the user
        if offline:  # offline mode fails at once when the `datasets` cache has no copy
            raise DataError(f"no local GLUE data for {spec.dir_name}, {offline} is set and `datasets` has no cached "
                            f"copy of {hub}: {fix}")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not load {hub} with `datasets` ({type(e).__name__}: {msg}): {fix}")
    out = {}
    for ours, theirs in _HF_SPLITS.items():
        theirs = _HF_DEV.get(spec.name, theirs) if ours == "dev" else theirs
        part = ds[theirs]
        cols = [part[c] for c in spec.hf_text_columns]
        conv = float if spec.is_regression else int
        out[ours] = [Example(tuple(str(c[i]) for c in cols), conv(y)) for i, y in enumerate(part["label"])]
    return _data(spec, out["train"], out["dev"], ref, None, split, hf=list(spec.hf_name))


# ------------------------------------------------------------------ user files


def _load_user_file(path: Path, task, text_columns, label_column, label_list, split) -> TaskData:
    header, rows = _read_user_rows(path)
    if text_columns is None or label_column is None:
        raise DataError(f"{path}: pass --text-columns (1 or 2) and --label-column; its columns are {header}")
    texts, label = _resolve(path, header, text_columns, label_column, by_name=_is_json(path))
    base = get_task(task) if task else None
    if label_list is not None:
        labels = tuple(label_list)
    elif base is not None:
        labels = base.label_list
    else:
        labels = _infer_label_list(path, [(lineno, r.get(label) if isinstance(r, dict) else r[label])
                                          for lineno, r in rows])
        if labels is not None and len(labels) < 2:
            raise DataError(f"{path}: every row's label is {labels[0]!r}, one class: a classifier needs at least "
                            f"two; fix the file, or pass --task with the task whose classes these are")
    if labels is not None and len(labels) < 2:
        raise DataError(f"{path}: a classification task needs at least two classes, got {list(labels)}")
    if base is not None and labels == base.label_list:
        metrics, main = base.metrics, base.main_metric
    elif labels is None:
        metrics, main = ("pearson", "spearmanr"), "pearson"
    else:
        metrics, main = (("accuracy", "f1") if len(labels) == 2 else ("accuracy",)), "accuracy"
    spec = TaskSpec(name=path.stem, text_columns=tuple(text_columns), label_column=label_column, label_list=labels,
                    metrics=metrics, main_metric=main, files={"all": path.name}, has_header=True)
    examples = _examples(path, rows, texts, label, _labeler(labels))
    train, dev = _split(examples, path, **split)
    return _data(spec, train, dev, str(path), path.name, split, file=str(path.resolve()))


def _read_user_rows(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, rows = _read_delimited(path, ",", csv.QUOTE_MINIMAL)
    elif suffix == ".tsv":  # GLUE convention: tabs, no quoting (a quote is a character)
        header, rows = _read_delimited(path, "\t", csv.QUOTE_NONE)
    else:
        header, rows = _read_json_rows(path)
    if not rows:
        raise DataError(f"{path} has no data rows")
    return header, rows


def _read_json_rows(path: Path):
    """JSON lines (one object per line), or a .json file holding one array of objects."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON object per line ({e.msg})")
    header = []
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with named fields, got {type(rec).__name__}")
        header += [k for k in rec if k not in header]
    if not records:
        raise DataError(f"{path} is empty")
    return header, [(lineno, rec) for lineno, rec in records]


# ------------------------------------------------------------------ shared helpers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")


def _read_delimited(path: Path, delimiter: str, quoting: int, has_header: bool = True):
    """(header or None, [(line number, fields)]); every row must have the header's width."""
    rows, header = [], None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            for fields in reader:
                if not fields:  # blank line
                    continue
                if has_header and header is None:
                    header = fields
                    continue
                width = len(header) if header is not None else len(rows[0][1]) if rows else len(fields)
                if len(fields) != width:
                    raise DataError(f"{path}:{reader.line_num}: {len(fields)} fields where the file has {width}; "
                                    f"fix or remove that line")
                rows.append((reader.line_num, fields))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except csv.Error as e:
        raise DataError(f"{path}: unreadable as {'TSV' if delimiter == chr(9) else 'CSV'} ({e})")
    if has_header and header is None:
        raise DataError(f"{path} is empty")
    if not rows:
        raise DataError(f"{path} has no data rows")
    return header, rows


def _resolve(path: Path, header: list, text_columns, label_column, by_name: bool = False):
    """Check the columns exist; names -> field indices for delimited rows, names kept for JSON records."""
    missing = [c for c in (*text_columns, label_column) if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))}; its columns are {header}")
    if by_name:
        return tuple(text_columns), label_column
    return tuple(header.index(c) for c in text_columns), header.index(label_column)


def _is_json(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def _examples(path: Path, rows, texts, label, to_label) -> list:
    out = []
    for lineno, row in rows:
        try:
            if isinstance(row, dict) and any(k not in row for k in (*texts, label)):
                raise ValueError(f"missing field {[k for k in (*texts, label) if k not in row]}")
            out.append(Example(tuple("" if row[t] is None else str(row[t]) for t in texts), to_label(row[label])))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}")
    return out


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value if isinstance(value, (int, float)) else str(value).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _missing(value) -> bool:
    """An absent label: None, an empty string, or NaN (a float, or text such as "nan" / "NaN")."""
    if value is None:
        return True
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return True
    if isinstance(value, bool):
        return False
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _labeler(label_list: Optional[tuple]):
    """value -> label id (by name first; integer file values 0..k-1 map to that id) or float (regression)."""
    if label_list is None:
        def regression(value):
            x = _number(value)
            if x is None:
                if _missing(value):
                    raise ValueError(f"the label is missing ({value!r}); fill it or remove that row")
                raise ValueError(f"label {value!r} is not a finite number")
            return x
        return regression
    ids = {name: i for i, name in enumerate(label_list)}
    numeric_names = any(_number(n) is not None for n in label_list)

    def classify(value):
        key = "" if value is None else str(value).strip()
        if key in ids:
            return ids[key]
        x = _number(value)
        if x is not None and x.is_integer():
            if str(int(x)) in ids:  # "1.0" or 1 for a label named "1"
                return ids[str(int(x))]
            if not numeric_names and 0 <= x < len(label_list):  # GLUE 0/1 files for named labels
                return int(x)
        if _missing(value):
            raise ValueError(f"the label is missing ({value!r}); fill it or remove that row")
        raise ValueError(f"label {value!r} is not one of {list(label_list)}"
                         + ("" if numeric_names else f" nor an id 0..{len(label_list) - 1}"))
    return classify


def _infer_label_list(path: Path, values) -> Optional[tuple]:
    """From (line, label) pairs: integers -> classes (sorted numerically); other numbers -> regression (None);
    strings -> sorted classes. A missing label (empty, null, NaN) or an infinite one is refused with its line."""
    for lineno, v in values:
        if _missing(v):
            raise DataError(f"{path}:{lineno}: the label is missing ({v!r}); fill it or remove that row")
        if _number(v) is None and not isinstance(v, bool):
            try:
                float(str(v).strip())
            except ValueError:
                continue
            raise DataError(f"{path}:{lineno}: label {v!r} is not a finite number; fix or remove that row")
    numbers = [_number(v) for _, v in values]
    if all(x is not None for x in numbers):
        if all(x.is_integer() for x in numbers):
            return tuple(str(int(x)) for x in sorted(set(numbers)))
        return None
    return tuple(sorted({str(v).strip() for _, v in values}))


def _split(examples: list, path: Path, dev_fraction: float, seed: int):
    """Deterministic train/dev split by `seed`; both parts keep file order."""
    n = len(examples)
    if n < 2:
        raise DataError(f"{path} has {n} row(s): too few to split into train and dev")
    n_dev = min(max(1, round(n * dev_fraction)), n - 1)
    is_dev = np.zeros(n, dtype=bool)
    is_dev[np.random.default_rng(seed).permutation(n)[:n_dev]] = True
    return [e for e, d in zip(examples, is_dev) if not d], [e for e, d in zip(examples, is_dev) if d]


def _data(spec, train, dev, ref, split_of, split, **where) -> TaskData:
    source = {"spec": ref, "task": spec.ref, **where, "train_rows": len(train), "dev_rows": len(dev),
              "dev_from_split_of": split_of}
    if split_of:
        source.update(split)
    return TaskData(spec, train, dev, source)


def _names(value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    names = tuple(str(v).strip() for v in value if str(v).strip())
    return names or None


def _override(spec: TaskSpec, text_columns, label_column, label_list) -> TaskSpec:
    changes = {}
    if text_columns is not None:
        changes["text_columns"] = tuple(text_columns)
    if label_column is not None:
        changes["label_column"] = label_column
    if label_list is not None:
        changes["label_list"] = tuple(label_list)
    return replace(spec, **changes) if changes else spec
