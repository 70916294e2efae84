"""The packed view of a compressed matrix: per bit group, the stored int32 words of U and V with their widths,
scales and offsets, and S, checked against the manifest's ``info`` and never unpacked on load.

The layout of the words is that of :mod:`deltacomp.quant.packing`. The ``mixed`` method rebuilds its matrices
through this view, the package reader hands it to the kernels, and the kernels' bank is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltacomp.errors import PackageError
from deltacomp.quant import packing, rtn


def group_widths(info: dict) -> list[tuple[int, int]]:
    """(U bits, V bits) of each group of a package module's ``info``; ``v_bits`` is written only where it
    differs from ``bits``."""
    return [(g["bits"], g.get("v_bits", g["bits"])) for g in info["groups"]]


@dataclass(frozen=True)
class PackedSide:
    """One factor of a bit group: ``r`` singular vectors of ``length`` codes, packed."""

    words: torch.Tensor  # (r, packed_words(length, bits)) int32
    scale: torch.Tensor  # (r, groups along length) fp16
    offset: torch.Tensor  # (r, groups along length) fp16
    bits: int
    length: int

    def dequantize(self, group_size: int) -> torch.Tensor:
        """(r, length) float32."""
        codes = packing.unpack(self.words, self.bits, self.length)
        return rtn.dequantize(codes, self.scale, self.offset, group_size)


@dataclass(frozen=True)
class PackedGroup:
    u: PackedSide  # rows of U_g^T: length m (out_features)
    v: PackedSide  # rows of V_g^T: length n (in_features)
    s: torch.Tensor  # (r,)

    @property
    def rank(self) -> int:
        return int(self.s.numel())


@dataclass(frozen=True)
class PackedModule:
    """A compressed matrix ``delta (m, n) = sum_g U_g diag(S_g) V_g^T`` as stored: nothing unpacked."""

    name: str
    shape: tuple[int, int]  # (m, n) = (out_features, in_features)
    group_size: int  # entries per (scale, offset) along a vector; 0 = one per vector
    groups: tuple[PackedGroup, ...]

    @property
    def rank(self) -> int:
        return sum(g.rank for g in self.groups)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized float32 ``u (m, r), s (r,), v (n, r)``."""
        u = torch.cat([g.u.dequantize(self.group_size) for g in self.groups], 0).T
        v = torch.cat([g.v.dequantize(self.group_size) for g in self.groups], 0).T
        s = torch.cat([g.s.float() for g in self.groups])
        return u, s, v

    def dense(self) -> torch.Tensor:
        """The float32 (m, n) delta: sum over groups of U_g diag(S_g) V_g^T."""
        total = None
        for g in self.groups:
            u = g.u.dequantize(self.group_size)  # (r_g, m)
            v = g.v.dequantize(self.group_size)  # (r_g, n)
            part = (u.T * g.s.float()) @ v
            total = part if total is None else total + part
        return total if total is not None else torch.zeros(self.shape)


def _side(name: str, parts: dict, key: str, bits: int, length: int, rank: int, group_size: int) -> PackedSide:
    try:
        words, scale, offset = parts[key], parts[f"{key}_scale"], parts[f"{key}_offset"]
    except KeyError as e:
        raise PackageError(f"{name}: stored tensor {e.args[0]!r} is missing") from None
    want = {key: ((rank, packing.packed_words(length, bits)), torch.int32),
            f"{key}_scale": ((rank, rtn.num_groups(length, group_size)), torch.float16),
            f"{key}_offset": ((rank, rtn.num_groups(length, group_size)), torch.float16)}
    for k, t in ((key, words), (f"{key}_scale", scale), (f"{key}_offset", offset)):
        shape, dtype = want[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise PackageError(f"{name}: stored {k} is {t.dtype} {list(t.shape)}; the manifest implies "
                               f"{dtype} {list(shape)}")
    return PackedSide(words, scale, offset, bits, length)


def packed_from_parts(name: str, parts: dict[str, torch.Tensor], info: dict, shape: tuple[int, int]) -> PackedModule:
    """The packed view of a ``mixed`` module from its stored tensors and manifest ``info``, checked."""
    m, n = (int(d) for d in shape)
    gs = int(info["group_size"])
    groups = []
    for i, ((bu, bv), g) in enumerate(zip(group_widths(info), info["groups"])):
        r = int(g["rank"])
        s = parts.get(f"g{i}.s")
        if s is None or tuple(s.shape) != (r,) or not s.dtype.is_floating_point:
            raise PackageError(f"{name}: stored g{i}.s must be a float vector of {r} values")
        groups.append(PackedGroup(_side(name, parts, f"g{i}.u", bu, m, r, gs),
                                  _side(name, parts, f"g{i}.v", bv, n, r, gs), s))
    return PackedModule(name, (m, n), gs, tuple(groups))
