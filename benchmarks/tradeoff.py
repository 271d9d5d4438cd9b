"""Accuracy against ONNX CPU latency on the two SST-2 defaults (issue 15, item 4), every point paired with dense.

Models (SST-2 dev, 872 rows):
- fusion: all-MiniLM-L6-v2 + the 8-adapter AdapterFusion trained on SST-2 (default_model_dir("sst2"));
- single: all-MiniLM-L6-v2 + the packaged SST-2 adapter and head.
Stages, in order (each point is saved as soon as it is scored; a re-run skips the points already in
WORK/points.json, so a crash costs the point in progress only):
1. dense: the fp32 export, and int8-only graphs of it (the baseline curve): dynamic per-tensor, dynamic
   per-channel (the measured choice of benchmarks/results/int8.md) and static per-tensor QDQ;
2. the five seed claims (PyTorch, weight masks and trained adapters share the dense graph's latency), at the
   budgets of --claim-steps, --mask-steps, --probe-steps, --sparse-steps, --lottery-steps;
3. post-training (Kwon et al. 2022) at --targets predicted speedups on cpu 1x128 (the cached latency model; the
   stage waits for a table in $COMPRESSOR_CACHE/latency so that none is built under this run's load), each fp32
   and int8 (dynamic per-channel), and at --kd-targets also after --kd-steps of KD recovery (`--recover kd`);
   the fusion's fused adapters compete in the search, and at --fixed-adapters targets they are kept;
4. timing: every graph of a model in one interleaved `compress bench` run per --timing-threads count
   (onnxruntime CPU, batch 1 and 8 x 128 tokens), the dense fp32 graph first (speedup = its p50 / the point's
   p50). One thread is timed too because on a VM two-thread latency depends on where the host runs the vCPUs
   (benchmarks/thread_modes.py).
Every point is compared with its model's dense fp32 graph on the same dev rows (paired bootstrap CI of the
accuracy difference, agreement) and on --fidelity-examples held-out SST-2 training rows (the last ones; pruning
and recovery read only the rows before them): agreement and mean KL. Claims are paired against dense PyTorch.

    python benchmarks/tradeoff.py [--models fusion,single] [--targets 1.5,2,2.5,3] [--out benchmarks/results]
    python benchmarks/tradeoff.py --models none --keep     # re-time the saved graphs and re-render only

Writes tradeoff.md, tradeoff.json and tradeoff.png into --out; graphs and logits to --work (default out/tradeoff).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from paired import Scorer, export, int8_dir  # noqa: E402

from compressor import load_model  # noqa: E402
from compressor.default_model import PACKAGED, cache_root, default_model_dir, minilm_dir  # noqa: E402
from compressor.training import TrainConfig  # noqa: E402

KINDS = {"fusion": ("heads", "neurons", "bottleneck", "adapters"), "single": ("heads", "neurons", "bottleneck")}


def probe(model, ctx, steps: int, lr: float = 1e-3) -> None:
    """Re-train the head only (the same short recovery for every weight-mask method)."""
    from compressor.training import train
    from compressor.training.heads import head_parameters

    for p in model.parameters():
        p.requires_grad_(False)
    head = head_parameters(model)
    for p in head:
        p.requires_grad_(True)
    train(model, ctx.train_set, ctx.collate, ctx.loss, ctx.config, head, stage="probe", steps=steps,
          learning_rate=lr)
    for p in head:
        p.requires_grad_(False)


@contextlib.contextmanager
def budget(ctx, steps: int):
    """Train `steps` per stage inside the block."""
    saved = ctx.config
    ctx.config = TrainConfig(**{**saved.to_dict(), "max_steps": steps})
    try:
        yield
    finally:
        ctx.config = saved


class Study:
    """The points (WORK/points.json, the resume record), one model's context at a time."""

    def __init__(self, args):
        self.args, self.work = args, args.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.record = self.work / "points.json"
        self.points = json.loads(self.record.read_text())["points"] if self.record.is_file() else []
        self.machine, self.bench_info = {}, {}

    def has(self, name: str) -> bool:
        return any(p["name"] == name for p in self.points)

    def get(self, name: str):
        return next((p for p in self.points if p["name"] == name), None)

    def add(self, point: dict) -> dict:
        self.points = [p for p in self.points if p["name"] != point["name"]] + [point]
        self.record.write_text(json.dumps(dict(points=self.points), indent=1) + "\n")
        d = point.get("difference")
        print(f"{point['name']:40s} {point['metric']:.4f}" + (f"  {d:+.2f} [{point['low']:+.2f}, {point['high']:+.2f}]"
                                                               if d is not None else "")
              + f"  ({point.get('seconds')} s)", flush=True)
        return point


