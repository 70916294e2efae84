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
# On a GPU, each block step runs as one kernel of the CUDA extension where it is built (cuda/gptq_block.cu), else
# the column loop of full blocks is replayed as a CUDA graph (_GraphStep), else it runs eagerly.
USE_KERNEL = True
USE_CUDA_GRAPHS = True
KERNEL_COLUMNS = 128  # the widest block the kernel steps through (kGptqBlock in cuda/gptq_block.h)


def _block_kernel(w: torch.Tensor):
    """The CUDA extension's block step (``gptq_block``) for ``w``, or None off a GPU or where the extension is not
    built or does not load (then the graph or eager path runs; the extension's error, if any, is raised by the
    dequant-matmul's first call)."""
    if not (USE_KERNEL and w.is_cuda):
        return None
    from deltacomp import native

    st = native.status()
    return st.module.gptq_block if st.module is not None and not st.error else None


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
    cols = w.shape[1]
    kernel = _block_kernel(w) if block <= KERNEL_COLUMNS else None
    if kernel is not None:  # it reads whole row-major (R, C) operands
        w, hinv, scale, offset, maxq = (t.float().contiguous() for t in (w, hinv, scale, offset, maxq))
    codes = torch.zeros_like(w)
    use_graph = kernel is None and USE_CUDA_GRAPHS and w.is_cuda and cols >= 2 * block
    graph = _GraphStep(w.shape[0], block, w.device) if use_graph else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if kernel is not None:
            err1 = kernel(w, hinv, scale, offset, maxq, codes, i1, i2 - i1)  # writes codes[:, i1:i2]
        else:
            args = (w[:, i1:i2], hinv[i1:i2, i1:i2], scale[:, i1:i2], offset[:, i1:i2], maxq[:, i1:i2])
            if graph is not None and i2 - i1 == block:
                q1, err1 = graph(*args)
            else:
                q1, err1 = _block_step(*(a.clone() for a in args))
            codes[:, i1:i2] = q1
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _block_step(w1, hinv1, s1, o1, m1, codes=None, err1=None):
    """Quantize the columns of one block in order, updating the rest of the block (in place on ``w1``)."""
    codes = torch.empty_like(w1) if codes is None else codes
    err1 = torch.empty_like(w1) if err1 is None else err1
    for i in range(w1.shape[1]):
        col = w1[:, i]
        q = torch.minimum(torch.round((col - o1[:, i]) / s1[:, i]).clamp_(min=0), m1[:, i])
        codes[:, i] = q
        e = (col - (q * s1[:, i] + o1[:, i])) / hinv1[i, i]
        w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
        err1[:, i] = e
    return codes, err1


class _GraphStep:
    """:func:`_block_step` for full blocks of one matrix captured once in a CUDA graph and replayed: the
    column loop launches ~10 tiny kernels per column, so on a GPU its Python and launch overhead, not the
    arithmetic, sets the speed (measured: ~6x faster replayed on an H100)."""

    def __init__(self, rows: int, block: int, device):
        self.bufs = [torch.zeros(rows, block, device=device), torch.zeros(block, block, device=device)] + [
            torch.ones(rows, block, device=device) for _ in range(3)]
        self.out = [torch.zeros(rows, block, device=device) for _ in range(2)]
        self.graph = None

    def __call__(self, *args):
        for buf, a in zip(self.bufs, args):
            buf.copy_(a)
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, on a copy
                _block_step(*(b.clone() for b in self.bufs), *(o.clone() for o in self.out))
            torch.cuda.current_stream().wait_stream(side)
            for buf, a in zip(self.bufs, args):
                buf.copy_(a)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                _block_step(*self.bufs, *self.out)
            for buf, a in zip(self.bufs, args):  # capture does not execute: restore the inputs and replay
                buf.copy_(a)
        self.graph.replay()
        return self.out[0], self.out[1]


def _params(x: torch.Tensor, bits: torch.Tensor, group_size: int, clip: bool):
    """Per-row scale/offset (R, G) in fp16 (the stored precision) for rows with their own bit widths; ``clip`` as
    in :func:`deltacomp.quant.rtn.fit` (the MSE-best clipped range, else min-max)."""
    rows = x.shape[0]
    g = rtn.num_groups(x.shape[1], group_size)
    scale = torch.empty(rows, g, dtype=torch.float16, device=x.device)
    offset = torch.empty_like(scale)
    for b in bits.unique().tolist():
        idx = (bits == b).nonzero().squeeze(1)
        scale[idx], offset[idx] = rtn.stored_params(*rtn.fit(x[idx], int(b), group_size, clip))
    return scale, offset


def gptq_rows(w: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, group_size: int, act_order: bool = True,
              damp: float = 0.01, clip: bool = False):
    """GPTQ of ``w (R, C)`` whose row r is a vector at ``bits[r]``; groups of ``group_size`` along each row, whose
    levels span the group's min-max range (``clip``: the MSE-best clipped range).

    Returns (codes uint8 (R, C), scale fp16 (R, G), offset fp16 (R, G)), as :func:`rtn.quantize_rows`.
    """
    bits = bits.to(w.device)
    scale, offset = _params(w.float(), bits, group_size, clip)
    cols = w.shape[1]
    s_full = rtn.expand(scale.float(), cols, group_size)
    o_full = rtn.expand(offset.float(), cols, group_size)
    maxq = ((1 << bits) - 1).float()[:, None]
    codes = gptq_core(w, h, s_full, o_full, maxq, act_order, damp)
    return codes.to(torch.uint8), scale, offset


def gptq_columns(w: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, group_size: int, act_order: bool = True,
                 damp: float = 0.01, clip: bool = False):
    """GPTQ of ``w (R, C)`` whose column c is a vector at ``bits[c]``; groups of ``group_size`` down each column
    (levels as in :func:`gptq_rows`).

    Returns the codes and parameters of the vectors as rows: (codes uint8 (C, R), scale (C, G), offset (C, G)).
    """
    bits = bits.to(w.device)
    scale, offset = _params(w.float().T, bits, group_size, clip)  # (C, G)
    rows = w.shape[0]
    s_full = rtn.expand(scale.float(), rows, group_size).T  # (R, C)
    o_full = rtn.expand(offset.float(), rows, group_size).T
    maxq = ((1 << bits) - 1).float()[None, :]
    codes = gptq_core(w, h, s_full, o_full, maxq, act_order, damp)
    return codes.T.to(torch.uint8).contiguous(), scale, offset
