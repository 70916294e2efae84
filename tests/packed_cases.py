"""Random packed modules and a float64 oracle, shared by the CPU and CUDA tests of the kernels."""

from __future__ import annotations

import torch

from deltacomp.quant import factors
from deltacomp.quant.budget import BitGroup
from deltacomp.quant.packed import PackedModule, packed_from_parts

ALL_WIDTHS = ((8, 8), (4, 3), (3, 3), (2, 1), (1, 2), (2, 2), (1, 1), (4, 4), (8, 4), (3, 2))


def random_module(m: int, n: int, widths=ALL_WIDTHS, rank_per_group: int = 3, group_size: int = 0,
                  seed: int = 0, name: str = "w") -> PackedModule:
    """A quantized random rank-r matrix with one bit group per (U bits, V bits) pair of ``widths``."""
    g = torch.Generator().manual_seed(seed)
    r = rank_per_group * len(widths)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.linspace(2.0, 0.2, r) * (1 + torch.rand(r, generator=g))
    u, v = u[:, :r], v[:, :r]
    delta = (u * s) @ v.T
    groups = [BitGroup(bu, rank_per_group, bv) for bu, bv in widths]
    fg = factors.quantize_rtn(delta, u, s, v, groups, group_size, refit=False)
    info = {"group_size": group_size, "groups": [{"bits": bu, "rank": rank_per_group, "v_bits": bv}
                                                  for bu, bv in widths]}
    return packed_from_parts(name, factors.to_tensors(fg), info, (m, n))


def oracle(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, table) -> torch.Tensor:
    """float64 ``y + sum_d w[:, d] * x @ dW_d^T`` per projection of ``table[p][d]`` (dense dequantized factors)."""
    out = y.double().clone()
    off = 0
    for row in table:
        m = next(mod.shape[0] for mod in row if mod is not None)
        for d, mod in enumerate(row):
            if mod is not None:
                out[:, off:off + m] += weights[:, d:d + 1].double() * (x.double() @ mod.dense().double().T)
        off += m
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
