"""Budget-optimal bits per singular vector (``--allocation optimal``).

Objective. A matrix ``dW = sum_i s_i u_i v_i^T`` (unit u_i, v_i) acts on inputs x with second moment
``H = E[x x^T]`` (the identity without calibration). The expected output error of its compressed form is
``E||(dW - dW_hat) x||^2 = tr((dW - dW_hat) H (dW - dW_hat)^T)``. Treating the vectors' errors as independent
(cross terms vanish to first order), vector i with its u at ``b_u`` bits and its v at ``b_v`` contributes

    dropped:          e_i(0) = s_i^2 * v_i^T H v_i
    width (b_u, b_v): e_i(b) = s_i^2 * (||du_i(b_u)||^2 * v_i^T H v_i + dv_i(b_v)^T H dv_i(b_v))

where ``du_i, dv_i`` are the measured quantization errors of u_i and v_i in the stored format (groups, fp16
parameters): round-to-nearest for u, and for v the quantizer the matrix will get, i.e. GPTQ under H with
calibration (its errors land where the inputs rarely point, so they cost far less than round-to-nearest's;
one GPTQ sweep measures every width, the rows stacked width after width). Errors grow with s_i^2, so large
singular values earn more bits; with calibration, directions the inputs rarely excite (small v^T H v) earn
fewer, and since GPTQ absorbs much of v's error but none of u's, widths with ``b_u > b_v`` can pay. A width
costs ``b_u * pad32(m) + b_v * pad32(n)`` bits (:func:`deltacomp.quant.budget.vector_cost`).

Noise weight. The kept vectors' errors are multiplied by ``noise`` (``--noise-weight``). With H the identity (no
calibration) the formula above counts rounding noise, spread over all n input directions, as harmful as losing the
vector's own direction; but real inputs occupy few directions and a fine-tune's singular vectors lie among them, so
the noise costs the model far less than its squared norm says. Measured by function on four SmolLM2-135M fine-tunes,
0.1 kept the answers closest to the fine-tune at 1, 0.5 and 0.25 bit (1: too few vectors, at more bits each), and
with calibration too (H weighs V's noise itself, yet 0.1 beat 1 on two SmolLM2 fine-tunes at 0.5 bit and was within
0.0004 of it on MiniLM): the default either way.

Excitation power. Without calibration H = I also says that the inputs excite every singular direction alike. A
fine-tune's update accumulates along the directions its inputs excite, so its larger singular directions may be the
more excited ones. ``--excitation-power`` P models that: each vector's errors (dropped and kept alike) are multiplied
by ``(s_i / s_1)^P``, which gives the largest vectors more bits and the smallest fewer (or none); 0, the
default, is the identity. At 2 it was closer to the fine-tune on MiniLM and a numeric SmolLM2 fine-tune, further on
instruction-following and pig-latin ones. With calibration ``v_i^T H v_i`` is measured and P is not read.

Solver. Minimise ``sum_i e_i(b_i)`` subject to ``sum_i cost_i(b_i) <= budget`` over all vectors of one matrix
(``--budget-scope matrix``) or of every compressed matrix at once (``--budget-scope model``: the sum of the
per-token output errors of all layers, under the total budget). The Lagrangian relaxation
``min e_i(b) + lambda * cost_i(b)`` splits per vector; bisection on lambda finds the cheapest multiplier that
fits, which is optimal for the budget it spends; a greedy pass then spends what is left on the upgrades with the
best error drop per bit. The result never exceeds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltacomp.errors import BudgetError
from deltacomp.lowrank.svd import svd
from deltacomp.quant import gptq, rtn
from deltacomp.quant.budget import budget_bits, vector_cost
from deltacomp.stages import stage, timed

Width = tuple[int, int]  # (bits of u, bits of v)


def max_rank(m: int, n: int, bits_per_entry: float, widths: tuple[Width, ...], share: float = 1.0,
             overhead: int = 0) -> int:
    """Most vectors the allocation could keep: the budget (times ``share``) spent on the cheapest width."""
    cheapest = min(vector_cost(bu, m, n, bv, overhead) for bu, bv in widths)
    return max(1, min(min(m, n), int(share * budget_bits(m, n, bits_per_entry) // cheapest)))


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes (R, L), scale (R, G), offset (R, G)


def _rtn(x: torch.Tensor, bits: int, group_size: int, clip: bool) -> tuple[Rows, torch.Tensor]:
    """Round-to-nearest of the rows of ``x (R, L)`` at ``bits`` in the stored format (``clip``: the MSE-best range,
    else min-max), and the error vectors (R, L)."""
    rows = rtn.quantize_rows(x, bits, group_size, clip=clip)
    return rows, x - rtn.dequantize(*rows, group_size)


def _v_errors(v: torch.Tensor, bits: list[int], group_size: int, h: torch.Tensor | None,
              gptq_v: tuple[bool, float] | None, clip: bool) -> tuple[dict[int, torch.Tensor], dict[int, Rows]]:
    """``dv^T H dv`` (r,) of every vector at each width: with ``h`` and ``gptq_v`` = (act_order, damp), GPTQ's
    errors (one sweep), else round-to-nearest's; and the rows of V^T by width as quantized for them: GPTQ's at the
    swept widths (below 8 bits), else round-to-nearest's at every width."""
    r = v.shape[1]
    swept = [b for b in bits if gptq_v is not None and h is not None and b < 8]  # 8 bits: rounding is enough
    errs, rows = {}, {}
    if swept:
        stacked = v.T.repeat(len(swept), 1)  # (K r, n)
        row_bits = torch.tensor(swept, device=v.device).repeat_interleave(r)
        quantized = gptq.gptq_rows(stacked, h, row_bits, group_size, *gptq_v, clip)
        errs = dict(zip(swept, (stacked - rtn.dequantize(*quantized, group_size)).split(r)))
        rows = {b: tuple(part) for b, *part in zip(swept, *(t.split(r) for t in quantized))}  # GPTQ is row by row
    for b in bits:
        if b not in errs:
            rounded, errs[b] = _rtn(v.T, b, group_size, clip)  # (r, n)
            if not swept:
                rows[b] = rounded
    return {b: (e * (e @ h)).sum(1) if h is not None else e.pow(2).sum(1) for b, e in errs.items()}, rows


