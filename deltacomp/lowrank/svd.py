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


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the squared Frobenius norm."""
    e = torch.cumsum(s.double() ** 2, 0)
    if e[-1] == 0:
        return 0
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=torch.float64)).item()) + 1
