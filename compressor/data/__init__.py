"""The data layer behind `--data`: task specs, readers, tokenisation and metrics."""

from .encode import TokenizedDataset, check_labels, collate
from .metrics import compute_metrics
from .readers import Example, TaskData, load_data
from .tasks import GLUE_TASKS, TaskSpec, find_task, get_task

__all__ = ["Example", "GLUE_TASKS", "TaskData", "TaskSpec", "TokenizedDataset", "check_labels", "collate",
           "compute_metrics", "find_task", "get_task", "load_data"]
