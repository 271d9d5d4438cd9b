"""One training loop (accelerate) for every method that trains: retraining, mask learning, adapter, fusion and
head training. The same code runs on a CPU here and on several GPUs under `accelerate launch`."""
from .config import TrainConfig
from .loop import evaluate, train
from .objectives import KDConfig, TaskContext
from .recovery import RECOVERY, recover, retrain_masked

__all__ = ["TrainConfig", "train", "evaluate", "TaskContext", "KDConfig", "RECOVERY", "recover", "retrain_masked"]
