"""Prune, compact and export adapter-based transformer models (AdapterFusion, bottleneck adapters)."""
from .modeling import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"

import warnings as _warnings

# Compaction legitimately builds Linear layers with no rows left (a layer with every head pruned).
_warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
