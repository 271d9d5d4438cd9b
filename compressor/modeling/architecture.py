"""The architecture manifest and the surgery that puts our modules into a transformers encoder.

A manifest is a JSON-able dict that fixes every shape of a model: per layer the head count and FFN width, per
adapter site (`mh_adapter` after attention, `output_adapter` after the FFN) its adapters, fusions, active setup
and placement. The loader derives one from AdapterHub configs; compaction writes a smaller one; a compacted
directory is rebuilt from it (no pickles).
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import UnsupportedAdapterError
from . import compositions, invertible, modules
from .config import BottleneckConfig, FusionConfig
from .descriptions import describe, set_submodule, submodule
from .modules import AdapterSite, Bottleneck, Fusion, Intermediate, PredictionHead, SelfAttention

SITES = ("mh_adapter", "output_adapter")
MANIFEST_VERSION = 1


class FlexHeadModel(nn.Module):
    """An AdapterHub flex-head model (BertAdapterModel, RobertaAdapterModel): encoder + named prediction heads.

    Kept as a wrapper even without heads so that module paths carry AdapterHub's prefix (`bert.encoder...`)."""

    def __init__(self, encoder: nn.Module, heads: dict, active_head: str):
        super().__init__()
        self.base_model_prefix = encoder.base_model_prefix
        setattr(self, self.base_model_prefix, encoder)
        self.config = encoder.config
        self.heads = nn.ModuleDict(heads)
        self.active_head = active_head

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if token_type_ids is not None:  # not passed otherwise: DistilBERT's forward has no such argument
            kwargs["token_type_ids"] = token_type_ids
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.active_head is None:  # an AdapterHub model saved without a head: hidden states, like transformers
            return out
        head = self.heads[self.active_head]
        cls = out.pooler_output if head.use_pooler else out.last_hidden_state[:, 0]
        return SequenceClassifierOutput(logits=head(cls), hidden_states=out.hidden_states, attentions=out.attentions)


def encoder_of(model: nn.Module) -> nn.Module:
    return model.base_model


def layers_of(model: nn.Module):
    encoder = encoder_of(model)
    return submodule(encoder, describe(encoder.config).layers)


def sites_of(layer: nn.Module, description) -> tuple:
    """(mh_adapter site, output_adapter site) of a layer whose modules are ours."""
    return submodule(layer, description.attention_output), submodule(layer, description.ffn_output)


class LayerParts(NamedTuple):
    """A loaded model's layer, by role (paths come from the model type's description)."""
    index: int
    path: str  # the layer's module path in the model
    attention: nn.Module  # SelfAttention: the heads
    ffn: nn.Module  # Intermediate: the FFN neurons
    mh_site: nn.Module  # AdapterSite after attention (its dense reads the heads)
    out_site: nn.Module  # AdapterSite after the FFN (its dense reads the neurons)
    module: nn.Module = None  # the layer itself
    description: object = None  # its ModelDescription

    @property
    def sites(self) -> tuple:
        return (("mh_adapter", self.mh_site), ("output_adapter", self.out_site))

    def replace_attention(self, new: nn.Module) -> None:
        """Put `new` where the layer's SelfAttention is (compaction)."""
        set_submodule(self.module, self.description.attention, new)

    def replace_ffn(self, new: nn.Module) -> None:
        set_submodule(self.module, self.description.ffn, new)


def layer_parts(model: nn.Module) -> list:
    """Every layer of a loaded model (ours installed) as LayerParts."""
    d = describe(base_config_of(model))
    layers = layers_of(model)
    prefix = next(p for p, m in model.named_modules() if m is layers)
    return [LayerParts(i, f"{prefix}.{i}", submodule(layer, d.attention), submodule(layer, d.ffn),
                       *sites_of(layer, d), layer, d) for i, layer in enumerate(layers)]


def layer_of_path(model: nn.Module, module_path: str) -> LayerParts:
    """The layer that holds the module at `module_path`."""
    for parts in layer_parts(model):
        if module_path.startswith(parts.path + "."):
            return parts
    raise KeyError(f"{module_path} is not inside an encoder layer")


def base_config_of(model: nn.Module) -> PretrainedConfig:
    return encoder_of(model).config


