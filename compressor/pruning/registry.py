"""A name -> class registry that rejects duplicates (peft's style)."""

from __future__ import annotations

from ..errors import PruningConfigError


class Registry(dict):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str):
        def wrap(cls):
            if name in self:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            cls.name = name
            self[name] = cls
            return cls
        return wrap

    def get_or_fail(self, name: str):
        if name not in self:
            raise PruningConfigError(f"unknown {self.what} '{name}'; choose one of: {', '.join(sorted(self))}")
        return self[name]
