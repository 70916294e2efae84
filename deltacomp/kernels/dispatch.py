"""The one dispatch point of the dequant-matmul op: shapes and gate weights in, ``deltacomp::delta_linear`` out."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from deltacomp import native
from deltacomp.errors import DeltacompError
from deltacomp.kernels.bank import FUSED_MAX_DELTAS, DeltaBank
from deltacomp.kernels.reference import delta_linear_factors


def gate_weights(rows: int, bank: DeltaBank, weights: torch.Tensor | None, index: torch.Tensor | None,
                 device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, k) weights: given (k,) or (..., k), one-hot from per-row delta ``index``, or all ones."""
    k = bank.num_deltas
    if weights is not None and index is not None:
        raise DeltacompError("give gate weights or delta indices, not both")
    if index is not None:
        index = index.reshape(-1).to(device=device, dtype=torch.long)
        if index.numel() != rows:
            raise DeltacompError(f"{index.numel()} delta indices for {rows} token rows")
        return torch.nn.functional.one_hot(index, k).to(dtype)
    if weights is None:
        return bank.unit_weights(rows, device, dtype)
    if weights.shape[-1] != k:
        raise DeltacompError(f"gate weights have {weights.shape[-1]} columns; the bank holds {k} deltas")
    w = weights.to(device=device, dtype=dtype)
    return w.expand(rows, k) if w.dim() == 1 else w.reshape(rows, k)


def delta_linear(x: torch.Tensor, bank: DeltaBank, y: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``y + sum_d w_d * dW_d x`` through the packed factors of ``bank``.

    x (..., n); y (..., M) the base output (zeros when None), M = sum of the bank's projection outputs;
    weights (k,) or (..., k): per-row gate weights over the bank's k deltas; index (...,): each row's delta
    (multi-tenant); neither: every delta at weight 1. Returns (..., M) in y's dtype (x's when y is None).
    """
    n, m = bank.in_features, sum(bank.out_features)
    if x.shape[-1] != n:
        raise DeltacompError(f"input has {x.shape[-1]} features; the delta bank expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n).contiguous()
    if y is None:
        y2 = torch.zeros(x2.shape[0], m, dtype=x.dtype, device=x.device)
    else:
        if y.shape[:-1] != lead or y.shape[-1] != m:
            raise DeltacompError(f"base output has shape {list(y.shape)}; expected {[*lead, m]}")
        y2 = y.reshape(-1, m).contiguous()
    wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float32 except for float64 checks
    w = gate_weights(x2.shape[0], bank, weights, index, x.device, wdtype).contiguous()
    # CPU, and training (gradients wanted): the twin's arithmetic on factors dequantized once and kept, which
    # autograd differentiates directly; the kernel serves inference.
    grads = torch.is_grad_enabled() and (x2.requires_grad or w.requires_grad or y2.requires_grad)
    if bank.cache_factors and (grads or not x.is_cuda):
        out = delta_linear_factors(x2.to(y2.dtype), y2, w, bank.dequantized(), bank.s, bank.rows)
    else:
        row_tile = 1 if index is not None else 0  # one row per tenant: each row tile reads only its own delta
        args = (x2.to(y2.dtype), y2, w, *bank.tensors(), row_tile)
        ext = _eager_extension(x2, grads)
        out = ext.delta_linear(*args) if ext is not None else torch.ops.deltacomp.delta_linear(*args)
    return out.reshape(*lead, m)


# When base_delta_linear computes the base product beside the delta's kernels. Measured on an H200 at Llama-2-7B
# shapes (BENCHMARKS.md): at one row (a decode step at batch 1) a step with one delta per merged group is 1.30x the
# base step fused (with U by block column), against 1.89x with the delta beside the base on a side stream, and banks
# of four deltas (gated per token, or one of them picked) are 6-15% faster fused than beside; from 2 rows on the fused
# form is slower (its base product is an fp32 dot product per output, not a tensor-core GEMM). Banks of more than four
# deltas (FUSED_MAX_DELTAS, defined beside the bank, which keeps U by block column only for the banks fused here) were
# not measured fused.
FUSED_MAX_ROWS = 1
FUSED_MAX_PROJECTIONS = 8  # base weights one fused call takes (the kernel's kMaxBaseProjs)


def base_delta_linear(x: torch.Tensor, bank: DeltaBank, base: Sequence[torch.Tensor], bias: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ cat(base)^T + bias + sum_d w_d * dW_d x``: the base layer and the deltas in one call.

    base[p] (out_p, n) is projection p's base weight (the bank's projections in order), bias (M,) or None. CUDA
    inference on at most :data:`FUSED_MAX_ROWS` rows of a bank of at most :data:`FUSED_MAX_DELTAS` deltas, with x's
    dtype everywhere, runs one fused launch sequence, where the base product runs beside the delta's kernels and is
    rounded once with the deltas; otherwise the base product is a plain matmul and the deltas go through
    :func:`delta_linear`.
    """
    if len(base) != len(bank.out_features) or any(
            tuple(t.shape) != (m, bank.in_features) for t, m in zip(base, bank.out_features)):
        got = [list(t.shape) for t in base]
        want = [[m, bank.in_features] for m in bank.out_features]
        raise DeltacompError(f"base weights {got} do not match the delta bank's projections {want}")
    n, m = bank.in_features, sum(bank.out_features)
    if x.shape[-1] != n:
        raise DeltacompError(f"input has {x.shape[-1]} features; the delta bank expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    grads = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in base)
                                         or (weights is not None and weights.requires_grad))
    same = all(t.dtype == x.dtype and t.is_contiguous() for t in [*base, *([] if bias is None else [bias])])
    fits = len(base) <= FUSED_MAX_PROJECTIONS and x2.shape[0] <= FUSED_MAX_ROWS and bank.num_deltas <= FUSED_MAX_DELTAS
    ext = _eager_extension(x2, grads) if same and fits else None
    if ext is None:
        bounds = [0, *itertools.accumulate(bank.out_features)]
        y = torch.cat([torch.nn.functional.linear(x, t, None if bias is None else bias[lo:hi])
                       for t, lo, hi in zip(base, bounds, bounds[1:])], dim=-1)
        return delta_linear(x, bank, y, weights=weights)
    w = gate_weights(x2.shape[0], bank, weights, None, x.device).contiguous()
    out = ext.delta_linear_base(x2.contiguous(), list(base), bias, w, *bank.base_op_args())
    return out.reshape(*lead, m)


def _eager_extension(x: torch.Tensor, grads: bool):
    """The compiled extension when the op can be called on it directly: CUDA inference outside ``torch.compile``.
    The custom op's Python layer costs tens of microseconds a call, which eager decoding pays at every layer;
    tracing, autograd and float64 go through ``deltacomp::delta_linear``."""
    if grads or not x.is_cuda or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return None
    return native.extension()
