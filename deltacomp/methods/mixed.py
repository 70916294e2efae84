"""Mixed precision (Delta-CoMe style): SVD, then more bits for singular vectors with larger singular values."""

from __future__ import annotations

import torch

from deltacomp.config import CompressConfig
from deltacomp.lowrank.svd import svd
from deltacomp.methods.base import Compressed, Method, bits_of, register
from deltacomp.quant import factors
from deltacomp.quant.budget import BitGroup, fill_schedule


@register("mixed")
class Mixed(Method):
    exact_factors = True

    def allocate(self, shape: tuple[int, int], config: CompressConfig) -> list[BitGroup]:
        return fill_schedule(shape[0], shape[1], config.bits, config.schedule)

    def check_budget(self, shape, config):
        self.allocate(shape, config)

    def compress(self, delta: torch.Tensor, config: CompressConfig, context=None) -> Compressed:
        groups = self.allocate(tuple(delta.shape), config)
        rank = sum(g.rank for g in groups)
        u, s, v = svd(delta, rank, config.device)  # (m, r), (r,), (n, r)
        fg = factors.quantize_rtn(delta, u, s, v, groups, config.group_size, config.refit)
        tensors = factors.to_tensors(fg)
        factor_bits = sum(bits_of(t) for k, t in tensors.items() if k.endswith((".u", ".v")))
        info = {
            "rank": rank,
            "groups": [{"bits": g.bits, "rank": g.rank} for g in groups],
            "group_size": config.group_size,
        }
        return Compressed(tensors, info, factor_bits, sum(bits_of(t) for t in tensors.values()))

    def reconstruct(self, tensors, info, shape):
        bits = [g["bits"] for g in info["groups"]]
        return factors.reconstruct(factors.from_tensors(tensors, bits, shape), info["group_size"])

    def factors(self, tensors, info, shape, max_rank=None):
        """B (m, r), A (r, n) of the dequantized groups; sqrt(|S|) on each side, the sign of S on B."""
        bits = [g["bits"] for g in info["groups"]]
        us, vs = [], []
        for g in factors.from_tensors(tensors, bits, shape):
            u = g.u.dequantize(info["group_size"])  # (r_g, m)
            v = g.v.dequantize(info["group_size"])  # (r_g, n)
            s = g.s.float()  # (r_g,): may be negative after the least-squares refit
            root = s.abs().sqrt()
            us.append(u.T * (root * torch.sign(s)))
            vs.append(v * root[:, None])
        return torch.cat(us, 1), torch.cat(vs, 0)
