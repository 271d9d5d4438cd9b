"""Tiny AdapterHub reference models for parity tests (a helper module, not a test file).

Everything here runs offline: the models are built from configs with the AdapterHub ``adapters``
library (the test-time reference, see docs/design.md), every parameter is randomised so that adapters,
fusion query/key/value and heads are far from identity/zero, and the models are written to disk in
the on-disk formats our users have:

``full`` / ``full_bin``
    ``model.save_pretrained(dir)`` of the AdapterHub model (``safe_serialization`` True / False):
    ``config.json`` with an ``adapters`` section (and ``prediction_heads`` for flex-head models),
    ``model.safetensors`` / ``pytorch_model.bin``.
``split_bin`` / ``split_safetensors``
    the base model saved with plain transformers (a fresh transformers model holding the same base
    weights, no adapters), one directory per adapter (``model.save_adapter``: ``adapter_config.json``
    + ``pytorch_adapter.bin`` / ``adapter.safetensors``) and one fusion directory
    (``model.save_adapter_fusion``: ``adapter_fusion_config.json`` +
    ``pytorch_model_adapter_fusion.bin`` / ``model_adapter_fusion.safetensors``). Heads that AdapterHub
    writes next to an adapter/fusion (``head_config.json`` + ``pytorch_model_head.bin`` /
    ``model_head.safetensors``) are kept there.

A case's :func:`save_case` returns the keyword arguments for
``compressor.load_model(path, adapters=None, fusion=None, setup=None)``; :func:`reference_outputs`
returns what the AdapterHub model computes for the case's active setup (``.logits`` of the head, or
``.last_hidden_state`` when the model has none).

AdapterHub semantics worth knowing (adapters 1.3.0, checked against its source and by running it):

* ``compose_fuse`` calls ``pre_forward`` (``original_ln_before``, ``residual_before_ln``) and, after the
  fusion, ``post_forward`` (``original_ln_after``) of the *last* fused adapter only; each child adapter
  contributes its ``bottleneck_up`` = ``adapter_up(down(x)) * scaling``, i.e. *before* gating, before
  its residual and before its ``ln_after``: in a fusion ``use_gating``, ``ln_after`` and
  ``adapter_residual_before_ln`` of the children have no effect, ``scaling`` and ``ln_before`` do.
* A fused adapter left out of a layer (``leave_out``) is simply skipped by the fusion in that layer
  (softmax over the others); if *all* fused adapters are left out the layer runs without adapters; if
  only the *last* one is left out AdapterHub raises ``KeyError`` (so no case does that).
* ``use_gating``: the gate is ``mean over all positions, padding included, of sigmoid(gate(x))``, so
  padded tokens change the outputs of real tokens.
* ``residual_before_ln="post_add"`` only works with ``original_ln_before=True`` (else AdapterHub fails
  with an unbound local), ``reduction_factor`` mappings are keyed by layer index only and bottleneck
  width is ``int(hidden // reduction_factor)``.
* AdapterFusion ``temperature=True`` decays T on every forward call, so no case uses it.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import adapters
from adapters import AdapterConfig, AutoAdapterModel, Fuse, Stack
from adapters.configuration import AdapterFusionConfig
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

from adapters import (BertAdapterModel, DistilBertAdapterModel, ElectraAdapterModel, RobertaAdapterModel,
                      XLMRobertaAdapterModel)

HIDDEN = 32
NUM_LAYERS = 2
VOCAB = 100
BATCH = 3
SEQ_LEN = 9
LENGTHS = (9, 6, 3)  # real tokens per row: one unpadded row, two padded rows
FLEX_HEAD = "t"
FLEX_NUM_LABELS = 3

FORMATS = ("full", "full_bin", "split_bin", "split_safetensors")
PADDINGS = ("right", "left")

ARCHS = ("bert", "roberta", "xlm-roberta", "electra", "mbert", "distilbert")
MBERT_VOCAB = 119547  # bert-base-multilingual-cased
_CLASSES = {  # arch -> (encoder, sequence classification, AdapterHub flex-head model)
    "bert": (BertModel, BertForSequenceClassification, BertAdapterModel),
    "mbert": (BertModel, BertForSequenceClassification, BertAdapterModel),
    "distilbert": (DistilBertModel, DistilBertForSequenceClassification, DistilBertAdapterModel),
    "roberta": (RobertaModel, RobertaForSequenceClassification, RobertaAdapterModel),
    "xlm-roberta": (XLMRobertaModel, XLMRobertaForSequenceClassification, XLMRobertaAdapterModel),
    "electra": (ElectraModel, ElectraForSequenceClassification, ElectraAdapterModel),
}
HEADS = ("none", "seqcls", "regression", "flex")

AdapterConfigSpec = Union[str, Dict[str, Any]]  # a registered name, or {"base": name, **overrides}
FusionConfigSpec = Union[str, Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One reference model.

    ``adapters``: (name, config) pairs, config a registered AdapterHub name ("seq_bn") or
    ``{"base": "seq_bn", **overrides}``. ``fusion``: (adapter names, config) or None.
    ``setup``: what the test passes as ``load_model(..., setup=...)`` (None: rely on the default).
    ``active``: the setup the reference runs ("a" or "a,b").
    """

    id: str
    arch: str = "bert"
    head: str = "none"
    adapters: Tuple[Tuple[str, AdapterConfigSpec], ...] = (("a", "seq_bn"),)
    fusion: Optional[Tuple[Tuple[str, ...], FusionConfigSpec]] = None
    setup: Optional[str] = None
    active: str = "a"
    unsupported: Optional[str] = None  # for unsupported cases: the option the error must name

    @property
    def formats(self) -> Tuple[str, ...]:
        # AdapterHub registers the ln_before LayerNorm twice (adapter_norm_before and adapter_down.0):
        # safetensors refuses shared tensors, so AdapterHub itself cannot save such adapters in
        # safetensors (neither save_pretrained nor save_adapter(use_safetensors=True)).
        if any(isinstance(spec, Mapping) and spec.get("ln_before") for _, spec in self.adapters):
            return ("full_bin", "split_bin")
        if self.arch == "mbert":  # one full and one split format: each copy of the embedding costs
            return ("full", "split_bin")
        return FORMATS

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) % (2**31)

    @property
    def adapter_names(self) -> List[str]:
        return [name for name, _ in self.adapters]

    @property
    def fusion_name(self) -> Optional[str]:
        return ",".join(self.fusion[0]) if self.fusion else None


