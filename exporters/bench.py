"""`compress bench`: latency and throughput of export directories, .onnx files and PyTorch model directories on
onnxruntime execution providers and PyTorch, with size, parameters, FLOPs and node placement beside them.

Timing follows docs/design.md ("Timing"): warm-up runs, pinned thread counts, repeats until both a minimum count and
a minimum time are reached, percentiles and spread, IO binding on GPU providers, and a profiled run that shows
which nodes fell back to the CPU. A provider that is not available is recorded as skipped, never a crash.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from compressor.errors import CompressorError, ExportError, ModelLoadError
from compressor.io import atomic_output_dir, check_output_dir

from .runtime import PROVIDERS, check_onnx_file, check_provider, make_session, provider_name

REPORT_FORMAT = "adapter-compressor-bench"
REPORT_VERSION = 1
TORCH = "torch"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NOT_ONNX = "not an ONNX target; export it first with compress export --onnx"
NO_TORCH_FOR_ONNX = "an .onnx file has no PyTorch model; give its export directory to bench PyTorch"
GPU_PROVIDERS = ("cuda", "tensorrt")  # inputs and outputs bound on the device (IO binding)


class BenchConfigError(CompressorError):
    """Bad benchmark options: an empty or non-positive shape list, a sequence longer than the model allows."""


@dataclass
class BenchConfig:
    providers: List[str] = field(default_factory=lambda: ["cpu"])
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8])
    seq_lens: List[int] = field(default_factory=lambda: [32, 128])
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    warmup: int = 3
    min_time_s: float = 1.0
    min_repeats: int = 10
    seed: int = 0

    def __post_init__(self):
        providers = []
        for p in self.providers:  # repeatable and comma-separated; keep order, drop duplicates
            for name in (s.strip().lower() for s in str(p).split(",")):
                if name and name not in providers:
                    if name != TORCH:
                        provider_name(name)  # an unknown name is a typo: error; a known but missing one is skipped
                    providers.append(name)
        self.providers = providers
        if not providers:
            raise BenchConfigError("no provider given; use --provider cpu|cuda|tensorrt|torch")
        self.batch_sizes, self.seq_lens = parse_ints(self.batch_sizes, "batch size"), parse_ints(self.seq_lens, "sequence length")
        for name, value, low in (("threads", self.threads, 1), ("warmup", self.warmup, 0),
                                 ("min_repeats", self.min_repeats, 1), ("min_time_s", self.min_time_s, 0)):
            if value < low:
                raise BenchConfigError(f"{name} must be >= {low}, got {value}")

    @property
    def shapes(self):
        return [(b, s) for b in self.batch_sizes for s in self.seq_lens]


def parse_ints(values, what: str) -> List[int]:
    """`[1, 8]`, `"1,8"` or `["1,8", "16"]` -> [1, 8, 16]; positive, unique, in the given order."""
    items = [values] if isinstance(values, (str, int)) else list(values)
    out = []
    for item in items:
        for text in str(item).split(","):
            if not text.strip():
                continue
            try:
                n = int(text)
            except ValueError:
                raise BenchConfigError(f"{what} '{text.strip()}' is not an integer (e.g. 1,8)") from None
            if n < 1:
                raise BenchConfigError(f"{what} must be >= 1, got {n}")
            if n not in out:
                out.append(n)
    if not out:
        raise BenchConfigError(f"no {what} given (e.g. 1,8)")
    return out


# ------------------------------------------------------------------------------------------------------ targets

@dataclass
class Target:
    name: str
    kind: str  # "export" | "onnx" | "model"
    path: Path
    onnx: Optional[Path] = None  # the graph ORT runs
    torch_dir: Optional[Path] = None  # what compressor.load_model loads (PyTorch runs and FLOPs)
    model: object = None
    info: dict = field(default_factory=dict)


def resolve_target(path) -> Target:
    """Classify a target path, or raise a one-line error for anything we cannot benchmark."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; give an export directory, an .onnx file or a model directory")
    if path.is_file():
        if path.suffix != ".onnx":
            raise ExportError(f"{path} is not an ONNX file; give an .onnx file, an export directory or a model directory")
        check_onnx_file(path)
        graph = _load_onnx(path).graph
        if not graph.node or not graph.input:  # an empty file parses as an empty ModelProto
            raise ExportError(f"{path} is not an ONNX model (no graph); give a file written by 'compress export --onnx'")
        beside = path.parent if (path.parent / "compress_manifest.json").is_file() else None
        return Target(path.name, "onnx", path, onnx=path, torch_dir=beside)
    has_weights = (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHTS)
    if (path / "model.onnx").is_file():
        check_onnx_file(path / "model.onnx")
        return Target(path.name, "export", path, onnx=path / "model.onnx", torch_dir=path if has_weights else None)
    if has_weights:
        return Target(path.name, "model", path, torch_dir=path)
    raise ModelLoadError(f"{path} is neither an export directory (model.onnx) nor a model directory (config.json and "
                         f"{' or '.join(WEIGHTS)})")


