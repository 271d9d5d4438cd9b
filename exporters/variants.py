"""Export variants: the files written beside the deploy graph (`model.onnx`), one registered class each.

A variant says everything the export needs to know about it, so that the pipeline (exporters/onnx_export.py), the
CLI table, `export.md` (exporters/export_summary.py), `parity.json` and the dev-metric comparison (`--data`) loop
over the registry and never name a variant:

- `name` (registry key, `compress export --variant NAME`, its key in `ExportResult.files` and `.variants`) and
  `file`, the file name in the export directory;
- `build(deploy, dst)`: write `dst` from the optimised fp32 deploy graph; returns what it did (a dict, kept in
  `ExportResult.variants[name]`). A variant may decline by leaving `dst` unwritten (sparse, when no tensor is
  below break-even); it is then reported, not listed among the files;
- `provider`: the onnxruntime execution provider its parity check runs on;
- `tolerance`: `ATOL` (held to `--atol`, as `model.onnx` is), a number (held to that stated max abs diff), or
  None (recorded only, never fails the export);
- `scored`: with `--data`, its dev metrics are compared with `model.onnx`'s;
- `summary(entry, sizes)`: its section of `export.md`.

Adding a variant is one class in this module (or anywhere, registered with `register_variant`). All variants
start from the optimised dense graph. Sparse stays a separate file: onnxruntime's optimizer, `quantize_dynamic`
and the fp16 converter do not accept sparse initializers, and onnxruntime densifies them at load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.errors import ExportError
from compressor.pruning.registry import Registry


ATOL = "atol"  # a variant's tolerance: held to --atol


class VariantRegistry(Registry):
    """The pruning registries' duplicate-rejecting name -> class map; an unknown name is an ExportError."""

    def get_or_fail(self, name: str):
        if name not in self:
            raise ExportError(f"unknown export variant '{name}'; choose one of: {', '.join(self)}")
        return self[name]


VARIANTS = VariantRegistry("export variant")
register_variant = VARIANTS.register


def mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


class Variant:
    name = "?"
    file = "?"
    title = "?"  # the heading of its export.md section
    provider = "cpu"
    tolerance: Union[str, float, None] = ATOL
    scored = False

    def build(self, deploy: Path, dst: Path) -> dict:
        """Write `dst` from the optimised fp32 graph `deploy`; return what was done (JSON-able)."""
        raise NotImplementedError

    def limit(self, atol: float) -> Optional[float]:
        """The max abs diff this variant is held to under `--atol`, or None when it is recorded only."""
        return atol if self.tolerance == ATOL else self.tolerance

    def rule(self, atol: float) -> str:
        """How its parity is judged, in words (export.md, the CLI)."""
        if self.tolerance is None:
            return "recorded, not held"
        return f"atol {atol:g}" if self.tolerance == ATOL else f"stated tolerance {self.tolerance:g}"

    def summary(self, entry: dict, sizes: dict) -> list:
        """export.md lines of its section (after the heading). `entry` is ExportResult.variants[name]: the build's
        dict plus file, provider, tolerance, max_abs_diff (and accuracy, data with --data)."""
        if entry["file"] is None:
            return [f"`{self.file}` was not written."]
        dense, size = sizes["model.onnx"], sizes[self.file]
        return [f"`{self.file}`: {mb(size)} ({dense / size:.2f}x the size of `model.onnx`). Parity on "
                f"{entry['provider']}: max abs diff {entry['max_abs_diff']:.3e} against the masked PyTorch model, "
                f"{entry['rule']}."]


def resolve(names) -> list:
    """Variant instances for `names` (deduplicated, in registration order); an unknown name is an ExportError."""
    wanted = set(names)
    for name in names:
        VARIANTS.get_or_fail(name)
    return [cls() for name, cls in VARIANTS.items() if name in wanted]


# ----------------------------------------------------------------------------------------------- int8

@register_variant("int8")
class Int8(Variant):
    """onnxruntime int8 (`--quantize int8`): dynamic per-tensor quantization, or, when the export has `--data`,
    the scheme and fp32 fallbacks of lowest measured cost against fp32 (exporters/quantization.py)."""

    file = "model.int8.onnx"
    title = "int8 (onnxruntime quantization: optimise, pre-process, quantize)"
    tolerance = None  # quantization error is not a bug: recorded, and measured on dev data with --data
    scored = True

    def build(self, deploy, dst):
        from . import quantization

        setup = quantization.current()
        if setup is None or not setup.search:
            write_int8(deploy, dst)
            return dict(scheme=quantization.DEFAULT.name)
        return quantization.search(deploy, dst, setup, progress=setup.progress)

    def summary(self, entry, sizes):
        dense, q = sizes["model.onnx"], sizes[self.file]
        lines = [f"`{self.file}`: {mb(q)} ({dense / q:.2f}x smaller than `model.onnx`), {entry['scheme']} "
                 f"quantization. Output deviation from the reference: max abs diff {entry['max_abs_diff']:.3e}; "
                 "recorded, not held to atol. Measure its latency with `compress bench`."]
        if "candidates" not in entry:
            return lines + ["", f"Not measured against fp32 (no `--data`): {entry['scheme']}, the default. With "
                            "`--data` the scheme and fp32 fallbacks are chosen by measured fidelity."]
        return lines + [""] + search_summary(entry)


