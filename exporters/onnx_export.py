"""`compress export --onnx`: compact, export with the TorchScript exporter, optimise, verify, write variants.

The output directory holds the graph to deploy (`model.onnx`), the compacted PyTorch model it came from
(config.json + compress_manifest.json + model.safetensors, reloadable with `compressor.load_model`), the
tokenizer files, `parity.json` and `export.md`; optionally the files of registered variants (exporters/variants.py:
`model.int8.onnx`, `model.fp16.onnx`, `model.sparse.onnx`, ...), each built from the optimised graph, parity-checked
on its provider at its tolerance and summarised by its own section of export.md. It is written atomically: a failed
export (parity included) leaves nothing behind.

Opset 17: the first opset with a LayerNormalization operator (one node per norm; our optimisation leaves it
unfused with its residual Add, see exporters/runtime.py), supported by onnxruntime >= 1.13 and TensorRT >= 8.6. The
TorchScript exporter (`dynamo=False`) is used because onnxruntime's transformer optimizer fuses no attention
in the dynamo exporter's output.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import onnx
import torch
from torch import nn

from compressor.compaction import compact, write_compacted
from compressor.errors import ExportError
from compressor.io import atomic_output_dir, check_output_dir
from compressor.masks import MaskSet, masked_copy
from compressor.modeling.architecture import layer_parts
from compressor.modeling.descriptions import describe

from . import graph_io
from . import optimize as graph_opt
from . import variants as variant_registry
from . import verify
from .runtime import make_session, release_memory

OPSET = 17


@dataclass
class ExportConfig:
    optimize: bool = True
    sparse: bool = False  # the same as "sparse" in variants (--sparse)
    quantize: Optional[str] = None  # None or "int8": the same as "int8" in variants (--quantize int8)
    atol: float = 1e-4
    allow_mismatch: bool = False
    seed: Optional[int] = None  # parity inputs; None draws fresh ones (the seed is written to parity.json)
    opset: int = OPSET
    variants: Sequence[str] = ()  # names registered in exporters/variants.py (--variant NAME): int8, fp16, sparse

    def __post_init__(self):
        if self.quantize not in (None, "int8"):
            raise ExportError(f"unknown --quantize '{self.quantize}'; the supported scheme is int8")
        if not self.atol > 0:
            raise ExportError(f"--atol must be positive, got {self.atol}")
        if isinstance(self.variants, str):
            self.variants = [self.variants]
        names = list(self.variants) + ["int8"] * bool(self.quantize) + ["sparse"] * self.sparse
        # validated (an unknown name is an ExportError), deduplicated, in registration order
        self.variants = tuple(v.name for v in variant_registry.resolve(names))
        self.sparse, self.quantize = "sparse" in self.variants, ("int8" if "int8" in self.variants else None)


@dataclass
class ExportResult:
    out: Path
    files: dict  # role -> file name: "model" -> model.onnx, then each written variant's name -> its file
    sizes: dict  # file name -> bytes
    attention: dict  # layer -> [num_heads of fused nodes]
    heads: list  # kept heads per layer
    parity: dict
    # variant name -> what its build returned, plus file (None: declined, e.g. sparse with nothing below
    # break-even), provider, tolerance (None: recorded only), rule, max_abs_diff; accuracy and data with --data
    variants: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def int8(self) -> Optional[dict]:
        return self.variants.get("int8")

    @property
    def sparse(self) -> Optional[dict]:
        return self.variants.get("sparse")


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


def export_graph(model: nn.Module, path: Path, opset: int = OPSET, external: Optional[bool] = None) -> tuple:
    """Write the ONNX graph of `model` with dynamic batch and sequence axes. Returns (input names, output).
    `external` True: the weights go to `<path>.data` (a scratch form for the optimiser); None: only past 2 GB.

    The TorchScript exporter builds the whole ModelProto in C++ and returns it serialised (two to three copies
    of the weights beside the model's own), so it is run with `export_params=False`: it writes the graph alone,
    and the initializers it would have stored (after constant folding and deduplication, recorded by
    `_recorded_initializers`) are written here one at a time (exporters/graph_io.py)."""
    path = Path(path)
    model = model.eval()
    inputs, output = io_names(model)
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in inputs)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    with warnings.catch_warnings(), _recorded_initializers() as params, _shape_inference_without_weights():
        _export(model, inputs, output, example, path, opset, axes)
    if not params:  # a torch whose exporter no longer passes through the recorded step
        raise ExportError("torch.onnx.export recorded no initializers: this torch version is not supported by "
                          "the export; install the torch version pyproject.toml names")
    data = path.name + ".data"
    graph_io.attach_initializers(path, params, data)
    del params
    if not external:  # the deployable form: self-contained below 2 GB
        graph = onnx.load(str(path), load_external_data=False)
        if not graph_io.write_model(graph, path, external=external):
            (path.parent / data).unlink()
    return inputs, output


@contextlib.contextmanager
def _recorded_initializers():
    """Record the initializers `torch.onnx.export` settles on: the TorchScript exporter passes them through
    `_jit_pass_onnx_deduplicate_initializers` (whatever `export_params` says) just before encoding the graph."""
    recorded, original = {}, torch._C._jit_pass_onnx_deduplicate_initializers

    def record(graph, params, training):
        params = original(graph, params, training)
        recorded.clear()
        recorded.update(params)
        return params

    torch._C._jit_pass_onnx_deduplicate_initializers = record
    try:
        yield recorded
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = original


@contextlib.contextmanager
def _shape_inference_without_weights():
    """The TorchScript exporter's ONNX shape inference, given the float weights as typed inputs instead of values:
    with their values it folds every transposed weight into a map it keeps until the pass ends (0.7x of a
    BERT-base model's size at the export's peak, benchmarks/results/export_memory.md). Float weights carry no
    shape, so the graph is the same (tests/test_graph_io.py); integer constants (shapes) still go in."""
    original = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if original is None:  # a torch without this pass: export as it is (more memory, the same graph)
        yield
        return

    def infer(graph, params, opset):
        return original(graph, {k: v for k, v in params.items() if not (
            v.is_floating_point() and v.numel() * v.element_size() >= graph_io.EXTERNAL_MIN_BYTES)}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def _export(model, inputs, output, example, path, opset, axes) -> None:
    try:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branches on fixed shapes: constant here
        # the wrapper must be in eval mode: the exporter restores the top module's mode onto every submodule
        torch.onnx.export(_Graph(model, inputs, output).eval(), example, str(path), dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=[output], dynamic_axes=axes,
                          do_constant_folding=True, export_params=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from e


def _on_demand(path: Path, provider: str) -> "verify.OnDemand":
    """A parity target whose onnxruntime session (holding its own copy of the weights) exists only while its
    cases run."""
    return verify.OnDemand(lambda: verify.session_runner(make_session(path, provider)), release_memory)


def export_onnx(model: nn.Module, out, masks: Optional[MaskSet] = None, config: Optional[ExportConfig] = None,
                overwrite: bool = False, tokenizer_dir=None, progress: Optional[Callable[[str], None]] = None,
                eval_data=None, owned: bool = False) -> ExportResult:
    """Compact `model` under `masks` (None: fold only), export, optimise, verify against the masked model and
    write the export directory `out`. Raises ParityError (nothing written) unless `allow_mismatch`.
    `eval_data` (a training.TaskContext): also score model.onnx and every written variant registered with
    `scored = True` (int8, fp16) on its dev split.

    `owned`: the caller hands `model` over; it is compacted in place (and its weights freed after the ONNX
    export) instead of copied.

    Memory: at most one model or graph besides the caller's `model` (none with `owned`) is held at a time. The
    parity inputs are drawn from the seed first; the masked reference and the compacted model are run on them as
    soon as they exist, the reference is dropped before compaction and the compacted weights right after the ONNX
    export; each graph stage reads its input from disk (the raw graph keeps its weights in external data, which
    the optimiser reads only where a fusion needs values), files are written one tensor at a time
    (exporters/graph_io.py), and each parity session is created, run and released in turn."""
    config = config or ExportConfig()
    say = progress or (lambda _msg: None)
    check_output_dir(out, overwrite)
    timings = {}
    base = model.base_model.config
    t = time.perf_counter()
    say("compacting")
    reference = masked_copy(model, masks) if masks is not None else model
    reference.eval()
    inputs, output = io_names(reference)
    t_parity = time.perf_counter()
    seed, cases = verify.parity_cases(inputs, vocab=base.vocab_size, type_vocab=getattr(base, "type_vocab_size", 1),
                                      seed=config.seed)
    expected = verify.run_cases(verify.torch_runner(reference, output), cases)  # the masked model's outputs
    verify_s = time.perf_counter() - t_parity
    del reference
    release_memory()
    compacted = compact(model, masks, in_place=owned)
    del model
    timings["compact_s"] = time.perf_counter() - t - verify_s
    t_parity = time.perf_counter()
    compacted_outputs = verify.run_cases(verify.torch_runner(compacted, output), cases)
    verify_s += time.perf_counter() - t_parity
    heads = [layer.attention.num_attention_heads for layer in layer_parts(compacted)]
    files, sizes = {}, {}
    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(compacted, tmp, tokenizer_dir)
        release_memory()
        t = time.perf_counter()
        say("exporting to ONNX")
        raw = tmp / ("model.onnx" if not config.optimize else "model.raw.onnx")
        export_graph(compacted, raw, config.opset, external=True if config.optimize else None)
        # export.md needs only the compacted model's shapes (parameters, FLOPs): its weights go
        compacted.to("meta")
        release_memory()
        timings["export_s"] = time.perf_counter() - t
        deploy = tmp / "model.onnx"
        if config.optimize:
            t = time.perf_counter()
            say("optimising the graph")
            attention = graph_opt.optimize_graph(raw, deploy, model_type=describe(base).ort_model_type)
            raw.unlink()
            for extra in tmp.glob("*.onnx.data"):  # external data of the raw graph, if it had any
                if extra.name != "model.onnx.data":
                    extra.unlink()
            release_memory()
            timings["optimize_s"] = time.perf_counter() - t
        files["model"] = deploy.name
        if not config.optimize:
            attention = graph_opt.attention_nodes_per_layer(deploy)
        release_memory()

        entries, tolerances, written = {}, {}, []
        for variant in variant_registry.resolve(config.variants):  # each from the optimised fp32 graph
            t = time.perf_counter()
            say(f"writing {variant.file} ({variant.name})")
            dst = tmp / variant.file
            info = dict(variant.build(deploy, dst) or {})
            release_memory()
            entries[variant.name] = dict(info, file=variant.file if dst.exists() else None,
                                         provider=variant.provider, tolerance=variant.limit(config.atol),
                                         rule=variant.rule(config.atol))
            if dst.exists():  # a variant may decline (sparse with nothing below break-even)
                files[variant.name] = variant.file
                written.append(variant)
            timings[f"{variant.name}_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say("verifying parity")
        candidates = {"compacted (PyTorch)": verify.Outputs(compacted_outputs),
                      "model.onnx": _on_demand(deploy, "cpu")}
        providers = {"compacted (PyTorch)": "torch", "model.onnx": "cpu"}
        for variant in written:  # each on its own provider, held to its own tolerance
            candidates[variant.file] = _on_demand(tmp / variant.file, variant.provider)
            providers[variant.file], tolerances[variant.file] = variant.provider, variant.limit(config.atol)
        # the references were computed on the same seeded inputs; the sessions are made one at a time
        report = verify.compare(verify.Outputs(expected), candidates, inputs, vocab=base.vocab_size,
                                type_vocab=getattr(base, "type_vocab_size", 1), atol=config.atol, seed=seed,
                                tolerances=tolerances, providers=providers)
        verify.write_report(report, tmp / "parity.json")
        timings["verify_s"] = time.perf_counter() - t + verify_s
        if not config.allow_mismatch:
            verify.raise_on_failure(report)
        for name in files.values():
            sizes[name] = (tmp / name).stat().st_size + sum(p.stat().st_size for p in tmp.glob(f"{name}.data"))
        for entry in entries.values():
            if entry["file"] is not None:
                entry["max_abs_diff"] = report.worst(entry["file"])
        scored = {name: tmp / e["file"] for name, e in entries.items()
                  if e["file"] is not None and variant_registry.VARIANTS[name].scored}
        if eval_data is not None and scored:  # a training.TaskContext: the accuracy each variant costs
            from .accuracy import variant_accuracy
            say(f"scoring fp32 and {', '.join(scored)} on dev data")
            data_name = eval_data.data.source.get("spec", eval_data.spec.name)
            for name, acc in variant_accuracy(deploy, scored, eval_data).items():
                entries[name].update(accuracy=acc, data=data_name)
        result = ExportResult(out=Path(out), files=files, sizes=sizes, attention=attention, heads=heads,
                              parity=report.to_dict(), variants=entries, timings=timings)
        from .export_summary import write_export_md
        write_export_md(result, compacted, tmp / "export.md", optimized=config.optimize)
    return result
