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
from compressor.modeling.descriptions import describe

from .runtime import PROVIDERS, check_onnx_file, check_provider, make_session, provider_name

REPORT_FORMAT = "adapter-compressor-bench"
REPORT_VERSION = 1
TORCH = "torch"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NOT_ONNX = "not an ONNX target; export it first with compress export --onnx"
NO_TORCH_FOR_ONNX = "an .onnx file has no PyTorch model; give its export directory to bench PyTorch"
GPU_PROVIDERS = ("cuda", "tensorrt")  # inputs and outputs bound on the device (IO binding)
TORCH_DEVICES = ("cpu", "cuda")
TORCH_DTYPES = ("fp32", "fp16", "bf16")


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
    rounds: int = 10  # min_time_s is cut into this many slices per target, timed in turn (docs/design.md "Timing")
    device: str = "cpu"  # the torch provider's device: cpu | cuda
    dtype: str = "fp32"  # the torch provider's weights and activations: fp32 | fp16 | bf16

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
                                 ("min_repeats", self.min_repeats, 1), ("min_time_s", self.min_time_s, 0),
                                 ("rounds", self.rounds, 1)):
            if value < low:
                raise BenchConfigError(f"{name} must be >= {low}, got {value}")
        self.device, self.dtype = str(self.device).strip().lower(), str(self.dtype).strip().lower()
        if self.device not in TORCH_DEVICES:
            raise BenchConfigError(f"unknown device '{self.device}'; choose one of {', '.join(TORCH_DEVICES)}")
        if self.dtype not in TORCH_DTYPES:
            raise BenchConfigError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(TORCH_DTYPES)}")
        if (self.device, self.dtype) != ("cpu", "fp32") and TORCH not in providers:
            raise BenchConfigError("--device and --dtype apply to the torch provider only; add --provider torch "
                                   "(onnxruntime runs its graphs as exported: cuda and tensorrt are GPU providers)")

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
    from compressor.modeling.descriptions import max_positions

    try:
        return max_positions(json.loads((directory / "config.json").read_text())) or None
    except (OSError, ValueError, TypeError):
        return None


def describe_targets(targets: List[Target], config: BenchConfig, base=None) -> None:
    """Size, parameters and FLOPs per token; loads the PyTorch model where one exists (kept only for torch runs).
    Paths are written as report_path(path, base)."""
    from compressor import load_model
    from compressor.flops import total_cost

    for t in targets:
        info = t.info
        info.update(name=t.name, kind=t.kind, path=report_path(t.path, base),
                    onnx=report_path(t.onnx, base) if t.onnx else None,
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


PATHS_NOTE = "relative to the working directory of the command; a path outside it is its last name only"


def report_path(path, base=None) -> str:
    """A path for a report that may be committed: relative to `base` (default: the working directory) when it
    lies under it, else only its last name; never an absolute, machine-specific path."""
    path = Path(path)
    base = Path.cwd() if base is None else Path(base)
    try:
        rel = path.resolve().relative_to(base.resolve())
    except ValueError:
        return path.name
    return rel.as_posix() or "."


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


def torch_runner(model, feeds: dict, device: str = "cpu") -> Callable[[], None]:
    """One forward pass on `device`; the inputs are put there once. On CUDA the run waits for the device
    (torch.cuda.synchronize) before the clock stops, so the time is the kernels', not the launch's."""
    import torch

    inputs = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    sync = torch.cuda.synchronize if device == "cuda" else None

    def run():
        with torch.inference_mode():
            model(**inputs)
        if sync is not None:
            sync()
    return run


def _stats(times_s) -> dict:
    ms = np.array(times_s) * 1e3
    return dict(repeats=len(ms), p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()),
                std_ms=float(statistics.stdev(ms)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()))


def measure(run: Callable[[], None], warmup: int, min_time_s: float, min_repeats: int) -> dict:
    """One target alone: warm up, then time single runs until both `min_repeats` and `min_time_s` are reached."""
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
    return _stats(times)


