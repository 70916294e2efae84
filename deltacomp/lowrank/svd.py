"""SVD of a delta matrix in float32, on the CPU or a GPU."""

from __future__ import annotations

import torch


def svd(delta: torch.Tensor, rank: int | None = None, device: str = "cpu"):
    """``delta (m, n) ~= U diag(S) V^T``; returns U (m, r), S (r,), V (n, r) in float32 on the CPU.

    Singular values come in descending order. ``rank`` truncates (None keeps min(m, n)). The
    decomposition runs in float32 on ``device``.
    """
    d = delta.to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = s.shape[0] if rank is None else min(rank, s.shape[0])
    return u[:, :r].cpu(), s[:r].cpu(), vh[:r].T.cpu()


def decompose(delta: torch.Tensor, rank: int, device: str = "cpu", method: str = "auto", niter: int = 4):
    """Top-``rank`` SVD ``U (m, r), S (r,), V (n, r)`` in float32, left on ``device``.

    ``method``: ``full`` (torch.linalg.svd), ``randomized`` (Halko et al.: a range finder with ``niter`` power
    iterations and oversampling, then an exact SVD of the small projection), or ``auto``: randomized on a GPU
    when ``rank`` is at most half of min(m, n), full otherwise.
    """
    d = delta.to(device=device, dtype=torch.float32)
    k = min(rank, min(d.shape))
    if method == "auto":
        method = "randomized" if d.is_cuda and k <= min(d.shape) // 2 else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    q = min(min(d.shape), k + max(32, k // 4))
    u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
    return u[:, :k], s[:k], v[:, :k]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the squared Frobenius norm."""
    e = torch.cumsum(s.double() ** 2, 0)
    if e[-1] == 0:
        return 0
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=torch.float64)).item()) + 1
