"""Low-rank baseline: truncated SVD with fp16 factors at the same bytes as the budget."""

from __future__ import annotations

import torch

from deltacomp.lowrank.lora import balance
from deltacomp.lowrank.svd import svd
from deltacomp.methods.base import Compressed, Method, info_int, register, stored_bits
from deltacomp.quant.budget import lowrank_rank


@register("lowrank")
class LowRank(Method):
    exact_factors = True

    def check_budget(self, shape, config):
        lowrank_rank(shape[0], shape[1], config.bits)

    def compress(self, delta, config, context=None):
        r = lowrank_rank(delta.shape[0], delta.shape[1], config.bits)
        b, a = balance(*svd(delta, r, config.device, "full"))  # (m, r), (r, n)
        tensors = {"a": a.contiguous().half().cpu(), "b": b.contiguous().half().cpu()}
        total = sum(stored_bits(t) for t in tensors.values())
        return Compressed(tensors, {"rank": r}, total, total)

    def layout(self, info, shape):
        m, n = shape
        r = info_int(info, "rank", 1, min(m, n))
        return {"a": ((r, n), (torch.float16,)), "b": ((m, r), (torch.float16,))}

    def reconstruct(self, tensors, info, shape):
        return tensors["b"].float() @ tensors["a"].float()

    def factors(self, tensors, info, shape, max_rank=None):
        return tensors["b"].float(), tensors["a"].float()  # (m, r), (r, n): sqrt(S) already on each side
