"""Budget-optimal bit allocation: never over the budget, better than the fixed 8/3/2 schedule on the actual
reconstruction error of a decaying spectrum, weighted by activations, and shared across matrices."""

import pytest
import torch

from deltacomp.errors import BudgetError
from deltacomp.quant import allocate, factors
from deltacomp.quant.budget import BitGroup, budget_bits, fill_schedule, vector_cost

BITS = (2, 3, 4, 8)


def _delta(m, n, power=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.arange(1, r + 1).float() ** -power
    return (torch.randn(m, r, generator=g) / m**0.5 * s) @ (torch.randn(n, r, generator=g) / n**0.5).T


def _spent(bits, m, n):
    return sum(vector_cost(int(b), m, n) for b in bits if b > 0)


def _reconstruct(delta, u, s, v, bits, group_size=0):
    order, runs = allocate.group_by_bits(bits)
    groups = [BitGroup(b, k) for b, k in runs]
    fg = factors.quantize_rtn(delta, u[:, order], s[order], v[:, order], groups, group_size, refit=True)
    return factors.reconstruct(fg, group_size)


@pytest.mark.parametrize("bits_per_entry", [0.25, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(256, 256), (384, 128), (100, 300)])
def test_never_exceeds_the_budget(bits_per_entry, shape):
    m, n = shape
    delta = _delta(m, n)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.T
    budget = budget_bits(m, n, bits_per_entry)
    k = allocate.max_rank(m, n, bits_per_entry, BITS)
    bits = allocate.matrix_bits(u[:, :k], s[:k], v[:, :k], BITS, 0, budget)
    assert _spent(bits, m, n) <= budget
    assert bits[0] > 0  # the largest singular vector is always kept
    assert set(bits.unique().tolist()) <= {0, *BITS}


@pytest.mark.parametrize("bits_per_entry", [0.5, 1.0])
def test_optimal_beats_the_fixed_schedule_on_the_actual_error(bits_per_entry):
    m, n = 384, 384
    delta = _delta(m, n, power=0.8)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.T
    budget = budget_bits(m, n, bits_per_entry)
    sched = fill_schedule(m, n, bits_per_entry)
    sched_bits = torch.cat([torch.full((g.rank,), g.bits) for g in sched])
    r = len(sched_bits)
    err_sched = float((delta - _reconstruct(delta, u[:, :r], s[:r], v[:, :r], sched_bits)).norm() / delta.norm())
    k = allocate.max_rank(m, n, bits_per_entry, BITS)
    opt_bits = allocate.matrix_bits(u[:, :k], s[:k], v[:, :k], BITS, 0, budget)
    err_opt = float((delta - _reconstruct(delta, u[:, :k], s[:k], v[:, :k], opt_bits)).norm() / delta.norm())
    assert _spent(opt_bits, m, n) <= budget and _spent(sched_bits, m, n) <= budget
    assert err_opt < err_sched, (err_opt, err_sched)


def test_activation_weights_move_bits_to_excited_directions():
    """With a Hessian that silences the inputs along the top right-singular vectors, those vectors lose bits."""
    m, n = 128, 128
    delta = _delta(m, n, power=0.3)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.T
    h = torch.eye(n) - 0.999 * v[:, :8] @ v[:, :8].T  # inputs barely excite v_0..v_7
    budget = budget_bits(m, n, 1.0)
    plain = allocate.matrix_bits(u, s, v, BITS, 0, budget)
    weighted = allocate.matrix_bits(u, s, v, BITS, 0, budget, h)
    assert int(weighted[1:8].sum()) < int(plain[1:8].sum())
    assert _spent(weighted, m, n) <= budget


def test_model_scope_shares_one_budget_and_keeps_every_matrix():
    shapes = [(128, 128), (256, 64), (64, 64)]
    tables, costs, total = [], [], 0
    for i, (m, n) in enumerate(shapes):
        delta = _delta(m, n, seed=i) * (10.0 if i == 0 else 0.1)  # matrix 0 matters far more
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        tables.append(allocate.vector_errors(u, s, vh.T, BITS, 0))
        costs.append(allocate.option_costs(m, n, BITS))
        total += m * n
    options = allocate.allocate(tables, costs, 1.0 * total)
    spent = sum(float(c[o].sum()) for c, o in zip(costs, options))
    assert spent <= 1.0 * total
    assert all(int(o[0]) > 0 for o in options)
    own = [float(costs[j][options[j]].sum()) / (m * n) for j, (m, n) in enumerate(shapes)]
    assert own[0] > 1.0 > own[2]  # the budget moved to the matrix with the large delta


def test_too_small_a_budget_is_a_clear_error():
    table = torch.ones(4, 5)
    with pytest.raises(BudgetError, match="cannot keep one vector of each of 2 matrices"):
        allocate.allocate([table, table], [allocate.option_costs(64, 64, BITS)] * 2, 10.0)


def test_group_by_bits_orders_widest_first_and_drops_zeros():
    order, runs = allocate.group_by_bits(torch.tensor([3, 8, 0, 2, 3, 8, 0]))
    assert order.tolist() == [1, 5, 0, 4, 3]
    assert runs == [(8, 2), (3, 2), (2, 1)]
