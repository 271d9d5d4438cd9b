"""int8 quantization of the optimised fp32 graph, and the measurements that choose it (exporters/variants.py's
`int8` and `int8-static` variants).

Schemes (onnxruntime.quantization): dynamic (int8 weights, activations quantized per batch at run time: MatMul,
the fused Attention, the embedding Gathers) and static (QDQ, activations quantized with ranges calibrated on task
texts: weight-constant MatMuls and Gemms only, uint8 activations with int8 weights, the CPU recommendation on
VNNI machines), each per-tensor or per-channel.

Everything is measured against the fp32 graph on a fidelity sample (task texts disjoint from the calibration
ones): `mean_kl` (KL(fp32 || int8), nats, compressor.evaluation) is the cost, `agreement` of predicted labels
the check. `sensitivity` measures the cost of quantizing each unit alone (a layer's attention / FFN in / FFN
out / adapters / fusion, or each node), so that the k most costly stay fp32 (`nodes_to_exclude`); `search`
tries the schemes, then fp32 fallbacks of the least costly, and keeps the first candidate within the bounds.

Where the texts come from: the export (compressor/api.py) sets an `Int8Setup` with `int8_setup(...)` around
`export_onnx`; the variants read it with `current()`. Without one, `int8` is today's dynamic per-tensor graph.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import onnx

from compressor.errors import ExportError
from compressor.modeling.descriptions import DESCRIPTIONS

from . import graph_io
from .runtime import make_session, release_memory

CALIBRATION_EXAMPLES = 128  # --calibration-examples: texts the static ranges are calibrated on
FIDELITY_EXAMPLES = 256  # texts (after the calibration ones) every candidate is measured on
BATCH = 16
# the automatic fp32 fallback stops once the int8 graph is this close to fp32 (a third of dynamic per-channel's
# KL on the default, whose agreement was 0.988: benchmarks/results/int8.md), or after MAX_KEPT units
KL_BOUND = 1e-3
AGREEMENT_BOUND = 0.99
MAX_KEPT = 4
# ... or once one more unit kept fp32 lowers the cost by less than this fraction: on the default the 3rd and 4th
# FFN kept fp32 bought nothing (KL 1.73e-3 with two, 1.98e-3 / 1.68e-3 with three / four) and cost speed
MIN_GAIN = 0.1
STATIC_OPS = ("MatMul", "Gemm")
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization", "Gather")


@dataclass(frozen=True)
class Scheme:
    kind: str  # "dynamic" or "static"
    per_channel: bool = False

    @property
    def name(self) -> str:
        return self.kind + ("-per-channel" if self.per_channel else "")


DYNAMIC, STATIC = Scheme("dynamic"), Scheme("static")
SCHEMES = (DYNAMIC, Scheme("dynamic", True), STATIC, Scheme("static", True))
STATIC_SCHEMES = SCHEMES[2:]
DEFAULT = DYNAMIC  # `int8` without --data


@dataclass
class Int8Setup:
    """What the int8 variants are calibrated and measured on: batches of model inputs (dicts of int64 arrays,
    every input the tokenizer gives; a graph takes the ones it declares) and where they came from."""

    calibration: List[dict] = field(default_factory=list)
    fidelity: List[dict] = field(default_factory=list)
    source: str = ""
    search: bool = False  # `int8`: choose among SCHEMES by measured fidelity (the export has --data)
    keep: Optional[int] = None  # units kept fp32; None: the fewest (<= MAX_KEPT) that meet the bounds
    calibration_examples: int = CALIBRATION_EXAMPLES  # for the packaged sample, when there are no batches
    max_length: int = 128  # for the packaged sample: the model's positions when fewer
    progress: Optional[Callable[[str], None]] = None

    def __post_init__(self):
        if self.keep is not None and self.keep < 0:
            raise ExportError(f"--int8-keep-fp32 must be 0 or more, got {self.keep}")
        if self.calibration_examples < 1:
            raise ExportError(f"--calibration-examples must be at least 1, got {self.calibration_examples}")


_SETUP: ContextVar[Optional[Int8Setup]] = ContextVar("int8_setup", default=None)


@contextlib.contextmanager
def int8_setup(setup: Optional[Int8Setup]):
    token = _SETUP.set(setup)
    try:
        yield setup
    finally:
        _SETUP.reset(token)


def current() -> Optional[Int8Setup]:
    return _SETUP.get()


def batches_of(examples, tokenizer, max_length: int, batch_size: int = BATCH) -> List[dict]:
    """Task examples (data.Example) tokenised and padded per batch, as numpy feeds."""
    from torch.utils.data import DataLoader

    from compressor.data import TokenizedDataset, collate

    loader = DataLoader(TokenizedDataset(examples, tokenizer, max_length), batch_size=batch_size, shuffle=False,
                        collate_fn=collate(tokenizer))
    return [{k: v.numpy().astype(np.int64) for k, v in b.items() if k != "labels"} for b in loader]


def setup_from_examples(examples, tokenizer, max_length: int, source: str, calibration_examples: int =
                        CALIBRATION_EXAMPLES, fidelity_examples: int = FIDELITY_EXAMPLES, **kw) -> Int8Setup:
    """The first `calibration_examples` rows calibrate, the next `fidelity_examples` measure; a task with fewer
    rows than that calibrates on its first half and measures on the second (small tasks keep int8's search)."""
    Int8Setup(calibration_examples=calibration_examples)  # checks it
    examples = list(examples)
    if len(examples) < 2:
        raise ExportError(f"{source} has {len(examples)} row(s): int8's search needs rows to calibrate on and "
                          "others to measure on; give a task with more training rows, or leave out --data")
    n_cal = min(calibration_examples, len(examples) // 2)
    cal = examples[:n_cal]
    fid = examples[n_cal:n_cal + fidelity_examples]
    return Int8Setup(batches_of(cal, tokenizer, max_length), batches_of(fid, tokenizer, max_length),
                     f"{source} ({len(cal)} calibration rows, the next {len(fid)} to measure)",
                     calibration_examples=calibration_examples, **kw)


def packaged_setup(tokenizer_dir: Path, max_length: int = 128, **kw) -> Int8Setup:
    """Calibration texts when the export has no --data: the packaged MRPC training sample
    (compressor/default_data), tokenised with the export's tokenizer."""
    from transformers import AutoTokenizer

    from compressor.data import load_data

    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        raise ExportError("int8-static needs calibration texts and a tokenizer: give --data (and --tokenizer if "
                          "the model directory has none)")
    data = load_data("glue:mrpc", data_dir=Path(__file__).parents[1] / "compressor" / "default_data")
    return setup_from_examples(data.train, AutoTokenizer.from_pretrained(str(tokenizer_dir)), max_length,
                               "the packaged MRPC training sample", **kw)


# ----------------------------------------------------------------------------------------------- quantize

def preprocess(src: Path, dst: Path) -> Path:
    """What `quant_pre_process(skip_optimization=True, skip_symbolic_shape=True)` does (onnx shape inference at
    quantization, and its metadata tag), without its in-memory copies: the graph is read one tensor at a time with
    its weights moved to external data (graph_io.split_weights, onnx.save_model's rule), so that no step holds the
    weights and the shape inference each quantization runs reads none, tagged, and its contrib-op outputs typed
    (type_contrib_outputs). Symbolic shape inference is skipped: it gives up on the sequence axis of our graphs."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    graph_only = graph_io.split_weights(src, Path(dst).parent / (Path(dst).name + ".data"))
    add_pre_process_metadata(graph_only)
    type_contrib_outputs(graph_only)
    onnx.save_model(graph_only, str(dst))
    return dst


# contrib-op outputs that are not float (onnxruntime's contrib op schemas); every other one is float in our graphs
_NOT_FLOAT = {("EmbedLayerNormalization", 1): onnx.TensorProto.INT32}


def type_contrib_outputs(model) -> None:
    """Declare the element type of contrib-op outputs (fused Attention, BiasGelu, EmbedLayerNormalization...),
    which onnx's shape inference leaves untyped, and with them everything downstream: without a type the static
    quantizer skips a tensor ("failed to infer the type"), leaving most MatMuls of the graph fp32."""
    from onnx import helper

    graph = model.graph
    typed = {v.name for v in graph.value_info} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        if node.domain != "com.microsoft":
            continue
        for i, out in enumerate(node.output):
            if out and out not in typed:
                elem = _NOT_FLOAT.get((node.op_type, i), onnx.TensorProto.FLOAT)
                graph.value_info.append(helper.make_tensor_value_info(out, elem, None))
    inferred = onnx.shape_inference.infer_shapes(model)  # downstream of the declared types
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)


class _Reader:
    """onnxruntime's CalibrationDataReader over fixed batches, feeding only the graph's inputs."""

    def __init__(self, batches, names):
        self.batches, self.names, self.i = batches, names, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {k: v for k, v in self.batches[self.i - 1].items() if k in self.names}

    def __len__(self):
        return len(self.batches)


def input_names(path: Path) -> set:
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def quantize(pre: Path, dst: Path, scheme: Scheme, setup: Optional[Int8Setup] = None, exclude: Sequence[str] = (),
             only: Optional[Sequence[str]] = None, cache: Optional[Path] = None) -> Path:
    """Write `dst`: the pre-processed graph `pre` quantized by `scheme`, the nodes `exclude` left fp32 (or only
    the nodes `only` quantized). Static schemes calibrate on `setup.calibration` once per `cache` file."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    # onnx's shape inference types no output of contrib ops (fused Attention): everything here is fp32
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    common = dict(per_channel=scheme.per_channel, nodes_to_exclude=list(exclude), nodes_to_quantize=list(only or []))
    if scheme.kind == "dynamic":
        return _quantize_dynamic(pre, dst, dict(weight_type=QuantType.QInt8, extra_options=extra, **common))
    if setup is None or not setup.calibration:
        raise ExportError("static int8 needs calibration texts: give --data (or a tokenizer for the packaged sample)")
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(setup.calibration, input_names(pre))
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=list(STATIC_OPS),
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                    extra_options=dict(extra, MatMulConstBOnly=True), **common)
    return dst


def _quantize_dynamic(pre: Path, dst: Path, options: dict) -> Path:
    """`quantize_dynamic(pre, dst, **options)`, the fp32 weights left on disk (`weights_stay_on_disk`): the
    quantizer writes its graph beside `pre` (int8 weights inline, fp32 ones still pointing into `pre`'s external
    data), which is then written to `dst` self-contained one tensor at a time (graph_io.write_model)."""
    from onnxruntime.quantization import quantize_dynamic

    pre, dst = Path(pre).resolve(), Path(dst).resolve()
    if not hooks_available():  # another onnxruntime: its own loading (same graph, fp32 weights in memory)
        quantize_dynamic(str(pre), str(dst), **options)
        return dst
    tmp = pre.parent / f".{dst.name}.quantized.onnx"
    try:
        with weights_stay_on_disk(pre.parent):
            quantize_dynamic(str(pre), str(tmp), **options)
        release_memory()
        graph_io.write_model(onnx.load(str(tmp), load_external_data=False), dst, base_dir=pre.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# where onnxruntime.quantization loads a graph with its weights: quantize_dynamic's first load (onnx shape
# inference through a file, then `onnx.load`) and the dynamic ONNXQuantizer's re-inference (a deep copy saved with
# external data and loaded back), 2-3 copies of the fp32 weights at once (benchmarks/results/export_memory.md)
_LOAD, _RELOAD = "load_model_with_shape_infer", "save_and_reload_model_with_shape_infer"
_HOOKED_MODULES = ("quantize", "onnx_quantizer", "base_quantizer", "quant_utils")


def _quant_modules() -> dict:
    import importlib

    return {m: importlib.import_module(f"onnxruntime.quantization.{m}") for m in _HOOKED_MODULES}


def hooks_available() -> bool:
    """Whether this onnxruntime loads graphs where `weights_stay_on_disk` replaces the loading."""
    mods = _quant_modules()
    return hasattr(mods["quantize"], _LOAD) and hasattr(mods["onnx_quantizer"], _RELOAD)


@contextlib.contextmanager
def weights_stay_on_disk(directory: Path):
    """While active, onnxruntime's quantizer runs on graphs whose large initializers stay external data in
    `directory`: its two loading steps infer shapes exactly as before but load no weights, and each weight is read
    from disk when the quantizer asks for its values (`numpy_helper.to_array` reads external data relative to the
    working directory and leaves the tensor as it was). Same graph out; in memory only the graph, one fp32 tensor
    at a time and the int8 weights."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata, generate_identified_filename

    def load(model_path):  # quant_utils.load_model_with_shape_infer without load_external_data
        inferred = generate_identified_filename(Path(model_path), "-inferred")
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        add_infer_metadata(model)
        inferred.unlink()
        return model

    def reload(model):  # save_and_reload_model_with_shape_infer: the large tensors are external already
        inferred = onnx.shape_inference.infer_shapes(model)
        add_infer_metadata(inferred)
        return inferred

    saved = []
    try:
        for module in _quant_modules().values():
            for name, hook in ((_LOAD, load), (_RELOAD, reload)):
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, hook)
        with graph_io.lazy_external_data(directory):
            yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


# ----------------------------------------------------------------------------------------------- measure

def logits_of(path: Path, batches: Iterable[dict]) -> np.ndarray:
    session = make_session(path, "cpu")
    names = {i.name for i in session.get_inputs()}
    out = [session.run(None, {k: v for k, v in b.items() if k in names})[0] for b in batches]
    del session
    release_memory()
    return np.concatenate(out)


def fidelity(ref: np.ndarray, cand: np.ndarray) -> dict:
    """How far the candidate's outputs are from fp32's: `cost` is the mean KL for logits ([rows, classes]),
    else the mean squared error relative to the reference's mean square (hidden states)."""
    from compressor.evaluation import agreement, mean_kl

    diff = float(np.abs(ref - cand).max()) if ref.size else 0.0
    if ref.ndim == 2 and ref.shape[1] > 1:
        kl = mean_kl(ref, cand)
        return dict(cost=kl, mean_kl=kl, agreement=agreement(ref.argmax(-1), cand.argmax(-1)), max_abs_diff=diff)
    rel = float(((ref - cand) ** 2).mean() / max(float((ref ** 2).mean()), 1e-12))
    return dict(cost=rel, relative_mse=rel, agreement=None, max_abs_diff=diff)


def meets(fid: dict) -> bool:
    ok = fid["cost"] <= KL_BOUND
    return ok and (fid["agreement"] is None or fid["agreement"] >= AGREEMENT_BOUND)


# ----------------------------------------------------------------------------------------------- units

_LAYER = re.compile(r"layer\.(\d+)/")
# scope prefixes of the FFN's first projection, one per model type (BERT: intermediate/, DistilBERT: ffn/)
_FFN_IN = tuple(sorted({d.ffn.replace(".", "/") + "/" for d in DESCRIPTIONS.values()}))


def unit_of(name: str, attention_layer: dict) -> str:
    """The unit a quantizable node belongs to: 'layer N attention|ffn in|ffn out|adapters|fusion', 'embeddings'
    or 'head'."""
    if name in attention_layer:
        return f"layer {attention_layer[name]} attention"
    m = _LAYER.search(name)
    if m is None:
        return "embeddings" if "embed" in name.lower() else "head"
    rest = name[m.end():]
    # the FFN's two MatMuls apart: the second reads the wide, long-tailed GELU output and costs ~5x the first
    part = ("adapters" if "adapter_" in rest else "fusion" if "," in rest or "score_proj" in rest else
            "attention" if rest.startswith("attention") else "ffn in" if rest.startswith(_FFN_IN) else
            "ffn out")
    return f"layer {m.group(1)} {part}"


def units(path: Path, scheme: Scheme, by: str = "unit") -> dict:
    """{unit: [node names]} of the nodes `scheme` quantizes (weight-constant ones), in graph order; `by="node"`:
    one unit per node."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    ops = STATIC_OPS if scheme.kind == "static" else DYNAMIC_OPS
    consumers = {i: n for n in graph.node for i in n.input}
    attention_layer = {}
    for n in graph.node:  # the fused Attention's layer: from the scope of the MatMul that consumes its output
        if n.op_type == "Attention" and n.output[0] in consumers:
            m = _LAYER.search(consumers[n.output[0]].name)
            attention_layer[n.name] = m.group(1) if m else "?"
    found = {}
    for n in graph.node:
        if n.op_type in ops and any(i in inits for i in n.input):  # a weight: what int8 stores
            found.setdefault(n.name if by == "node" else unit_of(n.name, attention_layer), []).append(n.name)
    return found


# ----------------------------------------------------------------------------------------------- choose

class Workspace:
    """A temporary directory holding the pre-processed graph, the fp32 reference outputs and calibration caches."""

    def __init__(self, deploy: Path, setup: Int8Setup, progress=None):
        self.tmp = Path(tempfile.mkdtemp(prefix="int8-"))
        self.setup, self.say = setup, progress or (lambda _m: None)
        self.pre = preprocess(deploy, self.tmp / "pre.onnx")
        self.ref = logits_of(deploy, setup.fidelity)
        self.n = 0

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cache(self, scheme: Scheme) -> Path:
        return self.tmp / f"calibration-{scheme.kind}.json"  # ranges do not depend on per-channel

    def measure(self, scheme: Scheme, exclude=(), only=None) -> tuple:
        """(fidelity, path) of one quantized candidate."""
        self.n += 1
        dst = quantize(self.pre, self.tmp / f"cand{self.n}.onnx", scheme, self.setup, exclude, only,
                       self.cache(scheme))
        return fidelity(self.ref, logits_of(dst, self.setup.fidelity)), dst


def sensitivity(ws: Workspace, scheme: Scheme, by: str = "unit") -> list:
    """Each unit quantized alone: [{unit, nodes, cost, agreement}], most costly first."""
    rows = []
    groups = units(ws.pre, scheme, by)
    for i, (unit, nodes) in enumerate(groups.items()):
        ws.say(f"int8 sensitivity: {unit} ({i + 1}/{len(groups)})")
        fid, path = ws.measure(scheme, only=nodes)
        path.unlink()
        rows.append(dict(unit=unit, nodes=nodes, cost=fid["cost"], agreement=fid["agreement"]))
    return sorted(rows, key=lambda r: -r["cost"])


def search(deploy: Path, dst: Path, setup: Int8Setup, schemes: Sequence[Scheme] = SCHEMES, by: str = "unit",
           progress=None) -> dict:
    """Quantize `deploy` by each scheme (in SCHEMES order: fastest first); unless one meets KL_BOUND and
    AGREEMENT_BOUND, rank the units of the least costly by sensitivity and keep the costliest fp32, one more at a
    time until the bounds are met, one more gains less than MIN_GAIN, or MAX_KEPT (`setup.keep`: exactly that
    many). The winner, written to
    `dst`, is the first candidate that meets the bounds, else the least costly (with `setup.keep`, the one with
    those units fp32). Returns the record export.md shows: every candidate's fidelity, the winner, the ranking
    and the units kept fp32."""
    ws = Workspace(deploy, setup, progress)
    try:
        cands = []
        for scheme in schemes:
            ws.say(f"int8 candidate {scheme.name}")
            fid, path = ws.measure(scheme)
            cands.append(dict(name=scheme.name, scheme=scheme, kept=[], path=path, **fid))
        best = min(cands, key=lambda c: c["cost"])
        needed = setup.keep if setup.keep is not None else not any(meets(c) for c in cands)
        ranking = sensitivity(ws, best["scheme"], by) if needed else []
        ks = range(1, min(MAX_KEPT, len(ranking)) + 1) if setup.keep is None else [min(setup.keep, len(ranking))]
        last = best
        for k in ks:
            if k == 0 or (setup.keep is None and (meets(last) or last is not best and gain < MIN_GAIN)):
                break  # auto: the fewest units that meet the bounds, while each one more still pays
            ws.say(f"int8 {best['name']} with {k} unit(s) fp32")
            fid, path = ws.measure(best["scheme"], exclude=[n for r in ranking[:k] for n in r["nodes"]])
            gain = 1 - fid["cost"] / last["cost"] if last["cost"] > 0 else 0.0
            last = dict(name=f"{best['name']} + {k} fp32", scheme=best["scheme"],
                        kept=[r["unit"] for r in ranking[:k]], path=path, **fid)
            cands.append(last)
        least = min(cands, key=lambda c: c["cost"])
        if setup.keep:  # by option: the k costliest units fp32, whatever they measure
            win, choice = (cands[-1] if cands[-1]["kept"] else best), "units kept fp32 by --int8-keep-fp32"
        else:  # fp32 fallbacks only when needed: the first that meets the bounds, else the least costly
            win = next((c for c in cands if meets(c)), least)
            choice = "the first within the bounds" if meets(win) else "none within the bounds: the least costly"
        shutil.move(str(win["path"]), str(dst))  # quantized graphs are written whole (no external data)
        strip = ("scheme", "path")
        return dict(scheme=win["scheme"].name, kept_fp32=[dict(unit=r["unit"], nodes=r["nodes"], cost=r["cost"])
                                                            for r in ranking if r["unit"] in win["kept"]],
                    fidelity={k: win[k] for k in ("cost", "agreement", "max_abs_diff")},
                    candidates=[{k: v for k, v in c.items() if k not in strip} for c in cands],
                    winner=win["name"], choice=choice, least_costly=least["name"],
                    baseline=cands[0]["name"], baseline_cost=cands[0]["cost"],
                    sensitivity=[{k: r[k] for k in ("unit", "cost", "agreement")} for r in ranking],
                    source=setup.source, bounds=dict(kl=KL_BOUND, agreement=AGREEMENT_BOUND, max_kept=MAX_KEPT,
                                                     min_gain=MIN_GAIN))
    finally:
        ws.close()