def _load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)  # shapes only: initializer dims survive without the data


def onnx_size_and_params(path: Path):
    """File size in bytes (external data files included) and the element count of all initializers."""
    import onnx

    graph = _load_onnx(path).graph
    params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    params += sum(int(np.prod(s.values.dims)) for s in graph.sparse_initializer)  # stored values, not the dense shape
    external = {e.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in external if (path.parent / f).is_file())
    return size, params


def _max_seq_len(directory: Path) -> Optional[int]:
    try:
        cfg = json.loads((directory / "config.json").read_text())
        limit = int(cfg["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # RoBERTa's positions start after the padding index
    return limit - (int(cfg.get("pad_token_id") or 0) + 1) if cfg.get("model_type") == "roberta" else limit


def describe_targets(targets: List[Target], config: BenchConfig) -> None:
    """Size, parameters and FLOPs per token; loads the PyTorch model where one exists (kept only for torch runs)."""
    from compressor import load_model
    from compressor.flops import total_cost

    for t in targets:
        info = t.info
        info.update(name=t.name, kind=t.kind, path=str(t.path), onnx=str(t.onnx) if t.onnx else None,
                    size_bytes=None, parameters=None, flops_per_token=None, placement={})
        if t.onnx is not None:
            info["size_bytes"], info["parameters"] = onnx_size_and_params(t.onnx)
        if t.torch_dir is None:
            continue
        limit = _max_seq_len(t.torch_dir)
        if limit is not None and max(config.seq_lens) > limit:
            raise BenchConfigError(f"sequence length {max(config.seq_lens)} is longer than {t.name} allows ({limit} "
                                   "positions); lower --seq-lens")
        try:
            model = load_model(t.torch_dir)
        except CompressorError:
            if t.kind != "onnx":
                raise
            t.torch_dir = None  # a manifest beside a bare .onnx file is a bonus for FLOPs, not a requirement
            continue
        costs = {s: total_cost(model, s) for s in config.seq_lens}
        info["flops_per_token"] = {str(s): c["flops_per_token"] for s, c in costs.items()}
        if t.kind == "model":
            weights = next(t.path / w for w in WEIGHTS if (t.path / w).is_file())
            info["size_bytes"], info["parameters"] = weights.stat().st_size, costs[config.seq_lens[0]]["params"]
        if TORCH in config.providers and t.kind != "onnx":
            t.model = model


def _unique_names(targets: List[Target]) -> None:
    seen = {}
    for t in targets:
        base = t.name if t.kind != "onnx" else f"{t.path.parent.name}/{t.name}"
        seen[base] = seen.get(base, 0) + 1
        t.name = base if seen[base] == 1 else f"{base} ({seen[base]})"


# ------------------------------------------------------------------------------------------------------- timing

def make_inputs(names_and_types, batch: int, seq: int, seed: int) -> dict:
    """Token ids in [5, 100) (valid for any vocabulary), attention mask all ones, token types zero."""
    rng = np.random.default_rng([seed, batch, seq])  # the same inputs for every target at this shape
    feeds = {}
    for name, dtype in names_and_types:
        if name == "input_ids":
            feeds[name] = rng.integers(5, 100, size=(batch, seq)).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        else:
            raise ExportError(f"unknown model input '{name}'; bench feeds input_ids, attention_mask, token_type_ids")
    return feeds


_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _ort_inputs(session):
    out = []
    for i in session.get_inputs():
        if i.type not in _ORT_TYPES:
            raise ExportError(f"model input '{i.name}' has type {i.type}; bench feeds int64 or int32 token ids")
        out.append((i.name, _ORT_TYPES[i.type]))
    return out


def ort_runner(session, provider: str, feeds: dict) -> Callable[[], None]:
    if provider not in GPU_PROVIDERS:
        return lambda: session.run(None, feeds)
    # GPU: copy inputs to the device once and keep outputs there, so host<->device copies are not timed
    import onnxruntime as ort

    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) for name, arr in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    run.values = values  # the device buffers must outlive the binding
    return run


def torch_runner(model, feeds: dict) -> Callable[[], None]:
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def run():
        with torch.inference_mode():
            model(**inputs)
    return run


def measure(run: Callable[[], None], warmup: int, min_time_s: float, min_repeats: int) -> dict:
    """Warm up, then time single runs until both `min_repeats` and `min_time_s` are reached."""
    for _ in range(warmup):
        run()
    gc.collect()
    gc.disable()  # a collection inside a timed run is noise, not model latency
    try:
        times, start = [], time.perf_counter()
        while len(times) < min_repeats or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    ms = np.array(times) * 1e3
    return dict(repeats=len(ms), p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()),
                std_ms=float(statistics.stdev(ms)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()))


