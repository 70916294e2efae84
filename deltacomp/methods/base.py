"""The method registry: each compression method is one file that registers a :class:`Method`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltacomp.config import CompressConfig
from deltacomp.errors import DeltacompError


@dataclass
class Compressed:
    """One matrix's compressed form: named tensors (stored in the package) and JSON-able facts."""

    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    factor_bits: int = 0  # bits of packed factor payload (what the budget limits)
    total_bits: int = 0  # all-in: factors plus scales, offsets, S


class Method:
    """A compression method: ``compress`` a float32 (m, n) delta; ``reconstruct`` it from the stored form."""

    name: str = ""
    exact_factors: bool = False  # True when ``factors`` returns the stored delta exactly (a low-rank method)

    def check_budget(self, shape: tuple[int, int], config: CompressConfig) -> None:
        """Raise BudgetError if the budget cannot cover a matrix of ``shape``; default: any budget works."""

    def compress(self, delta: torch.Tensor, config: CompressConfig, context=None) -> Compressed:
        raise NotImplementedError

    def reconstruct(self, tensors: dict[str, torch.Tensor], info: dict, shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def factors(self, tensors: dict[str, torch.Tensor], info: dict, shape: tuple[int, int],
                max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 LoRA factors ``B (m, r), A (r, n)`` with ``B @ A ~= reconstruct(...)``.

        Low-rank methods override this with their stored factors (``exact_factors = True``; ``max_rank`` is
        then left to the caller). The default, for full-rank methods, is the truncated SVD of the
        reconstruction at rank ``max_rank``, with sqrt(S) on each side.
        """
        from deltacomp.lowrank.svd import svd

        u, s, v = svd(self.reconstruct(tensors, info, shape), max_rank)  # (m, r), (r,), (n, r)
        root = s.sqrt()
        return u * root, (v * root).T


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a method available under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def bits_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def get_method(name: str) -> Method:
    import deltacomp.methods  # noqa: F401  (fills the registry)

    if name not in METHODS:
        raise DeltacompError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]()
