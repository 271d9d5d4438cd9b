"""MaskSet: the public mask format (docs/design.md).

A directory with
- `masks.safetensors`: one boolean tensor per unit group, True = keep, key `<module path>::<kind>`;
- `masks.json`: format version, the fingerprint of the model it was made for, method and parameters, data,
  and per kind the kept / total counts.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import MaskError
from .io import atomic_output_dir
from .units import KINDS, SEP, fingerprint, units_by_key

FORMAT = "compressor-masks"
FORMAT_VERSION = 1
TENSORS_FILE = "masks.safetensors"
META_FILE = "masks.json"


@dataclass
class MaskSet:
    masks: dict  # key -> bool tensor
    fingerprint: str
    method: str = "manual"
    params: dict = field(default_factory=dict)
    data: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    # the model the masks belong to when the method also trained weights (written to DIR/model/ beside them)
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def full(cls, model: nn.Module, kinds=KINDS) -> "MaskSet":
        """Keep everything, for the given kinds."""
        masks = {u.key: torch.ones(u.shape, dtype=torch.bool) for u in units_by_key(model).values() if u.kind in kinds}
        return cls(masks, fingerprint(model))

    def kind_of(self, key: str) -> str:
        return key.rsplit(SEP, 1)[-1]

    def counts(self) -> dict:
        out = {}
        for key, mask in sorted(self.masks.items()):
            kept, total = out.setdefault(self.kind_of(key), [0, 0])
            out[self.kind_of(key)] = [kept + int(mask.sum()), total + mask.numel()]
        return {k: {"kept": v[0], "total": v[1]} for k, v in out.items()}

    # ------------------------------------------------------------------ validation
    def check(self, model: nn.Module) -> dict:
        """Raise MaskError unless every mask names a unit of `model` with the right shape. Returns the units."""
        units = units_by_key(model)
        for key, mask in self.masks.items():
            if SEP not in key or self.kind_of(key) not in KINDS:
                raise MaskError(f"mask key '{key}' is not '<module path>::<kind>' with kind in {', '.join(KINDS)}")
            if key not in units:
                raise MaskError(
                    f"mask '{key}' names no prunable unit of this model: the masks were made for another model "
                    f"(theirs {self.fingerprint}, this one {fingerprint(model)}) or another --setup"
                )
            if tuple(mask.shape) != units[key].shape:
                raise MaskError(
                    f"mask '{key}' has shape {tuple(mask.shape)}, the model's unit has {units[key].shape}: "
                    "the masks were made for another model"
                )
            if mask.dtype != torch.bool:
                raise MaskError(f"mask '{key}' has dtype {mask.dtype}, expected bool")
        own = fingerprint(model)
        if self.fingerprint != own:
            raise MaskError(
                f"the masks were made for model {self.fingerprint}, this model is {own}: prune this model again"
            )
        return units

    # ------------------------------------------------------------------ I/O
    def save(self, directory, overwrite: bool = False) -> Path:
        """Write the mask directory whole or not at all."""
        with atomic_output_dir(directory, overwrite) as tmp:
            self.write(tmp)
        return Path(directory)

    def write(self, directory) -> None:
        """Write masks.safetensors and masks.json into the existing `directory` (no atomicity: see `save`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        meta = dict(
            format=FORMAT, version=FORMAT_VERSION, fingerprint=self.fingerprint, method=self.method,
            params=self.params, data=self.data, counts=self.counts(), **self.extra,
        )
        tensors = {k: v.contiguous() for k, v in sorted(self.masks.items())}
        save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": f"{FORMAT}-v{FORMAT_VERSION}"})  # one entry: byte-stable
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory) -> "MaskSet":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (TENSORS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise MaskError(f"{directory} is not a mask directory: {name} is missing")
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise MaskError(f"{directory / META_FILE} is not UTF-8 text (byte {e.start}); it is corrupt or not a "
                            "mask file: prune again") from e
        except json.JSONDecodeError as e:
            raise MaskError(f"{directory / META_FILE} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION \
                or not isinstance(meta.get("fingerprint"), str):
            raise MaskError(f"{directory / META_FILE} is not a version-{FORMAT_VERSION} mask file")
        try:
            masks = load_file(str(directory / TENSORS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise MaskError(f"cannot read {directory / TENSORS_FILE}: {e}; the file is corrupt, prune again") from e
        known = {"format", "version", "fingerprint", "method", "params", "data", "counts"}
        return cls(masks, meta["fingerprint"], meta.get("method", "?"), meta.get("params", {}), meta.get("data"),
                   {k: v for k, v in meta.items() if k not in known})


def apply_masks(model: nn.Module, maskset: MaskSet) -> nn.Module:
    """Mask `model` in place: structured masks become buffers, weight masks zero the weights."""
    units = maskset.check(model)
    for key, mask in maskset.masks.items():
        unit = units[key]
        if unit.kind == "weights":
            param = model.get_parameter(unit.module_path)
            with torch.no_grad():
                param.mul_(mask.to(param.dtype))
        else:
            model.get_submodule(unit.module_path).set_mask(unit.kind, mask)
    return model


def masked_copy(model: nn.Module, maskset: MaskSet) -> nn.Module:
    return apply_masks(copy.deepcopy(model), maskset)