class Model:
    """One default: the model, its SST-2 context (training rows before the fidelity pool) and its scorer."""

    def __init__(self, name: str, args):
        from compressor.api import _fidelity_pool, load_tokenizer
        from compressor.data import load_data
        from compressor.requests import EvalRequest
        from compressor.training import TaskContext

        self.name, self.args = name, args
        if name == "fusion":
            self.model = load_model(default_model_dir("sst2"))
        else:
            self.model = load_model(minilm_dir(), adapters=[PACKAGED / "sst2"], setup="sst2", head="sst2")
        data = load_data("glue:sst2", data_dir=args.glue_dir)
        pool, where = _fidelity_pool(EvalRequest(data="glue:sst2", fidelity_examples=args.fidelity_examples), data)
        config = TrainConfig(max_steps=args.claim_steps, batch_size=args.batch_size, learning_rate=1e-3,
                             max_length=128, seed=args.seed)
        self.ctx = TaskContext.build(data, load_tokenizer(minilm_dir(), self.model), config,
                                     max_train=len(data.train) - len(pool))
        self.scorer = Scorer(self.ctx, pool, where, args.work / "logits")


def _counts(masks) -> dict:
    return masks.counts() if masks is not None else {}


def graph_point(study: Study, m: Model, name: str, method: str, target: str, directory: Path, t0: float,
                quant: str = "fp32", counts=None, notes=None) -> dict:
    """Score the graph in `directory` against the model's dense fp32 graph and record it."""
    cand = m.scorer.logits(name, graph=directory / "model.onnx")
    dense = m.scorer.logits(f"{m.name}-dense", graph=study.work / f"{m.name}-dense" / "model.onnx")
    return study.add(dict(model=m.name, name=name, method=method, target=target, quant=quant, dir=directory.name,
                          source="onnxruntime", counts=counts or {}, notes=notes or {},
                          seconds=round(time.perf_counter() - t0, 1), **m.scorer.compare(cand, dense)))


def stage_dense(study: Study, m: Model) -> None:
    """The dense fp32 export and its int8-only graphs: the baseline curve."""
    from exporters import quantization as q

    name = f"{m.name}-dense"
    t0 = time.perf_counter()
    if not study.has(name):
        export(m.model, None, study.work / name)
        graph_point(study, m, name, "dense", "-", study.work / name, t0)
    setup = None
    for scheme in (q.DYNAMIC, q.Scheme("dynamic", True), q.STATIC):
        qn = f"{name}-int8-{scheme.name}"
        if study.has(qn):
            continue
        t0 = time.perf_counter()
        if scheme.kind == "static" and setup is None:
            rows = list(m.ctx.data.train[:2 * q.CALIBRATION_EXAMPLES])  # the first 128 calibrate, none measure
            setup = q.setup_from_examples(rows, m.ctx.tokenizer, 128, "glue:sst2 training rows 1-128",
                                          fidelity_examples=0)
        int8_dir(study.work / name, study.work / qn, scheme, setup)
        graph_point(study, m, qn, "int8 only", scheme.name, study.work / qn, t0, quant=f"int8 {scheme.name}")


