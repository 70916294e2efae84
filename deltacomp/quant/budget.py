"""The one budget definition every method shares, and the fixed-schedule bit allocation.

Budget: ``bits_per_entry`` of each compressed m x n matrix, i.e. ``bits_per_entry * m * n`` bits for its
packed factors. A singular vector pair with U's vector at ``b_u`` bits and V's at ``b_v`` costs
``b_u * pad32(m) + b_v * pad32(n)`` bits (rows are padded to whole 32-code blocks, see
:mod:`deltacomp.quant.packing`), so the packed bytes never exceed the budget. Scales, offsets and S are counted
separately, in the all-in figure, unless the budget is all-in (``--budget all-in``): each vector pair then also
costs its :func:`overhead_bits`.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltacomp.errors import BudgetError
from deltacomp.quant.packing import padded_length
from deltacomp.quant.rtn import num_groups

# Delta-CoMe's published schedule: 2 vectors at 8 bits, 32 at 3 bits, then 2-bit vectors while the budget lasts.
DEFAULT_SCHEDULE: tuple[tuple[int, int | None], ...] = ((8, 2), (3, 32), (2, None))


@dataclass(frozen=True)
class BitGroup:
    """``rank`` consecutive singular vectors, U's at ``bits`` and V's at ``v_bits`` (not given: ``bits`` too)."""

    bits: int
    rank: int
    v_bits: int | None = None

    def __post_init__(self):
        if self.v_bits is None:
            object.__setattr__(self, "v_bits", self.bits)


def budget_bits(m: int, n: int, bits_per_entry: float) -> float:
    return bits_per_entry * m * n


def overhead_bits(m: int, n: int, group_size: int) -> int:
    """What one vector pair of an m x n matrix stores besides its codes: its fp16 singular value and an fp16
    (scale, offset) per quantization group of u and of v."""
    return 16 + 32 * (num_groups(m, group_size) + num_groups(n, group_size))


def vector_cost(bits: int, m: int, n: int, v_bits: int | None = None, overhead: int = 0) -> int:
    """Bits of one packed (u, v) pair of an m x n matrix: u at ``bits``, v at ``v_bits`` (default ``bits``), plus
    ``overhead`` (:func:`overhead_bits` under an all-in budget, else 0)."""
    return bits * padded_length(m) + (bits if v_bits is None else v_bits) * padded_length(n) + overhead


def fill_schedule(m: int, n: int, bits_per_entry: float,
                  schedule: tuple[tuple[int, int | None], ...] = DEFAULT_SCHEDULE, overhead: int = 0) -> list[BitGroup]:
    """Fill ``schedule`` in order, never past the budget; a group shrinks to what the budget affords.

    >>> [(g.bits, g.rank) for g in fill_schedule(4096, 4096, 1.0)]
    [(8, 2), (3, 32), (2, 968)]
    """
    left = budget_bits(m, n, bits_per_entry)
    rank_left = min(m, n)
    groups = []
    for bits, count in schedule:
        if rank_left == 0:
            break
        affordable = int(left // vector_cost(bits, m, n, overhead=overhead))
        k = min(rank_left, affordable, count if count is not None else rank_left)
        if k > 0:
            groups.append(BitGroup(bits, k))
            left -= k * vector_cost(bits, m, n, overhead=overhead)
            rank_left -= k
    if not groups:
        cheapest = min(b for b, _ in schedule)
        need = vector_cost(cheapest, m, n, overhead=overhead) / (m * n)
        raise BudgetError(
            f"a budget of {bits_per_entry:g} bits per entry is too small for one {cheapest}-bit singular "
            f"vector of a {m}x{n} matrix (needs at least {need:.4g})"
        )
    return groups


def lowrank_rank(m: int, n: int, bits_per_entry: float, factor_bits: int = 16) -> int:
    """Rank of fp16 factors that fit the budget: ``factor_bits * r * (m + n) <= budget``."""
    r = min(min(m, n), int(budget_bits(m, n, bits_per_entry) // (factor_bits * (m + n))))
    if r < 1:
        need = factor_bits * (m + n) / (m * n)
        raise BudgetError(
            f"a budget of {bits_per_entry:g} bits per entry is too small for one fp16 singular vector of a "
            f"{m}x{n} matrix (needs at least {need:.4g})"
        )
    return r
