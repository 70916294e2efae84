"""Quantized SVD factors in bit groups: quantize, refit, reconstruct, and the stored tensor names.

A matrix ``delta (m, n) ~= sum_g U_g diag(S_g) V_g^T`` where group g holds ``r_g`` consecutive singular
vectors, U's at ``bits_g`` and V's at ``v_bits_g`` (the same unless the allocation chose otherwise). Stored per
group g (see :mod:`deltacomp.quant.packing` for the packing layout):

    g{g}.u         int32 (r_g, packed_words(m, bits))   rows of U_g^T, packed (V_g^T: at v_bits)
    g{g}.u_scale   fp16  (r_g, groups along m)          code * scale + offset
    g{g}.u_offset  fp16  (r_g, groups along m)
    g{g}.v, g{g}.v_scale, g{g}.v_offset                 the same for V_g^T, along n
    g{g}.s         fp16 (fp32 if fp16 cannot hold it) (r_g,)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltacomp.quant import packing, rtn
from deltacomp.quant.budget import BitGroup


@dataclass
class QuantRows:
    """Codes of some rows with their per-group parameters."""

    codes: torch.Tensor  # (R, L) uint8
    scale: torch.Tensor  # (R, G) fp16
    offset: torch.Tensor  # (R, G) fp16

    def dequantize(self, group_size: int) -> torch.Tensor:
        return rtn.dequantize(self.codes, self.scale, self.offset, group_size)


@dataclass
class FactorGroup:
    bits: int  # U's width
    u: QuantRows  # rows of U_g^T: (r_g, m)
    v: QuantRows  # rows of V_g^T: (r_g, n)
    s: torch.Tensor  # (r_g,)
    v_bits: int | None = None  # V's width; not given: ``bits``

    def __post_init__(self):
        if self.v_bits is None:
            self.v_bits = self.bits


def _store_s(s: torch.Tensor) -> torch.Tensor:
    half = s.to(torch.float16)
    ok = torch.isfinite(half).all() and bool(((half != 0) | (s == 0)).all())
    return half if ok else s.to(torch.float32)


def _split(x: torch.Tensor, groups: list[BitGroup]) -> list[torch.Tensor]:
    return list(torch.split(x, [g.rank for g in groups], dim=0))


def quantize_rtn(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                 groups: list[BitGroup], group_size: int, refit: bool = True) -> list[FactorGroup]:
    """Round-to-nearest quantization of truncated SVD factors u (m, r), s (r,), v (n, r).

    With ``refit``: after V is quantized, U diag(S) is refitted by least squares to ``delta`` given the
    quantized V (it absorbs V's rounding error), U is quantized, then S is refitted given both quantized
    factors. Each refit can only lower ``||delta - U diag(S) V^T||_F`` before the following rounding.
    """
    vq = [rtn.quantize_rows(vt, g.v_bits, group_size) for vt, g in zip(_split(v.T, groups), groups)]
    if refit:
        v_hat = torch.cat([rtn.dequantize(*q, group_size) for q in vq], 0).T  # (n, r)
        gram = v_hat.T @ v_hat  # (r, r)
        gram += torch.eye(gram.shape[0], device=gram.device) * (1e-6 * gram.diagonal().mean())
        us = torch.linalg.solve(gram, v_hat.T @ delta.T).T  # (m, r): argmin_X ||delta - X v_hat^T||
        s = us.norm(dim=0)
        u = us / torch.where(s > 0, s, torch.ones_like(s))
    uq = [rtn.quantize_rows(ut, g.bits, group_size) for ut, g in zip(_split(u.T, groups), groups)]
    if refit:
        u_hat = torch.cat([rtn.dequantize(*q, group_size) for q in uq], 0).T  # (m, r)
        a = (u_hat.T @ u_hat) * (v_hat.T @ v_hat)  # (r, r)
        b = ((u_hat.T @ delta) * v_hat.T).sum(1)  # b_i = u_i^T delta v_i
        a += torch.eye(a.shape[0], device=a.device) * (1e-6 * a.diagonal().mean())
        s = torch.linalg.solve(a, b)
    out = []
    for g, q_u, q_v, s_g in zip(groups, uq, vq, torch.split(s, [g.rank for g in groups])):
        out.append(FactorGroup(g.bits, QuantRows(*q_u), QuantRows(*q_v), _store_s(s_g), g.v_bits))
    return out


def reconstruct(groups: list[FactorGroup], group_size: int) -> torch.Tensor:
    """sum_g U_g diag(S_g) V_g^T as float32 (m, n)."""
    total = None
    for g in groups:
        u = g.u.dequantize(group_size)  # (r, m)
        v = g.v.dequantize(group_size)  # (r, n)
        part = (u.T * g.s.float()) @ v
        total = part if total is None else total + part
    return total


def to_tensors(groups: list[FactorGroup]) -> dict[str, torch.Tensor]:
    out = {}
    for i, g in enumerate(groups):
        for side, q, bits in (("u", g.u, g.bits), ("v", g.v, g.v_bits)):
            out[f"g{i}.{side}"] = packing.pack(q.codes, bits)
            out[f"g{i}.{side}_scale"] = q.scale
            out[f"g{i}.{side}_offset"] = q.offset
        out[f"g{i}.s"] = g.s
    return out


def from_tensors(tensors: dict[str, torch.Tensor], widths: list[tuple[int, int]],
                 shape: tuple[int, int]) -> list[FactorGroup]:
    """Groups from stored tensors; ``widths`` holds each group's (U bits, V bits)."""
    m, n = shape
    out = []
    for i, (bu, bv) in enumerate(widths):
        rows = {}
        for side, length, b in (("u", m, bu), ("v", n, bv)):
            codes = packing.unpack(tensors[f"g{i}.{side}"], b, length)
            rows[side] = QuantRows(codes, tensors[f"g{i}.{side}_scale"], tensors[f"g{i}.{side}_offset"])
        out.append(FactorGroup(bu, rows["u"], rows["v"], tensors[f"g{i}.s"], bv))
    return out


def group_widths(info: dict) -> list[tuple[int, int]]:
    """(U bits, V bits) of each group of a package module's ``info``; ``v_bits`` is written only where it
    differs from ``bits``."""
    return [(g["bits"], g.get("v_bits", g["bits"])) for g in info["groups"]]