def torch_point(study: Study, m: Model, name: str, method: str, target: str, model, t0: float, counts=None,
                notes=None) -> dict:
    """Score a PyTorch model against the dense PyTorch model (claims: they share the dense graph's latency)."""
    cand = m.scorer.logits(name, model=model)
    dense = m.scorer.logits(f"{m.name}-dense-torch", model=m.model)
    return study.add(dict(model=m.name, name=name, method=method, target=target, quant="fp32", dir=None,
                          source="PyTorch", counts=counts or {}, notes=notes or {},
                          seconds=round(time.perf_counter() - t0, 1), **m.scorer.compare(cand, dense)))


CLAIM_METHODS = ("lottery-fusion", "sparse-adapter", "omp", "imp", "tamt", "adapt-by-pruning", "head-importance",
                 "importance")


def abp_push(steps: int) -> float:
    """adapt-by-pruning's push for a `steps` mask budget: an untouched score crosses zero at half the budget, as
    the method's default push does at 400 steps (without it, training stops at the target after ~200 steps
    whatever the budget)."""
    from compressor.pruning.learned_masks import AdaptByPruningOptions

    o = AdaptByPruningOptions()
    return o.init / (o.mask_lr * steps / 2)


def stage_claims(study: Study, m: Model) -> None:
    """The seed papers' claims (thresholds in tradeoff_report), each at the stated budget (recorded in the point's
    notes); --claim-tag names the points of another budget, --claim-methods picks the methods."""
    from compressor.masks import masked_copy
    from compressor.pruning import prune

    a, ctx, model = m.args, m.ctx, m.model
    tag = f"-{a.claim_tag}" if a.claim_tag else ""
    wanted = set(a.claim_methods)
    if m.name == "fusion":
        name = "fusion-lottery-final" + tag
        if study.has(name) or "lottery-fusion" not in wanted:
            return
        t0 = time.perf_counter()
        with budget(ctx, a.lottery_steps):
            lottery = prune(model, "lottery-fusion", {"adapters": 0.875}, seed=a.seed, data=ctx,
                            options=dict(rounds=3, max_drop=1.0))
        history = [{k: h[k] for k in ("round", "fraction", "metric") if k in h} for h in lottery.extra["history"]]
        torch_point(study, m, name, "lottery-fusion", "adapters=0.875",
                    masked_copy(lottery.model, lottery), t0, _counts(lottery),
                    dict(history=history, accepted_round=lottery.extra.get("accepted_round"),
                         steps_per_round=a.lottery_steps, tag=a.claim_tag))
        return
    for s in a.sparse_adapter if "sparse-adapter" in wanted else []:
        name = f"single-sparse-adapter-{s}{tag}"
        if study.has(name):
            continue
        t0 = time.perf_counter()
        with budget(ctx, a.sparse_steps):
            ms = prune(model, "sparse-adapter", {"weights": s}, seed=a.seed, data=ctx, options=dict(criterion="snip"))
        torch_point(study, m, name, "sparse-adapter (snip)", f"adapter weights={s}", masked_copy(ms.model, ms), t0,
                    notes=dict(train_steps=a.sparse_steps, tag=a.claim_tag))
    for method, options in (("omp", {}), ("imp", dict(objective="kd", rate=0.25)), ("tamt", dict(objective="kd")),
                            ("adapt-by-pruning", {})):
        name = f"single-{method}-probe{tag}"
        if study.has(name) or method not in wanted:
            continue
        t0 = time.perf_counter()
        steps = a.mask_steps if method == "adapt-by-pruning" else a.claim_steps
        if method == "adapt-by-pruning":
            options = dict(push=abp_push(steps))
        with budget(ctx, steps):
            ms = prune(model, method, {"weights": a.weights}, seed=a.seed, data=ctx, options=options)
        pm = masked_copy(ms.model if ms.model is not None else model, ms)
        probe(pm, ctx, a.probe_steps)
        torch_point(study, m, name, f"{method} + probe", f"encoder weights={a.weights}", pm, t0,
                    notes=dict(train_steps=steps, probe_steps=a.probe_steps, tag=a.claim_tag,
                               **{k: str(ms.extra[k]) for k in ("stopped_early",) if ms.extra.get(k)},
                               **({"push": round(options["push"], 4),
                                   "steps_run": ms.extra["train"].get("steps")} if method == "adapt-by-pruning"
                                  else {})))
    for method, options in (("head-importance", dict(adapter_width=24)), ("importance", dict(examples=256))):
        name = f"single-{method}-heads{tag}"
        if study.has(name) or method not in wanted:
            continue
        t0 = time.perf_counter()
        with budget(ctx, a.claim_steps):
            ms = prune(model, method, {"heads": 0.5}, seed=a.seed, data=ctx, options=options)
        torch_point(study, m, name, method, "heads=0.5", masked_copy(ms.model if ms.model is not None else model, ms),
                    t0, _counts(ms), dict(train_steps=a.claim_steps if method == "head-importance" else 0,
                                          tag=a.claim_tag))


