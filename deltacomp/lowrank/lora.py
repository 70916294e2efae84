"""LoRA factor maths: balance a factorization and cut it to a lower rank. Tensors in, tensors out."""

from __future__ import annotations

import torch


def balance(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u (m, r), s (r,), v (n, r)`` -> ``B (m, r), A (r, n)`` with ``B @ A = u diag(s) v^T``.

    sqrt(|s|) goes to each side (equal magnitudes keep fp16/bf16 storage accurate), the sign of s to B.
    """
    root = s.abs().sqrt()
    return u * (root * torch.sign(s)), (v * root).T


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``b (m, r) @ a (r, n)``, as balanced factors.

    Works on the r x r core (QR of both factors, then an SVD of ``R_b R_a^T``), so it costs O((m + n) r^2),
    never an m x n matrix. Returns ``B (m, k), A (k, n)`` with k = min(rank, r) and the fraction of the
    product's squared Frobenius norm that the cut keeps.
    """
    b, a = b.float(), a.float()
    qb, rb = torch.linalg.qr(b)  # (m, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (n, r), (r, r)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)  # the core: b @ a = qb (rb ra^T) qa^T
    total = float((s.double() ** 2).sum())
    k = min(rank, s.shape[0])
    kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    nb, na = balance(qb @ uc[:, :k], s[:k], qa @ vch[:k].T)
    return nb, na, kept
