"""SVD recovers a delta of known rank; energy rank selection."""

import torch

from deltacomp.lowrank.svd import energy_rank, svd


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
