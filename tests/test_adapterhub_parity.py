"""A model imported from AdapterHub must compute what AdapterHub computes (max abs diff <= 1e-5).

The references are tiny randomised AdapterHub models (see ``adapterhub_reference.py``), saved in every
on-disk format our users have; ``compressor.load_model`` must load each and match the reference on
right- and left-padded batches. ``test_reference_*`` check the references themselves with the
``adapters`` library only.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterhub_reference as ref  # tests/ is on sys.path (conftest.py)

ATOL = 1e-5

logging.getLogger("adapters").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead, and thrash badly when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> ref.ReferenceStore:
    return ref.ReferenceStore(tmp_path_factory.mktemp("adapterhub_reference"))


def _case_format_params(cases):
    return [pytest.param(case, fmt, id=f"{case.id}-{fmt}") for case, fmt in ref.iter_case_formats(cases)]


def _load(spec):
    from compressor import load_model

    return load_model(spec["path"], adapters=spec["adapters"], fusion=spec["fusion"], setup=spec["setup"])


# ---------------------------------------------------------------------------------------------------
# the references themselves (no compressor needed)
# ---------------------------------------------------------------------------------------------------


# Reloading with AdapterHub costs ~0.1 s: every case is reloaded from one format (rotating, so each
# format is reloaded for a quarter of the cases) and a few representative cases from all of them.
# `python tests/adapterhub_reference.py` reloads every case from every format.
_ROUNDTRIP_ALL_FORMATS = {"seq_bn", "double_seq_bn_gating", "fuse2_mixed_configs", "bert_flex_fuse2", "roberta_regression_fuse2"}
_ROUNDTRIP_PARAMS = [
    pytest.param(case, fmt, id=f"{case.id}-{fmt}")
    for i, case in enumerate(ref.CASES)
    for fmt in case.formats
    if case.id in _ROUNDTRIP_ALL_FORMATS or fmt == case.formats[i % len(case.formats)]
]


@pytest.mark.parametrize("case,fmt", _case_format_params(ref.CASES))
def test_reference_saved_files(store, case, fmt):
    """Each format holds exactly the documented files."""
    spec = store.saved(case, fmt)
    for rel, names in ref.expected_files(case, fmt).items():
        directory = Path(spec["path"]).parent / rel
        assert set(os.listdir(directory)) == names, rel


@pytest.mark.parametrize("case,fmt", _ROUNDTRIP_PARAMS)
def test_reference_roundtrip(store, case, fmt):
    """AdapterHub reloads the saved reference to identical outputs."""
    spec = store.saved(case, fmt)
    reloaded = ref.reload_reference(case, fmt, spec)
    for padding in ref.PADDINGS:
        got = ref.reloaded_outputs(reloaded, case, store.inputs(case, padding))
        diff = ref.max_abs_diff(got, store.expected(case, padding))
        assert diff <= 1e-6, f"{case.id}/{fmt}/{padding}: reloaded AdapterHub model differs by {diff:.3g}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ref.CASES])
def test_reference_adapters_change_outputs(store, case):
    """Guards against vacuous cases: the active setup must matter, and a fusion must not equal its last adapter."""
    model = store.model(case)
    inputs = store.inputs(case, "right")
    active = store.expected(case, "right")
    try:
        model.set_active_adapters(None)
        assert ref.max_abs_diff(active, ref.reference_outputs(model, case, inputs)) > 1e-3
        if case.fusion and case.active == case.fusion_name:
            model.set_active_adapters(case.fusion[0][-1])
            assert ref.max_abs_diff(active, ref.reference_outputs(model, case, inputs)) > 1e-3
    finally:
        model.set_active_adapters(ref.active_setup(case))
    assert ref.max_abs_diff(active, ref.reference_outputs(model, case, inputs)) == 0.0


# ---------------------------------------------------------------------------------------------------
# compressor.load_model parity
# ---------------------------------------------------------------------------------------------------


def _head_in_adapter_dir(case, fmt):
    """Split formats of flex-head models: the head exists only inside the adapter/fusion directory."""
    return case.head == "flex" and fmt.startswith("split")


_PARITY_PARAMS = [
    pytest.param(case, fmt, id=f"{case.id}-{fmt}")
    for case, fmt in ref.iter_case_formats(ref.CASES)
    if not _head_in_adapter_dir(case, fmt)
]
_HEAD_IN_ADAPTER_DIR_PARAMS = [
    pytest.param(case, fmt, id=f"{case.id}-{fmt}")
    for case, fmt in ref.iter_case_formats(ref.CASES)
    if _head_in_adapter_dir(case, fmt)
]


@pytest.mark.parametrize("case,fmt", _PARITY_PARAMS)
def test_adapterhub_parity(store, case, fmt):
    _check_parity(store, case, fmt)


@pytest.mark.parametrize("case,fmt", _HEAD_IN_ADAPTER_DIR_PARAMS)
def test_adapterhub_parity_head_in_adapter_dir(store, case, fmt):
    """An AdapterHub flex head saved with its adapter (save_adapter, head named like the adapter) or with
    its fusion (save_adapter_fusion(with_head=...)) is what `load_adapter` / `load_adapter_fusion` bring
    back with the adapter: loading base + adapter dirs must give that head's logits."""
    _check_parity(store, case, fmt)


