"""A registry of named plugins (compression methods, fusion gates): filled by a class decorator, looked up with
an error that lists the known names."""

from __future__ import annotations

from deltacomp.errors import DeltacompError


class Registry(dict):
    """``name -> class`` for one kind of plugin."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        """Class decorator: make a class available under ``name`` (and set its ``name``)."""

        def deco(cls):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return deco

    def lookup(self, name: str):
        if name not in self:
            raise DeltacompError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(sorted(self))}")
        return self[name]