def _table(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, widths: tuple[Width, ...], group_size: int,
           h: torch.Tensor | None, gptq_v: tuple[bool, float] | None,
           clip: bool = True, noise: float = 1.0, power: float = 0.0) -> tuple[torch.Tensor, dict[int, Rows]]:
    """:func:`vector_errors` with the kept vectors' errors times ``noise`` and, without ``h``, every error of vector
    i times ``(s_i / s_1)^power`` (the module docstring's weights), and V^T's round-to-nearest rows by width
    (:func:`_v_errors`)."""
    s2 = s.double() ** 2
    hv = (v * (h @ v)).sum(0).double() if h is not None else torch.ones_like(s2)  # v_i^T H v_i
    du2 = {b: _rtn(u.T, b, group_size, clip)[1].pow(2).sum(1).double() for b in sorted({bu for bu, _ in widths})}
    dv_h, v_rows = _v_errors(v, sorted({bv for _, bv in widths}), group_size, h, gptq_v, clip)
    cols = [s2 * hv] + [noise * s2 * (du2[bu] * hv + dv_h[bv].double()) for bu, bv in widths]
    table = torch.stack(cols, 1)
    if h is None and power and len(s) and s[0] > 0:
        table = table * (s.double() / s[0].double()).pow(power)[:, None]
    return table.cpu(), v_rows


