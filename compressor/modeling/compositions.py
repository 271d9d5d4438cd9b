"""Typed adapter compositions: what runs at an adapter site, as AdapterHub's composition blocks define it.

- `Single(name)`: one bottleneck adapter (AdapterHub parses a plain name as `Stack(name)`: the same thing).
- `Fuse(name, adapters)`: the named AdapterFusion over `adapters` (in fusion order).
- `Stack(*children)`: children (Single or Fuse) one after the other, each reading the previous one's output
  (AdapterHub's `compose_stack`): `Stack(lang, task)`, `Stack(lang, Fuse(...))`.

`first()` / `last()` are AdapterHub's: the first / last adapter name, descending into the first / last child
(a Stack's first() picks the invertible adapter of the embeddings; last() the adapter whose post_forward runs).

The string form (`--setup`, the manifest's `setup`) is a plain name (an adapter or a named fusion) or
`Stack(a,b)` whose members are adapter or fusion names. The manifest's per-site `active` is the JSON form:
`["single", name]`, `["fuse", fusion, [names]]` or `["stack", [child, ...]]` (the first two as before Stack).
Everything else AdapterHub composes (Parallel, Split, BatchSplit, Average, MultiTask, nested Stacks, a Stack
inside a Fuse) is refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from ..errors import UnsupportedAdapterError

UNSUPPORTED_BLOCKS = ("Parallel", "Split", "BatchSplit", "Average", "MultiTask")
SUPPORTED = "an adapter or fusion name, or Stack(a,b) of adapter / fusion names"


class Composition:
    """Base of Single, Fuse and Stack."""

    @property
    def children(self) -> tuple:
        """What runs one after the other at a site: (self,) for Single and Fuse, the children of a Stack."""
        return (self,)

    def adapters(self) -> list:
        """Every adapter name (leaves), in order."""
        raise NotImplementedError

    def fuses(self) -> list:
        """The Fuse blocks inside, in order."""
        return [c for c in self.children if isinstance(c, Fuse)]

    def first(self) -> str:
        raise NotImplementedError

    def last(self) -> str:
        raise NotImplementedError

    def to_json(self) -> list:
        raise NotImplementedError

    # ------------------------------------------------------------------ at a site (duck-typed AdapterSite)

    def forward(self, site, h, input_tensor, placements: list):
        """The site's output after its dense + dropout `h` (AdapterHub's bottleneck_layer_forward): each child
        with its lead adapter's pre_forward (placements[i]), then the last adapter's post_forward."""
        dense_out = h
        for child, p in zip(self.children, placements):
            h = child._run(site, h, input_tensor, p)
        if placements[-1].get("is_parallel"):  # ParallelAdapter.post_forward: the sub-layer's output is added
            h = h + dense_out
        if placements[-1]["original_ln_after"]:
            h = site.LayerNorm(h + input_tensor)
        return h

    def units(self, site, path: str) -> Iterator[tuple]:
        """(module path, kind, shape, members) of every prunable unit this composition runs at `site` (held at
        `path`): each Fuse's fused adapters, then every adapter's bottleneck neurons (stacked ones included)."""
        for f in self.fuses():
            if f.names:
                fpath = f"{path}.adapter_fusion_layer.{f.name}"
                yield fpath, "adapters", (len(f.names),), tuple(f.names)
        for name in self.adapters():
            if site.adapters[name].width > 0:
                yield f"{path}.adapters.{name}", "bottleneck", (site.adapters[name].width,), ()

    def modules(self, site, path: str) -> Iterator[tuple]:
        """(path, module) of every adapter and fusion that runs."""
        for name in self.adapters():
            yield f"{path}.adapters.{name}", site.adapters[name]
        for f in self.fuses():
            yield f"{path}.adapter_fusion_layer.{f.name}", site.adapter_fusion_layer[f.name]


def pre_forward(p: dict, h, input_tensor, layer_norm, fusion=None):
    """AdapterHub's Adapter.pre_forward with placement `p` (of the lead adapter): (hidden, query, residual). A
    parallel adapter (ParallelAdapter.pre_forward) reads the sub-layer's input instead."""
    if p.get("is_parallel"):
        return input_tensor, (input_tensor if fusion is not None else None), input_tensor
    query = None
    residual = h if p["residual_before_ln"] is True else None
    if fusion is not None and fusion.query_before_ln:
        query = h
    if p["original_ln_before"]:
        h = h + input_tensor
        if p["residual_before_ln"] == "post_add":
            residual = h
        h = layer_norm(h)
    if p["residual_before_ln"] is False:
        residual = h
    if fusion is not None and not fusion.query_before_ln:
        query = h
    return h, query, residual


@dataclass(frozen=True)
class Single(Composition):
    name: str

    def adapters(self) -> list:
        return [self.name]

    def first(self) -> str:
        return self.name

    def last(self) -> str:
        return self.name

    def to_json(self) -> list:
        return ["single", self.name]

    def __str__(self) -> str:
        return self.name

    def _run(self, site, h, input_tensor, p):
        h, _, residual = pre_forward(p, h, input_tensor, site.LayerNorm)
        out, _ = site.adapters[self.name](h, None if p.get("is_parallel") else residual)
        return out


