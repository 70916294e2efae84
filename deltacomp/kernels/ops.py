"""The ``deltacomp::delta_linear`` and ``deltacomp::delta_linear_base`` custom ops: schemas, fake (meta) kernels,
CPU and CUDA kernels, and autograd for the first.

Registered through ``torch.library`` so that it traces under ``torch.compile`` and replays in CUDA graphs.
CPU tensors (and CUDA tensors when the extension is not built) run the pure-torch twin; CUDA tensors run the
compiled kernel (:mod:`deltacomp.native`), which reads the packed words and never dequantizes into memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltacomp import native
from deltacomp.kernels.reference import delta_linear_backward, delta_linear_base_reference, delta_linear_reference


@torch.library.custom_op("deltacomp::delta_linear", mutates_args=())
def delta_linear_op(x: Tensor, y: Tensor, w: Tensor, v_words: Tensor, v_scale: Tensor, v_offset: Tensor,
                    u_words: Tensor, u_scale: Tensor, u_offset: Tensor, s: Tensor, rows: Tensor,
                    projs: Tensor, spans: Tensor, row_tile: int = 0) -> Tensor:
    """y + sum_j ((x @ V_q^T) * S * w[:, delta])_j U_q[j]: x (R, n), y (R, M), w (R, k); bank layout 2.

    row_tile caps how many token rows the CUDA kernel tiles together (0: by the row count); it changes the work
    split, never the result. A multi-tenant batch passes 1, so that each row reads only its own delta.
    """
    return delta_linear_reference(x, y, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs,
                                  spans)


@delta_linear_op.register_kernel("cuda")
def _cuda(x, y, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans, row_tile=0):
    args = (x, y, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans)
    if x.dtype == torch.float64:  # the kernel computes in fp32; float64 (gradient checks) runs the twin
        return delta_linear_reference(*args)
    ext = native.extension()
    return delta_linear_reference(*args) if ext is None else ext.delta_linear(*args, row_tile)


@delta_linear_op.register_fake
def _fake(x, y, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset, s, rows, projs, spans, row_tile=0):
    torch._check(x.dim() == 2 and y.dim() == 2 and w.dim() == 2, lambda: "x, y and w must be 2-D")
    torch._check(x.shape[0] == y.shape[0] and w.shape[0] == x.shape[0],
                 lambda: f"x, y and w must have the same rows, got {x.shape[0]}, {y.shape[0]}, {w.shape[0]}")
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, _, w, *bank, _row_tile = inputs
    ctx.save_for_backward(x, w, *bank)


def _backward(ctx, grad):
    x, w, *bank = ctx.saved_tensors
    need_x, need_y, need_w = ctx.needs_input_grad[:3]
    grad_x, grad_w = delta_linear_backward(grad, x, w, tuple(bank), need_x, need_w)
    return (grad_x.to(x.dtype) if need_x else None, grad if need_y else None,
            grad_w.to(w.dtype) if need_w else None, *([None] * 11))


delta_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("deltacomp::delta_linear_base", mutates_args=())
def delta_linear_base_op(x: Tensor, weights: list[Tensor], bias: Tensor | None, w: Tensor, v_words: Tensor,
                         v_scale: Tensor, v_offset: Tensor, u_words: Tensor, u_scale: Tensor, u_offset: Tensor,
                         s: Tensor, rows: Tensor, projs: Tensor, spans: Tensor, u_cols: Tensor | None = None,
                         u_desc: Tensor | None = None, u_pair: Tensor | None = None, u_colinfo: Tensor | None = None,
                         col_len: int = 0) -> Tensor:
    """x @ cat(weights)^T (+ bias) + the bank's contribution: weights[p] (out_len_p, n) is projection p's base
    weight, bias (M,). The CUDA kernels compute the base product beside the delta's stages and round once; the
    optional U by block column (:meth:`DeltaBank.columns`, ``DeltaBank.col_len``) changes how the one-row kernel
    reads U, never the result. Inference only (no autograd): gate training goes through ``deltacomp::delta_linear``."""
    return delta_linear_base_reference(x, weights, bias, w, v_words, v_scale, v_offset, u_words, u_scale, u_offset,
                                       s, rows, projs, spans)


@delta_linear_base_op.register_kernel("cuda")
def _cuda_base(x, weights, bias, w, *bank_and_columns):
    bank = bank_and_columns[:10]
    ext = native.extension() if x.dtype != torch.float64 else None
    if ext is None:
        return delta_linear_base_reference(x, weights, bias, w, *bank)
    return ext.delta_linear_base(x, weights, bias, w, *bank_and_columns)


@delta_linear_base_op.register_fake
def _fake_base(x, weights, bias, w, *bank_and_columns):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "x and w must be 2-D")
    return x.new_empty(x.shape[0], sum(t.shape[0] for t in weights))