@timed("allocation")
def vector_errors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, widths: tuple[Width, ...], group_size: int,
                  h: torch.Tensor | None = None, gptq_v: tuple[bool, float] | None = None) -> torch.Tensor:
    """Expected error of each vector dropped and at each width: (r, 1 + len(widths)) float64.

    u (m, r), s (r,), v (n, r) with unit columns; ``h`` (n, n) the input second moment, or None for the identity;
    ``gptq_v`` = (act_order, damp): with ``h``, v's errors measured under GPTQ (as the matrix will be quantized).
    """
    return _table(u, s, v, widths, group_size, h, gptq_v)[0]


@timed("allocation")
def solve(errors: list[torch.Tensor], costs: list[torch.Tensor], budget: float,
             keep_first: bool = True) -> list[torch.Tensor]:
    """Option index (0 = dropped, k = the k-th width) of every vector, per matrix.

    ``errors[j]`` (r_j, K+1): expected error of matrix j's vectors per option; ``costs[j]`` (K+1,): bits of one
    vector of matrix j per option (option 0 costs 0). ``keep_first`` keeps the first vector of every matrix
    (never dropped), so no matrix is left out. Raises BudgetError when even that does not fit.
    """
    sizes = [e.shape[0] for e in errors]
    err = torch.cat([e.double() for e in errors])  # (V, K+1)
    cost = torch.cat([c.double().expand(k, -1) for c, k in zip(costs, sizes)])  # (V, K+1)
    if keep_first:
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        err[starts, 0] = float("inf")
        floor = float(cost[starts, 1:].min(1).values.sum())
        if floor > budget:
            raise BudgetError(f"a budget of {budget:.0f} bits cannot keep one vector of each of {len(sizes)} matrices "
                              f"(needs {floor:.0f})")

    def choose(lam: float) -> torch.Tensor:
        return torch.argmin(err + lam * cost, dim=1)

    def spent(choice: torch.Tensor) -> float:
        return float(cost.gather(1, choice[:, None]).sum())

    finite = torch.where(torch.isfinite(err), err, torch.zeros_like(err))
    lo, hi = 0.0, float((finite[:, :1] / cost[:, 1:].min()).max()) * 2 + 1.0
    if spent(choose(lo)) <= budget:
        hi = lo
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if spent(choose(mid)) <= budget else (mid, hi)
    choice = choose(hi)
    _fill(err, cost, choice, budget - spent(choice))
    return list(torch.split(choice, sizes))


def _fill(err: torch.Tensor, cost: torch.Tensor, choice: torch.Tensor, left: float, rounds: int = 3) -> None:
    """Spend ``left`` bits on the upgrades with the best error drop per bit, in place."""
    for _ in range(rounds):
        cur_err = err.gather(1, choice[:, None])
        cur_cost = cost.gather(1, choice[:, None])
        extra = cost - cur_cost
        gain = cur_err - err
        ratio = torch.where((extra > 0) & (gain > 0), gain / extra.clamp(min=1e-9), torch.zeros_like(gain))
        best_ratio, best_opt = ratio.max(1)
        order = torch.argsort(best_ratio, descending=True)
        order = order[best_ratio[order] > 0]
        extra_best = extra.gather(1, best_opt[:, None]).squeeze(1).tolist()
        took = []
        for i in order.tolist():
            if extra_best[i] <= left:
                left -= extra_best[i]
                took.append(i)
        if not took:
            return
        idx = torch.tensor(took)
        choice[idx] = best_opt[idx]


def option_costs(m: int, n: int, widths: tuple[Width, ...], overhead: int = 0) -> torch.Tensor:
    """Bits of one vector of an m x n matrix per option: (K+1,), option 0 (dropped) first."""
    return torch.tensor([0.0] + [float(vector_cost(bu, m, n, bv, overhead)) for bu, bv in widths], dtype=torch.float64)


