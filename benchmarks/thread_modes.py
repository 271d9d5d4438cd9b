"""Why the study times at one thread too: on a VM, two-thread onnxruntime latency moves between processes.

Starts --processes fresh processes one after another. Each makes one plain session per graph and thread count
(exporters.runtime.make_session) and times them interleaved (exporters.bench.measure_interleaved), thread counts
in alternating order. Per process and thread count: each graph's p50 and its speed-up over the first graph.
Across processes: each speed-up's median, min and max. On our 2-vCPU development VM (cpuidle `haltpoll`) two-thread
runs fall into a fast and a slow mode that lasts seconds to minutes, with one-thread runs steady throughout:
a slow process adds about the same milliseconds to every graph, so speed-ups shrink (results in
benchmarks/results/thread_modes.md).

    python benchmarks/thread_modes.py DENSE_EXPORT OTHER_EXPORT ... [--threads 2,1] [--processes 8]
        [--batch-size 1] [--seconds 3] [--out benchmarks/results/thread_modes.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from exporters.bench import _ort_inputs, make_inputs, measure_interleaved, ort_runner, resolve_target  # noqa: E402
from exporters.runtime import make_session  # noqa: E402


def child(args) -> dict:
    """One process: {threads: {graph: p50 ms}}."""
    targets = [resolve_target(p) for p in args.targets]
    out = {}
    for n in args.threads if args.index % 2 == 0 else args.threads[::-1]:
        runs = {}
        for t in targets:
            s = make_session(t.onnx, "cpu", n)
            runs[t.name] = ort_runner(s, "cpu", make_inputs(_ort_inputs(s), args.batch_size, args.seq_len, seed=0))
        stats = measure_interleaved(runs, warmup=3, min_time_s=args.seconds, min_repeats=10, rounds=10)
        out[n] = {k: v["p50_ms"] for k, v in stats.items()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", type=Path, help="export directories or .onnx files; the first is the base")
    ap.add_argument("--threads", default="2,1", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per graph per thread count")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "thread_modes.md")
    ap.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)  # set in the child processes
    args = ap.parse_args(argv)
    if args.index is not None:
        print(json.dumps(child(args)))
        return
    names = [resolve_target(p).name for p in args.targets]
    load_before, results = os.getloadavg(), []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, *map(str, args.targets), "--threads", ",".join(map(str, args.threads)),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--seconds", str(args.seconds),
               "--index", str(i)]
        got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        results.append({int(k): v for k, v in got.items()})
        print(f"process {i + 1}/{args.processes}: " + "; ".join(
            f"{n}t " + ", ".join(f"{v:.2f}" for v in results[-1][n].values()) for n in args.threads), file=sys.stderr)
    lines = ["# Two-thread onnxruntime latency on a VM moves between processes (`benchmarks/thread_modes.py`)", "",
             f"Command: `python benchmarks/thread_modes.py {' '.join(str(p) for p in args.targets)} --threads "
             f"{','.join(map(str, args.threads))} --processes {args.processes} --batch-size {args.batch_size} "
             f"--seconds {args.seconds}`", "",
             f"{os.cpu_count()} CPUs, cpuidle driver `{_cpuidle()}`; sequence {args.seq_len}, batch "
             f"{args.batch_size}; load average {', '.join(f'{x:.2f}' for x in load_before)} before, "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} after. Processes ran one after another; inside "
             "each, every graph was timed interleaved at each thread count. p50 ms per process; speed-up = the first "
             "graph's p50 / the graph's p50 in the same process and thread count.", "",
             "| process | threads | " + " | ".join(f"{n} p50 ms" for n in names) + " | "
             + " | ".join(f"{n} speed-up" for n in names[1:]) + " |",
             "|---:|---:|" + "---:|" * (2 * len(names) - 1)]
    for i, r in enumerate(results):
        for n in args.threads:
            p50 = [r[n][k] for k in names]
            lines.append(f"| {i + 1} | {n} | " + " | ".join(f"{v:.2f}" for v in p50) + " | "
                         + " | ".join(f"{p50[0] / v:.2f}x" for v in p50[1:]) + " |")
    lines += ["", "| threads | graph | p50 ms: median (min-max) over processes | speed-up: median (min-max) |",
              "|---:|---|---|---|"]
    for n in args.threads:
        for k in names:
            ms = np.array([r[n][k] for r in results])
            sp = np.array([r[n][names[0]] / r[n][k] for r in results])
            lines.append(f"| {n} | {k} | {np.median(ms):.2f} ({ms.min():.2f}-{ms.max():.2f}) | "
                         f"{np.median(sp):.2f}x ({sp.min():.2f}-{sp.max():.2f}) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpuidle() -> str:
    path = Path("/sys/devices/system/cpu/cpuidle/current_driver")
    return path.read_text().strip() if path.is_file() else "unknown"


if __name__ == "__main__":
    main()
