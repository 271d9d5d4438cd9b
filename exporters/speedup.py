"""Measured speedup of a pruned export over the dense model, in plain onnxruntime CPU sessions, beside the
latency model's prediction (masks pruned with post-training's --target-speedup on cpu)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from torch import nn


def measure_speedup(model: Optional[nn.Module], graph: Path, shape=(1, 128), rounds: int = 10, slice_s: float = 0.1,
                    dense_graph: Optional[Path] = None) -> dict:
    """Time the dense model's graph (exported here, as `compress export` would, unless `dense_graph` is given)
    and `graph` in plain `InferenceSession`s at `shape`, interleaved (compressor.latency.time_interleaved):
    {"dense_ms", "pruned_ms", "speedup" (medians), "speedup_fastest" (the same from each round's fastest run, a
    second interleaved pass), "shape", "rounds"}."""
    from compressor.compaction import compact
    from compressor.latency import onnx_graph, time_interleaved

    from .bench import _ort_inputs, make_inputs, ort_runner
    from .runtime import make_session, release_memory

    b, s = shape
    with tempfile.TemporaryDirectory(prefix="speedup-") as tmp:
        if dense_graph is None:
            dense_graph = onnx_graph(compact(model), Path(tmp) / "dense.onnx")
            release_memory()
        runs = {}
        for name, path in (("dense", dense_graph), ("pruned", graph)):
            session = make_session(path, "cpu")  # onnxruntime's defaults: what a plain InferenceSession runs
            runs[name] = ort_runner(session, "cpu", make_inputs(_ort_inputs(session), b, s, seed=0))
        ms = time_interleaved(runs, rounds, slice_s, "dense")
        fastest = time_interleaved(runs, rounds, slice_s, "dense", stat=min)
    return dict(dense_ms=round(ms["dense"], 4), pruned_ms=round(ms["pruned"], 4),
                speedup=round(ms["dense"] / ms["pruned"], 4), speedup_fastest=round(fastest["dense"] /
                                                                                    fastest["pruned"], 4),
                shape=f"{b}x{s}", rounds=rounds, provider="cpu")
