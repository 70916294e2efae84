"""The typed per-matrix context that calibration and a model-scope allocation hand to the pipeline and the method.

:mod:`deltacomp.calib.provider` fills one :class:`MatrixContext` per compressed matrix; the pipeline
(:func:`deltacomp.compress.compress`) calls its hooks without knowing which calibration filled them, and a method
reads the fields it uses (the mixed method: ``hessian`` and ``plan``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScopePlan:
    """A matrix's share of a model-scope allocation: its factors from the first pass and each vector's widths."""

    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    v: torch.Tensor  # (n, r)
    widths: torch.Tensor  # (r, 2): (U bits, V bits) of each vector; 0 drops it
    budget: float  # bits those widths spend: the matrix's share of the model's budget (--sequential re-allocates it)
    rows: torch.Tensor | None = None  # (k,) a token table's kept rows (row-sparse: u is (k, r)); None: every row


@dataclass(frozen=True)
class MatrixContext:
    """What one matrix is compressed with, beyond its delta. Every field is optional.

    - ``hessian`` (n, n): the layer's input second moment; the method quantizes with GPTQ under it.
    - ``target(base, finetuned) -> delta (m, n)``: the delta to compress instead of ``finetuned - base``
      (sequential calibration: the one that best serves the compressed model's inputs).
    - ``compressed(base, delta_hat)``: called with the compressed delta (m, n) once the matrix is done (sequential
      calibration: the student stream takes it).
    - ``plan``: the model-scope allocation's factors and widths for this matrix.
    - ``row_weight`` (m,): how much each row's error counts (a token table's rows: how often each token is
      seen); the method chooses its singular vectors for ``diag(row_weight) @ delta``.
    """

    hessian: torch.Tensor | None = None
    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    compressed: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    plan: ScopePlan | None = None
    row_weight: torch.Tensor | None = None