def bits_of_options(options: torch.Tensor, widths: tuple[Width, ...]) -> torch.Tensor:
    """Option indices -> widths (r, 2): (bits of u, bits of v), (0, 0) for dropped."""
    return torch.tensor(((0, 0), *widths), dtype=torch.long)[options.cpu()]


def matrix_bits(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, widths: tuple[Width, ...], group_size: int,
                budget: float, h: torch.Tensor | None = None, gptq_v: tuple[bool, float] | None = None,
                overhead: int = 0) -> torch.Tensor:
    """Widths (r, 2) of each vector of one matrix, optimal under ``budget`` bits (module docstring); each kept
    vector also costs ``overhead`` bits (an all-in budget)."""
    table = vector_errors(u, s, v, widths, group_size, h, gptq_v)
    options = solve([table], [option_costs(u.shape[0], v.shape[0], widths, overhead)], budget)[0]
    return bits_of_options(options, widths)


@dataclass
class Candidates:
    """One matrix's top singular vectors with the expected error and the cost of each at each width."""

    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    v: torch.Tensor  # (n, r)
    errors: torch.Tensor  # (r, widths): :func:`vector_errors`
    costs: torch.Tensor  # (widths,): :func:`option_costs`
    # V^T's rows at each V width as quantized to measure ``errors``: the factors take the chosen ones (the ``v_rows``
    # of :func:`deltacomp.quant.factors.quantize`) instead of quantizing V again where they round V the same way
    v_rows: dict[int, Rows] = field(default_factory=dict)
    v_gptq: bool = False  # ``v_rows`` are GPTQ's under the allocation's Hessian (the widths below 8 bits only)


def candidates(delta: torch.Tensor, bits_per_entry: float, widths: tuple[Width, ...], group_size: int,
               h: torch.Tensor | None = None, gptq_v: tuple[bool, float] | None = None, overhead: int = 0,
               share: float = 1.0, device: str = "cpu", svd_method: str = "auto", clip: bool = True,
               noise: float = 1.0, power: float = 0.0) -> Candidates:
    """What an allocation chooses from for ``delta (m, n)``: the top :func:`max_rank` vectors (``share`` times the
    matrix's own budget: a model-scope allocation may give a matrix more than its share), their errors and costs.
    Both the per-matrix allocation and the model-scope first pass start here."""
    m, n = delta.shape
    u, s, v = svd(delta, max_rank(m, n, bits_per_entry, widths, share, overhead), device, svd_method)
    with stage("allocation"):
        table, v_rows = _table(u, s, v, widths, group_size, h, gptq_v, clip, noise, power)
    return Candidates(u, s, v, table, option_costs(m, n, widths, overhead), v_rows,
                      gptq_v is not None and h is not None)


def choose(c: Candidates, widths: tuple[Width, ...], budget: float) -> torch.Tensor:
    """Widths (r, 2) of the candidates of one matrix, optimal under ``budget`` bits."""
    return bits_of_options(solve([c.errors], [c.costs], budget)[0], widths)


def group_by_bits(bits: torch.Tensor) -> tuple[torch.Tensor, list[tuple[Width, int]]]:
    """Order of the kept vectors (widest first, stable) and the ((u bits, v bits), count) runs of that order.

    ``bits`` is (r, 2) widths, or (r,) when u and v share each width; 0 = dropped.
    """
    if bits.dim() == 1:
        bits = torch.stack([bits, bits], 1)
    keep = (bits[:, 0] > 0).nonzero().squeeze(1)
    key = bits[keep, 0] + bits[keep, 1]  # total width, then u's: (3, 2) before (2, 3)
    order = keep[torch.argsort(-(key * 16 + bits[keep, 0]), stable=True)]
    runs: list[tuple[Width, int]] = []
    for bu, bv in bits[order].tolist():
        if runs and runs[-1][0] == (bu, bv):
            runs[-1] = ((bu, bv), runs[-1][1] + 1)
        else:
            runs.append(((bu, bv), 1))
    return order, runs