class RunFailed(Exception):
    """A runner raised while being timed; `key` says which (its cell is failed, the others go on)."""

    def __init__(self, key, error: BaseException):
        super().__init__(str(error))
        self.key, self.error = key, error


def measure_interleaved(runs: dict, warmup: int, min_time_s: float, min_repeats: int, rounds: int = 10,
                        rewarm: Optional[int] = None, failed: Optional[dict] = None) -> dict:
    """Time several runners fairly: after `warmup` untimed runs each, rounds A, B, C, A, B, C, ... each time a
    slice of one runner (single runs until min_time_s / rounds seconds, at least one run), until every runner
    has `min_repeats` runs and `min_time_s` seconds timed. Before each slice `rewarm` untimed runs (default 1
    when there are several runners, else 0) bring that runner's caches and thread pool back, so only one is hot
    while it is timed. Machine load that comes and goes then hits every runner alike.

    Returns {key: stats + "slices": [per-round timed seconds lists]}. A runner that raises is dropped from the
    next rounds and its error put in `failed[key]` (when given; otherwise it is raised as RunFailed)."""
    active = list(runs)
    rewarm = (1 if len(active) > 1 else 0) if rewarm is None else rewarm
    slice_s = min_time_s / rounds
    times = {k: [] for k in active}
    slices = {k: [] for k in active}

    def drop(key, error):
        active.remove(key)
        if failed is None:
            raise RunFailed(key, error)
        failed[key] = error

    for key in list(active):
        try:
            for _ in range(warmup):
                runs[key]()
        except Exception as e:
            drop(key, e)
    gc.collect()
    gc.disable()  # a collection inside a timed run is noise, not model latency
    try:
        def done(key):
            return len(times[key]) >= min_repeats and sum(times[key]) >= min_time_s

        while active and not all(done(k) for k in active):
            for key in list(active):
                run = runs[key]
                try:
                    for _ in range(rewarm):
                        run()
                    got, start = [], time.perf_counter()
                    while not got or time.perf_counter() - start < slice_s:
                        t0 = time.perf_counter()
                        run()
                        got.append(time.perf_counter() - t0)
                except Exception as e:
                    drop(key, e)
                    continue
                times[key] += got
                slices[key].append(got)
    finally:
        gc.enable()
    return {k: dict(_stats(times[k]), slices=slices[k]) for k in runs if k not in (failed or {}) and times[k]}


def round_ratios(base_slices: list, slices: list) -> list:
    """Per round: median of the base runner's slice / median of this runner's slice."""
    return [float(np.median(b) / np.median(t)) for b, t in zip(base_slices, slices)]


def spread(ratios: list) -> Optional[dict]:
    """The per-round speedups' median, quartiles and range; None without rounds."""
    if not ratios:
        return None
    q1, med, q3 = (float(x) for x in np.percentile(ratios, [25, 50, 75]))
    return dict(median=med, q1=q1, q3=q3, min=float(min(ratios)), max=float(max(ratios)), rounds=len(ratios))


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

class CpuLoad:
    """How busy the machine was while timing: the 1-minute load average before and after, and (on Linux) the
    mean number of cores other processes kept busy: busy jiffies in /proc/stat minus this process's CPU time,
    over the wall time. Started when made; finish() returns the record."""

    def __init__(self):
        self.load_before = _loadavg()
        self.wall, self.own, self.busy = time.perf_counter(), _own_cpu_s(), _busy_cpu_s()

    def finish(self) -> dict:
        wall = time.perf_counter() - self.wall
        busy = _busy_cpu_s()
        other = None
        if busy is not None and self.busy is not None and wall > 0:
            other = max(0.0, (busy - self.busy - (_own_cpu_s() - self.own)) / wall)
        return dict(load_average_before=self.load_before, load_average_after=_loadavg(),
                    other_cpu_cores=None if other is None else round(other, 3), timed_s=round(wall, 2),
                    cpu_count=os.cpu_count())


