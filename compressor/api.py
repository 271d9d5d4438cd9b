"""Library entry points behind the CLI commands: one function per command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .compaction import compact, write_compacted
from .io import atomic_output_dir
from .masks import MaskSet


def model_source_dir(source) -> Path:
    """Where a model (and its tokenizer files) came from; None is the embedded default."""
    if source is None:
        from .default_model import default_model_dir
        return default_model_dir()
    return Path(source)


def compact_to_dir(model: nn.Module, maskset: Optional[MaskSet], out, overwrite: bool = False,
                   adapterhub: bool = False, source=None) -> nn.Module:
    """Compact `model` under `maskset` and write it to `out` (and `out/adapterhub` in AdapterHub's format)."""
    compacted = compact(model, maskset)
    with atomic_output_dir(out, overwrite) as tmp:
        write_compacted(compacted, tmp, tokenizer_dir=model_source_dir(source))
        if adapterhub:
            from .adapterhub_export import write_adapterhub
            write_adapterhub(model, maskset, tmp / "adapterhub", reference=compacted)
    return compacted
