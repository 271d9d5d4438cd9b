"""Pruning core: criteria score units, methods turn scores into a MaskSet. Surgery lives in compaction."""
from .criteria import CRITERIA, Criterion, register_criterion
from .methods import METHODS, PruningMethod, prune, register_method
from .sparsity import parse_sparsity

__all__ = ["CRITERIA", "Criterion", "register_criterion", "METHODS", "PruningMethod", "register_method", "prune",
           "parse_sparsity"]
