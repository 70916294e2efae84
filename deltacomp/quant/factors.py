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

from deltacomp.quant import gptq, packing, rtn
from deltacomp.quant.budget import BitGroup
from deltacomp.stages import stage, timed


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


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a + torch.eye(a.shape[0], device=a.device, dtype=a.dtype) * (1e-6 * float(a.diagonal().mean()) + 1e-30)
    return torch.linalg.solve(a, b)


def unit_columns(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b (m, r)`` as unit columns (a zero column stays zero) and their norms (r,)."""
    s = b.norm(dim=0)
    return b / torch.where(s > 0, s, torch.ones_like(s)), s


def _widths(groups: list[BitGroup], side: str, device) -> torch.Tensor:
    return torch.cat([torch.full((g.rank,), g.bits if side == "u" else g.v_bits, dtype=torch.long)
                      for g in groups]).to(device)  # (r,)


def quantize(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, groups: list[BitGroup],
             group_size: int, refit: bool = True, h: torch.Tensor | None = None, act_order: bool = True,
             damp: float = 0.01, clip: bool = True, v_rows: tuple | None = None) -> list[FactorGroup]:
    """Quantize truncated SVD factors u (m, r), s (r,), v (n, r) in ``groups`` (consecutive vectors per width).

    Without ``h``: round-to-nearest. With ``h`` (n, n), the layer's input second moment ``X^T X / N``: GPTQ, as
    in Delta-CoMe, where every least-squares fit below is measured on the calibration inputs (``H = I`` is the
    plain case):

    1. V first: the rows of ``V^T (r, n)``, each at its vector's width (GPTQ: Hessian H).
    2. With ``refit``, U diag(S) is refitted to the delta given the quantized V:
       ``argmin_B ||(delta - B V_q^T) X^T||`` = ``delta H V_q (V_q^T H V_q)^-1`` (it absorbs V's rounding error).
    3. Then U (GPTQ: the "weight" is ``U (m, r)``, its inputs ``Y = X V_q diag(S)``, so its Hessian is
       ``diag(S) V_q^T H V_q diag(S)`` (r, r)).
    4. With ``refit``, S is refitted given both quantized factors: ``argmin_s ||(delta - U_q diag(s) V_q^T) X^T||``.

    Each refit can only lower the (weighted) error before the following rounding. ``clip`` takes the MSE-best
    clipped range of each vector (:func:`deltacomp.quant.rtn.fit`), else its min-max range, under round-to-nearest
    and GPTQ alike.
    ``v_rows``: ``(tables, index)``, rows of V^T that the bit allocation already quantized as step 1 would: a table
    (codes, scale, offset) per width, whose row ``index[i]`` is vector i's. Vectors at a width with a table take
    their rows from it; the others are quantized here. Everything runs in float32 on the device of ``u``.
    """
    with stage("rtn" if h is None else "gptq"):
        return _quantize(delta, u, s, v, groups, group_size, refit, h, act_order, damp, clip, v_rows)


def _rows_at(x: torch.Tensor, widths: torch.Tensor, group_size: int, h: torch.Tensor | None, act_order: bool,
             damp: float, clip: bool) -> tuple:
    """The rows of ``x (R, L)``, row i at ``widths[i]``: GPTQ under ``h``, else round-to-nearest."""
    if h is not None:
        return gptq.gptq_rows(x, h, widths, group_size, act_order, damp, clip)
    return _place([(at, rtn.quantize_rows(x[at], b, group_size, clip=clip)) for b, at in _by_width(widths)],
                  len(widths), x.device)


def _by_width(widths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Each width of ``widths (r,)`` with the positions that hold it."""
    return [(b, (widths == b).nonzero().squeeze(1)) for b in widths.unique().tolist()]


def _place(parts: list[tuple[torch.Tensor, tuple]], count: int, device) -> tuple:
    """``count`` rows (codes, scale, offset) on ``device`` assembled from ``parts``: (positions, the rows at them)."""
    out = tuple(torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=device) for t in parts[0][1])
    for at, rows in parts:
        for o, t in zip(out, rows):
            o[at.to(device)] = t.to(device)
    return out


def _v_rows(vt: torch.Tensor, widths: torch.Tensor, group_size: int, h: torch.Tensor | None, act_order: bool,
            damp: float, clip: bool, known: tuple | None) -> tuple:
    """Step 1: the rows of ``vt = V^T (r, n)``, each at its vector's width; from ``known`` (:func:`quantize`'s
    ``v_rows``) where it holds that width, the rest quantized in one call."""
    if known is None:
        return _rows_at(vt, widths, group_size, h, act_order, damp, clip)
    tables, index = known
    index = index.to(vt.device)
    parts, missing = [], []
    for b, at in _by_width(widths):
        if b in tables:
            parts.append((at, tuple(t[index[at].to(t.device)] for t in tables[b])))
        else:  # a width the allocation did not quantize as the factors do (GPTQ at 8 bits)
            missing.append(at)
    if missing:
        at = torch.cat(missing)
        parts.append((at, _rows_at(vt[at], widths[at], group_size, h, act_order, damp, clip)))
    return _place(parts, len(widths), vt.device)


def _quantize(delta, u, s, v, groups, group_size, refit, h, act_order, damp, clip, v_rows) -> list[FactorGroup]:
    dev = u.device
    delta = delta.to(dev, torch.float32)
    h = h.to(dev, torch.float32) if h is not None else None
    v_q = _v_rows(v.T, _widths(groups, "v", dev), group_size, h, act_order, damp, clip, v_rows)  # (r, n) codes, ...
    v_hat = rtn.dequantize(*v_q, group_size).T  # (n, r)
    hv = v_hat if h is None else h @ v_hat  # (n, r)
    if refit:
        u, s = unit_columns(_solve(v_hat.T @ hv, hv.T @ delta.T).T)  # (m, r) = delta H V_q (V_q^T H V_q)^-1
    if h is None:
        u_q = _rows_at(u.T, _widths(groups, "u", dev), group_size, None, act_order, damp, clip)  # (r, m)
    else:
        h_u = (v_hat.T @ hv) * s[:, None] * s[None, :]  # (r, r): Y^T Y / N with Y = X V_q diag(S)
        u_q = gptq.gptq_columns(u, h_u, _widths(groups, "u", dev), group_size, act_order, damp, clip)
    if refit:
        u_hat = rtn.dequantize(*u_q, group_size).T  # (m, r)
        a = (u_hat.T @ u_hat) * (v_hat.T @ hv)  # (r, r): A_ij = (u_i . u_j) (v_i^T H v_j)
        rhs = ((u_hat.T @ delta) * hv.T).sum(1)  # b_i = u_i^T delta H v_i
        s = _solve(a, rhs)
    out, start = [], 0
    for g in groups:
        sl = slice(start, start + g.rank)
        start += g.rank
        out.append(FactorGroup(g.bits, QuantRows(*(t[sl] for t in u_q)), QuantRows(*(t[sl] for t in v_q)),
                               _store_s(s[sl]), g.v_bits))
    return out


def quantize_rtn(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, groups: list[BitGroup],
                 group_size: int, refit: bool = True) -> list[FactorGroup]:
    """Round-to-nearest quantization of the factors: :func:`quantize` without calibration."""
    return quantize(delta, u, s, v, groups, group_size, refit)


def quantize_gptq(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, groups: list[BitGroup],
                  h: torch.Tensor, group_size: int, act_order: bool = True, damp: float = 0.01,
                  refit: bool = True) -> list[FactorGroup]:
    """GPTQ of the factors with input moment ``h (n, n)``: :func:`quantize` calibrated."""
    return quantize(delta, u, s, v, groups, group_size, refit, h, act_order, damp)


def reconstruct(groups: list[FactorGroup], group_size: int) -> torch.Tensor:
    """sum_g U_g diag(S_g) V_g^T as float32 (m, n)."""
    total = None
    for g in groups:
        u = g.u.dequantize(group_size)  # (r, m)
        v = g.v.dequantize(group_size)  # (r, n)
        part = (u.T * g.s.float()) @ v
        total = part if total is None else total + part
    return total


@timed("pack")
def to_tensors(groups: list[FactorGroup]) -> dict[str, torch.Tensor]:
    out = {}
    for i, g in enumerate(groups):
        for side, q, bits in (("u", g.u, g.bits), ("v", g.v, g.v_bits)):
            out[f"g{i}.{side}"] = packing.pack(q.codes, bits)
            out[f"g{i}.{side}_scale"] = q.scale
            out[f"g{i}.{side}_offset"] = q.offset
        out[f"g{i}.s"] = g.s
    return out
