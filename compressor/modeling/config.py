"""AdapterHub adapter and fusion configurations, resolved into the few options that change the computation.

We read AdapterHub's `adapter_config.json` / `adapter_fusion_config.json` (and the `adapters` section of a
full-model `config.json`) without importing the `adapters` library. Every option that would make our modules
compute something different from AdapterHub is either implemented here or rejected by name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Union

from ..errors import UnsupportedAdapterError

# AdapterHub's named bottleneck configurations (adapters/configuration/adapter_config.py).
_SEQ_BN = dict(
    original_ln_before=True, original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False,
    ln_before=False, ln_after=False, mh_adapter=False, output_adapter=True, non_linearity="relu",
    reduction_factor=16,
)
_DOUBLE_SEQ_BN = dict(
    _SEQ_BN, original_ln_before=False, mh_adapter=True, non_linearity="swish",
)
# MAD-X's language adapters: the same bottlenecks plus an invertible adapter on the embeddings (SeqBnInvConfig,
# DoubleSeqBnInvConfig)
_INV = dict(inv_adapter="nice", inv_adapter_reduction_factor=2)
NAMED_ADAPTER_CONFIGS = {"seq_bn": _SEQ_BN, "pfeiffer": _SEQ_BN, "double_seq_bn": _DOUBLE_SEQ_BN, "houlsby": _DOUBLE_SEQ_BN,
                         "seq_bn_inv": dict(_SEQ_BN, **_INV), "pfeiffer+inv": dict(_SEQ_BN, **_INV),
                         "double_seq_bn_inv": dict(_DOUBLE_SEQ_BN, **_INV), "houlsby+inv": dict(_DOUBLE_SEQ_BN, **_INV)}
# He et al.'s parallel adapter (ParBnConfig): reads the sub-layer's input, its scaled output is added to the output
_PAR_BN = dict(_SEQ_BN, original_ln_before=False, reduction_factor=2, scaling=4.0, is_parallel=True)
NAMED_ADAPTER_CONFIGS.update(par_bn=_PAR_BN, parallel=_PAR_BN)
# AdapterHub's GLOW coupling block (adapters/methods/modeling.py) slices the sequence axis where it means the
# features and returns a list: it fails on every [batch, seq, hidden] input, so no glow adapter ever ran there
INV_ADAPTERS = ("nice",)

_FUSION_STATIC = dict(key=True, query=True, value=False, query_before_ln=False, residual_before=False,
                      temperature=False, value_before_softmax=True)
_FUSION_DYNAMIC = dict(_FUSION_STATIC, value=True)
NAMED_FUSION_CONFIGS = {"static": _FUSION_STATIC, "dynamic": _FUSION_DYNAMIC}

# The other methods AdapterHub saves (adapter_config.json "architecture", and what tells its variants apart):
# named in their refusal, with what a user can do instead.
_CONVERT = "train or convert it as a bottleneck adapter (seq_bn, double_seq_bn, par_bn, seq_bn_inv)"
_MERGE = ("merge it into the base weights with AdapterHub's model.merge_adapter(name), save the model without "
          "adapters, and compress that")
_METHOD_ADVICE = {"LoRA": _MERGE, "IA3": _MERGE, "VeRA": _MERGE, "DoRA": _MERGE}


def unsupported_method(raw: Mapping) -> Optional[str]:
    """The name of the (non-bottleneck) method an AdapterHub adapter config describes, None for a bottleneck."""
    arch = raw.get("architecture")
    if arch == "lora":
        init = str(raw.get("init_weights", "lora")).lower()
        return {"ia3": "IA3", "vera": "VeRA"}.get(init, "DoRA" if raw.get("use_dora") else
                                                   "IA3" if raw.get("composition_mode") == "scale" else "LoRA")
    if arch in ("prefix_tuning", "prompt_tuning"):
        return arch.replace("_", " ")
    if arch in ("reft", "loreft", "noreft", "direft"):
        return "ReFT"
    if arch == "union":
        return "a config union (MAM / UniPELT)"
    if raw.get("phm_layer"):
        return "Compacter (phm_layer=True)"
    return None


# Options that must hold these values, else the adapter computes something we do not implement.
_REQUIRED_VALUES = {
    "architecture": (None, "bottleneck"),
    "phm_layer": (False,),
    "cross_adapter": (False,),
}
# Options that only matter during training or initialisation.
_IGNORED = {
    "dropout", "init_weights", "init_weights_seed", "stochastic_depth",
    "factorized_phm_W", "factorized_phm_rule", "hypercomplex_nonlinearity", "learn_phm", "phm_bias",
    "phm_c_init", "phm_dim", "phm_init_range", "phm_rank", "shared_W_phm", "shared_phm_rule",
}


# Adapter and fusion names become module keys and file names: no '.', '/' or other path characters.
# A fusion's name may list its adapters comma-separated, as AdapterHub names fusions.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_FUSION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*(,[A-Za-z0-9_][A-Za-z0-9_\-]*)*")


def check_name(name: Any, what: str) -> str:
    """An adapter / fusion / head name that is safe as a module key and as a directory name."""
    pattern = _FUSION_NAME if what == "fusion" else _NAME
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise UnsupportedAdapterError(f"{what} name {name!r} is not allowed: use letters, digits, '_' and '-' "
                                      "only (no '.', '/' or spaces); rename it in its config")
    return name


def _check_activation(name: Any, adapter: str) -> None:
    from transformers.activations import ACT2FN

    if name is None or (isinstance(name, str) and (name.lower() in ACT2FN or name.lower() == "leakyrelu")):
        return
    raise UnsupportedAdapterError(f"adapter '{adapter}': non_linearity={name!r} is not an activation AdapterHub "
                                  f"knows; use one of relu, swish, gelu, tanh, leakyrelu ...")


def _check_type(owner: str, key: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise UnsupportedAdapterError(f"{owner}: {key}={value!r} must be {what}")


@dataclass
class BottleneckConfig:
    """One bottleneck adapter: what it computes and where it sits."""

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: Union[float, dict] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    use_gating: bool = False
    scaling: Union[float, str] = 1.0
    leave_out: list = field(default_factory=list)
    inv_adapter: Optional[str] = None  # an invertible adapter on the embeddings (modeling/invertible.py)
    inv_adapter_reduction_factor: Optional[float] = None
    is_parallel: bool = False  # AdapterHub's ParallelAdapter (par_bn)

    @classmethod
    def from_adapterhub(cls, raw: Union[str, Mapping[str, Any]], name: str = "?") -> "BottleneckConfig":
        if name != "?":
            check_name(name, "adapter")
        if not isinstance(raw, (str, Mapping)):
            raise UnsupportedAdapterError(f"adapter '{name}': its config must be a name or a JSON object, not "
                                          f"{type(raw).__name__}")
        if isinstance(raw, str):
            if raw.lower() not in NAMED_ADAPTER_CONFIGS:
                raise UnsupportedAdapterError(
                    f"adapter '{name}': config '{raw}' is not supported; supported: seq_bn (pfeiffer), double_seq_bn "
                    "(houlsby), seq_bn_inv (pfeiffer+inv), double_seq_bn_inv (houlsby+inv), par_bn (parallel)"
                )
            raw = NAMED_ADAPTER_CONFIGS[raw.lower()]
        raw = dict(raw)
        nested = raw.pop("invertible_adapter", None)  # AdapterHub v1's form, read as AdapterHub reads it today
        if nested:
            if not isinstance(nested, Mapping) or "block_type" not in nested:
                raise UnsupportedAdapterError(f"adapter '{name}': invertible_adapter={nested!r} must be an object "
                                              "with block_type and reduction_factor")
            raw.update(inv_adapter=nested["block_type"], inv_adapter_reduction_factor=nested.get("reduction_factor"))
        method = unsupported_method(raw)
        if method:
            raise UnsupportedAdapterError(f"adapter '{name}' is {method}, which compressor does not support; "
                                          f"{_METHOD_ADVICE.get(method, _CONVERT)}")
        for key, allowed in _REQUIRED_VALUES.items():
            if key in raw and raw[key] not in allowed:
                raise UnsupportedAdapterError(
                    f"adapter '{name}': option {key}={raw[key]!r} is not supported (only {allowed[-1]!r}); "
                    "convert the adapter to a sequential bottleneck (seq_bn or double_seq_bn)"
                )
        known = set(cls.__dataclass_fields__) | set(_REQUIRED_VALUES) | _IGNORED
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UnsupportedAdapterError(f"adapter '{name}': unknown option(s) {', '.join(unknown)}; cannot load it faithfully")
        cfg = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        cfg._validate(name)
        return cfg

    def _validate(self, name: str) -> None:
        owner = f"adapter '{name}'"
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after",
                    "adapter_residual_before_ln", "ln_before", "ln_after", "use_gating", "is_parallel"):
            _check_type(owner, key, getattr(self, key), (bool,), "true or false")
        _check_activation(self.non_linearity, name)
        if not isinstance(self.leave_out, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out):
            raise UnsupportedAdapterError(f"{owner}: leave_out={self.leave_out!r} must be a list of layer indices")
        self.leave_out = list(self.leave_out)
        if self.residual_before_ln not in (True, False, "post_add"):
            raise UnsupportedAdapterError(f"adapter '{name}': residual_before_ln={self.residual_before_ln!r} is not supported")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise UnsupportedAdapterError(f"adapter '{name}': residual_before_ln='post_add' needs original_ln_before=True")
        if not (isinstance(self.scaling, (int, float)) or self.scaling in ("learned", "channel")):
            raise UnsupportedAdapterError(f"adapter '{name}': scaling={self.scaling!r} is not supported")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, Mapping) else [self.reduction_factor]
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
            raise UnsupportedAdapterError(f"{owner}: reduction_factor={self.reduction_factor!r} must be a number "
                                          "(or a mapping of layer to number), not text")
        if not all(f > 0 for f in factors):
            raise UnsupportedAdapterError(f"{owner}: reduction_factor={self.reduction_factor!r} must be > 0")
        if self.inv_adapter is not None:
            if self.inv_adapter == "glow":
                raise UnsupportedAdapterError(
                    f"{owner}: option inv_adapter='glow' is not supported: AdapterHub's own GLOW block fails on "
                    "every token sequence, so no glow adapter computes anything to match; use inv_adapter='nice'")
            if self.inv_adapter not in INV_ADAPTERS:
                raise UnsupportedAdapterError(f"{owner}: option inv_adapter={self.inv_adapter!r} is not supported "
                                              f"(only {', '.join(map(repr, INV_ADAPTERS))}, or null for none)")
            rf = self.inv_adapter_reduction_factor
            if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 0:
                raise UnsupportedAdapterError(f"{owner}: inv_adapter_reduction_factor={rf!r} must be a number > 0")

    def width(self, hidden_size: int, layer: int) -> int:
        """Bottleneck width as AdapterHub computes it: int(hidden // reduction_factor), at least 1."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer) in rf:
                rf = rf[str(layer)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise UnsupportedAdapterError(f"reduction_factor mapping {rf} has no entry for layer {layer} and no 'default'")
        return max(1, int(hidden_size // rf))

    def placement(self) -> dict:
        """The options that decide how a site wires residuals and the layer norm around its adapters."""
        return dict(
            original_ln_before=self.original_ln_before,
            original_ln_after=self.original_ln_after,
            residual_before_ln=self.residual_before_ln,
            **({"is_parallel": True} if self.is_parallel else {}),  # written only when true: old manifests stay
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.inv_adapter is None:  # manifests of models without one stay as they were
            del out["inv_adapter"], out["inv_adapter_reduction_factor"]
        if not self.is_parallel:
            del out["is_parallel"]
        return out


@dataclass
class FusionConfig:
    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    value_before_softmax: bool = True  # V is linear and bias-free: before or after the weighted sum is the same
    temperature: bool = False  # AdapterHub anneals T only in training; inference uses T = 1

    @classmethod
    def from_adapterhub(cls, raw: Union[str, Mapping[str, Any]], name: str = "?") -> "FusionConfig":
        if name != "?":
            check_name(name, "fusion")
        if not isinstance(raw, (str, Mapping)):
            raise UnsupportedAdapterError(f"fusion '{name}': its config must be a name or a JSON object, not "
                                          f"{type(raw).__name__}")
        if isinstance(raw, str):
            if raw not in NAMED_FUSION_CONFIGS:
                raise UnsupportedAdapterError(f"fusion '{name}': config '{raw}' is not supported; supported: dynamic, static")
            raw = NAMED_FUSION_CONFIGS[raw]
        raw = {k: v for k, v in dict(raw).items()
               if k not in ("regularization", "value_initialized", "dropout_prob", "architecture")}
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise UnsupportedAdapterError(f"fusion '{name}': unknown option(s) {', '.join(unknown)}")
        for key, value in raw.items():
            _check_type(f"fusion '{name}'", key, value, (bool,), "true or false")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)
