"""Extra files beside the deploy graph: sparse initializers (disk size) and int8 dynamic quantization (speed).

Both start from the optimised dense graph. Sparse comes last and stays a separate file: onnxruntime's
optimizer and `quantize_dynamic` do not accept sparse initializers, and onnxruntime densifies them at load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# fp32 values (4 bytes) plus one int64 linear index (8 bytes) per non-zero: sparse storage is smaller only
# below a density of 4 / (4 + 8) = 1/3.
VALUE_BYTES, INDEX_BYTES = 4, 8
BREAK_EVEN_DENSITY = VALUE_BYTES / (VALUE_BYTES + INDEX_BYTES)
MIN_ELEMENTS = 256  # small tensors (biases, norms) are not worth an index


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


def write_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization of the optimised graph: pre-process (shape inference), then
    `quantize_dynamic` with int8 weights (MatMul, fused Attention, Gather of embeddings). Symbolic shape
    inference is skipped: it gives up on the sequence axis of our graphs; onnx's own inference suffices for
    dynamic quantization, which needs no activation ranges."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # the graph is already optimised by the transformer optimizer; re-optimising would undo nothing useful
        quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        # onnx's shape inference types no output of contrib ops (fused Attention): everything here is fp32
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