def _c(base: str, **overrides: Any) -> Dict[str, Any]:
    return {"base": base, **overrides}


def _single(id_: str, config: AdapterConfigSpec, **kw: Any) -> Case:
    return Case(id=id_, adapters=(("a", config),), **kw)


def _fuse(
    id_: str,
    adapter_configs: Sequence[Tuple[str, AdapterConfigSpec]],
    fusion_config: FusionConfigSpec = "dynamic",
    fused: Optional[Sequence[str]] = None,
    **kw: Any,
) -> Case:
    fused = tuple(fused or [n for n, _ in adapter_configs])
    kw.setdefault("active", ",".join(fused))
    return Case(id=id_, adapters=tuple(adapter_configs), fusion=(fused, fusion_config), **kw)


_MIXED_LAST = _c(
    "seq_bn",
    residual_before_ln=False,
    original_ln_before=False,
    ln_after=True,
    use_gating=True,
    scaling=0.5,
    non_linearity="gelu",
    reduction_factor=4,
)
_MIXED_FIRST = _c("seq_bn", ln_before=True, scaling="channel", non_linearity="tanh", reduction_factor=8)

CASES: List[Case] = [
    # --- single adapter, adapter options (BERT, no head) ---------------------------------------
    _single("seq_bn", "seq_bn"),
    _single("double_seq_bn", "double_seq_bn"),
    _single("pfeiffer_legacy_name", "pfeiffer"),
    _single("seq_bn_dict", _c("seq_bn")),
    _single("seq_bn_rf3", _c("seq_bn", reduction_factor=3)),
    _single("seq_bn_rf_float", _c("seq_bn", reduction_factor=HIDDEN / 5.5)),  # width 5, as compaction writes back
    _single("seq_bn_rf_map", _c("seq_bn", reduction_factor={"0": 4, "default": 8})),
    _single("double_seq_bn_rf_map", _c("double_seq_bn", reduction_factor={"0": 4, "default": 8})),
    _single("seq_bn_swish", _c("seq_bn", non_linearity="swish")),
    _single("seq_bn_gelu", _c("seq_bn", non_linearity="gelu")),
    _single("seq_bn_tanh", _c("seq_bn", non_linearity="tanh")),
    _single("double_seq_bn_relu", _c("double_seq_bn", non_linearity="relu")),
    _single("seq_bn_residual_before_ln_false", _c("seq_bn", residual_before_ln=False)),
    _single("seq_bn_residual_before_ln_post_add", _c("seq_bn", residual_before_ln="post_add")),
    # residual_before_ln only matters together with original_ln_before=True
    _single(
        "double_seq_bn_residual_before_ln_false",
        _c("double_seq_bn", residual_before_ln=False, original_ln_before=True),
    ),
    _single("seq_bn_ln_before", _c("seq_bn", ln_before=True)),
    _single("seq_bn_ln_after", _c("seq_bn", ln_after=True)),
    _single("seq_bn_ln_after_adapter_residual_before_ln", _c("seq_bn", ln_after=True, adapter_residual_before_ln=True)),
    _single("double_seq_bn_ln_before_after", _c("double_seq_bn", ln_before=True, ln_after=True)),
    _single("seq_bn_original_ln_before_false", _c("seq_bn", original_ln_before=False)),
    _single("double_seq_bn_original_ln_before_true", _c("double_seq_bn", original_ln_before=True)),
    _single("seq_bn_leave_out_1", _c("seq_bn", leave_out=[1])),
    _single("double_seq_bn_leave_out_1", _c("double_seq_bn", leave_out=[1])),
    _single("seq_bn_scaling_0.5", _c("seq_bn", scaling=0.5)),
    _single("seq_bn_scaling_learned", _c("seq_bn", scaling="learned")),
    _single("seq_bn_scaling_channel", _c("seq_bn", scaling="channel")),
    _single("double_seq_bn_scaling_channel", _c("double_seq_bn", scaling="channel")),
    _single("seq_bn_gating", _c("seq_bn", use_gating=True)),
    _single("double_seq_bn_gating", _c("double_seq_bn", use_gating=True)),
    _single(
        "seq_bn_everything",
        _c(
            "seq_bn",
            ln_before=True,
            ln_after=True,
            adapter_residual_before_ln=True,
            residual_before_ln=False,
            scaling="channel",
            use_gating=True,
            non_linearity="gelu",
            reduction_factor={"1": 4, "default": 16},
        ),
    ),
    # --- several adapters, one active -------------------------------------------------------------
    Case(
        id="two_adapters_setup_b",
        adapters=(("a", "seq_bn"), ("b", _c("seq_bn", non_linearity="gelu", reduction_factor=4))),
        setup="b",
        active="b",
    ),
    # --- fusions ------------------------------------------------------------------------------------
    _fuse("fuse2_seq_bn_dynamic", [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))], "dynamic"),
    _fuse(
        "fuse3_seq_bn_static",
        [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4)), ("c", _c("seq_bn", non_linearity="gelu"))],
        "static",
    ),
    _fuse("fuse2_double_seq_bn_dynamic", [("a", "double_seq_bn"), ("b", _c("double_seq_bn", reduction_factor=8))]),
    _fuse(
        "fuse2_double_seq_bn_static_query_before_ln",
        [("a", _c("double_seq_bn", original_ln_before=True)), ("b", _c("double_seq_bn", original_ln_before=True))],
        _c("static", query_before_ln=True),
    ),
    _fuse("fuse2_residual_before", [("a", "seq_bn"), ("b", "seq_bn")], _c("dynamic", residual_before=True)),
    _fuse("fuse2_query_before_ln", [("a", "seq_bn"), ("b", "seq_bn")], _c("dynamic", query_before_ln=True)),
    _fuse(
        "fuse2_value_after_softmax", [("a", "seq_bn"), ("b", "seq_bn")], _c("dynamic", value_before_softmax=False)
    ),
    _fuse("fuse2_no_value", [("a", "seq_bn"), ("b", "seq_bn")], _c("dynamic", value=False)),
    _fuse(
        "fuse2_all_fusion_options",
        [("a", "seq_bn"), ("b", _c("seq_bn", residual_before_ln="post_add"))],
        _c("dynamic", residual_before=True, query_before_ln=True, value_before_softmax=False),
    ),
    # the last fused adapter's pre_forward/post_forward settings apply; children's gating/ln_after do not
    _fuse("fuse2_mixed_configs", [("a", _MIXED_FIRST), ("b", _MIXED_LAST)]),
    _fuse("fuse2_mixed_configs_reversed", [("a", _MIXED_LAST), ("b", _MIXED_FIRST)]),
    # leave_out and fusion: a left-out fused adapter drops out of the softmax in that layer
    _fuse("fuse2_leave_out_first", [("a", _c("seq_bn", leave_out=[1])), ("b", "seq_bn")]),
    _fuse(
        "fuse3_leave_out_first_two",
        [("a", _c("seq_bn", leave_out=[0])), ("b", _c("seq_bn", leave_out=[0])), ("c", "seq_bn")],
        "static",
    ),
    _fuse(
        "fuse2_leave_out_all",
        [("a", _c("seq_bn", leave_out=[1])), ("b", _c("seq_bn", leave_out=[1]))],
    ),
    _fuse(
        "fuse2_double_seq_bn_leave_out_first",
        [("a", _c("double_seq_bn", leave_out=[0])), ("b", "double_seq_bn")],
    ),
    # setup resolution with more adapters than fused ones
    _fuse(
        "fuse2_of_3_adapters_default_setup",
        [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4)), ("c", _c("seq_bn", non_linearity="tanh"))],
        fused=("a", "b"),
    ),
    _fuse(
        "fuse2_setup_single_adapter",
        [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))],
        setup="b",
        active="b",
    ),
    _fuse(
        "fuse2_setup_explicit_fusion",
        [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))],
        setup="a,b",
    ),
    # --- heads: transformers heads, regression, AdapterHub flex head; RoBERTa ----------------------
    _single("bert_seqcls_seq_bn", "seq_bn", head="seqcls"),
    _single("bert_regression_double_seq_bn", "double_seq_bn", head="regression"),
    _fuse("bert_seqcls_fuse2", [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))], head="seqcls"),
    _fuse("bert_regression_fuse2_static", [("a", "double_seq_bn"), ("b", "double_seq_bn")], "static", head="regression"),
    # flex head "t": a single adapter named like the head, so save_adapter() carries the head
    Case(id="bert_flex_seq_bn", head="flex", adapters=((FLEX_HEAD, "seq_bn"),), active=FLEX_HEAD),
    _fuse("bert_flex_fuse2", [("a", "seq_bn"), ("b", _c("double_seq_bn", mh_adapter=False))], head="flex"),
    _single("roberta_seq_bn", "seq_bn", arch="roberta"),
    _single("roberta_double_seq_bn_gating", _c("double_seq_bn", use_gating=True, scaling="learned"), arch="roberta"),
    _fuse("roberta_fuse2_double_seq_bn", [("a", _c("double_seq_bn", leave_out=[0])), ("b", "double_seq_bn")], arch="roberta"),
    _single("roberta_seqcls_seq_bn", _c("seq_bn", ln_after=True), arch="roberta", head="seqcls"),
    _fuse("roberta_regression_fuse2", [("a", "seq_bn"), ("b", "seq_bn")], arch="roberta", head="regression"),
    Case(id="roberta_flex_seq_bn", arch="roberta", head="flex", adapters=((FLEX_HEAD, "double_seq_bn"),), active=FLEX_HEAD),
    _fuse(
        "roberta_flex_fuse3_static",
        [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4)), ("c", "seq_bn")],
        _c("static", residual_before=True),
        arch="roberta",
        head="flex",
    ),
    # --- XLM-R and ELECTRA (issue 16): same layer layout as BERT; ELECTRA with its embedding projection ------
    _single("xlmr_seq_bn", "seq_bn", arch="xlm-roberta"),
    _fuse("xlmr_seqcls_fuse2", [("a", _c("seq_bn", leave_out=[0])), ("b", _c("seq_bn", reduction_factor=4))], arch="xlm-roberta",
          head="seqcls"),
    Case(id="xlmr_flex_seq_bn", arch="xlm-roberta", head="flex", adapters=((FLEX_HEAD, "seq_bn"),), active=FLEX_HEAD),
    _single("electra_double_seq_bn_gating", _c("double_seq_bn", use_gating=True), arch="electra"),
    _fuse("electra_regression_fuse2", [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))], arch="electra",
          head="regression"),
    _fuse("electra_flex_fuse2", [("a", "double_seq_bn"), ("b", "double_seq_bn")], arch="electra", head="flex"),
    # --- mBERT: a BERT with mBERT's 119,547-token vocabulary (two formats: the embedding dominates the cost) --
    _single("mbert_seq_bn", "seq_bn", arch="mbert"),
    _fuse("mbert_flex_fuse2", [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))], arch="mbert", head="flex"),
    # --- DistilBERT: its own block (q_lin/k_lin/v_lin/out_lin, sa_layer_norm, ffn.lin1/lin2, output_layer_norm) --
    _single("distilbert_double_seq_bn", "double_seq_bn", arch="distilbert"),
    _single("distilbert_seq_bn_options", _c("seq_bn", residual_before_ln=False, ln_after=True, use_gating=True,
                                            scaling="channel", non_linearity="gelu"), arch="distilbert"),
    _fuse("distilbert_fuse2_double_seq_bn", [("a", _c("double_seq_bn", leave_out=[0])), ("b", "double_seq_bn")],
          arch="distilbert"),
    _fuse("distilbert_seqcls_fuse2_static", [("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))], "static",
          arch="distilbert", head="seqcls"),
    Case(id="distilbert_flex_double_seq_bn", arch="distilbert", head="flex", adapters=((FLEX_HEAD, "double_seq_bn"),),
         active=FLEX_HEAD),
    _fuse("distilbert_flex_fuse2", [("a", "double_seq_bn"), ("b", "double_seq_bn")],
          _c("dynamic", residual_before=True), arch="distilbert", head="flex"),
    # --- invertible adapters (MAD-X language adapters, NICE) on the embeddings: the active setup's first() adapter's
    # runs (a fusion's first fused adapter; none when that one has none). Under Stack: below the Stack rows
    _single("seq_bn_inv", "seq_bn_inv"),
    Case(id="xlmr_flex_double_seq_bn_inv", arch="xlm-roberta", head="flex", adapters=((FLEX_HEAD, "double_seq_bn_inv"),),
         active=FLEX_HEAD),
    _single("electra_seqcls_seq_bn_inv_gelu", _c("seq_bn_inv", non_linearity="gelu"), arch="electra", head="seqcls"),
    _single("distilbert_double_seq_bn_inv_rf4", _c("double_seq_bn_inv", inv_adapter_reduction_factor=4),
            arch="distilbert"),
    _fuse("roberta_fuse2_inv_first", [("a", "seq_bn_inv"), ("b", _c("seq_bn", reduction_factor=4))], arch="roberta"),
    _fuse("fuse2_inv_second", [("a", "seq_bn"), ("b", "seq_bn_inv")]),
]

# --- Stack (issue 16): MAD-X's Stack(language, task) and Stack(language, Fuse(...)), as compose_stack runs them:
# each member after its own pre_forward (the transformer's layer norm again), the last one's post_forward
def _stack(id_: str, adapter_configs, fusion=None, **kw: Any) -> Case:
    members = [n for n, _ in adapter_configs if not fusion or n not in fusion[0]]
    if fusion:
        members.append(f"Fuse({','.join(fusion[0])})")
    active = f"Stack({','.join(members)})"
    return Case(id=id_, adapters=tuple(adapter_configs), fusion=fusion, setup=active, active=active, **kw)


CASES += [
    _stack("stack_lang_task", [("lang", "seq_bn"), ("task", _c("seq_bn", reduction_factor=4))]),
    _stack("stack_lang_task_houlsby_mixed", [("lang", "double_seq_bn"), ("task", _MIXED_LAST)], head="seqcls"),
    # the flex head is saved with the task adapter named like it (save_adapter carries it)
    _stack("stack_lang_task_leave_out", [("lang", _c("seq_bn", leave_out=[1])), (FLEX_HEAD, "seq_bn")],
           arch="roberta", head="flex"),
    _stack("stack_lang_fuse2", [("lang", "seq_bn"), ("a", "seq_bn"), ("b", _c("seq_bn", reduction_factor=4))],
           fusion=(("a", "b"), "dynamic"), head="flex"),
    _stack("stack_lang_fuse3_static_houlsby", [("lang", "double_seq_bn"), ("a", "double_seq_bn"),
                                              ("b", _c("double_seq_bn", reduction_factor=8)), ("c", "double_seq_bn")],
           fusion=(("a", "b", "c"), _c("static", residual_before=True)), arch="distilbert"),
]

# --- MAD-X: an invertible language adapter under Stack(lang, task) / Stack(lang, Fuse(...)): first() is lang, so its
# block runs on the embeddings; under Stack(task, lang) first() is task, which has none: no block runs
CASES += [
    _stack("stack_inv_lang_task", [("lang", "seq_bn_inv"), ("task", _c("seq_bn", reduction_factor=4))]),
    _stack("xlmr_seqcls_stack_inv_lang_fuse2", [("lang", "seq_bn_inv"), ("a", "seq_bn"),
                                                ("b", _c("seq_bn", reduction_factor=4))],
           fusion=(("a", "b"), "dynamic"), arch="xlm-roberta", head="seqcls"),
    _stack("electra_stack_inv_lang_task", [("lang", "seq_bn_inv"), ("task", "seq_bn")], arch="electra"),
    _stack("distilbert_stack_inv_lang_task", [("lang", _c("double_seq_bn_inv", non_linearity="gelu")),
                                              ("task", "double_seq_bn")], arch="distilbert"),
    _stack("stack_task_inv_lang", [("task", "seq_bn"), ("lang", "seq_bn_inv")]),
]

# --- parallel bottleneck adapters (par_bn, AdapterHub's ParallelAdapter): read the sub-layer's input, their scaled
# output is added to the sub-layer's output before the residual and layer norm; alone and in a Stack
CASES += [
    _single("par_bn", "par_bn"),
    _single("par_bn_options", _c("par_bn", mh_adapter=True, use_gating=True, ln_after=True, scaling="learned",
                                 non_linearity="gelu", leave_out=[0]), arch="roberta", head="seqcls"),
    _stack("stack_par_bn_task", [("par", _c("par_bn", reduction_factor=4)), ("task", "double_seq_bn")]),
    _stack("stack_lang_par_bn", [("lang", "seq_bn"), (FLEX_HEAD, "par_bn")], arch="distilbert", head="flex"),
]

# Options the toolkit does not support: loading must raise UnsupportedAdapterError naming them.
UNSUPPORTED_CASES: List[Case] = [
    _single("unsupported_phm_layer", _c("seq_bn", phm_layer=True, reduction_factor=4), unsupported="phm_layer"),
    _fuse("unsupported_par_bn_fusion", [("a", "par_bn"), ("b", "par_bn")], unsupported="is_parallel"),
    _single("unsupported_seq_bn_inv_glow", _c("seq_bn_inv", inv_adapter="glow"), unsupported="glow"),
    _single("unsupported_lora", "lora", unsupported="LoRA"),
    _single("unsupported_ia3", "ia3", unsupported="IA3"),
    _single("unsupported_compacter", _c("compacter", reduction_factor=4), unsupported="Compacter"),
    _single("unsupported_prefix_tuning", "prefix_tuning", unsupported="prefix tuning"),
    _single("unsupported_loreft", "loreft", unsupported="ReFT"),
    _single("unsupported_mam", "mam", unsupported="MAM / UniPELT"),
]

CASES_BY_ID: Dict[str, Case] = {c.id: c for c in CASES + UNSUPPORTED_CASES}
assert len(CASES_BY_ID) == len(CASES) + len(UNSUPPORTED_CASES), "duplicate case id"


def iter_case_formats(cases: Sequence[Case] = CASES) -> List[Tuple[Case, str]]:
    return [(case, fmt) for case in cases for fmt in case.formats]


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def tiny_config(arch: str, num_labels: Optional[int] = None):
    common = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,  # RoBERTa needs > seq len + 2 (positions start at pad_token_id + 1)
    )
    if num_labels is not None:
        common["num_labels"] = num_labels
    if arch == "bert":
        return BertConfig(**common)
    if arch == "mbert":
        return BertConfig(**dict(common, vocab_size=MBERT_VOCAB))
    if arch == "distilbert":  # transformers' DistilBERT names its fields its own way
        labels = {} if num_labels is None else dict(num_labels=num_labels)
        return DistilBertConfig(dim=HIDDEN, n_layers=NUM_LAYERS, n_heads=4, hidden_dim=37, vocab_size=VOCAB,
                                max_position_embeddings=64, **labels)
    if arch in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
        return cls(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **common)
    if arch == "electra":  # embeddings narrower than the hidden size: ELECTRA's embedding projection runs
        return ElectraConfig(embedding_size=16, **common)
    raise ValueError(arch)