def node_placement(path: Path, provider: str, threads: int, feeds: dict) -> dict:
    """Nodes per execution provider in one profiled run, and the op types that fell back to the CPU.

    A separate session: profiling slows every run, so it never shares the timed one."""
    name = check_provider(provider)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        session = make_session(path, provider, threads, profile_prefix=str(Path(tmp) / "ort_profile"))
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return placement_from_profile(events, name)


def placement_from_profile(events: list, requested: str) -> dict:
    """Count nodes per provider in an onnxruntime profile (events with cat 'Node' carry args.provider and
    args.op_name); op types on CPUExecutionProvider are fallbacks when `requested` is another provider."""
    nodes = {}  # node name -> (provider, op type); each node logs fence and kernel events, count it once
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            nodes[e["name"].rsplit("_kernel_time", 1)[0].rsplit("_fence_", 1)[0]] = (args["provider"], args.get("op_name"))
    per_provider, fallback = {}, {}
    for ep, op in nodes.values():
        per_provider[ep] = per_provider.get(ep, 0) + 1
        if ep == "CPUExecutionProvider" and requested != "CPUExecutionProvider":
            fallback[op] = fallback.get(op, 0) + 1
    return dict(provider=requested, nodes=dict(sorted(per_provider.items())), cpu_fallback_ops=dict(sorted(fallback.items())))


# ------------------------------------------------------------------------------------------------------ the run

def machine_info(threads: int) -> dict:
    import onnxruntime as ort

    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return None

    processor = platform.processor()
    if not processor and Path("/proc/cpuinfo").is_file():  # Linux leaves platform.processor() empty
        processor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
    info = dict(platform=platform.platform(), processor=processor, machine=platform.machine(),
                cpu_count=os.cpu_count(), python=platform.python_version(),
                torch=version("torch"), onnxruntime=ort.__version__, onnx=version("onnx"),
                transformers=version("transformers"), numpy=np.__version__,
                ort_available_providers=ort.get_available_providers(), threads=threads,
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None, gpu=None)
    import torch
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cell(target, provider, batch, seq, status, reason=None, **stats):
    return dict(target=target.name, provider=provider, batch_size=batch, seq_len=seq, status=status, reason=reason,
                **stats)


