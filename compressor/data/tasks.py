"""Task specifications: which columns hold the texts and the label, the label order, the metrics.

GLUE tasks follow the classic `download_glue_data.py` file layout. Their `label_list` is the order of the
HuggingFace `datasets` glue configs, so a label id means the same class offline (TSV files) and online.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import DataError

Column = Union[str, int]  # a header name, or a field index for files without a header (CoLA)


# The Hub id of GLUE: the short name "glue" no longer resolves (the datasets moved to owner namespaces)
HF_GLUE = "nyu-mll/glue"

@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple  # 1 or 2 columns: a single text or a text pair
    label_column: Column
    label_list: Optional[tuple]  # None = regression (one float output)
    metrics: tuple
    main_metric: str
    files: dict = field(default_factory=dict)  # split -> file name inside the task directory
    has_header: bool = True
    hf_name: Optional[tuple] = None  # (HF_GLUE, config) for `datasets.load_dataset`
    dir_name: Optional[str] = None  # GLUE directory name, e.g. "SST-2"
    hf_text_columns: tuple = ()  # the text columns of the `datasets` version (their names differ)

    @property
    def is_regression(self) -> bool:
        return self.label_list is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_list is None else len(self.label_list)

    @property
    def ref(self) -> str:
        """How messages and masks.json name the task: `glue:rte`, or a user file's stem."""
        return f"glue:{self.name}" if self.hf_name else self.name


_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
_PAIR = ("sentence1", "sentence2")
_ENT = ("entailment", "not_entailment")


def _glue(name, dir_name, text_columns, label_column, label_list, metrics, main, *, hf_text=None, files=_FILES,
          has_header=True):
    return TaskSpec(name=name, text_columns=tuple(text_columns), label_column=label_column,
                    label_list=None if label_list is None else tuple(label_list), metrics=tuple(metrics),
                    main_metric=main, files=dict(files), has_header=has_header, hf_name=(HF_GLUE, name),
                    dir_name=dir_name, hf_text_columns=tuple(hf_text or text_columns))


GLUE_TASKS = {
    # CoLA train/dev have no header: source, label, original label, sentence
    "cola": _glue("cola", "CoLA", (3,), 1, ("unacceptable", "acceptable"), ("matthews_correlation",),
                  "matthews_correlation", hf_text=("sentence",), has_header=False),
    "sst2": _glue("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), ("accuracy",), "accuracy"),
    "mrpc": _glue("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
                  ("accuracy", "f1"), "accuracy", hf_text=_PAIR),
    "stsb": _glue("stsb", "STS-B", _PAIR, "score", None, ("pearson", "spearmanr"), "pearson"),
    "qqp": _glue("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
                 ("accuracy", "f1"), "accuracy"),
    "mnli": _glue("mnli", "MNLI", _PAIR, "gold_label", ("entailment", "neutral", "contradiction"), ("accuracy",),
                  "accuracy", files={"train": "train.tsv", "dev": "dev_matched.tsv"}),
    "qnli": _glue("qnli", "QNLI", ("question", "sentence"), "label", _ENT, ("accuracy",), "accuracy"),
    "rte": _glue("rte", "RTE", _PAIR, "label", _ENT, ("accuracy",), "accuracy"),
    "wnli": _glue("wnli", "WNLI", _PAIR, "label", ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def find_task(name: str) -> Optional[TaskSpec]:
    """The GLUE task called `name` (case-insensitive; `sst2`, `SST-2`, `sst_2` alike), or None."""
    return GLUE_TASKS.get(_key(name))


def get_task(name: str) -> TaskSpec:
    spec = find_task(name)
    if spec is None:
        raise DataError(f"unknown task {name!r}: valid GLUE tasks are {glue_task_names()}")
    return spec


def glue_task_names() -> str:
    return ", ".join(f"{s.name} ({s.dir_name})" for s in GLUE_TASKS.values())