def _num_labels(head: str) -> Optional[int]:
    return {"none": None, "seqcls": 3, "regression": 1, "flex": None}[head]


def _plain_class(arch: str, head: str):
    return _CLASSES[arch][1 if head in ("seqcls", "regression") else 0]


def adapter_config(spec: AdapterConfigSpec):
    """A registered name stays a name (saved as such in config.json); a dict becomes a config object."""
    if isinstance(spec, str):
        return spec
    spec = dict(spec)
    base = spec.pop("base")
    return AdapterConfig.load(base, **spec)


def fusion_config(spec: FusionConfigSpec):
    if isinstance(spec, str):
        return spec
    spec = dict(spec)
    base = spec.pop("base")
    return AdapterFusionConfig.load(base, **spec)


def randomize_(model: nn.Module, seed: int) -> None:
    """Every parameter far from its init: N(0, 0.2); LayerNorm weights 1 + 0.1 N; adapter scalings 1 + 0.3 N."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are visited once
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            if name.endswith(".scaling"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))


def active_setup(case: Case):
    if case.active.startswith("Stack("):  # members: adapter names, or Fuse(a,b) for the case's fusion
        members = [m.strip() for m in case.active[len("Stack("):-1].replace("Fuse(", "[").replace(")", "]")
                   .split(",")]
        out, group = [], None
        for m in members:
            if m.startswith("["):
                group = [m[1:]]
            elif group is not None:
                group.append(m.rstrip("]"))
                if m.endswith("]"):
                    out.append(Fuse(*group))
                    group = None
            else:
                out.append(m)
        return Stack(*out)
    if case.fusion and case.active == case.fusion_name:
        return Fuse(*case.fusion[0])
    return case.active


def build_reference(case: Case) -> nn.Module:
    """The AdapterHub model of a case, randomised, active setup set, in eval mode."""
    torch.manual_seed(case.seed)
    if case.head == "flex":
        cls = _CLASSES[case.arch][2]
        model = cls(tiny_config(case.arch))
        model.add_classification_head(FLEX_HEAD, num_labels=FLEX_NUM_LABELS)
    else:
        model = _plain_class(case.arch, case.head)(tiny_config(case.arch, _num_labels(case.head)))
        adapters.init(model)
    for name, spec in case.adapters:
        model.add_adapter(name, config=adapter_config(spec))
    if case.fusion:
        model.add_adapter_fusion(list(case.fusion[0]), config=fusion_config(case.fusion[1]))
    randomize_(model, case.seed)
    model.set_active_adapters(active_setup(case))
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# inputs and outputs
# ----------------------------------------------------------------------------------------------


def pad_token_id(arch: str) -> int:
    return 1 if arch in ("roberta", "xlm-roberta") else 0


def make_inputs(arch: str, padding: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Batch 3, seq len 9, rows with 9/6/3 real tokens, padded on the right or on the left."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.full((BATCH, SEQ_LEN), pad_token_id(arch), dtype=torch.long)
    attention_mask = torch.zeros((BATCH, SEQ_LEN), dtype=torch.long)
    token_type_ids = torch.zeros((BATCH, SEQ_LEN), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        sl = slice(0, n) if padding == "right" else slice(SEQ_LEN - n, SEQ_LEN)
        input_ids[row, sl] = torch.randint(3, vocab_size(arch), (n,), generator=gen)
        attention_mask[row, sl] = 1
        token_type_ids[row, sl] = torch.randint(0, 2, (n,), generator=gen)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch in ("bert", "mbert", "electra"):
        inputs["token_type_ids"] = token_type_ids
    return inputs


def vocab_size(arch: str) -> int:
    return MBERT_VOCAB if arch == "mbert" else VOCAB


def reference_outputs(model: nn.Module, case: Case, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """What AdapterHub computes: the head's logits, or last_hidden_state without a head."""
    with torch.no_grad():
        if case.head == "flex":
            return model(**inputs, head=FLEX_HEAD).logits
        out = model(**inputs)
        return out.last_hidden_state if case.head == "none" else out.logits


