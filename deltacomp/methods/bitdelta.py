"""BitDelta baseline: ``delta ~= scale * sign(delta)``, one scale per matrix, signs packed 32 per int32."""

from __future__ import annotations

import torch

from deltacomp.errors import BudgetError
from deltacomp.methods.base import Compressed, Method, register, stored_bits
from deltacomp.quant import packing


@register("bitdelta")
class BitDelta(Method):
    def check_budget(self, shape, config):
        if config.bits < 1.0:
            raise BudgetError(
                f"bitdelta stores 1 bit per entry and cannot meet a budget of {config.bits:g} bits per entry"
            )

    def compress(self, delta, config, context=None):
        self.check_budget(tuple(delta.shape), config)
        scale = delta.abs().mean()  # the L2-optimal scale for sign(delta)
        signs = packing.pack((delta >= 0).to(torch.uint8), 1)  # (m, packed_words(n, 1))
        tensors = {"sign": signs, "scale": scale.reshape(1).float()}
        return Compressed(tensors, {}, stored_bits(signs), sum(stored_bits(t) for t in tensors.values()))

    def layout(self, info, shape):
        m, n = shape
        return {"sign": ((m, packing.packed_words(n, 1)), (torch.int32,)), "scale": ((1,), (torch.float32,))}

    def reconstruct(self, tensors, info, shape):
        bits = packing.unpack(tensors["sign"], 1, shape[1]).float()
        return (bits * 2 - 1) * tensors["scale"].float()
