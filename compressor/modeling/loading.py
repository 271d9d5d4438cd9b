"""`load_model`: a transformers encoder, an AdapterHub full model, base + adapter + fusion directories, or a
directory we wrote after compaction, into one plain nn.Module with our adapter modules.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for `.bin` files: never a pickle
that can run code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers import logging as hf_logging

from ..errors import ModelLoadError, UnsupportedAdapterError
from .architecture import (
    FlexHeadModel, PredictionHead, check_base_config, empty_model, head_kwargs, install_modules,
    manifest_from_adapterhub, resolve_setup,
)
from .config import BottleneckConfig, FusionConfig
from .descriptions import INVERTIBLE, describe
from .manifest import validate_manifest

MANIFEST_FILE = "compress_manifest.json"
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ADAPTER_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")

log = logging.getLogger(__name__)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-save the model") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not a {type(data).__name__}; re-save the model")
    return data


def read_weights(path: Path) -> dict:
    """A state dict from a .safetensors file, or a .bin / .pt file loaded with weights_only=True."""
    import pickle
    import warnings

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # never repeat torch's advice to retry with weights_only=False
        raise ModelLoadError(f"refusing to load {path}: it is a pickle holding more than tensors, which could run "
                             "code; only plain tensors are loaded. Re-save the weights with safetensors") from e
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        raise ModelLoadError(
            f"cannot read weights from {path}: {type(e).__name__}: {_first_line(e)} "
            "(is the file complete? re-save it with safetensors)"
        ) from e


def find_weights(directory: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ModelLoadError(f"{directory} has no {what} weights (expected one of: {', '.join(names)})")


def load_model(path=None, adapters: Optional[Sequence] = None, fusion=None, setup: Optional[str] = None,
               head: Optional[str] = None) -> nn.Module:
    """Load a model for pruning, compaction and export.

    path: a transformers encoder directory (BERT, RoBERTa; with or without a sequence-classification head), an
        AdapterHub full-model directory, or a directory written by `compress compact` (required:
        compressor.load_default_model() loads the embedded default).
    adapters: AdapterHub adapter directories to add to a base model. fusion: an AdapterHub fusion directory.
    setup: which adapter or fusion to run (default: the only fusion, else the only adapter).
    head: which AdapterHub prediction head to use (default: the only one).
    Returns an nn.Module in eval mode whose output has `.logits` (with a head) or `.last_hidden_state`.
    """
    if path is None:  # the default is chosen at the edge (compressor.api.load_default_model), not here
        raise ModelLoadError("load_model needs a model directory; for the embedded default use "
                             "compressor.load_default_model()")
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise ModelLoadError(f"model directory {path} {what}: give the directory that holds config.json")
    if (path / MANIFEST_FILE).is_file():
        if adapters or fusion:
            raise ModelLoadError(f"{path} is a compacted model: it cannot take extra adapters or fusions")
        return load_compacted(path)
    raw_config = read_json(path / "config.json")
    weights_file = find_weights(path, MODEL_WEIGHTS, "model")
    config = _auto_config(path)
    check_base_config(config)

    hub = raw_config.get("adapters") or {}
    adapter_cfgs, fusion_cfgs = _adapterhub_configs(hub)
    extra_weights = {}
    full_state = read_weights(weights_file)
    adapter_key = describe(config).adapter_key
    extra_weights.update({k: v for k, v in full_state.items() if adapter_key.match(k) or k.startswith("heads.")})
    heads_cfg = dict(raw_config.get("prediction_heads") or {})
    for adapter_dir in adapters or ():
        name, cfg, weights, head_cfg = _read_adapter_dir(Path(adapter_dir), config.hidden_size)
        if name in adapter_cfgs:
            raise ModelLoadError(f"adapter '{name}' is given twice (in the model and in {adapter_dir})")
        adapter_cfgs[name] = cfg
        extra_weights.update(weights)
        if head_cfg is not None:  # AdapterHub saves an adapter's prediction head beside it
            heads_cfg[name] = head_cfg
    if fusion is not None:
        fname, names, fcfg, weights = _read_fusion_dir(Path(fusion), adapter_cfgs)
        fusion_cfgs[fname] = (names, fcfg)
        fusion_head = _read_head(Path(fusion), weights)
        if fusion_head is not None:
            heads_cfg[fusion_head[0] or fname] = fusion_head[1]
        extra_weights.update(weights)

    architectures = raw_config.get("architectures") or []
    seq_cls = any(a.endswith("ForSequenceClassification") for a in architectures)
    if (heads_cfg and not seq_cls) or any(a.endswith("AdapterModel") for a in architectures):
        model_class = "flex"
    elif seq_cls:
        model_class = "sequence_classification"
    elif not architectures or any(a.endswith("Model") for a in architectures):
        model_class = "encoder"
    else:
        raise UnsupportedAdapterError(
            f"architecture {architectures[0]} is not supported: use an encoder (BertModel, RobertaModel), a "
            "...ForSequenceClassification model or an AdapterHub model with a classification head"
        )
    active_head = None
    if model_class == "flex" and heads_cfg:
        active_head = head or (next(iter(heads_cfg)) if len(heads_cfg) == 1 else None)
        if active_head not in heads_cfg:
            raise UnsupportedAdapterError(
                f"choose a prediction head with --head (heads: {', '.join(heads_cfg)})"
            )
        heads_cfg = {active_head: heads_cfg[active_head]}

    manifest = manifest_from_adapterhub(config, model_class, adapter_cfgs, fusion_cfgs, heads_cfg, active_head)
    resolve_setup(manifest, setup)
    model = _load_base(path, config, model_class, full_state)
    manifest["pooler"] = getattr(model.base_model, "pooler", None) is not None
    if model_class == "flex":
        heads = {n: PredictionHead(config.hidden_size, **head_kwargs(h, config)) for n, h in heads_cfg.items()}
        model = FlexHeadModel(model, heads, active_head)
    install_modules(model, manifest)
    _load_extra(model, extra_weights)
    return model.eval()


def _auto_config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError... for a bad config.json
        raise ModelLoadError(f"{path}/config.json is not a transformers config transformers can read: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _adapterhub_configs(hub: dict):
    adapter_cfgs, fusion_cfgs = {}, {}
    config_map = hub.get("config_map", {})
    for name, cfg_id in (hub.get("adapters") or {}).items():
        raw = config_map.get(cfg_id, cfg_id) if isinstance(cfg_id, str) else cfg_id
        adapter_cfgs[name] = BottleneckConfig.from_adapterhub(raw, name)
    fusion_map = hub.get("fusion_config_map", {})
    for fname, cfg_id in (hub.get("fusions") or {}).items():
        names = (hub.get("fusion_name_map") or {}).get(fname, fname.split(","))
        raw = fusion_map.get(cfg_id, cfg_id) if isinstance(cfg_id, str) else cfg_id
        unknown = [n for n in names if n not in adapter_cfgs]
        if unknown:
            raise ModelLoadError(f"fusion '{fname}' fuses adapter(s) {', '.join(unknown)} that the model does not have")
        fusion_cfgs[fname] = (list(names), FusionConfig.from_adapterhub(raw, fname))
    return adapter_cfgs, fusion_cfgs


def _read_adapter_dir(directory: Path, hidden_size: int):
    meta = read_json(directory / "adapter_config.json")
    name = meta.get("name") or directory.name
    if meta.get("hidden_size") not in (None, hidden_size):
        raise ModelLoadError(
            f"adapter '{name}' in {directory} was trained for hidden size {meta['hidden_size']}, the model has {hidden_size}"
        )
    cfg = BottleneckConfig.from_adapterhub(meta.get("config", meta), name)
    weights = read_weights(find_weights(directory, ADAPTER_WEIGHTS, "adapter"))
    head = _read_head(directory, weights)
    return name, cfg, weights, head[1] if head else None


def _read_head(directory: Path, weights: dict):
    """(name, config) of a prediction head AdapterHub saved beside an adapter or fusion; its weights go into
    `weights`. A transformers-head model saves a head with config null: that head is the base model's."""
    if not (directory / "head_config.json").is_file():
        return None
    meta = read_json(directory / "head_config.json")
    if not meta.get("config"):
        return None
    weights.update(read_weights(find_weights(directory, HEAD_WEIGHTS, "prediction head")))
    return meta.get("name"), meta["config"]