def output_of(outputs: Any, case: Case) -> torch.Tensor:
    """Pick the compared tensor out of a model output (ours or AdapterHub's)."""
    return outputs.last_hidden_state if case.head == "none" else outputs.logits


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


def _plain_copy(model: nn.Module, case: Case) -> nn.Module:
    """A fresh plain transformers model (no adapters) holding the reference's base weights."""
    plain = _plain_class(case.arch, case.head)(tiny_config(case.arch, _num_labels(case.head)))
    source = model.base_model if case.head in ("none", "flex") else model
    src_state = source.state_dict()
    state = plain.state_dict()
    missing = [k for k in state if k not in src_state]
    if missing:
        raise AssertionError(f"base weights not found in the AdapterHub model: {missing}")
    plain.load_state_dict({k: src_state[k] for k in state}, strict=True)
    plain.eval()
    return plain


def save_case(model: nn.Module, case: Case, fmt: str, root: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Write a case in format ``fmt`` under ``root``; return kwargs for ``compressor.load_model``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if fmt in ("full", "full_bin"):
        path = root / "model"
        model.save_pretrained(str(path), safe_serialization=(fmt == "full"))
        return {"path": str(path), "adapters": None, "fusion": None, "setup": case.setup}
    if fmt not in ("split_bin", "split_safetensors"):
        raise ValueError(fmt)
    safe = fmt == "split_safetensors"
    base = root / "base"
    _plain_copy(model, case).save_pretrained(str(base), safe_serialization=safe)
    adapter_dirs = []
    for name in case.adapter_names:
        d = root / f"adapter_{name}"
        model.save_adapter(str(d), name, use_safetensors=safe)
        adapter_dirs.append(str(d))
    fusion_dir = None
    if case.fusion:
        fusion_dir = root / "fusion"
        kwargs = {"with_head": FLEX_HEAD} if case.head == "flex" else {}
        model.save_adapter_fusion(str(fusion_dir), case.fusion_name, use_safetensors=safe, **kwargs)
        fusion_dir = str(fusion_dir)
    return {"path": str(base), "adapters": adapter_dirs, "fusion": fusion_dir, "setup": case.setup}


def expected_files(case: Case, fmt: str) -> Dict[str, set]:
    """File names each saved directory must hold (relative dir name -> names)."""
    if fmt in ("full", "full_bin"):
        names = {"config.json", "model.safetensors" if fmt == "full" else "pytorch_model.bin"}
        if case.head == "flex":  # BertAdapterModel/RobertaAdapterModel are GenerationMixins
            names.add("generation_config.json")
        return {"model": names}
    safe = fmt == "split_safetensors"
    head_files = {"head_config.json", "model_head.safetensors" if safe else "pytorch_model_head.bin"}
    files = {"base": {"config.json", "model.safetensors" if safe else "pytorch_model.bin"}}
    for name in case.adapter_names:
        names = {"adapter_config.json", "adapter.safetensors" if safe else "pytorch_adapter.bin"}
        # non-flex models with a transformers head write that (unnamed) head next to every adapter;
        # flex models write the head whose name equals the adapter's
        if case.head in ("seqcls", "regression") or (case.head == "flex" and name == FLEX_HEAD):
            names |= head_files
        files[f"adapter_{name}"] = names
    if case.fusion:
        names = {
            "adapter_fusion_config.json",
            "model_adapter_fusion.safetensors" if safe else "pytorch_model_adapter_fusion.bin",
        }
        if case.head == "flex":
            names |= head_files
        files["fusion"] = names
    return files


# ----------------------------------------------------------------------------------------------
# reloading with the adapters library (self-check of the reference)
# ----------------------------------------------------------------------------------------------


def reload_reference(case: Case, fmt: str, spec: Mapping[str, Any]) -> nn.Module:
    """Reload a saved case with the adapters library itself and activate the case's setup."""
    if fmt in ("full", "full_bin"):
        # AdapterHub cannot reload its own full model when a fusion has a custom (dict) config: the
        # JSON-loaded fusion_config_map holds plain dicts and BottleneckLayer.add_fusion_layer reads
        # `fusion_config.dropout_prob` (AttributeError). Turn them back into config objects first.
        config = AutoConfig.from_pretrained(spec["path"])
        fusion_map = config.adapters.get("fusion_config_map", {})
        for key, value in list(fusion_map.items()):
            if isinstance(value, Mapping):
                fusion_map[key] = AdapterFusionConfig.from_dict(value)
        model = AutoAdapterModel.from_pretrained(spec["path"], config=config)
    else:
        safe = fmt == "split_safetensors"
        if case.head == "flex":
            model = AutoAdapterModel.from_pretrained(spec["path"])
        else:
            model = _plain_class(case.arch, case.head).from_pretrained(spec["path"])
            adapters.init(model)
        for d in spec["adapters"]:
            model.load_adapter(d, use_safetensors=safe)
        if spec["fusion"]:
            model.load_adapter_fusion(spec["fusion"], use_safetensors=safe)
    model.set_active_adapters(active_setup(case))
    model.eval()
    return model


def reloaded_outputs(model: nn.Module, case: Case, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Outputs of a reloaded reference. A full-model reload via AutoAdapterModel turns a transformers
    sequence-classification head into the flex head "default"."""
    with torch.no_grad():
        if case.head == "flex":
            return model(**inputs, head=FLEX_HEAD).logits
        out = model(**inputs)
        return out.last_hidden_state if case.head == "none" else out.logits


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


class ReferenceStore:
    """Builds each case once, computes its reference outputs once, saves each format once.

    Meant to sit behind a session-scoped pytest fixture (``ReferenceStore(tmp_path_factory.mktemp(...))``).
    """

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)
        self._models: Dict[str, nn.Module] = {}
        self._expected: Dict[Tuple[str, str], torch.Tensor] = {}
        self._saved: Dict[Tuple[str, str], Dict[str, Any]] = {}

    def model(self, case: Case) -> nn.Module:
        if case.id not in self._models:
            self._models[case.id] = build_reference(case)
        return self._models[case.id]

    def inputs(self, case: Case, padding: str) -> Dict[str, torch.Tensor]:
        return make_inputs(case.arch, padding)

    def expected(self, case: Case, padding: str) -> torch.Tensor:
        key = (case.id, padding)
        if key not in self._expected:
            self._expected[key] = reference_outputs(self.model(case), case, self.inputs(case, padding))
        return self._expected[key]

    def saved(self, case: Case, fmt: str) -> Dict[str, Any]:
        """load_model kwargs of the case saved in ``fmt`` (a fresh copy of the dict each call)."""
        key = (case.id, fmt)
        if key not in self._saved:
            self._saved[key] = save_case(self.model(case), case, fmt, self.root / case.id / fmt)
        spec = dict(self._saved[key])
        if spec["adapters"] is not None:
            spec["adapters"] = list(spec["adapters"])
        return spec


if __name__ == "__main__":  # quick self-check: python tests/adapterhub_reference.py
    import tempfile
    import time

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            model = build_reference(case)
            for fmt in case.formats:
                spec = save_case(model, case, fmt, Path(tmp) / case.id / fmt)
                reloaded = reload_reference(case, fmt, spec)
                for padding in PADDINGS:
                    inputs = make_inputs(case.arch, padding)
                    diff = max_abs_diff(reference_outputs(model, case, inputs), reloaded_outputs(reloaded, case, inputs))
                    assert diff <= 1e-6, (case.id, fmt, padding, diff)
            print(f"ok {case.id}")
    print(f"{len(CASES)} cases in {time.time() - t0:.1f}s")
