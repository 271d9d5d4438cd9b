"""How long `post-training` takes per stage on a default, and its peak memory (issue 14: <= 5 minutes on 2 cores).

One process per run (the peak RSS is the process's): loads the default as `compress prune` does, prunes with
`post-training` at one target, and prints one JSON line: the method's own stage times (wall seconds: Fisher,
search, rearrangement, mask tuning), the process CPU seconds and wall time of the whole `prune` call, peak RSS,
the load average and the rearrangement summary. Compare versions by alternating runs (A, B, A, B) in one shell
loop and taking ratios of medians; a busy machine stretches wall times, so record the load.

    python benchmarks/post_training_speed.py [--default single|fusion] [--target-flops 0.5] [--examples 1024]
        [--option rearrange=false]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from compressor import load_model  # noqa: E402
from compressor.api import load_task, load_tokenizer  # noqa: E402
from compressor.default_model import PACKAGED, default_model_dir, minilm_dir  # noqa: E402
from compressor.pruning import prune  # noqa: E402
from compressor.training import TrainConfig  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default", choices=("single", "fusion"), default="single",
                    help="single: MiniLM + the SST-2 adapter and head; fusion: the SST-2 fusion default")
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE, passed to the method")
    ap.add_argument("--glue-dir", type=Path, default=ROOT.parent.parent / "shared" / "data" / "glue")
    args = ap.parse_args(argv)
    if args.default == "single":
        model = load_model(minilm_dir(), adapters=[PACKAGED / "sst2"], setup="sst2", head="sst2")
    else:
        model = load_model(default_model_dir("sst2"))
    ctx = load_task("glue:sst2", load_tokenizer(minilm_dir(), model), TrainConfig(max_length=128),
                    data_dir=args.glue_dir)
    options = dict(target_flops=args.target_flops, examples=args.examples)
    for kv in args.option:
        k, v = kv.split("=", 1)
        options[k] = {"true": True, "false": False}.get(v.lower(), v)
    load = os.getloadavg()[0]
    cpu, wall = time.process_time(), time.perf_counter()
    ms = prune(model, "post-training", {}, seed=0, data=ctx, options=options)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    r = ms.extra.get("rearrangement") or {}
    print(json.dumps(dict(default=args.default, options=options, stages=ms.extra["seconds"], prune_wall=round(wall, 1),
                          prune_cpu=round(cpu, 1), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                          load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2),
                          flops_fraction=ms.extra["flops_fraction"], counts=ms.counts(),
                          rearrangement=r.get("kinds"))), flush=True)


if __name__ == "__main__":
    main()