def wait_for_latency_table(model, timeout_s: float) -> str:
    """Post-training reads the cached latency model of `model` (cpu, 1x128): wait up to `timeout_s` for its table
    in $COMPRESSOR_CACHE/latency, so that none is built under this run's load. Returns what happened."""
    from compressor.latency import architecture_signature, machine_fingerprint

    folder, arch = cache_root() / "latency", architecture_signature(model)
    fp = json.loads(json.dumps(machine_fingerprint("cpu", (1, 128))))

    def ready():
        for f in folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                table = json.loads(f.read_text())
                if table.get("architecture") == arch and table.get("fingerprint") == fp:
                    return True
        return False

    if ready():
        return "cached before the stage"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        print(f"waiting for the latency table of architecture {arch} in {folder} ...", flush=True)
        time.sleep(30)
        if ready():
            return f"cached after a {time.perf_counter() - t0:.0f} s wait"
    return "missing"


def stage_post_training(study: Study, m: Model) -> None:
    from compressor.pruning import prune
    from compressor.training.objectives import KDConfig
    from compressor.training.recovery import DEFAULT_PARTS, recover
    from exporters import quantization as q

    a = m.args
    table = wait_for_latency_table(m.model, a.table_wait)
    m.table = table
    # without a table for this architecture, one would be built under this run's load (and be wrong): prune to
    # the FLOPs fraction 1/x instead, and let the timing say what speed that buys
    flops = table == "missing"
    if flops:
        print(f"{m.name}: no latency table for this machine and architecture: post-training to "
              "--target-flops 1/x", flush=True)
    runs = [(x, KINDS[m.name], "-flops" if flops else "") for x in a.targets]
    if m.name == "fusion" and not flops:
        runs += [(x, KINDS["single"], "-keep-adapters") for x in a.fixed_adapters]
    for x, kinds, tag in runs:
        base = f"{m.name}-pt{tag}-{x}"
        kd = base + "-kd" + a.kd_tag
        wanted = [base, base + "-int8"] + ([kd, kd + "-int8"] if x in a.kd_targets and tag != "-keep-adapters"
                                           else [])
        if all(study.has(n) for n in wanted):
            continue
        t0 = time.perf_counter()
        option = dict(target_flops=round(1 / x, 4)) if flops else dict(target_speedup=x)
        ms = prune(m.model, "post-training", {k: 0 for k in kinds}, seed=a.seed, data=m.ctx,
                   options=dict(option, examples=a.examples))
        pruned = ms.model if ms.model is not None else m.model
        info = dict(kinds=list(kinds), examples=a.examples,
                    **{k: ms.extra[k] for k in ("seconds", "flops_fraction", "predicted_speedup", "target_met")
                       if k in ms.extra})
        target = (f"flops={round(1 / x, 4)}" if flops else f"speedup={x}") + \
            (" (fused adapters kept)" if tag == "-keep-adapters" else "")
        graphs = [(base, pruned, "post-training", dict(info), t0)]
        if kd in wanted:
            t1 = time.perf_counter()
            recovered, summary = recover(pruned, ms, m.ctx, "kd", list(DEFAULT_PARTS), steps=a.kd_steps,
                                         teacher=m.model, kd=KDConfig())
            graphs.append((kd, recovered, "post-training + KD",
                           dict(info, kd_steps=summary["steps"], kd_loss=summary["loss"],
                                kd_seconds=round(time.perf_counter() - t1, 1)), t1))
        for name, net, method, notes, t in graphs:
            if not study.has(name):
                export(net, ms, study.work / name)
                graph_point(study, m, name, method, target, study.work / name, t, counts=_counts(ms), notes=notes)
            if not study.has(name + "-int8"):
                t2 = time.perf_counter()
                scheme = q.Scheme("dynamic", True)
                int8_dir(study.work / name, study.work / (name + "-int8"), scheme)
                graph_point(study, m, name + "-int8", method, target, study.work / (name + "-int8"), t2,
                            quant=f"int8 {scheme.name}", counts=_counts(ms), notes=notes)


