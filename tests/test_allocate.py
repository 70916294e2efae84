"""Budget-optimal bit allocation: never over the budget, better than the fixed 8/3/2 schedule on the actual
reconstruction error of a decaying spectrum, weighted by activations, shared across matrices, and with U/V widths
(GPTQ-measured V errors) better than equal widths on the calibrated output error."""

import pytest
import torch

from deltacomp.errors import BudgetError
from deltacomp.quant import allocate, factors
from deltacomp.quant.budget import BitGroup, budget_bits, fill_schedule, vector_cost

BITS = ((2, 2), (3, 3), (4, 4), (8, 8))
UV_BITS = ((2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (8, 4), (8, 8))


def _delta(m, n, power=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.arange(1, r + 1).float() ** -power
    return (torch.randn(m, r, generator=g) / m**0.5 * s) @ (torch.randn(n, r, generator=g) / n**0.5).T


def _spent(bits, m, n):
    if bits.dim() == 1:
        bits = torch.stack([bits, bits], 1)
    return sum(vector_cost(int(bu), m, n, int(bv)) for bu, bv in bits if bu > 0)


def _groups(bits):
    order, runs = allocate.group_by_bits(bits)
    return order, [BitGroup(bu, k, bv) for (bu, bv), k in runs]


def _reconstruct(delta, u, s, v, bits, group_size=0):
    order, groups = _groups(bits)
    fg = factors.quantize_rtn(delta, u[:, order], s[order], v[:, order], groups, group_size, refit=True)
    return factors.reconstruct(fg, group_size)


@pytest.mark.parametrize("widths", [BITS, UV_BITS])
@pytest.mark.parametrize("bits_per_entry", [0.25, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(256, 256), (384, 128), (100, 300)])
def test_never_exceeds_the_budget(bits_per_entry, shape, widths):
    m, n = shape
    delta = _delta(m, n)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.T
    budget = budget_bits(m, n, bits_per_entry)
    k = allocate.max_rank(m, n, bits_per_entry, widths)
    bits = allocate.matrix_bits(u[:, :k], s[:k], v[:, :k], widths, 0, budget)
    assert bits.shape == (k, 2)
    assert _spent(bits, m, n) <= budget
    assert bits[0, 0] > 0  # the largest singular vector is always kept
    assert {tuple(w) for w in bits.tolist()} <= {(0, 0), *widths}


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
    assert int(weighted[1:8, 0].sum()) < int(plain[1:8, 0].sum())
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
    options = allocate.solve(tables, costs, 1.0 * total)
    spent = sum(float(c[o].sum()) for c, o in zip(costs, options))
    assert spent <= 1.0 * total
    assert all(int(o[0]) > 0 for o in options)
    own = [float(costs[j][options[j]].sum()) / (m * n) for j, (m, n) in enumerate(shapes)]
    assert own[0] > 1.0 > own[2]  # the budget moved to the matrix with the large delta


def test_too_small_a_budget_is_a_clear_error():
    table = torch.ones(4, 5)
    with pytest.raises(BudgetError, match="cannot keep one vector of each of 2 matrices"):
        allocate.solve([table, table], [allocate.option_costs(64, 64, BITS)] * 2, 10.0)


def test_group_by_bits_orders_widest_first_and_drops_zeros():
    order, runs = allocate.group_by_bits(torch.tensor([3, 8, 0, 2, 3, 8, 0]))
    assert order.tolist() == [1, 5, 0, 4, 3]
    assert runs == [((8, 8), 2), ((3, 3), 2), ((2, 2), 1)]
    pairs = torch.tensor([[2, 1], [3, 2], [0, 0], [2, 3], [2, 1], [3, 3]])
    order, runs = allocate.group_by_bits(pairs)
    assert order.tolist() == [5, 1, 3, 0, 4]  # total width first, then U's
    assert runs == [((3, 3), 1), ((3, 2), 1), ((2, 3), 1), ((2, 1), 2)]


def _calibrated_case(m=256, n=256, tokens=2048, seed=0):
    """A decaying-spectrum delta and inputs with a decaying covariance spectrum (as layer inputs have)."""
    g = torch.Generator().manual_seed(seed)
    delta = _delta(m, n, power=0.5, seed=seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    x = (torch.randn(tokens, n, generator=g) * torch.arange(1, n + 1).float() ** -1.0) @ q.T  # (tokens, n)
    return delta, x, x.T @ x / tokens


def test_gptq_measured_v_errors_are_below_round_to_nearest():
    delta, _, h = _calibrated_case()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = 64
    rtn_table = allocate.vector_errors(u[:, :k], s[:k], vh[:k].T, BITS, 128, h)
    gptq_table = allocate.vector_errors(u[:, :k], s[:k], vh[:k].T, BITS, 128, h, (True, 0.01))
    assert torch.equal(rtn_table[:, 0], gptq_table[:, 0])  # dropping costs the same
    for j in (1, 2, 3):  # 2, 3, 4 bits: GPTQ's error under H is below rounding's, for the matrix as a whole
        assert float(gptq_table[:, j].sum()) < 0.9 * float(rtn_table[:, j].sum())
    assert torch.allclose(gptq_table[:, 4], rtn_table[:, 4])  # 8 bits: rounding is what is measured


@pytest.mark.parametrize("bits_per_entry", [0.25, 0.5])
def test_uv_widths_beat_equal_widths_on_the_calibrated_output_error(bits_per_entry):
    """GPTQ absorbs much of V's error and none of U's: spending fewer bits on V keeps more vectors, and the
    calibrated output error ``||(delta - delta_hat) X^T||`` falls."""
    from deltacomp.quant.factors import quantize_gptq

    m, n = 256, 256
    delta, x, h = _calibrated_case(m, n)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.T
    budget = budget_bits(m, n, bits_per_entry)
    errs = {}
    for name, widths in (("equal", BITS), ("uv", UV_BITS)):
        k = allocate.max_rank(m, n, bits_per_entry, widths)
        bits = allocate.matrix_bits(u[:, :k], s[:k], v[:, :k], widths, 128, budget, h, (True, 0.01))
        assert _spent(bits, m, n) <= budget
        order, groups = _groups(bits)
        fg = quantize_gptq(delta, u[:, order], s[order], v[:, order], groups, h, 128)
        approx = factors.reconstruct(fg, 128)
        errs[name] = float(((delta - approx) @ x.T).norm() / (delta @ x.T).norm())
    assert errs["uv"] < 0.95 * errs["equal"], errs


@pytest.mark.parametrize("group_size", [0, 64])
@pytest.mark.parametrize("calibrated", [False, True])
def test_v_rows_measured_by_the_allocation_are_what_quantizing_v_again_gives(group_size, calibrated):
    """The factors of an optimal allocation take V as the allocation quantized it (round-to-nearest, or GPTQ's sweep
    under the same Hessian, a width it did not sweep quantized on its own): the same tensors as quantizing again."""
    m, n = 192, 320
    delta = _delta(m, n)
    h = _calibrated_case(m, n)[2] if calibrated else None
    gptq_v = (True, 0.01) if calibrated else None
    c = allocate.candidates(delta, 1.0, UV_BITS, group_size, h, gptq_v)
    assert c.v_gptq == calibrated
    assert set(c.v_rows) == {bv for _, bv in UV_BITS} - ({8} if calibrated else set())  # 8 bits: not swept
    bits = allocate.choose(c, UV_BITS, budget_bits(m, n, 1.0))
    bits[0] = torch.tensor([8, 8])  # a width the sweep left out
    order, groups = _groups(bits)
    assert len({bv for bv in bits[order, 1].tolist()}) > 2  # several V widths to pick from
    args = (delta, c.u[:, order], c.s[order], c.v[:, order], groups, group_size, True, h)
    again = factors.quantize(*args)
    reused = factors.quantize(*args, v_rows=(c.v_rows, order))
    for a, b in zip(factors.to_tensors(again).values(), factors.to_tensors(reused).values()):
        assert torch.equal(a, b)


def test_the_excitation_power_weighs_each_vector_by_its_singular_value_and_moves_bits_to_the_largest():
    """Without calibration every error of vector i is scaled by (s_i / s_1)^P: the largest vectors keep more bits and
    the tail loses vectors; with a Hessian the power is not read."""
    m, n = 192, 320
    delta, budget = _delta(m, n, power=0.5), budget_bits(m, n, 0.5)
    plain = allocate.candidates(delta, 0.5, BITS, 0, noise=0.1)
    first = []
    ranks = []
    for power in (0.0, 1.0, 2.0, 4.0):
        c = allocate.candidates(delta, 0.5, BITS, 0, noise=0.1, power=power)
        scale = (plain.s.double() / plain.s[0].double()) ** power
        assert torch.allclose(c.errors, plain.errors * scale[:, None], rtol=1e-12, atol=0)
        bits = allocate.choose(c, BITS, budget)
        assert _spent(bits, m, n) <= budget
        first.append(int(bits[0, 0]))
        ranks.append(int((bits[:, 0] > 0).sum()))
    assert first == sorted(first) and first[-1] > first[0], first
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] < ranks[0], ranks
    h = torch.eye(n)
    assert torch.equal(allocate.candidates(delta, 0.5, BITS, 0, h, power=2.0).errors,
                       allocate.candidates(delta, 0.5, BITS, 0, h).errors)


def test_a_lower_noise_weight_keeps_more_vectors_at_fewer_bits_within_the_budget():
    m, n = 192, 320
    delta, budget = _delta(m, n, power=0.5), budget_bits(m, n, 1.0)
    plain = allocate.candidates(delta, 1.0, BITS, 0)
    ranks, widths = [], []
    for noise in (1.0, 0.3, 0.1, 0.03):
        c = allocate.candidates(delta, 1.0, BITS, 0, noise=noise)
        assert torch.equal(c.errors[:, 0], plain.errors[:, 0])  # a dropped vector's error does not move
        assert torch.allclose(c.errors[:, 1:], noise * plain.errors[:, 1:], rtol=1e-12, atol=0)
        bits = allocate.choose(c, BITS, budget)
        assert _spent(bits, m, n) <= budget
        kept = bits[bits[:, 0] > 0, 0].double()
        ranks.append(len(kept))
        widths.append(float(kept.mean()))
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0], ranks
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0], widths

