"""Pruning core: criteria score units, methods turn scores into a MaskSet. Surgery lives in compaction."""
from .criteria import CRITERIA, Criterion, register_criterion
from . import data_criteria  # noqa: F401  (registers the data-driven criteria)
from .methods import METHODS, PruningMethod, prune, register_method
from .sparsity import parse_sparsity

__all__ = ["CRITERIA", "Criterion", "register_criterion", "METHODS", "PruningMethod", "register_method", "prune",
           "parse_sparsity"]
from . import head_adapters, importance, learned_masks, lottery, magnitude_global, sparse_adapter  # noqa: E402,F401  (register)
from . import post_training  # noqa: E402,F401  (registers post-training)
