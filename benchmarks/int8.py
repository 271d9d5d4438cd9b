"""int8 on the embedded default (issue 15, item 2): what each quantization candidate costs on MRPC dev (paired,
against the fp32 export) and how much faster it runs.

Steps, in a work directory (reused when there):

1. `compress export --onnx --seed 0 --out WORK/fp32`: the fp32 reference.
2. The candidates, built with exporters/quantization.py from WORK/fp32/model.onnx, calibrated and measured on
   MRPC training rows exactly as `compress export --quantize int8 --data glue:mrpc` does (one seeded shuffle:
   128 calibration rows, the next 256 to measure): dynamic and static, per-tensor and per-channel, then the
   sensitivity-ranked fp32 fallbacks (1..MAX_KEPT units) of the least costly scheme. Each becomes an export
   directory WORK/NAME (the candidate as model.onnx beside the fp32 export's tokenizer and config).
3. `compress eval WORK/NAME --data glue:mrpc --against WORK/fp32 --fidelity-examples 1000 --json`: paired
   difference with its 95% bootstrap interval, agreement on dev, fidelity on training rows.
4. `compress bench WORK/fp32 WORK/NAME... --batch-sizes 1,8 --seq-lens 128 --threads 1`, for the schemes and
   then for the fp32 fallbacks: latency ratios against fp32, the targets timed in turn (interleaved).
5. benchmarks/results/int8.md.

    python benchmarks/int8.py --data-dir ../shared/data/glue --work out/int8 [--out-md benchmarks/results/int8.md]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

SMALL_FILES = ("config.json", "compress_manifest.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")


def sh(*args) -> None:
    print("$", " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], check=True)


def candidates(fp32: Path, work: Path, data_dir: Path) -> list:
    """Build every candidate directory; returns [(name, fidelity on the measuring rows, units kept fp32)]."""
    from transformers import AutoTokenizer

    from compressor.data import load_data
    from exporters import quantization as q

    record = work / "candidates.json"
    if record.exists():
        return json.loads(record.read_text())
    rows = list(load_data("glue:mrpc", data_dir=data_dir).train)
    random.Random(0).shuffle(rows)  # as compressor/api.py's _int8_setup
    setup = q.setup_from_examples(rows, AutoTokenizer.from_pretrained(str(fp32)), 128, "glue:mrpc training rows")
    ws = q.Workspace(fp32 / "model.onnx", setup, progress=print)
    out = []

    def keep(name, fid, path, kept):
        d = work / name
        d.mkdir(exist_ok=True)
        for f in SMALL_FILES:
            if (fp32 / f).exists():
                shutil.copy(fp32 / f, d / f)
        shutil.move(str(path), d / "model.onnx")
        out.append(dict(name=name, kept=kept, **fid))
        print(name, fid, flush=True)

    try:
        for scheme in q.SCHEMES:
            keep(scheme.name, *ws.measure(scheme), [])
        best = min(out, key=lambda c: c["cost"])
        scheme = next(s for s in q.SCHEMES if s.name == best["name"])
        ranking = q.sensitivity(ws, scheme)
        for k in range(1, q.MAX_KEPT + 1):
            units = ranking[:k]
            fid, path = ws.measure(scheme, exclude=[n for r in units for n in r["nodes"]])
            keep(f"{scheme.name}+{k}fp32", fid, path, [r["unit"] for r in units])
    finally:
        ws.close()
    result = dict(source=setup.source, candidates=out,
                  sensitivity=[{k: r[k] for k in ("unit", "cost", "agreement")} for r in ranking])
    record.write_text(json.dumps(result, indent=1))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="GLUE directory (MRPC/train.tsv, dev.tsv)")
    ap.add_argument("--work", type=Path, required=True, help="work directory (reused)")
    ap.add_argument("--out-md", type=Path, default=Path(__file__).parent / "results" / "int8.md")
    ap.add_argument("--only", default=None, help="comma-separated candidate names to evaluate and bench")
    ap.add_argument("--fidelity-examples", type=int, default=1000, help="compress eval --fidelity-examples")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not (fp32 / "model.onnx").exists():
        sh("export", "--onnx", "--seed", "0", "--out", fp32)
    built = candidates(fp32, work, args.data_dir)
    names = [c["name"] for c in built["candidates"]]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    evals = {}
    for name in names:
        js = work / f"eval-{name}.json"
        if not js.exists():
            sh("eval", work / name, "--data", "glue:mrpc", "--data-dir", args.data_dir, "--against", fp32,
               "--fidelity-examples", args.fidelity_examples, "--json", js, "--overwrite")
        evals[name] = json.loads(js.read_text())
    reports = []  # two runs, each against fp32: the plain schemes, then the fp32 fallbacks
    for group, members in (("schemes", [n for n in names if "fp32" not in n]),
                           ("fallbacks", [n for n in names if "fp32" in n])):
        bench = work / f"bench-{group}"
        if members and not (bench / "report.json").exists():
            sh("bench", fp32, *[work / n for n in members], "--batch-sizes", "1,8", "--seq-lens", "128",
               "--threads", "1", "--out", bench, "--overwrite")
        if (bench / "report.json").exists():
            reports.append(json.loads((bench / "report.json").read_text()))
    write_md(args.out_md, built, evals, reports, names, args.only, args.fidelity_examples)


def speedups(reports: list) -> dict:
    """{(target name, batch): (p50 speedup vs the first target, its IQR text)} from bench's report.json files."""
    out = {}
    for cell in [c for report in reports for c in report["results"]]:
        if cell.get("status") != "ok":
            continue
        r = cell.get("speedup_rounds")
        iqr = f"{r['q1']:.2f}-{r['q3']:.2f}" if r else None
        out[(Path(cell["target"]).name, cell["batch_size"])] = cell.get("speedup_p50"), iqr
    return out