@register_variant("int8-static")
class Int8Static(Int8):
    """Static int8 (`--variant int8-static`): QDQ, activation ranges calibrated on task texts (the export's
    `--data` training rows, or the packaged MRPC sample), per-channel or not and fp32 fallbacks by measurement."""

    file = "model.int8-static.onnx"
    title = "int8-static (onnxruntime static QDQ quantization, calibrated)"

    def build(self, deploy, dst):
        from . import quantization as q

        setup = q.current() or q.Int8Setup()
        if not setup.calibration:
            setup = q.packaged_setup(deploy.parent, setup.max_length, keep=setup.keep, progress=setup.progress,
                                     calibration_examples=setup.calibration_examples)
        return q.search(deploy, dst, setup, schemes=q.STATIC_SCHEMES, progress=setup.progress)


def search_summary(entry: dict) -> list:
    """export.md lines of a measured int8 choice (quantization.search's record)."""
    b = entry["bounds"]
    fid = entry["fidelity"]
    vs = (f"; {entry['baseline_cost'] / fid['cost']:.1f}x lower than {entry['baseline']}'s"
          if entry["baseline"] != entry["winner"] and fid["cost"] > 0 else "")
    lines = [f"Chosen by measured fidelity against `model.onnx` on {entry['source']}: **{entry['winner']}** "
             f"({entry['choice']}; mean KL {fid['cost']:.2e}{vs}"
             + (f", agreement {fid['agreement']:.4f}" if fid["agreement"] is not None else "") + "). Bounds: mean "
             f"KL <= {b['kl']:g} and agreement >= {b['agreement']:g}; at most {b['max_kept']} units kept fp32, each "
             f"while it lowers the KL by {b.get('min_gain', 0):.0%} or more.",
             "", "| candidate | mean KL (or rel. MSE) | agreement | max abs diff |", "|---|---|---|---|"]
    for c in entry["candidates"]:
        agree = "-" if c["agreement"] is None else f"{c['agreement']:.4f}"
        lines.append(f"| {c['name']} | {c['cost']:.2e} | {agree} | {c['max_abs_diff']:.3f} |")
    if entry["kept_fp32"]:
        lines += ["", "Kept fp32 (`nodes_to_exclude`): the units whose quantization alone cost most: "
                  + "; ".join(f"{k['unit']} (KL {k['cost']:.2e} alone; {', '.join(k['nodes'])})"
                              for k in entry["kept_fp32"]) + "."]
    else:
        lines += ["", "No unit kept fp32."]
    if entry["sensitivity"]:
        top = entry["sensitivity"][:6]
        lines += ["", f"Sensitivity (each unit quantized alone, {len(entry['sensitivity'])} units; the costliest): "
                  + ", ".join(f"{r['unit']} {r['cost']:.2e}" for r in top) + "."]
    return lines


def write_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic per-tensor quantization of the optimised graph (int8 weights of MatMul, fused
    Attention, embedding Gathers), pre-processed one tensor at a time (quantization.preprocess) and quantized
    with the fp32 weights left on disk (quantization.weights_stay_on_disk): no stage holds the fp32 weights."""
    from . import quantization

    with tempfile.TemporaryDirectory() as tmp:
        pre = quantization.preprocess(src, Path(tmp) / "pre.onnx")
        quantization.quantize(pre, dst, quantization.DEFAULT)


# ----------------------------------------------------------------------------------------------- fp16

# Held to this max abs diff against the masked fp32 PyTorch model (logits or last_hidden_state), on the CPU EP.
# Measured worst over the parity inputs (onnxruntime 1.32, CPU EP): 5e-5 to 2.6e-3 on the tiny test models,
# 3.3e-3 on the default (MiniLM + 8 adapters + fusion, MRPC logits); 1e-2 leaves a 3x margin over the worst.
FP16_TOLERANCE = 1e-2
# Kept fp32 on top of onnxruntime's DEFAULT_OP_BLOCK_LIST (ML ops, Range, CumSum, TopK, Min/Max...): none. The
# ops of our graphs are fine in fp16 where it matters (GPU): LayerNormalization and EmbedLayerNormalization
# compute mean and variance in fp32 (stash_type 1), CUDA's Softmax and fused Attention accumulate in fp32, and
# the converter clamps constants (the -3.4e38 of the unfused attention mask) to fp16's +-65504. Blocking
# LayerNormalization and Softmax too moved the worst diff by at most 1.1e-3 (default: 3.3e-3 -> 2.1e-3) for 17-48
# more Cast nodes in the file. On the CPU EP most of these ops (the fused Attention, EmbedLayerNormalization...)
# have no fp16 kernel: onnxruntime inserts Casts at load and runs them in fp32 (70 Casts in 692 nodes on the
# default; CPU latency within noise of fp32's), so fp16 is a GPU format: half the disk, not a CPU speed-up.
FP16_EXTRA_BLOCKED: tuple = ()


@register_variant("fp16")
class Fp16(Variant):
    """onnxruntime's float16 conversion with fp32 inputs and outputs (`--variant fp16`), for GPUs."""

    file = "model.fp16.onnx"
    title = "fp16 (onnxruntime float16 conversion, fp32 inputs and outputs)"
    tolerance = FP16_TOLERANCE
    scored = True

    def build(self, deploy, dst):
        return write_fp16(deploy, dst)

    def summary(self, entry, sizes):
        dense, half = sizes["model.onnx"], sizes[self.file]
        extra = entry["op_block_list_extra"]
        blocked = f"onnxruntime's default block list plus {', '.join(extra)}" if extra else (
            "onnxruntime's default block list only (no op of our graphs is on it)")
        return [f"`{self.file}`: {mb(half)} ({dense / half:.2f}x smaller than `model.onnx`); "
                f"{entry['fp16_initializers']} of {entry['initializers']} initializers fp16, inputs and outputs "
                f"fp32. Ops kept fp32: {blocked}. Parity on "
                f"{entry['provider']}: max abs diff {entry['max_abs_diff']:.3e} against the masked PyTorch model, "
                f"{entry['rule']}.",
                "", "A GPU format: the CPU execution provider lacks fp16 kernels for most of these ops, so "
                "onnxruntime casts around them and runs them in fp32 there; measure it with "
                "`compress bench --provider cuda`."]