def _bench_provider(t: Target, provider: str, config: BenchConfig, tick) -> list:
    """All shapes of one target on one provider; skipped or failed cells carry the reason."""
    shapes = config.shapes
    if provider == TORCH:
        reason = None if t.model is not None else (NO_TORCH_FOR_ONNX if t.kind == "onnx" else
                                                   "the export directory has no PyTorch weights (model.safetensors)")
    else:
        reason = NOT_ONNX if t.onnx is None else None
        if reason is None:
            try:
                check_provider(provider)
            except CompressorError as e:
                reason = str(e)
    if reason is not None:
        cells = []
        for b, s in shapes:
            tick(t, provider, b, s)
            cells.append(_cell(t, provider, b, s, "skipped", reason))
        return cells

    cells, previous = [], None
    try:
        if provider == TORCH:
            import torch
            previous = torch.get_num_threads()
            torch.set_num_threads(config.threads)
            names = [("input_ids", np.int64), ("attention_mask", np.int64)]
            if t.model.base_model.config.model_type == "bert":
                names.append(("token_type_ids", np.int64))
        else:
            session = make_session(t.onnx, provider, config.threads)
            names = _ort_inputs(session)
        for b, s in shapes:
            tick(t, provider, b, s)
            try:
                feeds = make_inputs(names, b, s, config.seed)
                run = torch_runner(t.model, feeds) if provider == TORCH else ort_runner(session, provider, feeds)
                stats = measure(run, config.warmup, config.min_time_s, config.min_repeats)
            except Exception as e:  # e.g. out of memory at a large shape: record it, keep the other cells
                cells.append(_cell(t, provider, b, s, "failed", _one_line(e)))
                continue
            stats["seq_per_s"] = b / (stats["mean_ms"] / 1e3)
            cells.append(_cell(t, provider, b, s, "ok", **stats))
    except Exception as e:  # the session could not be made: every remaining shape failed for the same reason
        done = {(c["batch_size"], c["seq_len"]) for c in cells}
        for b, s in shapes:
            if (b, s) not in done:
                tick(t, provider, b, s)
                cells.append(_cell(t, provider, b, s, "failed", _one_line(e)))
    finally:
        if previous is not None:
            import torch
            torch.set_num_threads(previous)
    ok = [c for c in cells if c["status"] == "ok"]
    if provider != TORCH and ok:
        b, s = ok[0]["batch_size"], ok[0]["seq_len"]
        try:
            placement = node_placement(t.onnx, provider, config.threads, make_inputs(names, b, s, config.seed))
            t.info["placement"][provider] = dict(placement, batch_size=b, seq_len=s)
        except Exception as e:
            t.info["placement"][provider] = dict(error=_one_line(e))
    return cells


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def add_speedups(results: list, first: str) -> None:
    """speedup_p50 = p50 of the first target / p50 of this one, same provider and shape (None if either lacks one)."""
    base = {(c["provider"], c["batch_size"], c["seq_len"]): c["p50_ms"]
            for c in results if c["target"] == first and c["status"] == "ok"}
    for c in results:
        ref = base.get((c["provider"], c["batch_size"], c["seq_len"]))
        c["speedup_p50"] = ref / c["p50_ms"] if c["status"] == "ok" and ref else None


def run_bench(targets: Sequence, config: BenchConfig, out, overwrite: bool = False,
              progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Benchmark every target x provider x shape; write report.json, report.md and latency.png into `out`.

    progress(label, done, total) is called before each cell and once at the end. Returns the report."""
    from .bench_report import write_report

    check_output_dir(out, overwrite)
    if not targets:
        raise BenchConfigError("no target given; pass export directories, .onnx files or model directories")
    resolved = [resolve_target(p) for p in targets]
    _unique_names(resolved)
    describe_targets(resolved, config)  # loads models: errors surface before any timing
    machine = machine_info(config.threads)  # before timing: its load average says whether the machine was quiet

    total = len(resolved) * len(config.providers) * len(config.shapes)
    done = [0]

    def tick(t, provider, b, s):
        if progress:
            progress(f"{t.name} · {provider} · batch {b} × seq {s}", done[0], total)
        done[0] += 1

    results = []
    for t in resolved:
        for provider in config.providers:
            results.extend(_bench_provider(t, provider, config, tick))
    if progress:
        progress("done", total, total)
    add_speedups(results, resolved[0].name)
    report = dict(format=REPORT_FORMAT, version=REPORT_VERSION,
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  config=asdict(config), machine=machine,
                  providers={p: PROVIDERS.get(p, "PyTorch (CPU)") for p in config.providers},
                  targets=[t.info for t in resolved], results=results)
    with atomic_output_dir(out, overwrite) as tmp:
        write_report(report, tmp)
    return report
