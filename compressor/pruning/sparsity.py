"""`--sparsity KIND=FRACTION` parsing: the share of each unit group to prune."""

from __future__ import annotations

from ..errors import PruningConfigError
from ..units import KINDS


def parse_sparsity(items) -> dict:
    out = {}
    for item in items or ():
        kind, sep, value = str(item).partition("=")
        kind = kind.strip()
        if not sep:
            raise PruningConfigError(f"--sparsity '{item}' is not KIND=FRACTION, e.g. heads=0.5")
        if kind not in KINDS:
            raise PruningConfigError(f"unknown unit kind '{kind}' in --sparsity; kinds: {', '.join(KINDS)}")
        try:
            fraction = float(value)
        except ValueError:
            raise PruningConfigError(f"--sparsity {kind}={value}: '{value}' is not a number") from None
        if not 0.0 <= fraction < 1.0:
            raise PruningConfigError(
                f"--sparsity {kind}={value}: the fraction pruned must be in [0, 1) (1 would remove every unit)"
            )
        if kind in out:
            raise PruningConfigError(f"--sparsity gives '{kind}' twice")
        out[kind] = fraction
    if not out:
        raise PruningConfigError(f"give at least one --sparsity KIND=FRACTION (kinds: {', '.join(KINDS)})")
    return out