def write_md(path: Path, built: dict, evals: dict, reports: list, names: list, only, fidelity: int) -> None:
    sp = speedups(reports)
    lines = ["# int8 on the embedded default (MRPC fusion)", "",
             "Made by `python benchmarks/int8.py --data-dir ../shared/data/glue --work WORK"
             + (f" --only {only}" if only else "") + "` (that runs "
             "`compress export --onnx --seed 0 --out WORK/fp32`, builds the candidates with "
             "exporters/quantization.py, then per candidate `compress eval WORK/NAME --data glue:mrpc --against "
             f"WORK/fp32 --fidelity-examples {fidelity} --json ...` and `compress bench WORK/fp32 WORK/NAME... "
             "--batch-sizes 1,8 --seq-lens 128 --threads 1` twice (the schemes, then the fp32 fallbacks), each "
             "against fp32).", "",
             f"Candidates calibrated and measured on {built['source']}, as `compress export --quantize int8 --data "
             "glue:mrpc` does. `KL (select)`: mean KL(fp32 || int8) on those measuring rows, what the export's "
             "choice reads. Dev: MRPC's 408 dev rows, accuracy difference to fp32 with its 95% paired bootstrap "
             "interval (1000 resamples), agreement of predictions; fidelity: agreement and mean KL on the "
             "training rows `compress eval` uses. Speed-up: fp32 p50 / candidate p50 at sequence 128, 1 thread, "
             "the targets timed in turn (IQR of the per-round ratio in brackets).", "",
             "| candidate | kept fp32 | KL (select) | dev acc. diff, pt [95% CI] | dev agreement | fidelity agreement "
             "| fidelity KL | speed-up b1 | speed-up b8 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in built["candidates"]:
        if c["name"] not in names:
            continue
        e = evals[c["name"]]
        d = next(r for r in e["differences"] if r["metric"] == "accuracy")
        fid = e["fidelity"]

        def s(b):
            v, iqr = sp.get((c["name"], b), (None, None))
            return "-" if v is None else f"{v:.2f}x" + (f" [{iqr}]" if iqr else "")

        lines.append(f"| {c['name']} | {', '.join(c['kept']) or '-'} | {c['cost']:.2e} | "
                     f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | "
                     f"{e['agreement']['agreement']:.3f} | {fid.get('agreement', float('nan')):.3f} | "
                     f"{fid.get('mean_kl', float('nan')):.4f} | {s(1)} | {s(8)} |")
    lines += ["", "Sensitivity of the least costly scheme (each unit quantized alone, mean KL on the measuring rows, "
              "costliest first): " + ", ".join(f"{r['unit']} {r['cost']:.2e}" for r in built["sensitivity"]) + ".",
              "", f"Machine: {reports[0]['machine'].get('processor', '?') if reports else '?'}, "
              f"{reports[0]['machine'].get('cpu_count', '?') if reports else '?'} cores, shared (timings interleaved).",
              ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
