"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized so that the layer output error ``||(W - W_q) X^T||`` stays small.

``W (R, C)`` acts on inputs with second moment ``H = X^T X / N (C, C)``. Quantization parameters are fixed
before the sweep ("static groups"), so act-order (columns visited by decreasing ``diag(H)``) never splits a
quantization group, and the codes keep :mod:`deltacomp.quant.rtn`'s format: ``w ~= code * scale + offset``.

Two layouts of the parameters, both as in the delta package (one row of codes per singular vector):

* :func:`gptq_rows`: each row of W is a vector with its own bit width; groups run along the row (V^T).
* :func:`gptq_columns`: each column of W is a vector with its own bit width; groups run down the column (U).
"""

from __future__ import annotations

import torch

from deltacomp.quant import rtn

BLOCK = 128


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (GPTQ's form)."""
    c = h.shape[0]
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()) + 1e-12)
    eye = torch.eye(c, device=h.device, dtype=h.dtype)
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h += eye * (float(h.diagonal().mean()) * 10.0 ** (attempt - 3))  # not positive definite: damp more
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True)


def gptq_core(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, maxq: torch.Tensor,
              act_order: bool = True, damp: float = 0.01, block: int = BLOCK) -> torch.Tensor:
    """Codes (R, C) of ``w (R, C)`` under per-entry parameters ``scale, offset (R, C)``, ``maxq`` broadcastable.

    Runs in float32 on ``w``'s device; returns the codes as float32 (exact small integers).
    """
    w = w.float().clone()
    h = h.float().to(w.device)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    maxq = maxq.float().expand_as(w)
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        scale, offset, maxq = scale[:, perm], offset[:, perm], maxq[:, perm]
    hinv = _inverse_cholesky(h, damp)
    codes = torch.zeros_like(w)
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        s1, o1, m1 = scale[:, i1:i2], offset[:, i1:i2], maxq[:, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round((col - o1[:, i]) / s1[:, i]), min=0).minimum(m1[:, i])
            codes[:, i1 + i] = q
            e = (col - (q * s1[:, i] + o1[:, i])) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _params(x: torch.Tensor, bits: torch.Tensor, group_size: int):
    """Per-row scale/offset (R, G) in fp16 (the stored precision) for rows with their own bit widths."""
    rows = x.shape[0]
    g = rtn.num_groups(x.shape[1], group_size)
    scale = torch.empty(rows, g, dtype=torch.float16, device=x.device)
    offset = torch.empty_like(scale)
    for b in bits.unique().tolist():
        idx = (bits == b).nonzero().squeeze(1)
        s, o = rtn.fit(x[idx], int(b), group_size)
        scale[idx], offset[idx] = s.to(torch.float16), o.to(torch.float16)
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scale.float() > 0, scale, torch.full_like(scale, tiny)), offset


def gptq_rows(w: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, group_size: int, act_order: bool = True,
              damp: float = 0.01):
    """GPTQ of ``w (R, C)`` whose row r is a vector at ``bits[r]``; groups of ``group_size`` along each row.

    Returns (codes uint8 (R, C), scale fp16 (R, G), offset fp16 (R, G)), as :func:`rtn.quantize_rows`.
    """
    bits = bits.to(w.device)
    scale, offset = _params(w.float(), bits, group_size)
    cols = w.shape[1]
    s_full = rtn.expand(scale.float(), cols, group_size)
    o_full = rtn.expand(offset.float(), cols, group_size)
    maxq = ((1 << bits) - 1).float()[:, None]
    codes = gptq_core(w, h, s_full, o_full, maxq, act_order, damp)
    return codes.to(torch.uint8), scale, offset


def gptq_columns(w: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, group_size: int, act_order: bool = True,
                 damp: float = 0.01):
    """GPTQ of ``w (R, C)`` whose column c is a vector at ``bits[c]``; groups of ``group_size`` down each column.

    Returns the codes and parameters of the vectors as rows: (codes uint8 (C, R), scale (C, G), offset (C, G)).
    """
    bits = bits.to(w.device)
    scale, offset = _params(w.float().T, bits, group_size)  # (C, G)
    rows = w.shape[0]
    s_full = rtn.expand(scale.float(), rows, group_size).T  # (R, C)
    o_full = rtn.expand(offset.float(), rows, group_size).T
    maxq = ((1 << bits) - 1).float()[None, :]
    codes = gptq_core(w, h, s_full, o_full, maxq, act_order, damp)
    return codes.T.to(torch.uint8).contiguous(), scale, offset
