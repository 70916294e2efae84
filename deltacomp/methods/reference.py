"""The plain reference (Delta-CoMe as published): SVD, the fixed bit schedule, min-max round-to-nearest per vector.

It is the row every quality table keeps beside deltacomp's own settings, so that a choice which lowers the weight
error but raises the model's error shows: the exact SVD of the delta, the singular vectors given bits by the
``mixed`` method's ``--schedule`` filled under the same budget, and each vector of U and V rounded to the nearest
of 2**bits levels spanning its own minimum and maximum (one scale and offset per vector). No least-squares refit,
no clipped range, no calibration, no optimal allocation: it reads ``--bits`` and ``--schedule`` and nothing else.
(``mixed`` quantizes the same way by default, so ``mixed --allocation schedule --svd full`` gives the same
packages; the default differs by the optimal allocation.)

It stores what ``mixed`` stores (the same tensors and manifest ``info``), so every reader of a package takes it.
"""

from __future__ import annotations

from deltacomp.lowrank.svd import svd
from deltacomp.methods.base import Compressed, register, stored_bits
from deltacomp.methods.mixed import Mixed
from deltacomp.quant import factors

PER_VECTOR = 0  # quantization group size: one (scale, offset) per singular vector


@register("reference")
class Reference(Mixed):
    uses = frozenset()
    auto = {"allocation": "schedule"}  # it follows the schedule, whatever mixed defaults to

    def check_budget(self, shape, config):
        self.schedule_groups(shape, config, PER_VECTOR)

    def compress(self, delta, config, context=None):
        groups = self.schedule_groups(tuple(delta.shape), config, PER_VECTOR)
        u, s, v = svd(delta, sum(g.rank for g in groups), config.device, "full")  # (m, r), (r,), (n, r)
        fg = factors.quantize(delta.to(u.device), u, s, v, groups, PER_VECTOR, refit=False, clip=False)
        tensors = {k: t.cpu() for k, t in factors.to_tensors(fg).items()}
        info = {
            "rank": sum(g.rank for g in groups),
            "groups": [{"bits": g.bits, "rank": g.rank} for g in groups],
            "group_size": PER_VECTOR,
            "allocation": "schedule",
            "calibrated": False,
        }
        factor_bits = sum(stored_bits(t) for k, t in tensors.items() if k.endswith((".u", ".v")))
        return Compressed(tensors, info, factor_bits, sum(stored_bits(t) for t in tensors.values()))
