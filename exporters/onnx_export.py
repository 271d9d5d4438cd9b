"""`compress export --onnx`: compact, export with the TorchScript exporter, optimise, verify, write variants.

The output directory holds the graph to deploy (`model.onnx`), the compacted PyTorch model it came from
(config.json + compress_manifest.json + model.safetensors, reloadable with `compressor.load_model`), the
tokenizer files, `parity.json` and `export.md`; optionally `model.int8.onnx` and `model.sparse.onnx`. It is
written atomically: a failed export (parity included) leaves nothing behind.

Opset 17: the first opset with a LayerNormalization operator (one node per norm; our optimisation leaves it
unfused with its residual Add, see exporters/runtime.py), supported by onnxruntime >= 1.13 and TensorRT >= 8.6. The
TorchScript exporter (`dynamo=False`) is used because onnxruntime's transformer optimizer fuses no attention
in the dynamo exporter's output.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from compressor.compaction import compact, write_compacted
from compressor.errors import ExportError
from compressor.io import atomic_output_dir, check_output_dir
from compressor.masks import MaskSet, masked_copy
from compressor.modeling.architecture import layers_of

from . import optimize as graph_opt
from . import variants, verify
from .runtime import make_session

OPSET = 17


@dataclass
class ExportConfig:
    optimize: bool = True
    sparse: bool = False
    quantize: Optional[str] = None  # None or "int8"
    atol: float = 1e-4
    allow_mismatch: bool = False
    seed: Optional[int] = None  # parity inputs; None draws fresh ones (the seed is written to parity.json)
    opset: int = OPSET

    def __post_init__(self):
        if self.quantize not in (None, "int8"):
            raise ExportError(f"unknown --quantize '{self.quantize}'; the supported scheme is int8")
        if not self.atol > 0:
            raise ExportError(f"--atol must be positive, got {self.atol}")


@dataclass
class ExportResult:
    out: Path
    files: dict  # role -> file name
    sizes: dict  # file name -> bytes
    attention: dict  # layer -> [num_heads of fused nodes]
    heads: list  # kept heads per layer
    parity: dict
    int8: Optional[dict] = None
    sparse: Optional[dict] = None
    timings: dict = field(default_factory=dict)


class _Graph(nn.Module):
    """The exported signature: named int64 inputs, one named output."""

    def __init__(self, model: nn.Module, input_names: list, output_name: str):
        super().__init__()
        self.model, self.input_names, self.output_name = model, input_names, output_name

    def forward(self, *inputs):
        return getattr(self.model(**dict(zip(self.input_names, inputs))), self.output_name)


def io_names(model: nn.Module) -> tuple:
    config = model.base_model.config
    names = ["input_ids", "attention_mask"]
    if getattr(config, "type_vocab_size", 0) > 1:  # BERT has segments; RoBERTa's single type is left implicit
        names.append("token_type_ids")
    with torch.inference_mode():
        out = model(**{n: torch.ones(1, 2, dtype=torch.long) for n in names})
    return names, ("logits" if getattr(out, "logits", None) is not None else "last_hidden_state")


def export_graph(model: nn.Module, path: Path, opset: int = OPSET) -> tuple:
    """Write the ONNX graph of `model` with dynamic batch and sequence axes. Returns (input names, output)."""
    model = model.eval()
    inputs, output = io_names(model)
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in inputs)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > graph_opt.TWO_GB
    with warnings.catch_warnings():
        _export(model, inputs, output, example, path, opset, axes, big)
    return inputs, output


def _export(model, inputs, output, example, path, opset, axes, big) -> None:
    try:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branches on fixed shapes: constant here
        # the wrapper must be in eval mode: the exporter restores the top module's mode onto every submodule
        torch.onnx.export(_Graph(model, inputs, output).eval(), example, str(path), dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=[output], dynamic_axes=axes,
                          do_constant_folding=True, external_data=big)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from e


def export_onnx(model: nn.Module, out, masks: Optional[MaskSet] = None, config: Optional[ExportConfig] = None,
                overwrite: bool = False, tokenizer_dir=None, progress: Optional[Callable[[str], None]] = None,
                eval_data=None) -> ExportResult:
    """Compact `model` under `masks` (None: fold only), export, optimise, verify against the masked model and
    write the export directory `out`. Raises ParityError (nothing written) unless `allow_mismatch`.
    `eval_data` (a training.TaskContext) with int8: also score both graphs on its dev split."""
    config = config or ExportConfig()
    say = progress or (lambda _msg: None)
    check_output_dir(out, overwrite)
    timings = {}
    t = time.perf_counter()
    say("compacting")
    reference = masked_copy(model, masks) if masks is not None else model
    reference.eval()
    compacted = compact(model, masks)
    timings["compact_s"] = time.perf_counter() - t
    base = model.base_model.config
    files, sizes = {}, {}
    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(compacted, tmp, tokenizer_dir)
        t = time.perf_counter()
        say("exporting to ONNX")
        raw = tmp / ("model.onnx" if not config.optimize else "model.raw.onnx")
        inputs, output = export_graph(compacted, raw, config.opset)
        timings["export_s"] = time.perf_counter() - t
        deploy = tmp / "model.onnx"
        if config.optimize:
            t = time.perf_counter()
            say("optimising the graph")
            graph_opt.optimize_graph(raw, deploy, model_type="bert")
            raw.unlink()
            for extra in tmp.glob("*.onnx.data"):  # external data of the raw graph, if it had any
                if extra.name != "model.onnx.data":
                    extra.unlink()
            timings["optimize_s"] = time.perf_counter() - t
        files["model"] = deploy.name
        attention = graph_opt.attention_nodes_per_layer(deploy)
        heads = [layer.attention.self.num_attention_heads for layer in layers_of(compacted)]

        t = time.perf_counter()
        say("verifying parity")
        candidates = {"compacted (PyTorch)": verify.torch_runner(compacted, output),
                      "model.onnx": verify.session_runner(make_session(deploy, "cpu"))}
        sparse_info = int8_info = None
        if config.quantize == "int8":
            say("quantizing (int8)")
            variants.write_int8(deploy, tmp / "model.int8.onnx")
            files["int8"] = "model.int8.onnx"
            candidates["model.int8.onnx"] = verify.session_runner(make_session(tmp / "model.int8.onnx", "cpu"))
        if config.sparse:
            say("writing sparse initializers")
            sparse_info = variants.write_sparse(deploy, tmp / "model.sparse.onnx")
            if sparse_info["tensors"]:
                files["sparse"] = "model.sparse.onnx"
                candidates["model.sparse.onnx"] = verify.session_runner(make_session(tmp / "model.sparse.onnx", "cpu"))
            else:  # nothing below break-even: a copy of the dense graph would only mislead
                (tmp / "model.sparse.onnx").unlink()
        report = verify.compare(verify.torch_runner(reference, output), candidates, inputs,
                                vocab=base.vocab_size, type_vocab=getattr(base, "type_vocab_size", 1),
                                atol=config.atol, seed=config.seed, record_only=("model.int8.onnx",))
        verify.write_report(report, tmp / "parity.json")
        timings["verify_s"] = time.perf_counter() - t
        if not config.allow_mismatch:
            verify.raise_on_failure(report)
        for name in files.values():
            sizes[name] = (tmp / name).stat().st_size + sum(p.stat().st_size for p in tmp.glob(f"{name}.data"))
        if "int8" in files:
            int8_info = dict(max_abs_diff=report.worst("model.int8.onnx"))
            if eval_data is not None:  # a training.TaskContext: the accuracy int8 costs on its dev split
                from .accuracy import int8_accuracy
                say("scoring fp32 and int8 on dev data")
                int8_info.update(accuracy=int8_accuracy(deploy, tmp / "model.int8.onnx", eval_data),
                                 data=eval_data.data.source.get("spec", eval_data.spec.name))
        result = ExportResult(out=Path(out), files=files, sizes=sizes, attention=attention, heads=heads,
                              parity=report.to_dict(), int8=int8_info, sparse=sparse_info, timings=timings)
        from .export_summary import write_export_md
        write_export_md(result, compacted, tmp / "export.md", optimized=config.optimize)
    return result
