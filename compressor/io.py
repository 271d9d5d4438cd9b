"""Output directories that appear whole or not at all (DESIGN.md invariant 4)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExistsError


@contextlib.contextmanager
def atomic_output_dir(target, overwrite: bool = False):
    """Yield a temporary directory beside `target`; rename it to `target` only if the block succeeds.

    An existing `target` is an error unless `overwrite`. On any exception (Ctrl-C included) the temporary
    directory is removed and `target` is left as it was."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(target, overwrite: bool = False) -> None:
    """Fail early, before any work, when the output exists and may not be replaced."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another --out or pass --overwrite")