def write_fp16(src: Path, dst: Path, extra_blocked=FP16_EXTRA_BLOCKED) -> dict:
    """onnxruntime's transformer-model fp16 conversion (`OnnxModel.convert_float_to_float16`: types from
    symbolic shape inference, which knows the contrib ops) with fp32 graph inputs and outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(extra_blocked))
    inits = model.model.graph.initializer
    big = sum(t.ByteSize() for t in inits) > 2 ** 31
    model.save_model_to_file(str(dst), use_external_data_format=big)
    return dict(initializers=len(inits), fp16_initializers=sum(t.data_type == onnx.TensorProto.FLOAT16 for t in inits),
                op_block_list_extra=list(extra_blocked))


# ----------------------------------------------------------------------------------------------- sparse

# fp32 values (4 bytes) plus one int64 linear index (8 bytes) per non-zero: sparse storage is smaller only
# below a density of 4 / (4 + 8) = 1/3.
VALUE_BYTES, INDEX_BYTES = 4, 8
BREAK_EVEN_DENSITY = VALUE_BYTES / (VALUE_BYTES + INDEX_BYTES)
MIN_ELEMENTS = 256  # small tensors (biases, norms) are not worth an index


@register_variant("sparse")
class Sparse(Variant):
    """Weights pruned by `--sparsity weights=...` stored as sparse initializers (`--sparse`): disk size only."""

    file = "model.sparse.onnx"
    title = "Sparse initializers"

    def build(self, deploy, dst):
        info = write_sparse(deploy, dst)
        if not info["tensors"]:  # nothing below break-even: a copy of the dense graph would only mislead
            dst.unlink()
        return info

    def summary(self, entry, sizes):
        if entry["file"] is None:
            return [f"No `{self.file}` written: no weight tensor is below the break-even density "
                    f"{entry['break_even_density']:.3f} (fp32 values with int64 indices). Prune single weights "
                    "(`--sparsity weights=...`) to leave zeros that compaction cannot remove."]
        dense, sp = sizes["model.onnx"], sizes[self.file]
        density = entry["nonzero"] / entry["elements"] if entry["elements"] else float("nan")
        return [f"`{self.file}`: {mb(sp)} against {mb(dense)} dense ({dense / sp:.2f}x). "
                f"{len(entry['tensors'])} weight tensors stored sparse ({entry['nonzero']:,} non-zeros of "
                f"{entry['elements']:,}, density {density:.3f}). Break-even density: "
                f"{entry['break_even_density']:.3f} (fp32 values with int64 indices); denser tensors stay dense.",
                "", "This is a disk-size format, not a speed format: onnxruntime densifies sparse initializers "
                "when it loads the model, so latency and memory at run time equal the dense graph's."]


def write_sparse(src: Path, dst: Path) -> dict:
    """Copy `src` with every fp32 initializer whose density is below break-even stored as a sparse initializer.
    Returns what was converted: tensors, their elements and non-zeros, and the break-even density."""
    model = onnx.load(str(src))
    graph = model.graph
    keep, converted, total, nonzero = [], [], 0, 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init) if init.data_type == onnx.TensorProto.FLOAT else None
        if array is None or array.size < MIN_ELEMENTS:
            keep.append(init)
            continue
        flat = array.reshape(-1)
        idx = np.flatnonzero(flat)
        if idx.size / flat.size >= BREAK_EVEN_DENSITY:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[idx].astype(np.float32), init.name)
        indices = numpy_helper.from_array(idx.astype(np.int64), f"{init.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        converted.append(dict(name=init.name, elements=int(flat.size), nonzero=int(idx.size)))
        total += flat.size
        nonzero += idx.size
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(dst))
    return dict(tensors=converted, elements=int(total), nonzero=int(nonzero),
                break_even_density=BREAK_EVEN_DENSITY)