def bench(study: Study, args, models) -> None:
    """All graphs of each model in one interleaved run per --timing-threads count, its dense fp32 graph first.
    The first count (the machine's cores) gives each point's p50_ms and speedup; every count adds a timing run."""
    from exporters.bench import BenchConfig, run_bench

    for threads in args.timing_threads:
        for model in models:
            points = [p for p in study.points if p["model"] == model and p.get("dir")]
            if not points:
                continue
            points.sort(key=lambda p: p["name"] != f"{model}-dense")
            report = run_bench([study.work / p["dir"] for p in points],
                               BenchConfig(providers=["cpu"], batch_sizes=[1, 8], seq_lens=[128],
                                           min_time_s=args.min_time, threads=threads),
                               study.work / f"bench-{model}-{threads}t", overwrite=True)
            cells = {(Path(c["target"]).name, c["batch_size"]): c for c in report["results"] if c["status"] == "ok"}
            first = threads == args.timing_threads[0]
            if first:
                study.machine = report["machine"]
            for p in points:
                p50 = {str(b): cells[(p["dir"], b)]["p50_ms"] if (p["dir"], b) in cells else None for b in (1, 8)}
                speedup = {str(b): cells[(p["dir"], b)].get("speedup_p50") if (p["dir"], b) in cells else None
                           for b in (1, 8)}
                if first:
                    p["p50_ms"], p["speedup"] = p50, speedup
                    p["speedup_rounds"] = {str(b): cells[(p["dir"], b)].get("speedup_rounds") for b in (1, 8)
                                           if (p["dir"], b) in cells}
                # every re-time (--keep) adds a run per thread count: the report judges the goal on the slowest
                # (timings on a shared VM move between runs far more than within one interleaved run)
                p.setdefault("timing_runs", []).append(dict(threads=threads, p50_ms=p50, speedup=speedup,
                                                            load=report["machine"].get("load_average")))
            dense = next(p for p in points if p["name"] == f"{model}-dense")
            for p in study.points:  # PyTorch points (claims) carry no latency of their own
                if p["model"] == model and not p.get("dir"):
                    p["p50_ms"], p["speedup"] = dense["p50_ms"], {"1": None, "8": None}
    study.record.write_text(json.dumps(dict(points=study.points), indent=1) + "\n")


# the claims' own comparisons (candidate, reference), beside each one's comparison with dense
CLAIM_PAIRS = [("single-sparse-adapter-0.8", "single-sparse-adapter-0.0"),
               ("single-sparse-adapter-0.95", "single-sparse-adapter-0.0"),
               ("single-adapt-by-pruning-probe", "single-omp-probe"), ("single-tamt-probe", "single-imp-probe"),
               ("single-tamt-probe", "single-omp-probe")]


