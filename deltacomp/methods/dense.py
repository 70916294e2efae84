"""Dense reference: the delta itself in fp16 (16 bits per entry, whatever the budget)."""

from __future__ import annotations

import torch

from deltacomp.methods.base import Compressed, Method, register, stored_bits


@register("dense")
class Dense(Method):
    def compress(self, delta, config, context=None):
        t = delta.to(torch.float16)
        return Compressed({"delta": t}, {}, stored_bits(t), stored_bits(t))

    def layout(self, info, shape):
        return {"delta": (tuple(shape), (torch.float16,))}

    def reconstruct(self, tensors, info, shape):
        return tensors["delta"].float()
