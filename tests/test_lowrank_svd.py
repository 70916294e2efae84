"""SVD recovers a delta of known rank; energy rank selection."""

import torch

from deltacomp.lowrank.svd import energy_rank, fast_float64, orthonormal, randomized_svd, svd


def test_recovers_a_known_rank_exactly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(120, 5, generator=g) @ torch.randn(5, 80, generator=g)
    u, s, v = svd(delta, rank=5)
    assert u.shape == (120, 5) and s.shape == (5,) and v.shape == (80, 5)
    assert float((u * s @ v.T - delta).norm() / delta.norm()) < 1e-5
    full = svd(delta)[1]
    assert float(full[5:].max()) < 1e-4 * float(full[0])
    assert bool((s[:-1] >= s[1:]).all())


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 0.5) == 1  # 9/14
    assert energy_rank(s, 0.9) == 2  # 13/14
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_cholesky_and_householder_bases_agree_and_dependent_columns_fall_back(monkeypatch):
    """The Cholesky QR basis is orthonormal and spans the columns; columns that are dependent (a LoRA-like delta's
    range at a larger width) take Householder QR instead; both SVDs match the exact one."""
    householder, calls = torch.linalg.qr, []
    monkeypatch.setattr(torch.linalg, "qr", lambda a: calls.append(a.shape) or householder(a))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 40, generator=g) * torch.logspace(0, -3, 40)  # condition number 1e3
    q = orthonormal(y)
    assert float((q.T @ q - torch.eye(40)).abs().max()) < 1e-5
    assert float((q @ (q.T @ y) - y).norm() / y.norm()) < 1e-5
    assert not calls  # Cholesky QR
    dependent = torch.randn(300, 4, generator=g) @ torch.randn(4, 40, generator=g)
    q = orthonormal(dependent)
    assert calls == [(300, 40)]  # Householder QR
    assert float((q.T @ q - torch.eye(40)).abs().max()) < 1e-5
    assert float((q @ (q.T @ dependent) - dependent).norm() / dependent.norm()) < 1e-5
    monkeypatch.undo()

    s = torch.arange(1, 121).float() ** -0.8
    delta = (torch.linalg.qr(torch.randn(200, 120, generator=g)).Q * s) @ torch.linalg.qr(
        torch.randn(160, 120, generator=g)).Q.T
    exact = torch.linalg.svdvals(delta)[:30]
    for qr in (False, True):
        u, sv, v = randomized_svd(delta, 30, qr=qr)
        assert float(((sv - exact).abs() / exact).max()) < 1e-3
        assert float((u.T @ u - torch.eye(30)).abs().max()) < 1e-4
    assert not fast_float64(delta.device)  # the CPU keeps Householder QR by default
    low = torch.randn(200, 6, generator=g) @ torch.randn(6, 160, generator=g)  # the basis' columns dependent
    u, sv, v = randomized_svd(low, 30, qr=False)
    assert float(((u * sv) @ v.T - low).norm() / low.norm()) < 1e-5
