"""The pure-torch twin of the dequant-matmul op: the CPU path and the test oracle of the CUDA kernel.

It has the op's signature (bank layout 2, :mod:`deltacomp.kernels.bank`) and computes, per projection p,

    t   = x @ V_p^T                      (R, J_p)  into the rank space
    c   = t * s * w[:, delta]            (R, J_p)  scaled by S and by each row's gate weight of the row's delta
    out = y[:, p] + c @ U_p              (R, m_p)

in float32 (float64 for float64 inputs), dequantizing the factors it needs (the CUDA kernel never does; this
twin may).
"""

from __future__ import annotations

import torch

from deltacomp.kernels.bank import DELTA, GROUP_SIZE, U_BITS, U_PARAMS, U_WORDS, V_BITS, V_PARAMS, V_WORDS
from deltacomp.quant import packing, rtn


def dequantize_rows(words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor,
                    fields: tuple[int, int, int], length: int) -> torch.Tensor:
    """Rows of one factor from a bank: (J, 8) row table -> (J, length) float32."""
    out = torch.empty(rows.shape[0], length, dtype=torch.float32, device=words.device)
    bits_f, word_f, param_f = fields
    keys = rows[:, [bits_f, GROUP_SIZE]]
    for bits, gs in torch.unique(keys, dim=0).tolist():
        sel = ((keys[:, 0] == bits) & (keys[:, 1] == gs)).nonzero().squeeze(1)
        width = packing.packed_words(length, bits)
        groups = rtn.num_groups(length, gs)
        w_idx = rows[sel, word_f].long()[:, None] + torch.arange(width, device=words.device)
        p_idx = rows[sel, param_f].long()[:, None] + torch.arange(groups, device=words.device)
        codes = packing.unpack(words[w_idx], bits, length)
        out[sel] = rtn.dequantize(codes, scale[p_idx], offset[p_idx], gs)
    return out


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def projections(n: int, v_words, v_scale, v_offset, u_words, u_scale, u_offset, rows, projs) -> list[tuple]:
    """Per non-empty projection: (j0, j1, out_off, out_len, V_p (J_p, n), U_p (J_p, m_p)) dequantized, float32."""
    out = []
    for j0, j1, off, length in projs.tolist():
        if j1 == j0:
            continue
        r = rows[j0:j1]
        v = dequantize_rows(v_words, v_scale, v_offset, r, (V_BITS, V_WORDS, V_PARAMS), n)
        u = dequantize_rows(u_words, u_scale, u_offset, r, (U_BITS, U_WORDS, U_PARAMS), length)
        out.append((j0, j1, off, length, v, u))
    return out


def delta_linear_factors(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, parts: list[tuple], s: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
    """The op's arithmetic on factors dequantized beforehand (:func:`projections`), in plain torch operations."""
    acc = _acc(x)
    xf = x.to(acc)
    out = y.to(acc).clone()
    for j0, j1, off, length, v, u in parts:
        v, u = v.to(acc), u.to(acc)
        c = (xf @ v.T) * s[j0:j1].to(acc) * w[:, rows[j0:j1, DELTA].long()].to(acc)  # (R, J_p)
        out[:, off:off + length] = out[:, off:off + length] + c @ u
    return out.to(y.dtype)


def delta_linear_reference(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, v_words: torch.Tensor,
                           v_scale: torch.Tensor, v_offset: torch.Tensor, u_words: torch.Tensor,
                           u_scale: torch.Tensor, u_offset: torch.Tensor, s: torch.Tensor, rows: torch.Tensor,
                           projs: torch.Tensor, spans: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, n), y (R, M), w (R, k) -> y + the deltas' contribution, (R, M) in y's dtype.

    ``spans`` (where each delta's rows lie) only lets the CUDA kernel skip deltas; the twin reads each row's delta.
    """
    parts = projections(x.shape[1], v_words, v_scale, v_offset, u_words, u_scale, u_offset, rows, projs)
    return delta_linear_factors(x, y, w, parts, s, rows)


def delta_linear_base_reference(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                                w: torch.Tensor, *bank: torch.Tensor) -> torch.Tensor:
    """x @ cat(weights)^T (+ bias) + the deltas' contribution, (R, M) in x's dtype: the base product is kept in
    float32 (float64 for float64 inputs) and rounded once with the deltas, as the fused CUDA kernel does."""
    acc = _acc(x)
    y = torch.cat([x.to(acc) @ wt.to(acc).T for wt in weights], dim=1)
    if bias is not None:
        y = y + bias.to(acc)
    return delta_linear_reference(x, y, w, *bank).to(x.dtype)


def delta_linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bank: tuple[torch.Tensor, ...],
                          need_x: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the op's output with respect to x (R, n) and the gate weights w (R, k).

    With gc = grad_p @ U_p^T (R, J_p) and t = x V_p^T: dL/dw[:, d] = sum over d's rows of gc * t * s, and
    dL/dx = (gc * s * w[:, delta]) @ V_p summed over projections. Used for training gates (not a fast path).
    """
    v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs = bank[:9]
    acc = _acc(x)
    xf, g, w = x.to(acc), grad.to(acc), w.to(acc)
    grad_x = torch.zeros_like(xf) if need_x else None
    grad_w = torch.zeros_like(w) if need_w else None
    for j0, j1, off, length, v, u in projections(x.shape[1], v_words, v_scale, v_offset, u_words, u_scale,
                                                 u_offset, rows, projs):
        v, u = v.to(acc), u.to(acc)
        delta = rows[j0:j1, DELTA].long()
        gc = (g[:, off:off + length] @ u.T) * s[j0:j1].to(acc)  # (R, J_p)
        if need_w:
            grad_w.index_add_(1, delta, gc * (xf @ v.T))
        if need_x:
            grad_x += (gc * w[:, delta]) @ v
    return grad_x, grad_w
