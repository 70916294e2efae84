"""SVD of a delta matrix in float32, on the CPU or a GPU."""

from __future__ import annotations

import torch

from deltacomp.stages import timed


@timed("svd")
def svd(delta: torch.Tensor, rank: int | None = None, device: str = "cpu", method: str = "auto", niter: int = 4):
    """Top-``rank`` SVD ``delta (m, n) ~= U diag(S) V^T``: U (m, r), S (r,), V (n, r) in float32, left on ``device``
    (the caller moves what it stores). Singular values descending; ``rank`` None keeps min(m, n).

    ``method``: ``full`` (torch.linalg.svd), ``randomized`` (Halko et al.: a range finder with ``niter`` power
    iterations and oversampling, then an exact SVD of the small projection), or ``auto``: randomized on a GPU
    when ``rank`` is at most half of min(m, n), full otherwise.
    """
    d = delta.to(device=device, dtype=torch.float32)
    k = min(d.shape) if rank is None else min(rank, min(d.shape))
    if method == "auto":
        method = "randomized" if d.is_cuda and k <= min(d.shape) // 2 else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    return randomized_svd(d, k, niter)


def randomized_svd(d: torch.Tensor, k: int, niter: int = 4, oversample: int | None = None, qr: bool | None = None):
    """Top-k SVD of ``d (m, n)`` (Halko, Martinsson, Tropp 2011): an orthonormal basis Q (m, q) of the range of
    ``d G`` refined by ``niter`` power iterations, then the small SVD of ``B = Q^T d (q, n)`` from the
    float64 eigendecomposition of ``B B^T (q, q)``. Singular values descending. The bases are orthonormalized by
    :func:`orthonormal`: ``qr`` True takes Householder QR, False Cholesky QR, None (the default) Cholesky QR on a
    GPU with fast float64 arithmetic (:func:`fast_float64`), Householder QR elsewhere."""
    m, n = d.shape
    qr = not fast_float64(d.device) if qr is None else qr
    q = min(m, n, k + (oversample if oversample is not None else max(32, k // 4)))
    g = torch.Generator(device=d.device).manual_seed(0)
    basis = orthonormal(d @ torch.randn(n, q, device=d.device, generator=g), qr)  # (m, q)
    for _ in range(niter):
        basis = orthonormal(d.T @ basis, qr)  # (n, q)
        basis = orthonormal(d @ basis, qr)  # (m, q)
    b = basis.T @ d  # (q, n)
    evals, w = torch.linalg.eigh((b @ b.T).double())  # ascending
    evals, w = evals.flip(0)[:k], w.flip(1)[:, :k]
    s = evals.clamp(min=0).sqrt()
    u = basis @ w.float()  # (m, k)
    v = (b.T.double() @ w / torch.where(s > 0, s, torch.ones_like(s))).float()  # (n, k)
    return u, s.float(), v


# compute capabilities of the GPUs whose float64 throughput is half their float32 rate (P100, V100, A100, H100/H200,
# B100/B200); the others run float64 at 1/32 to 1/64 of it
FAST_FLOAT64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def fast_float64(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with fast float64 arithmetic (:data:`FAST_FLOAT64`)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in FAST_FLOAT64


def orthonormal(y: torch.Tensor, qr: bool = False) -> torch.Tensor:
    """An orthonormal basis (k, q) of the columns of ``y (k, q)``, k >= q: Cholesky QR in float64, twice
    (``Y L^-T`` with ``Y^T Y = L L^T``: two products and a small factorization, where Householder QR runs a long
    sequence of small steps; stable while the condition number of ``y`` stays far below 1e8), or Householder QR
    (``qr``, or where the columns are nearly dependent)."""
    if not qr:
        basis = y.double()
        for _ in range(2):  # the second pass restores the orthogonality the first loses to rounding
            chol, info = torch.linalg.cholesky_ex(basis.T @ basis)
            diag = chol.diagonal()
            if int(info) != 0 or not bool(diag.min() > 1e-6 * diag.max()):  # (nearly) dependent: not stable
                break
            basis = torch.linalg.solve_triangular(chol, basis.T, upper=False).T
        else:
            return basis.to(y.dtype)
    return torch.linalg.qr(y).Q


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the squared Frobenius norm."""
    e = torch.cumsum(s.double() ** 2, 0)
    if e[-1] == 0:
        return 0
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=torch.float64)).item()) + 1