def _loadavg() -> Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _busy_cpu_s() -> Optional[float]:
    """Seconds all CPUs spent busy since boot (not idle, not waiting for I/O), from /proc/stat; None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is already in user


def _placements(targets: List[Target], prov: _Provider, cells: list, config: BenchConfig) -> None:
    """Node placement per target at its first successful shape, in a profiled session of its own."""
    for t in targets:
        ok = [c for c in cells if c["target"] == t.name and c["status"] == "ok"]
        if not ok:
            continue
        b, s = ok[0]["batch_size"], ok[0]["seq_len"]
        try:
            placement = node_placement(t.onnx, prov.provider, config.threads,
                                       make_inputs(prov.names[t.name], b, s, config.seed))
            t.info["placement"][prov.provider] = dict(placement, batch_size=b, seq_len=s)
        except Exception as e:
            t.info["placement"][prov.provider] = dict(error=_one_line(e))


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


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_label(config: BenchConfig) -> str:
    """The torch provider's name in the report: "PyTorch (CPU)", "PyTorch (CUDA, fp16)", ..."""
    return f"PyTorch ({config.device.upper()}{'' if config.dtype == 'fp32' else ', ' + config.dtype})"


def _torch_unavailable(config: BenchConfig) -> Optional[str]:
    if config.device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} " + ("has no CUDA support" if torch.version.cuda is None
                                                 else f"(CUDA {torch.version.cuda}) sees no CUDA device")
        return f"PyTorch device cuda is not available here: {build}"
    if config.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(0)} does not support bf16"
    return None


class _Provider:
    """What one provider needs for every target: the reason a target cannot run on it, its onnxruntime
    session (made once, kept for every shape) or its PyTorch model on the device, and its input names."""

    def __init__(self, provider: str, targets: List[Target], config: BenchConfig):
        self.provider, self.config = provider, config
        self.skip, self.error, self.sessions, self.names = {}, {}, {}, {}
        self.previous_threads = None
        common = None
        if provider == TORCH:
            common = _torch_unavailable(config)
        else:
            try:
                check_provider(provider)
            except CompressorError as e:
                common = str(e)
        for t in targets:
            if provider == TORCH:
                reason = None if t.model is not None else (
                    NO_TORCH_FOR_ONNX if t.kind == "onnx" else
                    "the export directory has no PyTorch weights (model.safetensors)")
            else:
                reason = NOT_ONNX if t.onnx is None else None
            if reason or common:
                self.skip[t.name] = reason or common

    def __enter__(self):
        if self.provider == TORCH:
            import torch

            self.previous_threads = torch.get_num_threads()
            torch.set_num_threads(self.config.threads)
        return self

    def __exit__(self, *exc):
        self.sessions.clear()
        if self.previous_threads is not None:
            import torch

            torch.set_num_threads(self.previous_threads)
            if self.config.device == "cuda":
                torch.cuda.empty_cache()

    def prepare(self, t: Target) -> None:
        """Make the session or move the model; an error fails every shape of this target on this provider."""
        try:
            if self.provider == TORCH:
                import torch

                t.model.to(device=self.config.device, dtype=getattr(torch, _TORCH_DTYPES[self.config.dtype]))
                names = [("input_ids", np.int64), ("attention_mask", np.int64)]
                if describe(t.model.base_model.config).token_types:
                    names.append(("token_type_ids", np.int64))
            else:
                self.sessions[t.name] = make_session(t.onnx, self.provider, self.config.threads)
                names = _ort_inputs(self.sessions[t.name])
            self.names[t.name] = names
        except Exception as e:
            self.error[t.name] = _one_line(e)

    def runner(self, t: Target, batch: int, seq: int) -> Callable[[], None]:
        feeds = make_inputs(self.names[t.name], batch, seq, self.config.seed)
        if self.provider == TORCH:
            return torch_runner(t.model, feeds, self.config.device)
        return ort_runner(self.sessions[t.name], self.provider, feeds)


