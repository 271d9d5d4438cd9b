"""Tiny models in AdapterHub's full-model format, written without the `adapters` library (fast, offline).

The format (config.json `adapters` section, state-dict key names) is the one `adapters` writes; the parity
tests in test_adapterhub_parity.py check our loader against the library itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (AutoModel, AutoModelForSequenceClassification, BertConfig, ElectraConfig, RobertaConfig,
                          XLMRobertaConfig)

from compressor.modeling.config import NAMED_ADAPTER_CONFIGS, NAMED_FUSION_CONFIGS


def tiny_config(model_type: str = "bert", **overrides):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=100, max_position_embeddings=64, hidden_act="gelu")
    common.update(overrides)
    if model_type in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if model_type == "roberta" else XLMRobertaConfig
        return cls(pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    if model_type == "electra":  # embeddings narrower than the hidden size: the embedding projection runs
        return ElectraConfig(embedding_size=16, **common)
    assert model_type == "bert", model_type
    return BertConfig(**common)


def make_model_dir(directory, model_type="bert", adapter_config="seq_bn", n_adapters=3, fusion="dynamic",
                   fusion_overrides=None, adapter_overrides=None, head=None, seed=0) -> Path:
    """Write a tiny model. head: None | "classifier" (transformers ...ForSequenceClassification) | "flex"
    (an AdapterHub prediction head named 't' with 3 labels). fusion: None or a fusion config name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if head == "classifier":
        config.num_labels = 3
        base = AutoModelForSequenceClassification.from_config(config)
        config.architectures = [base.__class__.__name__]
    else:
        base = AutoModel.from_config(config)
        config.architectures = [f"{type(base).__name__.replace('Model', '')}AdapterModel" if head == "flex"
                                else type(base).__name__]
    state = {k: v for k, v in base.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    prefix = "" if head is None else f"{base.base_model_prefix}."
    if head == "flex":
        state = {prefix + k: v for k, v in state.items()}
    names = [f"a{i}" for i in range(n_adapters)]
    acfg = dict(NAMED_ADAPTER_CONFIGS[adapter_config], **(adapter_overrides or {}))
    hidden = config.hidden_size
    for layer in range(config.num_hidden_layers):
        for site, flag in (("attention.output", "mh_adapter"), ("output", "output_adapter")):
            if not acfg[flag]:
                continue
            base_path = f"{prefix}encoder.layer.{layer}.{site}"
            for name in names:
                p = f"{base_path}.adapters.{name}"
                rf = acfg["reduction_factor"]
                rf = rf.get(str(layer), rf.get("default")) if isinstance(rf, dict) else rf
                width = max(1, int(hidden // rf))
                down = 0
                if acfg.get("ln_before"):  # AdapterHub registers this LayerNorm twice
                    ln_w, ln_b = 1 + torch.randn(hidden) * 0.1, torch.randn(hidden) * 0.1
                    state[f"{p}.adapter_norm_before.weight"], state[f"{p}.adapter_norm_before.bias"] = ln_w, ln_b
                    state[f"{p}.adapter_down.0.weight"], state[f"{p}.adapter_down.0.bias"] = ln_w.clone(), ln_b.clone()
                    down = 1
                state[f"{p}.adapter_down.{down}.weight"] = torch.randn(width, hidden) * 0.3
                state[f"{p}.adapter_down.{down}.bias"] = torch.randn(width) * 0.3
                if acfg.get("ln_after"):
                    state[f"{p}.adapter_norm_after.weight"] = 1 + torch.randn(hidden) * 0.1
                    state[f"{p}.adapter_norm_after.bias"] = torch.randn(hidden) * 0.1
                if acfg.get("use_gating"):
                    state[f"{p}.gate.weight"], state[f"{p}.gate.bias"] = torch.randn(1, hidden), torch.randn(1)
                if acfg.get("scaling") in ("learned", "channel"):
                    state[f"{p}.scaling"] = 1 + torch.randn(1 if acfg["scaling"] == "learned" else hidden) * 0.3
                state[f"{p}.adapter_up.weight"] = torch.randn(hidden, width) * 0.3
                state[f"{p}.adapter_up.bias"] = torch.randn(hidden) * 0.3
            if fusion:
                fcfg = dict(NAMED_FUSION_CONFIGS[fusion], **(fusion_overrides or {}))
                f = f"{base_path}.adapter_fusion_layer.{','.join(names)}"
                for proj in ("query", "key"):
                    if fcfg[proj]:
                        state[f"{f}.{proj}.weight"] = torch.randn(hidden, hidden) * 0.3
                        state[f"{f}.{proj}.bias"] = torch.randn(hidden) * 0.3
                if fcfg["value"]:
                    state[f"{f}.value.weight"] = torch.eye(hidden) + torch.randn(hidden, hidden) * 0.3
    raw = config.to_dict()
    raw["adapters"] = dict(
        adapters={n: "cfg" for n in names}, config_map={"cfg": acfg},
        fusions={",".join(names): "fcfg"} if fusion else {},
        fusion_config_map={"fcfg": dict(NAMED_FUSION_CONFIGS[fusion], **(fusion_overrides or {}))} if fusion else {}, fusion_name_map={",".join(names): names} if fusion else {},
    )
    if head == "flex":
        raw["prediction_heads"] = {"t": dict(head_type="classification", num_labels=3, layers=2,
                                             activation_function="tanh", use_pooler=False, bias=True)}
        state["heads.t.1.weight"], state["heads.t.1.bias"] = torch.randn(hidden, hidden) * 0.3, torch.randn(hidden)
        state["heads.t.4.weight"], state["heads.t.4.bias"] = torch.randn(3, hidden) * 0.3, torch.randn(3)
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def random_inputs(model_type: str, batch: int, seq: int, padding: str = "right", seed: int = 0, vocab: int = 100):
    """input_ids / attention_mask (/ token_type_ids) with `padding` in right | left | random."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    pos = torch.arange(seq)[None, :]
    if padding == "right":
        mask = pos < lengths[:, None]
    elif padding == "left":
        mask = pos >= (seq - lengths)[:, None]
    else:
        mask = torch.rand(batch, seq, generator=gen) < 0.7
        mask[:, 0] = True
    out = dict(input_ids=ids, attention_mask=mask.long())
    if model_type in ("bert", "electra"):
        out["token_type_ids"] = (pos >= seq // 2).long().expand(batch, seq).contiguous()
    return out
