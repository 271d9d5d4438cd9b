"""Checks of a compacted model's `compress_manifest.json` before any module is built from it.

The manifest decides every shape of the rebuilt model; a hand-edited or truncated one must fail in one line
naming the field, not as a KeyError deep in module construction (docs/design.md, "compress_manifest.json")."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from .architecture import SITES
from .config import check_name

MODEL_CLASSES = ("encoder", "sequence_classification", "flex")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_manifest(manifest: dict, num_layers: int, where: Path) -> dict:
    """Raise ModelLoadError naming the first malformed field; return the manifest unchanged."""

    def bad(field: str, why: str):
        raise ModelLoadError(f"{where}: {field} {why}; the manifest was edited or truncated: re-run compress "
                             "compact on the original model")

    if manifest.get("model_class") not in MODEL_CLASSES:
        bad("model_class", f"must be one of {', '.join(MODEL_CLASSES)}, got {manifest.get('model_class')!r}")
    head_dim = manifest.get("head_dim")
    if not _count(head_dim) or head_dim == 0:
        bad("head_dim", f"must be a positive integer, got {head_dim!r}")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        bad("layers", f"must be a list of {num_layers} layers (config.json's num_hidden_layers), got "
                      f"{type(layers).__name__ if not isinstance(layers, list) else len(layers)}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            bad(f"layers[{i}]", "must be an object")
        for key in ("heads", "intermediate"):
            if not _count(layer.get(key)):
                bad(f"layers[{i}].{key}", f"must be a count >= 0, got {layer.get(key)!r}")
        sites = layer.get("sites")
        if not isinstance(sites, dict) or set(sites) != set(SITES):
            bad(f"layers[{i}].sites", f"must have exactly {', '.join(SITES)}")
        for s, site in sites.items():
            _check_site(site, f"layers[{i}].sites.{s}", bad)
    heads = manifest.get("heads", {})
    if not isinstance(heads, dict):
        bad("heads", "must be an object")
    for name, head in heads.items():
        if not isinstance(head, dict) or not (_count(head.get("num_labels")) and head["num_labels"] > 0):
            bad(f"heads.{name}.num_labels", "must be a positive integer")
    if manifest["model_class"] == "flex" and manifest.get("active_head") not in (None, *heads):
        bad("active_head", f"must name one of the heads ({', '.join(heads) or 'none'})")
    return manifest


def _check_site(site, field: str, bad) -> None:
    if not isinstance(site, dict):
        bad(field, "must be an object")
    adapters, fusions = site.get("adapters", {}), site.get("fusions", {})
    if not isinstance(adapters, dict) or not isinstance(fusions, dict):
        bad(field, "adapters and fusions must be objects")
    for name, a in adapters.items():
        check_name(name, "adapter")
        if not isinstance(a, dict) or not _count(a.get("width")):
            bad(f"{field}.adapters.{name}.width", "must be a count >= 0")
    for name, f in fusions.items():
        check_name(name, "fusion")
        if not isinstance(f, dict) or not isinstance(f.get("adapters"), list):
            bad(f"{field}.fusions.{name}.adapters", "must be a list of adapter names")
        space = f.get("bottleneck_space", False)
        if not isinstance(space, bool):
            bad(f"{field}.fusions.{name}.bottleneck_space", f"must be true or false, got {space!r}")
        if space:  # its shapes come from the widths of the adapters it fuses
            missing = [n for n in f["adapters"] if not isinstance(n, str) or n not in adapters]
            if missing:
                bad(f"{field}.fusions.{name}.adapters", f"names adapter(s) the site does not have ({missing[0]!r}), "
                                                        "which a bottleneck-space fusion needs for its shapes")
            if f.get("folded") is not True:
                bad(f"{field}.fusions.{name}.folded", "must be true for a bottleneck-space fusion")