def _bench_group(targets: List[Target], prov: _Provider, batch: int, seq: int, config: BenchConfig) -> list:
    """One provider and shape, every target interleaved (measure_interleaved); cells in target order."""
    cells, runs = {}, {}
    for t in targets:
        if t.name in prov.skip:
            cells[t.name] = _cell(t, prov.provider, batch, seq, "skipped", prov.skip[t.name])
        elif t.name in prov.error:
            cells[t.name] = _cell(t, prov.provider, batch, seq, "failed", prov.error[t.name])
        else:
            try:
                runs[t.name] = prov.runner(t, batch, seq)  # every runner exists before any is timed
            except Exception as e:
                cells[t.name] = _cell(t, prov.provider, batch, seq, "failed", _one_line(e))
    failed = {}
    stats = measure_interleaved(runs, config.warmup, config.min_time_s, config.min_repeats, config.rounds,
                                failed=failed) if runs else {}
    base = stats.get(targets[0].name)
    for t in targets:
        if t.name in failed:  # e.g. out of memory at a large shape: record it, keep the other cells
            cells[t.name] = _cell(t, prov.provider, batch, seq, "failed", _one_line(failed[t.name]))
        elif t.name in stats:
            st = dict(stats[t.name])
            slices = st.pop("slices")
            st["seq_per_s"] = batch / (st["mean_ms"] / 1e3)
            st["rounds"] = len(slices)
            st["speedup_rounds"] = spread(round_ratios(base["slices"], slices)) if base else None
            cells[t.name] = _cell(t, prov.provider, batch, seq, "ok", **st)
    return [cells[t.name] for t in targets]


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
              progress: Optional[Callable[[str, int, int], None]] = None, path_base=None) -> dict:
    """Benchmark every target x provider x shape; write report.json, report.md and latency.png into `out`.

    For each provider and shape every target's runner is made first, then the targets are timed in turn
    (measure_interleaved). progress(label, done, total) is called before each provider x shape and once at the
    end. Target paths in the report are relative to the working directory (see report_path), or to
    `path_base` = (directory, "what it is") when given. Returns the report."""
    from .bench_report import write_report

    check_output_dir(out, overwrite)
    if not targets:
        raise BenchConfigError("no target given; pass export directories, .onnx files or model directories")
    resolved = [resolve_target(p) for p in targets]
    _unique_names(resolved)
    describe_targets(resolved, config, None if path_base is None else path_base[0])  # loads models: errors surface before any timing
    machine = machine_info(config.threads)  # before timing: its load average says whether the machine was quiet

    total = len(resolved) * len(config.providers) * len(config.shapes)
    done = [0]
    results, load = [], CpuLoad()
    for provider in config.providers:
        with _Provider(provider, resolved, config) as prov:
            for t in resolved:
                if t.name not in prov.skip:
                    prov.prepare(t)
            group = []
            for b, s in config.shapes:
                if progress:
                    progress(f"{provider} · batch {b} × seq {s} · {len(resolved)} target"
                             f"{'s' if len(resolved) > 1 else ''} in turn", done[0], total)
                done[0] += len(resolved)
                group += _bench_group(resolved, prov, b, s, config)
            results += group
            if provider != TORCH:
                _placements(resolved, prov, group, config)
    if progress:
        progress("done", total, total)
    timing = dict(order="interleaved", rounds_target=config.rounds, **load.finish())
    add_speedups(results, resolved[0].name)
    report = dict(format=REPORT_FORMAT, version=REPORT_VERSION,
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  config=asdict(config), machine=machine,
                  providers={p: PROVIDERS[p] if p != TORCH else torch_label(config) for p in config.providers},
                  paths=PATHS_NOTE if path_base is None else path_base[1],
                  timing=timing, targets=[t.info for t in resolved], results=results)
    with atomic_output_dir(out, overwrite) as tmp:
        write_report(report, tmp)
    return report