def _read_fusion_dir(directory: Path, adapter_cfgs: dict):
    meta = read_json(directory / "adapter_fusion_config.json")
    names = list(meta.get("adapter_names") or [])
    fname = meta.get("name") or ",".join(names)
    missing = [n for n in names if n not in adapter_cfgs]
    if missing:
        raise ModelLoadError(
            f"fusion '{fname}' in {directory} fuses adapter(s) {', '.join(missing)} that are not loaded; pass them with --adapter"
        )
    fcfg = FusionConfig.from_adapterhub(meta.get("config", "dynamic"), fname)
    weights = read_weights(find_weights(directory, FUSION_WEIGHTS, "fusion"))
    return fname, names, fcfg, weights


def _load_base(path: Path, config, model_class: str, full_state: dict) -> nn.Module:
    cls = AutoModelForSequenceClassification if model_class == "sequence_classification" else AutoModel
    kwargs = {} if cls is AutoModelForSequenceClassification or not describe(config).pooler else dict(
        add_pooling_layer=any(".pooler." in k or k.startswith("pooler.") for k in full_state))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # adapter and head keys are "unexpected" to transformers: we load them
    try:
        return cls.from_pretrained(path, config=config, attn_implementation="eager", **kwargs)
    except Exception as e:
        raise ModelLoadError(f"transformers cannot load the base model in {path}: {_error_detail(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)


def _load_extra(model: nn.Module, weights: dict) -> None:
    """Load adapter, fusion and head weights, whatever model class the checkpoint was saved from."""
    own = model.state_dict()
    d = describe(model.base_model.config)
    prefix = next((k.split(d.layers + ".")[0] for k in own if d.layers + "." in k), "")
    wanted = {k for k in own if ".adapters." in k or ".adapter_fusion_layer." in k or k.startswith("heads.")
              or k.startswith(f"{prefix}{INVERTIBLE}.")}
    mapped = {}
    for key, value in weights.items():
        m = d.adapter_key.match(key)
        target = prefix + m.group(1) if m else key
        if target in wanted:
            if value.shape != own[target].shape:
                raise ModelLoadError(
                    f"weight {key} has shape {tuple(value.shape)}, the adapter config implies {tuple(own[target].shape)}"
                )
            mapped[target] = value
    missing = sorted(wanted - set(mapped))
    if missing:
        raise ModelLoadError(
            f"{len(missing)} adapter/fusion/head weight(s) missing from the checkpoint, e.g. {missing[0]}"
        )
    model.load_state_dict(mapped, strict=False)


def load_compacted(path: Path) -> nn.Module:
    manifest = read_json(path / MANIFEST_FILE)
    if manifest.get("format") != "compressor-manifest":
        raise ModelLoadError(f"{path / MANIFEST_FILE} is not a compressor manifest")
    config = _auto_config(path)
    check_base_config(config)
    validate_manifest(manifest, config.num_hidden_layers, path / MANIFEST_FILE)
    state = read_weights(find_weights(path, ("model.safetensors",), "model"))
    try:
        model = empty_model(config, manifest)
        result = model.load_state_dict(state, strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a field the checks above do not cover
        raise ModelLoadError(f"{path}: the weights or {MANIFEST_FILE} do not fit together ({type(e).__name__}: "
                             f"{_first_line(e)}); re-run compress compact on the original model") from e
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise ModelLoadError(f"{path}/model.safetensors does not match its manifest (e.g. {bad}); re-run compress compact")
    return model.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error_detail(e: BaseException) -> str:
    """The first line of an error and, for torch's "Error(s) in loading state_dict", the first reason below it
    (the size mismatch that says which tensor is wrong)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    reason = next((line for line in lines[1:] if "size mismatch" in line or "Missing key" in line), None)
    return f"{lines[0]} {reason}" if reason else lines[0]
