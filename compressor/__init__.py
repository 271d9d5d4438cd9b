"""Prune, compact and export adapter-based transformer models (AdapterFusion, bottleneck adapters).

The library surface is `compressor.api`: one function per `compress` command, each taking a request and returning
a result (`compressor.requests`); they are importable from here too, loaded on first use (all but `demo`,
which names the demo module here: use `compressor.api.demo`)."""
from .modeling import load_model

__version__ = "0.1.0"

_API = ("inspect", "prune", "compact", "export", "train", "evaluate", "bench", "load_default_model",
        "load_tokenizer")
_REQUESTS = ("InspectRequest", "InspectResult", "PruneRequest", "PruneResult", "CompactRequest", "CompactResult",
             "ExportRequest", "ExportResult", "TrainRequest", "TrainResult", "EvalRequest", "EvalResult",
             "BenchRequest", "BenchResult", "DemoRequest", "DemoResult")
__all__ = ["load_model", *_API, *_REQUESTS]


def __getattr__(name):
    """The api functions and the request / result classes, imported on first use (keeps `import compressor`
    light)."""
    if name in _API:
        from . import api
        return getattr(api, name)
    if name in _REQUESTS:
        from . import requests
        return getattr(requests, name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


import warnings as _warnings

# Compaction legitimately builds Linear layers with no rows left (a layer with every head pruned).
_warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
