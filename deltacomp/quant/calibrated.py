"""GPTQ on the SVD factors of a delta, calibrated by the layer's input second moment ``H = X^T X / N``.

As in Delta-CoMe (REFERENCE.md section 1), for ``delta (m, n) ~= U diag(S) V^T`` whose vectors are in bit groups:

1. V first: the "weight" is ``V^T (r, n)`` (a row per vector, at that vector's width), its inputs are the layer
   inputs X, so its Hessian is H (n, n). All bit groups go through one GPTQ sweep with the same H.
2. With ``refit``, U diag(S) is refitted to the delta *on the calibration inputs* given the quantized V:
   ``argmin_B ||(delta - B V_q^T) X^T||`` = ``delta H V_q (V_q^T H V_q)^-1`` (absorbs V's quantization error;
   the uncalibrated refit of :mod:`deltacomp.quant.factors` with H in place of the identity).
3. Then U: the "weight" is ``U (m, r)`` (a column per vector), its inputs are ``Y = X V_q diag(S)``, so its
   Hessian is ``diag(S) V_q^T H V_q diag(S)`` (r, r).
4. With ``refit``, S is refitted given both quantized factors: ``argmin_s ||(delta - U_q diag(s) V_q^T) X^T||``.

Everything runs in float32 on the device of the inputs; the result is :class:`deltacomp.quant.factors.FactorGroup`
objects, stored exactly like the round-to-nearest ones.
"""

from __future__ import annotations

import torch

from deltacomp.quant import gptq, rtn
from deltacomp.quant.budget import BitGroup
from deltacomp.quant.factors import FactorGroup, QuantRows, _store_s


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a + torch.eye(a.shape[0], device=a.device, dtype=a.dtype) * (1e-6 * float(a.diagonal().mean()) + 1e-30)
    return torch.linalg.solve(a, b)


def quantize_gptq(delta: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, groups: list[BitGroup],
                  h: torch.Tensor, group_size: int, act_order: bool = True, damp: float = 0.01,
                  refit: bool = True) -> list[FactorGroup]:
    """GPTQ of u (m, r), s (r,), v (n, r) in ``groups`` (consecutive vectors per width) with input moment h (n, n)."""
    dev = u.device
    delta, h = delta.to(dev, torch.float32), h.to(dev, torch.float32)
    bits = torch.cat([torch.full((g.rank,), g.bits, dtype=torch.long) for g in groups]).to(dev)  # (r,) U's
    v_bits = torch.cat([torch.full((g.rank,), g.v_bits, dtype=torch.long) for g in groups]).to(dev)  # (r,)
    v_codes, v_scale, v_offset = gptq.gptq_rows(v.T, h, v_bits, group_size, act_order, damp)  # (r, n)
    v_hat = rtn.dequantize(v_codes, v_scale, v_offset, group_size).T  # (n, r)
    hv = h @ v_hat  # (n, r)
    if refit:
        b = _solve(v_hat.T @ hv, (delta @ hv).T).T  # (m, r) = delta H V_q (V_q^T H V_q)^-1
        s = b.norm(dim=0)
        u = b / torch.where(s > 0, s, torch.ones_like(s))
    h_u = (v_hat.T @ hv) * s[:, None] * s[None, :]  # (r, r): Y^T Y / N with Y = X V_q diag(S)
    u_codes, u_scale, u_offset = gptq.gptq_columns(u, h_u, bits, group_size, act_order, damp)  # (r, m)
    if refit:
        u_hat = rtn.dequantize(u_codes, u_scale, u_offset, group_size).T  # (m, r)
        a = (u_hat.T @ u_hat) * (v_hat.T @ hv)  # (r, r): A_ij = (u_i . u_j) (v_i^T H v_j)
        rhs = ((u_hat.T @ delta) * hv.T).sum(1)  # b_i = u_i^T delta H v_i
        s = _solve(a, rhs)
    out, start = [], 0
    for g in groups:
        sl = slice(start, start + g.rank)
        start += g.rank
        out.append(FactorGroup(g.bits, QuantRows(u_codes[sl], u_scale[sl], u_offset[sl]),
                               QuantRows(v_codes[sl], v_scale[sl], v_offset[sl]), _store_s(s[sl]), g.v_bits))
    return out