@dataclass(frozen=True)
class Fuse(Composition):
    name: str  # the fusion's name (AdapterHub's default: the adapter names joined by ",")
    names: Tuple[str, ...]  # the fused adapters, in fusion order

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))

    def adapters(self) -> list:
        return list(self.names)

    def first(self) -> str:
        return self.names[0]

    def last(self) -> str:
        return self.names[-1]

    def to_json(self) -> list:
        return ["fuse", self.name, list(self.names)]

    def __str__(self) -> str:
        return self.name

    def _run(self, site, h, input_tensor, p):
        """AdapterHub's compose_fuse: the last adapter's pre_forward with the fusion's query options."""
        fusion = site.adapter_fusion_layer[self.name]
        h, query, residual = pre_forward(p, h, input_tensor, site.LayerNorm, fusion)
        fused = [site.adapters[n] for n in self.names]
        if fusion.bottleneck_space:
            return fusion(query, [a.bottleneck(h) for a in fused], residual, up_layers=[a.adapter_up for a in fused])
        return fusion(query, [a.up(h) for a in fused], residual)


@dataclass(frozen=True)
class Stack(Composition):
    items: Tuple[Composition, ...]

    def __init__(self, *items):
        object.__setattr__(self, "items", tuple(items))
        for c in self.items:
            if not isinstance(c, (Single, Fuse)):
                raise UnsupportedAdapterError(
                    f"Stack({', '.join(map(str, self.items))}): a Stack's members must be adapters or fusions "
                    f"(no nested {type(c).__name__}); supported: {SUPPORTED}")
        names = self.adapters()
        if len(set(names)) != len(names):  # one module, one set of units: it cannot run twice
            raise UnsupportedAdapterError(f"{self}: an adapter appears twice in the Stack; supported: {SUPPORTED}")

    @property
    def children(self) -> tuple:
        return self.items

    def adapters(self) -> list:
        return [n for c in self.items for n in c.adapters()]

    def first(self) -> str:
        return self.items[0].first()

    def last(self) -> str:
        return self.items[-1].last()

    def to_json(self) -> list:
        return ["stack", [c.to_json() for c in self.items]]

    def __str__(self) -> str:
        # a fusion named by its adapter list ("a,b") is written Fuse(a,b): its commas are not the Stack's
        return "Stack(" + ",".join(f"Fuse({c.name})" if isinstance(c, Fuse) and "," in c.name else str(c)
                                   for c in self.items) + ")"


def from_json(active) -> Optional[Composition]:
    """A manifest's `active` (JSON form, or a Composition) as a Composition; None stays None."""
    if active is None or isinstance(active, Composition):
        return active
    kind = active[0]
    if kind == "single":
        return Single(active[1])
    if kind == "fuse":
        return Fuse(active[1], tuple(active[2]))
    if kind == "stack":
        return Stack(*(from_json(c) for c in active[1]))
    raise UnsupportedAdapterError(f"active composition {active!r} in the manifest is not one of single, fuse, stack")


def of_children(children: list) -> Optional[Composition]:
    """The composition that runs `children` one after the other (a Stack of one is that child)."""
    if not children:
        return None
    return children[0] if len(children) == 1 else Stack(*children)


_CALL = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)


def parse(text: str, fusions: Optional[dict] = None) -> Composition:
    """The string form (`--setup`): a name, or `Stack(a,b,...)` whose members are names. `fusions` maps fusion
    names to their adapter names: a member that names a fusion is that Fuse; `Fuse(a,b)` names the fusion of a
    and b (AdapterHub's default name "a,b")."""
    fusions = fusions or {}
    m = _CALL.match(text)
    if m is None:
        name = text.strip()
        return Fuse(name, tuple(fusions[name])) if name in fusions else Single(name)
    block, inner = m.group(1), m.group(2)
    if block in UNSUPPORTED_BLOCKS:
        raise UnsupportedAdapterError(
            f"--setup {text}: the {block} composition is not supported; supported: {SUPPORTED}")
    if block == "Fuse":
        names = [n.strip() for n in inner.split(",") if n.strip()]
        name = ",".join(names)
        if "(" in inner or name not in fusions:
            raise UnsupportedAdapterError(
                f"--setup {text}: no fusion '{name}' in this model; name one of its fusions (supported: {SUPPORTED})")
        return Fuse(name, tuple(fusions[name]))
    if block != "Stack":
        raise UnsupportedAdapterError(f"--setup {text}: unknown composition '{block}'; supported: {SUPPORTED}")
    parts = _split_top(inner)
    if any("(" in p and not p.strip().startswith("Fuse(") for p in parts):
        raise UnsupportedAdapterError(
            f"--setup {text}: a Stack can hold adapters and fusions only (no nested blocks); supported: {SUPPORTED}")
    if len(parts) < 2 or any(not p.strip() for p in parts):
        raise UnsupportedAdapterError(f"--setup {text}: a Stack needs two or more names; supported: {SUPPORTED}")
    return Stack(*(parse(p, fusions) for p in parts))


def _split_top(inner: str) -> list:
    """`inner` split at the commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in inner:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]
