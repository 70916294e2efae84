"""The shared budget: the Delta-CoMe schedule on a 4096 x 4096 matrix, never over budget, clear refusals."""

import pytest

from deltacomp.errors import BudgetError
from deltacomp.quant import budget


def test_published_schedule_on_a_7b_matrix():
    groups = budget.fill_schedule(4096, 4096, 1.0)
    assert [(g.bits, g.rank) for g in groups] == [(8, 2), (3, 32), (2, 968)]


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (384, 1536), (64, 160), (100, 37)])
@pytest.mark.parametrize("bits", [0.25, 0.5, 1.0, 2.0])
def test_schedule_never_exceeds_the_budget(shape, bits):
    m, n = shape
    try:
        groups = budget.fill_schedule(m, n, bits)
    except BudgetError:
        assert budget.vector_cost(2, m, n) > bits * m * n
        return
    spent = sum(g.rank * budget.vector_cost(g.bits, m, n) for g in groups)
    assert spent <= bits * m * n
    assert sum(g.rank for g in groups) <= min(m, n)
    # a greedy fill: not even one more cheapest vector would fit, unless the rank is exhausted
    if sum(g.rank for g in groups) < min(m, n):
        assert spent + budget.vector_cost(2, m, n) > bits * m * n


def test_rank_is_capped_by_the_matrix():
    groups = budget.fill_schedule(64, 64, 16.0)
    assert sum(g.rank for g in groups) == 64


def test_budget_too_small_names_the_need():
    with pytest.raises(BudgetError, match=r"too small for one 2-bit singular vector of a 384x384 matrix"):
        budget.fill_schedule(384, 384, 0.001)


def test_lowrank_rank_at_equal_bytes():
    assert budget.lowrank_rank(4096, 4096, 1.0) == 128  # 16 * r * 8192 <= 4096^2
    with pytest.raises(BudgetError, match="fp16 singular vector"):
        budget.lowrank_rank(4096, 4096, 0.001)