def claim_pairs(study: Study, args) -> None:
    """Paired comparisons between claim points from their cached logits (point["vs"][reference])."""
    from compressor.data import load_data
    from paired import Scorer

    tags = {f"-{p['notes']['tag']}" for p in study.points if (p.get("notes") or {}).get("tag")} | {""}
    pairs = [(a + t, b + t) for a, b in CLAIM_PAIRS for t in tags]
    pairs = [(a, b) for a, b in pairs if study.has(a) and study.has(b)
             and (study.work / "logits" / f"{a}.npz").is_file() and (study.work / "logits" / f"{b}.npz").is_file()]
    if not pairs:
        return
    ctx = type("Spec", (), {"spec": load_data("glue:sst2", data_dir=args.glue_dir).spec})()
    scorer = Scorer.__new__(Scorer)
    scorer.ctx, scorer.source, scorer.cache = ctx, "cached", study.work / "logits"
    for a, b in pairs:
        study.get(a).setdefault("vs", {})[b] = scorer.compare(scorer.logits(a), scorer.logits(b))
    study.record.write_text(json.dumps(dict(points=study.points), indent=1) + "\n")


def merge(study: Study, other: Path, previous: dict) -> None:
    """Points of a parallel run's work directory `other`, with their graphs and cached logits, into the study;
    its commands and compute time into `previous` (the record this run extends)."""
    import shutil

    record = json.loads((other / "points.json").read_text())
    (study.work / "logits").mkdir(exist_ok=True)
    for p in record["points"]:
        if study.has(p["name"]):
            continue
        if p.get("dir") and not (study.work / p["dir"]).exists():
            shutil.move(str(other / p["dir"]), study.work / p["dir"])
        npz = other / "logits" / f"{p['name']}.npz"
        if npz.is_file():
            shutil.copy(npz, study.work / "logits" / npz.name)
        study.points.append(p)
    for npz in (other / "logits").glob("*-dense-torch.npz"):  # the claims' reference
        if not (study.work / "logits" / npz.name).exists():
            shutil.copy(npz, study.work / "logits" / npz.name)
    study.record.write_text(json.dumps(dict(points=study.points), indent=1) + "\n")
    if (other / "tradeoff.json").is_file():
        done = json.loads((other / "tradeoff.json").read_text())
        previous.setdefault("commands", []).extend(done.get("commands", []))
        previous.setdefault("parallel", []).append(done.get("run", {}).get("compute_s"))


