"""onnxruntime sessions: provider names, availability, pinned thread counts.

One place decides how a session is made, so parity checks and latency measurements run the graph the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import onnx

from compressor.errors import ExportError, ProviderUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def provider_name(provider: str) -> str:
    try:
        return PROVIDERS[provider]
    except KeyError:
        raise ProviderUnavailableError(
            f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)} (or 'torch' for PyTorch)") from None


def check_provider(provider: str) -> str:
    """The onnxruntime provider name for `provider`, or ProviderUnavailableError saying what to install."""
    import onnxruntime as ort

    name = provider_name(provider)
    if name not in ort.get_available_providers():
        hint = "install the 'gpu' extra (onnxruntime-gpu) on a machine with a CUDA GPU" if provider != "cpu" else ""
        raise ProviderUnavailableError(
            f"onnxruntime provider {name} is not available here (available: "
            f"{', '.join(ort.get_available_providers())}){'; ' + hint if hint else ''}")
    return name


def check_onnx_file(path) -> Path:
    """A readable ONNX model file, or ExportError in one line."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an .onnx file" if path.is_dir() else "does not exist"
        raise ExportError(f"{path} {what}; give an .onnx file or an export directory")
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ExportError(f"{path} is not an ONNX model ({type(e).__name__}); give a file written by "
                          "'compress export --onnx'") from None
    return path


# Providers on which onnxruntime's fused SkipLayerNormalization is the fast kernel: our sessions give them the
# graph with its residual Sums turned back into Adds, which onnxruntime fuses at load. On the CPU the unfused pair
# is the fast one, and the graph as written (Sum + LayerNormalization) is what every session runs, a plain
# `InferenceSession(path)` included (exporters/optimize.py, residual_sums).
SKIP_LAYER_NORM_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def skip_layer_norm_graph(path, options) -> Optional[bytes]:
    """The graph at `path` with every residual Sum that feeds a LayerNormalization back as an Add (so that
    onnxruntime fuses the pair into SkipLayerNormalization at load), serialized; None when it has none. Weights
    in external data stay where they are: `options` is told the folder to read them from."""
    from .optimize import skip_layer_norm_form

    model = onnx.load(str(path), load_external_data=False)
    if not skip_layer_norm_form(model):
        return None
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(path).resolve().parent))
    return model.SerializeToString()


def make_session(path, provider: str = "cpu", threads: Optional[int] = None, optimization: str = "all",
                 profile_prefix: Optional[str] = None):
    """An InferenceSession on one provider (CPU kept as fallback for ops the provider lacks), with intra-op
    threads pinned when `threads` is given and inter-op threads at 1 (sequential execution); otherwise onnxruntime's
    defaults, so a CPU session runs the graph as a plain `InferenceSession(path)` does. On CUDA and TensorRT the
    residual Sums become Adds again (skip_layer_norm_graph), for the fused SkipLayerNormalization kernel. With
    `profile_prefix`, onnxruntime profiles every run into a JSON file of that prefix (see end_profiling)."""
    import onnxruntime as ort

    name = check_provider(provider)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    try:
        graph = skip_layer_norm_graph(path, options) if name in SKIP_LAYER_NORM_PROVIDERS else None
        return ort.InferenceSession(str(path) if graph is None else graph, sess_options=options, providers=providers)
    except Exception as e:
        raise ExportError(f"onnxruntime could not load {path}: {str(e).splitlines()[0]}") from None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`): protobuf and numpy leave
    large freed blocks in the heap that would otherwise keep each export stage's peak resident until the end."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
