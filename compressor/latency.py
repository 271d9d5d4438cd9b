"""Latency model: the predicted latency of a model compacted under masks, on one provider and input shape.

In the spirit of Kwon et al.'s per-layer lookup tables. For each distinct layer (its manifest entry: heads, FFN
width, adapters and fusions), a ONE-layer copy of the model is compacted and timed at a few kept counts per kind,
each kind varied with the others dense: heads, FFN neurons, and per adapter site the fused adapters kept and the
total bottleneck width. The model is additive and piecewise linear: latency = fixed + sum over layers of (the
dense one-layer latency - fixed + the kinds' deltas at their kept counts). The fixed part (embeddings, pooler,
head) is timed as a copy with no encoder layer. All configurations are timed interleaved (exporters/bench.py), and
each is kept as its per-round ratio to the dense one-layer graph (median over rounds) times that graph's median: load
that comes and goes cancels in the ratios, which is what a speedup is. Within a round a configuration counts by
its fastest run (load only adds time; the differences measured are small against the noise of a shared machine).

The copies' word embeddings are cut to 1024 rows (a gather costs the same at any vocabulary size; the graphs
export faster and several sessions fit in memory). Counts below 1 (min_keep 0) extrapolate the first segment.

Providers: `cpu` (a plain onnxruntime `InferenceSession` of the exported, optimised graph), `cuda` (the CUDA EP),
`torch-cpu` and `torch-cuda` (PyTorch eager on the compacted model). Tables are cached as JSON under
`cache_root()/latency`, keyed by the architecture signature and the machine fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import PruningConfigError, ProviderUnavailableError
from .modeling.architecture import encoder_of, layer_parts, layers_of
from .modeling.descriptions import describe, set_submodule, submodule
from .units import active_adapter_names, unit_key

PROVIDERS = ("cpu", "cuda", "torch-cpu", "torch-cuda")
SITES = ("mh_adapter", "output_adapter")
VOCAB = 1024
VERSION = 2


def parse_shape(shape) -> tuple:
    """'1x128' -> (1, 128), or a one-line error."""
    if isinstance(shape, (tuple, list)) and len(shape) == 2:
        b, s = shape
    else:
        parts = str(shape).lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise PruningConfigError(f"shape '{shape}' is not BxS (batch x sequence length), e.g. 1x128")
        b, s = parts
    b, s = int(b), int(s)
    if b < 1 or s < 1:
        raise PruningConfigError(f"shape '{shape}': batch and sequence length must be >= 1, e.g. 1x128")
    return b, s


def check_provider(on: str) -> str:
    """`on` if known and available here, else a one-line error."""
    on = str(on).strip().lower()
    if on not in PROVIDERS:
        raise PruningConfigError(f"unknown provider '{on}' for the latency model; choose one of {', '.join(PROVIDERS)}")
    if on == "torch-cuda" and not torch.cuda.is_available():
        raise ProviderUnavailableError("torch-cuda: PyTorch sees no CUDA device here; use --on cpu or torch-cpu")
    if on in ("cpu", "cuda"):
        from exporters.runtime import check_provider as ort_check

        ort_check(on)
    return on


# ----------------------------------------------------------------------------------------------- kept counts

def _paths(model: nn.Module) -> dict:
    return {id(m): p for p, m in model.named_modules()}


def _kept(masks: dict, key: str, n: int, first: Optional[int] = None) -> torch.Tensor:
    m = masks.get(key)
    return torch.ones(n, dtype=torch.bool) if m is None else m.flatten().bool()


def layer_counts(model: nn.Module, masks: Optional[dict] = None) -> list:
    """Per layer the kept counts the latency model reads: heads, neurons, and per adapter site
    `SITE:adapters` (fused adapters kept) and `SITE:width` (bottleneck neurons of the kept adapters)."""
    masks = masks or {}
    paths = _paths(model)
    out = []
    for layer in layer_parts(model):
        att, ffn = layer.attention, layer.ffn
        c = dict(heads=int(_kept(masks, unit_key(paths[id(att)], "heads"), att.num_attention_heads).sum()),
                 neurons=int(_kept(masks, unit_key(paths[id(ffn)], "neurons"), ffn.dense.out_features).sum()))
        for sname, site in layer.sites:
            names = active_adapter_names(site)
            if not names:
                continue
            spath = paths[id(site)]
            kept = names
            for fuse in site.active.fuses():  # a fused adapter pruned from its fusion does not run
                fkey = unit_key(f"{spath}.adapter_fusion_layer.{fuse.name}", "adapters")
                km = _kept(masks, fkey, len(fuse.names))
                gone = {n for n, k in zip(fuse.names, km.tolist()) if not k}
                kept = [n for n in kept if n not in gone]
                c[f"{sname}:adapters"] = c.get(f"{sname}:adapters", 0) + len(fuse.names) - len(gone)
            c[f"{sname}:width"] = sum(int(_kept(masks, unit_key(f"{spath}.adapters.{n}", "bottleneck"),
                                                site.adapters[n].width).sum()) for n in kept)
        out.append(c)
    return out


def _signature(model: nn.Module, i: int) -> str:
    spec = model.compress_manifest["layers"][i]
    return hashlib.sha256(json.dumps([model.base_model.config.hidden_size, spec], sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def architecture_signature(model: nn.Module) -> str:
    config = model.base_model.config
    payload = dict(cls=type(model).__name__, type=config.model_type, hidden=config.hidden_size,
                   act=str(getattr(config, "hidden_act", "")), manifest=model.compress_manifest,
                   head=getattr(model, "active_head", None))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_fingerprint(on: str, shape: tuple) -> dict:
    import onnxruntime as ort

    processor = platform.processor()
    if not processor and Path("/proc/cpuinfo").is_file():
        processor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
    info = dict(processor=processor, machine=platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), onnxruntime=ort.__version__, torch=torch.__version__,
                provider=on, shape=list(shape))
    if on.endswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


# ----------------------------------------------------------------------------------------------- the model

def _interp(curve: dict, x: float) -> float:
    """Piecewise-linear in the kept count; linear extrapolation of the end segments."""
    xs, ys = curve["counts"], curve["delta_ms"]
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        return ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if x >= xs[-1]:
        return ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(np.interp(x, xs, ys))


@dataclass
class LatencyModel:
    table: dict  # JSON: key, fingerprint, fixed_ms, layers (signature per layer), tables (signature -> curves)

    @property
    def key(self) -> str:
        return self.table["key"]

    def delta(self, layer: int, kind: str, count: float) -> float:
        curve = self.table["tables"][self.table["layers"][layer]]["curves"].get(kind)
        return 0.0 if curve is None else _interp(curve, count)

    def latency_ms(self, counts: list) -> float:
        fixed = self.table["fixed_ms"]
        total = fixed
        for i, c in enumerate(counts):  # a layer costs no less than nothing (the deltas add up measurement noise)
            total += max(0.0, self.table["tables"][self.table["layers"][i]]["dense_ms"] - fixed
                         + sum(self.delta(i, kind, n) for kind, n in c.items()))
        return total

    def dense_ms(self) -> float:
        t = self.table
        return t["fixed_ms"] + sum(t["tables"][s]["dense_ms"] - t["fixed_ms"] for s in t["layers"])

    def predict(self, model: nn.Module, masks: Optional[dict] = None) -> dict:
        """Predicted latency (ms) of `model` compacted under `masks` and the speedup over the dense model."""
        ms, dense = self.latency_ms(layer_counts(model, masks)), self.dense_ms()
        return dict(latency_ms=ms, dense_ms=dense, speedup=dense / ms if ms > 0 else float("inf"))


# ----------------------------------------------------------------------------------------------- building

def _sub_model(model: nn.Module, layers: list) -> nn.Module:
    """A copy of `model` with only the encoder layers `layers` (copies), the word embeddings cut to VOCAB rows."""
    enc = encoder_of(model)
    path = describe(enc.config).layers
    full = submodule(enc, path)
    manifest = model.compress_manifest
    emb = enc.embeddings.word_embeddings
    small = nn.Embedding(min(VOCAB, emb.num_embeddings), emb.embedding_dim)
    with torch.no_grad():
        small.weight.copy_(emb.weight[:small.num_embeddings])
    set_submodule(enc, path, nn.ModuleList())
    enc.embeddings.word_embeddings = nn.Embedding(1, 1)
    try:
        sub = copy.deepcopy(model)
    finally:
        set_submodule(enc, path, full)
        enc.embeddings.word_embeddings = emb
    sub_enc = encoder_of(sub)
    set_submodule(sub_enc, path, nn.ModuleList([copy.deepcopy(full[i]) for i in layers]))
    sub_enc.embeddings.word_embeddings = small
    sub_enc.config.num_hidden_layers, sub_enc.config.vocab_size = len(layers), small.num_embeddings
    sub.compress_manifest = copy.deepcopy(dict(manifest, layers=[manifest["layers"][i] for i in layers]))
    return sub.eval()


def _first(n: int, k: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[:k] = True
    return m


def _points(n: int) -> list:
    """Kept counts timed for a group of n: all of them up to 5, else 1, n/4, n/2, 3n/4, n."""
    if n <= 5:
        return list(range(1, n + 1))
    return sorted({1, -(-n // 4), -(-n // 2), -(-3 * n // 4), n})


def _configurations(sub: nn.Module) -> list:
    """(kind, count, masks) for the one-layer copy `sub`: each kind varied with the others dense."""
    layer = layer_parts(sub)[0]
    paths = _paths(sub)
    att, ffn = layer.attention, layer.ffn
    out = [("dense", None, {})]
    for kind, module, n in (("heads", att, att.num_attention_heads), ("neurons", ffn, ffn.dense.out_features)):
        key = unit_key(paths[id(module)], kind)
        out += [(kind, k, {key: _first(n, k)}) for k in _points(n)[:-1]]
    for sname, site in layer.sites:
        names = active_adapter_names(site)
        if not names:
            continue
        spath = paths[id(site)]
        widths = [site.adapters[n].width for n in names]
        for fuse in site.active.fuses():
            if len(fuse.names) > 1:
                fkey = unit_key(f"{spath}.adapter_fusion_layer.{fuse.name}", "adapters")
                n = len(fuse.names)
                out += [(f"{sname}:adapters", k, {fkey: _first(n, k)}) for k in _points(n)[:-1]]
        for frac in (0.25, 0.5, 0.75):  # every adapter of the site at the same share of its width
            kept = [max(1, round(frac * w)) for w in widths]
            if kept != widths:
                out.append((f"{sname}:width", sum(kept), {unit_key(f"{spath}.adapters.{n}", "bottleneck"):
                                                          _first(w, k) for n, w, k in zip(names, widths, kept)}))
        if any(w > 1 for w in widths):
            out.append((f"{sname}:width", len(widths), {unit_key(f"{spath}.adapters.{n}", "bottleneck"):
                                                        _first(w, 1) for n, w in zip(names, widths)}))
    return out


def onnx_graph(model: nn.Module, path: Path) -> Path:
    """The deployed graph of an already compacted `model`, as `compress export --onnx` writes it (export,
    then onnxruntime's transformer optimizer and our fusions)."""
    from exporters import optimize as graph_opt
    from exporters.onnx_export import export_graph

    raw = path.with_suffix(".raw.onnx")
    export_graph(model, raw)
    graph_opt.optimize_graph(raw, path, model_type=describe(model.base_model.config).ort_model_type)
    raw.unlink()
    return path


def make_runner(compacted: nn.Module, on: str, shape: tuple, tmp: Path, name: str):
    """A no-argument callable running `compacted` once at `shape` on `on`."""
    from exporters import bench
    from exporters.onnx_export import io_names

    b, s = shape
    if on.startswith("torch"):
        device = "cuda" if on == "torch-cuda" else "cpu"
        names, _ = io_names(compacted)
        feeds = bench.make_inputs([(n, np.int64) for n in names], b, s, seed=0)
        return bench.torch_runner(compacted.to(device), feeds, device)
    from exporters.runtime import make_session

    session = make_session(onnx_graph(compacted, tmp / f"{name}.onnx"), on)
    return bench.ort_runner(session, on, bench.make_inputs(bench._ort_inputs(session), b, s, seed=0))


def time_interleaved(runs: dict, rounds: int, slice_s: float, reference, advance=None, stat=statistics.median) -> dict:
    """Per runner: the median over `rounds` rounds of stat(its slice) / stat(the reference's slice) in the same
    round, times the reference's median of stat (ms). Round-robin slices (bench.measure_interleaved), one call
    per round. stat=min reads each slice's fastest run: load on a shared machine only ever adds time."""
    from exporters.bench import measure_interleaved

    import gc

    per_round, keys = {k: [] for k in runs}, list(runs)
    gc.collect()
    gc.freeze()  # measure_interleaved collects before each round: only what is new since then is scanned
    try:
        for r in range(rounds):
            # each round starts at another runner: none keeps the place after the pause between rounds
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            stats = measure_interleaved({k: runs[k] for k in order}, warmup=2 if r == 0 else 0,
                                        min_time_s=slice_s, min_repeats=1, rounds=1)
            for k in runs:
                per_round[k].append(stat([t for sl in stats[k]["slices"] for t in sl]))
            if advance:
                advance()
    finally:
        gc.unfreeze()
    ref = statistics.median(per_round[reference]) * 1e3
    return {k: statistics.median(a / b for a, b in zip(per_round[k], per_round[reference])) * ref for k in runs}


def _monotone(counts: list, delta: list, full: int) -> dict:
    """Sorted curve through (full, 0), made non-decreasing in the kept count (removing never adds latency)."""
    pts = sorted(zip(counts + [full], delta + [0.0]))
    xs, ys = [pts[-1][0]], [pts[-1][1]]
    for x, y in reversed(pts[:-1]):
        if x == xs[0]:
            continue
        xs.insert(0, x)
        ys.insert(0, min(y, ys[0]))
    return dict(counts=xs, delta_ms=[round(y, 6) for y in ys])


def build(model: nn.Module, on: str = "cpu", shape=(1, 128), rounds: int = 10, slice_s: float = 0.1,
          progress: bool = True) -> dict:
    """Measure the table (see the module docstring)."""
    from exporters.runtime import release_memory

    from .compaction import compact
    from .masks import MaskSet
    from .pruning.post_training import _progress
    from .units import fingerprint

    sigs = [_signature(model, i) for i in range(len(layers_of(model)))]
    first = {s: sigs.index(s) for s in dict.fromkeys(sigs)}
    plans = {s: (_sub_model(model, [i]), None) for s, i in first.items()}
    plans = {s: (sub, _configurations(sub)) for s, (sub, _) in plans.items()}
    bare = _sub_model(model, [])  # embeddings, pooler and head: the fixed part
    n_configs = sum(len(c) for _, c in plans.values()) + 1
    runs, meta = {}, {}
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp, _progress() as bar:
        if not progress:
            bar.disable = True
        task = bar.add_task(f"latency model ({on}, {shape[0]}x{shape[1]}): compacting", total=n_configs + rounds)
        for s, (sub, configs) in plans.items():
            for j, (kind, count, masks) in enumerate(configs):
                name = f"{s}-{j}"
                compacted = compact(sub, MaskSet(masks, fingerprint(sub)) if masks else None)
                runs[name], meta[name] = make_runner(compacted, on, shape, Path(tmp), name), (s, kind, count)
                bar.advance(task)
        runs["fixed"] = make_runner(compact(bare), on, shape, Path(tmp), "fixed")
        bar.advance(task)
        release_memory()
        bar.update(task, description=f"latency model ({on}, {shape[0]}x{shape[1]}): timing")
        reference = f"{sigs[0]}-0"
        ms = time_interleaved(runs, rounds, slice_s, reference, lambda: bar.advance(task), stat=min)
    tables = {}
    for s, (sub, configs) in plans.items():
        dense = ms[f"{s}-0"]
        full = layer_counts(sub)[0]
        raw = {}
        for name, (sig, kind, count) in meta.items():
            if sig == s and kind != "dense":
                raw.setdefault(kind, ([], []))
                raw[kind][0].append(count)
                raw[kind][1].append(ms[name] - dense)
        curves = {k: _monotone(list(c), list(d), full[k]) for k, (c, d) in raw.items()}
        tables[s] = dict(dense_ms=round(dense, 6), full=full, curves=curves)
    for s, t in tables.items():  # a fused adapter's removal also removes its width: keep only the fusion's share
        for site in SITES:
            a, w = t["curves"].get(f"{site}:adapters"), t["curves"].get(f"{site}:width")
            if a is None or w is None:
                continue
            per = t["full"][f"{site}:width"] / t["full"][f"{site}:adapters"]
            delta = [d - _interp(w, k * per) for k, d in zip(a["counts"], a["delta_ms"])]
            t["curves"][f"{site}:adapters"] = _monotone(a["counts"][:-1], delta[:-1], a["counts"][-1])
    fixed = min(ms["fixed"], min(t["dense_ms"] for t in tables.values()))
    return dict(version=VERSION, fixed_ms=round(fixed, 6), layers=sigs,
                tables=tables, rounds=rounds, slice_s=slice_s)


def latency_model(model: nn.Module, on: str = "cpu", shape="1x128", rounds: int = 10, slice_s: float = 0.1,
                  progress: bool = True, cache: bool = True) -> LatencyModel:
    """The cached latency model of `model` on `on` at `shape` (built and cached when missing)."""
    from .default_model import cache_root

    from .modeling.descriptions import max_positions

    on, shape = check_provider(on), parse_shape(shape)
    longest = max_positions(model.base_model.config)
    if shape[1] > longest:
        raise PruningConfigError(f"shape {shape[0]}x{shape[1]}: the model takes at most {longest} tokens; give a "
                                 f"shorter sequence, e.g. --shape {shape[0]}x{longest}")
    fp = machine_fingerprint(on, shape)
    key = hashlib.sha256(json.dumps(dict(arch=architecture_signature(model), machine=fp, rounds=rounds,
                                         slice_s=slice_s, version=VERSION), sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "latency" / f"{key}.json"
    if cache and path.is_file():
        try:
            return LatencyModel(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt
    table = dict(key=key, fingerprint=fp, architecture=architecture_signature(model),
                 **build(model, on, shape, rounds, slice_s, progress))
    if cache:
        from .io import atomic_write_json

        atomic_write_json(path, table, overwrite=True)
    return LatencyModel(table)