def main(argv=None):
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glue-dir", default=str(ROOT.parent.parent / "shared" / "data" / "glue"))
    ap.add_argument("--models", default="fusion,single", help="models to compute: fusion, single, none")
    ap.add_argument("--stages", default="dense,claims,post-training", help="stages to compute (see --order)")
    ap.add_argument("--keep", action="store_true", help="use --out/tradeoff.json's points as the resume record too "
                    "(--models none --keep: re-time and re-render only)")
    ap.add_argument("--targets", type=floats, default=[1.5, 2.0, 2.5, 3.0], help="post-training speedup targets")
    ap.add_argument("--kd-targets", type=floats, default=[2.5, 3.0])
    ap.add_argument("--fixed-adapters", type=floats, default=[2.5], help="fusion targets with fused adapters kept")
    ap.add_argument("--kd-steps", type=int, default=200)
    ap.add_argument("--kd-tag", default="", help="suffix of the KD points' names (e.g. 900 for -kd900), so that "
                    "another --kd-steps budget adds points beside the saved ones")
    ap.add_argument("--examples", type=int, default=512, help="post-training's task examples")
    ap.add_argument("--claim-steps", type=int, default=200, help="training steps of a claim's method stage")
    ap.add_argument("--mask-steps", type=int, default=400, help="adapt-by-pruning's mask learning")
    ap.add_argument("--probe-steps", type=int, default=200)
    ap.add_argument("--sparse-steps", type=int, default=400, help="SparseAdapter's adapter training")
    ap.add_argument("--lottery-steps", type=int, default=150, help="lottery-fusion's training per round")
    ap.add_argument("--claim-tag", default="", help="suffix of the claim points' names (e.g. long for "
                    "single-omp-probe-long), so that other budgets add points beside the saved ones")
    ap.add_argument("--claim-methods", default=",".join(CLAIM_METHODS), type=lambda s: s.split(","),
                    help="the claims stage's methods (default: all)")
    ap.add_argument("--sparse-adapter", type=floats, default=[0.0, 0.8])
    ap.add_argument("--weights", type=float, default=0.5, help="encoder weight sparsity of the mask methods")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fidelity-examples", type=int, default=1000)
    ap.add_argument("--order", default="fusion-dense,fusion-pt,single-dense,single-pt,claims",
                    help="MODEL-dense (+ int8 only), MODEL-pt (post-training), claims: in this order")
    ap.add_argument("--table-wait", type=float, default=600, help="seconds to wait for a cached latency table")
    ap.add_argument("--merge", default="", help="comma-separated work directories of parallel runs (their --out "
                    "the same directory): their points, graphs and logits move into --work")
    ap.add_argument("--no-bench", action="store_true", help="keep the saved timings (render only)")
    ap.add_argument("--time-models", default="", help="comma-separated models to re-time (default: every model in "
                    "the record); the others keep their saved timings")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and scoring")
    ap.add_argument("--timing-threads", default="2,1", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="onnxruntime intra-op thread counts to time at, each its own run (see tradeoff.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT.parent / "out" / "tradeoff")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    saved = args.out / "tradeoff.json"
    previous = json.loads(saved.read_text()) if args.keep and saved.is_file() else {}
    previous = previous if previous.get("version") == 2 else {}  # not an older study's record
    if previous:
        known = {p["name"] for p in study.points}
        study.points += [p for p in previous["points"] if p["name"] not in known]
    for other in [Path(d) for d in args.merge.split(",") if d]:
        merge(study, other, previous)
    command = f"python benchmarks/tradeoff.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    commands = [c for c in previous.get("commands", []) if "--models none" not in c or "--merge" in c] + [command]
    models = [n for n in args.models.split(",") if n in KINDS]
    stages = args.stages.split(",")
    start = time.perf_counter()
    loaded, tables = {}, {}
    for step in args.order.split(","):  # post-training needs each model's cached latency table (see --table-wait)
        name, _, stage = step.partition("-")
        todo = [name] if name in models else models if name == "claims" else []
        stage = "claims" if name == "claims" else stage
        for n in todo:
            if n not in loaded:
                loaded[n] = Model(n, args)
            if stage == "dense" and "dense" in stages:
                stage_dense(study, loaded[n])
            elif stage == "pt" and "post-training" in stages:
                stage_dense(study, loaded[n])  # the reference of every point (a no-op once there)
                stage_post_training(study, loaded[n])
                tables[n] = getattr(loaded[n], "table", None)
            elif stage == "claims" and "claims" in stages:
                stage_claims(study, loaded[n])
    table_before = tables or None
    compute_s = round(time.perf_counter() - start)
    claim_pairs(study, args)
    t0 = time.perf_counter()
    run = dict(previous.get("run", {}))
    if not args.no_bench:
        wanted = [m for m in args.time_models.split(",") if m]
        bench(study, args, sorted({p["model"] for p in study.points if not wanted or p["model"] in wanted}))
        run["bench_s"] = round(time.perf_counter() - t0)
    else:
        study.machine = previous.get("machine", {})
    if models:
        run.update(compute_s=compute_s, latency_tables=table_before)
    from tradeoff_report import write_report

    record = dict(version=2, args={k: str(v) for k, v in vars(args).items() if k not in ("glue_dir", "work", "out")},
                  commands=commands, machine=study.machine, run=run, points=study.points)
    saved.write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, args.out)


if __name__ == "__main__":
    main()