def check_base_config(config: PretrainedConfig) -> None:
    describe(config)  # an unsupported model type is a one-line error
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedAdapterError(
            f"position_embedding_type={config.position_embedding_type!r} is not supported (only 'absolute')"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedAdapterError("decoder / cross-attention BERT models are not supported (encoders only)")


# --------------------------------------------------------------------------- manifest from AdapterHub configs

def site_adapter_entry(cfg: BottleneckConfig, width: int) -> dict:
    return dict(width=width, non_linearity=cfg.non_linearity, ln_before=cfg.ln_before, ln_after=cfg.ln_after,
                adapter_residual_before_ln=cfg.adapter_residual_before_ln, use_gating=cfg.use_gating,
                scaling=cfg.scaling)


def site_fusion_entry(fcfg: FusionConfig, names: list, folded: bool = False, bottleneck_space: bool = False) -> dict:
    """`bottleneck_space` (written only when true, by compaction): the fusion computes in its adapters'
    bottleneck space (see Fusion) and its shapes follow their widths."""
    entry = dict(adapters=list(names), query=fcfg.query, key=fcfg.key, value=fcfg.value,
                 residual_before=fcfg.residual_before, query_before_ln=fcfg.query_before_ln, folded=folded)
    if bottleneck_space:
        entry.update(folded=True, bottleneck_space=True)
    return entry


def manifest_from_adapterhub(config: PretrainedConfig, model_class: str, adapters: dict, fusions: dict,
                             heads: Optional[dict] = None, active_head: Optional[str] = None) -> dict:
    """adapters: name -> BottleneckConfig; fusions: name -> (adapter names, FusionConfig)."""
    hidden, n_layers = config.hidden_size, config.num_hidden_layers
    ffn_size = describe(config).ffn_size(config)
    layers = []
    for i in range(n_layers):
        sites = {s: dict(adapters={}, fusions={}, active=None, placement={}) for s in SITES}
        for name, cfg in adapters.items():
            if i in cfg.leave_out:
                continue
            for s in SITES:
                if getattr(cfg, s):
                    sites[s]["adapters"][name] = site_adapter_entry(cfg, cfg.width(hidden, i))
        for fname, (names, fcfg) in fusions.items():
            for s in SITES:
                # AdapterHub adds a fusion layer wherever all fused adapters agree on the location flag.
                if all(getattr(adapters[n], s) for n in names):
                    sites[s]["fusions"][fname] = site_fusion_entry(fcfg, names)
        pruned = (getattr(config, "pruned_heads", None) or {}).get(i, [])  # transformers prunes these at init
        layers.append(dict(heads=config.num_attention_heads - len(pruned), intermediate=ffn_size,
                           sites=sites))
    return dict(
        format="compressor-manifest", version=MANIFEST_VERSION, model_class=model_class,
        head_dim=hidden // config.num_attention_heads, layers=layers,
        adapterhub=dict(adapters={k: v.to_dict() for k, v in adapters.items()},
                        fusions={k: dict(adapters=list(n), config=f.to_dict()) for k, (n, f) in fusions.items()}),
        heads=heads or {}, active_head=active_head, setup=None, compacted=False,
        **invertible.manifest_fields(config, adapters),
    )


def setup_composition(manifest: dict, setup: Optional[str]):
    """The Composition a setup string names in this manifest (compositions.parse; names checked)."""
    hub = manifest["adapterhub"]
    adapters, fusions = hub["adapters"], hub["fusions"]
    comp = compositions.parse(setup, {k: v["adapters"] for k, v in fusions.items()})
    for child in comp.children:
        if child.name not in adapters and child.name not in fusions:
            raise UnsupportedAdapterError(
                f"setup '{setup}': '{child.name}' is neither an adapter nor a fusion of this model "
                f"(adapters: {', '.join(adapters) or 'none'}; fusions: {', '.join(fusions) or 'none'})"
            )
    return comp


def resolve_setup(manifest: dict, setup: Optional[str]) -> dict:
    """Set each site's active composition and placements for `setup` (its string form: an adapter or fusion
    name, or Stack(a,b); None picks the only fusion, else the only adapter) the way AdapterHub's
    BottleneckLayer resolves it: at each site the children with an adapter there. Returns the manifest."""
    hub = manifest["adapterhub"]
    adapters, fusions = hub["adapters"], hub["fusions"]
    if setup is None:
        if len(fusions) == 1:
            setup = next(iter(fusions))
        elif len(adapters) == 1:
            setup = next(iter(adapters))
        elif adapters:
            raise UnsupportedAdapterError(
                f"the model has {len(adapters)} adapters and {len(fusions)} fusions; choose one with --setup "
                f"(adapters: {', '.join(adapters)}; fusions: {', '.join(fusions) or 'none'})"
            )
    comp = setup_composition(manifest, setup) if setup is not None else None
    manifest["setup"] = None if comp is None else str(comp)
    for i, layer in enumerate(manifest["layers"]):
        for s, site in layer["sites"].items():
            site["active"], site["placement"] = None, {}
            site.pop("placements", None)
            if comp is None:
                continue
            children, leads = [], []
            for child in comp.children:
                if isinstance(child, compositions.Fuse):
                    if any(adapters[n].get("is_parallel") for n in child.names):
                        raise UnsupportedAdapterError(
                            f"fusion '{child.name}': a fusion of parallel adapters (is_parallel) is not supported; "
                            "run a parallel adapter alone or in a Stack")
                    names = [n for n in child.names if n in site["adapters"]]
                    if not names:
                        continue
                    if child.last() not in site["adapters"]:
                        raise UnsupportedAdapterError(
                            f"fusion '{child.name}': its last adapter '{child.last()}' is left out of layer {i}, "
                            "where AdapterHub cannot run the fusion; reorder the fusion or drop leave_out"
                        )
                    children.append(compositions.Fuse(child.name, tuple(names)))
                elif child.name in site["adapters"]:
                    children.append(child)
                else:
                    continue
                leads.append(BottleneckConfig(**adapters[child.last()]).placement())
            active = compositions.of_children(children)
            if active is None:
                continue
            site["active"], site["placement"] = active.to_json(), leads[-1]
            if len(leads) > 1:
                site["placements"] = leads
    return manifest


# --------------------------------------------------------------------------- building modules

def _new_site(old: nn.Module, location: str) -> AdapterSite:
    return AdapterSite(old.dense, old.LayerNorm, old.dropout, location)


def install_modules(model: nn.Module, manifest: dict) -> nn.Module:
    """Replace attention, FFN and sub-layer outputs of every layer by ours, with the manifest's shapes.

    Weights of base modules are copied when shapes agree (loading a full model); otherwise the caller loads a
    state dict afterwards (rebuilding a compacted model)."""
    config = base_config_of(model)
    d = describe(config)
    hidden, head_dim = config.hidden_size, manifest["head_dim"]
    if d.layer_class is not None:
        _rebuild_layers(layers_of(model), d, config, head_dim)
    for layer, spec in zip(layers_of(model), manifest["layers"]):
        att = SelfAttention(hidden, spec["heads"], head_dim, d.attention_dropout(config))
        _copy_if_same_shape(att, submodule(layer, d.attention))
        set_submodule(layer, d.attention, att)
        ffn = Intermediate(hidden, spec["intermediate"], d.activation(config))
        _copy_if_same_shape(ffn, submodule(layer, d.ffn))
        set_submodule(layer, d.ffn, ffn)
        set_submodule(layer, d.attention_output, _new_site(submodule(layer, d.attention_output), "mh_adapter"))
        set_submodule(layer, d.ffn_output, _new_site(submodule(layer, d.ffn_output), "output_adapter"))
        mh, out = sites_of(layer, d)
        if spec["heads"] * head_dim != mh.dense.in_features:
            mh.dense = nn.Linear(spec["heads"] * head_dim, hidden)
        if spec["intermediate"] != out.dense.in_features:
            out.dense = nn.Linear(spec["intermediate"], hidden)
        for s, site_module in zip(SITES, (mh, out)):
            site = spec["sites"][s]
            for name, a in site["adapters"].items():
                site_module.adapters[name] = Bottleneck(
                    hidden, a["width"], a["non_linearity"], a["ln_before"], a["ln_after"],
                    a["adapter_residual_before_ln"], a["use_gating"], a["scaling"])
            for name, f in site["fusions"].items():
                # bottleneck space (compaction's choice, see Fusion): shapes follow the fused adapters' widths
                widths = [site["adapters"][n]["width"] for n in f["adapters"]] if f.get("bottleneck_space") else None
                site_module.adapter_fusion_layer[name] = Fusion(
                    hidden, f["query"], f["key"], f["value"], f["residual_before"], f["query_before_ln"], f["folded"],
                    bottleneck_widths=widths)
    apply_setup(model, manifest)
    return model


def _rebuild_layers(layers: nn.ModuleList, d, config: PretrainedConfig, head_dim: int) -> None:
    """Replace each transformers layer by the description's `layer_class`, made of our parts holding the
    layer's own modules (`d.source` says where they sit); install_modules then gives them the manifest's shapes."""
    cls = getattr(modules, d.layer_class)
    for i, old in enumerate(layers):
        if isinstance(old, cls):
            continue
        part = {role: submodule(old, path) if path else nn.Identity() for role, path in d.source}
        att = SelfAttention(config.hidden_size, 0, head_dim, d.attention_dropout(config))
        att.query, att.key, att.value = part["query"], part["key"], part["value"]
        att.num_attention_heads = part["query"].out_features // head_dim
        att.all_head_size = part["query"].out_features
        ffn = Intermediate(config.hidden_size, 0, d.activation(config))
        ffn.dense = part["ffn_in"]
        layers[i] = cls(att, AdapterSite(part["attention_dense"], part["attention_norm"], part["attention_dropout"],
                                         "mh_adapter"),
                        ffn, AdapterSite(part["ffn_dense"], part["ffn_norm"], part["ffn_dropout"], "output_adapter"))


# where each role of `d.source` sits in our layer (the attribute names of our modules)
_OUR_PARTS = dict(query="{attention}.query", key="{attention}.key", value="{attention}.value",
                  attention_dense="{attention_output}.dense", attention_norm="{attention_output}.LayerNorm",
                  ffn_in="{ffn}.dense", ffn_dense="{ffn_output}.dense", ffn_norm="{ffn_output}.LayerNorm")


def transformers_names(d) -> dict:
    """{module path in our layer: module path in transformers' layer} for a type whose layer we rebuild (empty
    for the others: their names are transformers' own). AdapterHub write-back renames base weights with it."""
    paths = dict(attention=d.attention, attention_output=d.attention_output, ffn=d.ffn, ffn_output=d.ffn_output)
    return {_OUR_PARTS[role].format(**paths): path for role, path in d.source if path and role in _OUR_PARTS}


def apply_setup(model: nn.Module, manifest: dict) -> None:
    d = describe(base_config_of(model))
    for layer, spec in zip(layers_of(model), manifest["layers"]):
        for s, site_module in zip(SITES, sites_of(layer, d)):
            site = spec["sites"][s]
            site_module.active = site["active"]
            site_module.placement = site["placement"]
            if "placements" in site:  # a Stack: one per child
                site_module.placements = [dict(p) for p in site["placements"]]
    invertible.install_invertible(model, manifest)
    model.compress_manifest = manifest


def _copy_if_same_shape(new: nn.Module, old: nn.Module) -> None:
    new_sd, old_sd = new.state_dict(), old.state_dict()
    if all(k in old_sd and old_sd[k].shape == v.shape for k, v in new_sd.items()):
        new.load_state_dict({k: old_sd[k] for k in new_sd})


def empty_model(config: PretrainedConfig, manifest: dict) -> nn.Module:
    """A model with the manifest's shapes and uninitialised-but-allocated weights (to load a state dict into)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    kind = manifest["model_class"]
    if kind == "sequence_classification":
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    else:
        pooler = dict(add_pooling_layer=manifest.get("pooler", True)) if describe(config).pooler else {}
        encoder = AutoModel.from_config(config, attn_implementation="eager", **pooler)
        model = encoder
        if kind == "flex":
            heads = {name: PredictionHead(config.hidden_size, **head_kwargs(h, config)) for name, h in manifest["heads"].items()}
            model = FlexHeadModel(encoder, heads, manifest["active_head"])
    return install_modules(model, manifest)


def head_kwargs(head_config: dict, config: PretrainedConfig) -> dict:
    """Our PredictionHead arguments from an AdapterHub `prediction_heads` entry."""
    if head_config.get("head_type") != "classification":
        raise UnsupportedAdapterError(
            f"prediction head type '{head_config.get('head_type')}' is not supported (only 'classification')"
        )
    dropout = head_config.get("dropout_prob")
    if dropout is None:
        dropout = getattr(config, "classifier_dropout", None) or getattr(config, "hidden_dropout_prob", 0.0)
    return dict(num_labels=head_config["num_labels"], layers=head_config.get("layers", 2),
                activation_function=head_config.get("activation_function", "tanh"), bias=head_config.get("bias", True),
                use_pooler=head_config.get("use_pooler", False), dropout=dropout)