def _check_parity(store, case, fmt):
    spec = store.saved(case, fmt)
    model = _load(spec)
    assert isinstance(model, nn.Module)
    assert not model.training, "load_model must return a model in eval mode"
    for padding in ref.PADDINGS:
        inputs = store.inputs(case, padding)
        with torch.no_grad():
            outputs = model(**inputs)
        field = "last_hidden_state" if case.head == "none" else "logits"
        assert getattr(outputs, field, None) is not None, f"{case.id}/{fmt}: the output has no .{field}"
        got = ref.output_of(outputs, case)
        expected = store.expected(case, padding)
        assert tuple(got.shape) == tuple(expected.shape), f"{case.id}/{fmt}/{padding}"
        diff = ref.max_abs_diff(got, expected)
        assert diff <= ATOL, f"{case.id}/{fmt}/{padding}: max abs diff {diff:.3g} > {ATOL}"


def test_ambiguous_or_unknown_setup_raises(store):
    """Two adapters, no fusion, no setup: nothing to pick by default; a setup naming nothing loaded fails too."""
    from compressor.errors import CompressorError

    case = ref.CASES_BY_ID["two_adapters_setup_b"]
    for fmt in ("full", "split_bin"):
        spec = store.saved(case, fmt)
        with pytest.raises(CompressorError):
            _load({**spec, "setup": None})
        with pytest.raises(CompressorError):
            _load({**spec, "setup": "nope"})


@pytest.mark.parametrize(
    "case,fmt",
    [pytest.param(c, f, id=f"{c.id}-{f}") for c in ref.UNSUPPORTED_CASES for f in ("full_bin", "split_bin")],
)
def test_unsupported_adapter_option_raises(store, case, fmt):
    from compressor.errors import UnsupportedAdapterError

    spec = store.saved(case, fmt)
    with pytest.raises(UnsupportedAdapterError) as info:
        _load(spec)
    assert case.unsupported in str(info.value), f"the error must name {case.unsupported!r}: {info.value}"


# ---------------------------------------------------------------------------------------------------
# .bin files are untrusted pickles
# ---------------------------------------------------------------------------------------------------


class _MkdirOnUnpickle:
    """Unpickling this calls os.mkdir(target): a harmless, observable stand-in for arbitrary code."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def _write_payload(path: Path, target: Path, raw_pickle: bool) -> None:
    payload = {"encoder.layer.0.output.adapters.a.adapter_up.weight": _MkdirOnUnpickle(str(target))}
    path.unlink()
    if raw_pickle:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)


def test_payload_would_run_if_unpickled(tmp_path):
    """The payload is real: an unsafe torch.load executes it (so the test below is not vacuous)."""
    target = tmp_path / "ran"
    path = tmp_path / "x.bin"
    path.write_bytes(b"")
    _write_payload(path, target, raw_pickle=False)
    torch.load(path, weights_only=False)
    assert target.is_dir()


@pytest.mark.parametrize(
    "fmt,file,raw_pickle",
    [
        ("split_bin", "adapter_a/pytorch_adapter.bin", False),
        ("split_bin", "adapter_a/pytorch_adapter.bin", True),
        ("split_bin", "fusion/pytorch_model_adapter_fusion.bin", False),
        ("split_bin", "base/pytorch_model.bin", False),
        ("full_bin", "model/pytorch_model.bin", False),
    ],
)
def test_malicious_bin_is_not_executed(store, tmp_path, fmt, file, raw_pickle):
    from compressor.errors import CompressorError

    case = ref.CASES_BY_ID["fuse2_seq_bn_dynamic"]
    spec = store.saved(case, fmt)
    src = Path(spec["path"]).parent
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    target = tmp_path / "pwned"
    _write_payload(dst / file, target, raw_pickle)

    def moved(p):
        return None if p is None else str(dst / Path(p).relative_to(src))

    moved_spec = {
        "path": moved(spec["path"]),
        "adapters": None if spec["adapters"] is None else [moved(p) for p in spec["adapters"]],
        "fusion": moved(spec["fusion"]),
        "setup": spec["setup"],
    }
    with pytest.raises(CompressorError):
        _load(moved_spec)
    assert not target.exists(), "loading a .bin executed code from the pickle"
