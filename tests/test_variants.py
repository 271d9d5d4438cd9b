"""The export variant registry (exporters/variants.py): a variant registered in one place is built, parity-checked
on its provider at its tolerance, listed by the CLI and summarised in export.md, with no other change; the old
spellings (`--quantize int8`, `--sparse`) and `--variant NAME` choose from it; fp16 also holds on the unfused graph."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from compressor.errors import ExportError
from exporters import variants
from exporters.onnx_export import ExportConfig, export_onnx
from exporters.variants import ATOL, VARIANTS, Variant, register_variant
from factories import make_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("v") / "model", "roberta", "seq_bn", n_adapters=2,
                          fusion="dynamic", head="classifier", seed=4)


@pytest.fixture
def throwaway():
    """Two variants registered by this test only: a copy of the fp32 graph (held to atol) and one that declines."""

    @register_variant("copy")
    class Copy(Variant):
        file = "model.copy.onnx"
        title = "Copy of the fp32 graph (a test's throwaway variant)"
        tolerance = ATOL

        def build(self, deploy, dst):
            shutil.copyfile(deploy, dst)
            return dict(copied_from=deploy.name)

    @register_variant("declines")
    class Declines(Variant):
        file = "model.never.onnx"
        title = "A variant that writes nothing"
        tolerance = None

        def build(self, deploy, dst):
            return {}

    yield Copy
    del VARIANTS["copy"], VARIANTS["declines"]


def test_a_registered_variant_is_built_checked_listed_and_summarised(throwaway, model_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(model_dir), "--onnx", "--variant", "copy", "--variant", "declines",
                                 "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.copy.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert not (out / "model.never.onnx").exists()
    assert "model.copy.onnx" in result.stdout and "model.never.onnx" not in result.stdout  # the CLI table
    parity = json.loads((out / "parity.json").read_text())
    copy = parity["targets"]["model.copy.onnx"]
    assert copy == dict(tolerance=1e-4, held=True, provider="cpu", passed=True, worst=copy["worst"])
    assert copy["worst"] == pytest.approx(parity["worst"]["model.onnx"], abs=1e-6)  # the same graph
    assert "model.never.onnx" not in parity["targets"]
    copies = [c for c in parity["checks"] if c["target"] == "model.copy.onnx"]
    assert len(copies) == len([c for c in parity["checks"] if c["target"] == "model.onnx"]) > 0
    text = (out / "export.md").read_text()
    assert "## Copy of the fp32 graph (a test's throwaway variant)" in text
    assert "`model.copy.onnx`: " in text and "atol 0.0001" in text and "| model.copy.onnx | cpu | 0.0001 |" in text
    assert "## A variant that writes nothing" in text and "`model.never.onnx` was not written." in text


def test_a_registered_variant_is_held_to_its_tolerance(throwaway, model_dir, tmp_path):
    """The same copy held to an impossible stated tolerance fails the export: its tolerance is used, not atol."""
    throwaway.tolerance = -1.0  # any diff exceeds it
    model = compressor.load_model(model_dir)
    with pytest.raises(compressor.errors.ParityError, match="model.copy.onnx.*tolerance -1"):
        export_onnx(model, tmp_path / "out", config=ExportConfig(variants=["copy"], seed=0))
    assert not (tmp_path / "out").exists()


def test_config_spellings_and_unknown_names():
    config = ExportConfig(quantize="int8", sparse=True, variants=["fp16", "int8"])
    assert config.variants == ("int8", "fp16", "sparse")  # deduplicated, in registration order
    assert config.quantize == "int8" and config.sparse
    assert ExportConfig(variants=["sparse"]).sparse and ExportConfig(variants="fp16").variants == ("fp16",)
    assert ExportConfig().variants == ()
    with pytest.raises(ExportError, match="unknown export variant 'fp8'; choose one of: int8, int8-static, fp16, sparse"):
        ExportConfig(variants=["fp8"])
    with pytest.raises(ValueError, match="registered twice"):
        register_variant("fp16")(type("Again", (Variant,), {}))
    assert {"int8", "int8-static", "fp16", "sparse"} <= set(VARIANTS)
    assert [v.name for v in variants.resolve(["sparse", "fp16"])] == ["fp16", "sparse"]


def test_fp16_of_the_unoptimised_graph_holds_its_tolerance(model_dir, tmp_path):
    """Without the optimizer the graph keeps Softmax and the additive mask (float32 min, clamped to fp16's)."""
    model = compressor.load_model(model_dir)
    result = export_onnx(model, tmp_path / "out", config=ExportConfig(optimize=False, variants=["fp16"], seed=0))
    target = result.parity["targets"]["model.fp16.onnx"]
    assert target["passed"] and target["tolerance"] == 1e-2 and target["worst"] < 5e-3
