"""A compressed matrix's delta as a module whose codes are fixed and whose S, scales and offsets are trained.

``delta x = U diag(s) V^T x`` with ``U = codes_U * scale_U + offset_U`` per group of codes (the same for V). The
trained values are relative, so that one learning rate suits every matrix: ``s = s0 (1 + c)``,
``scale = scale0 (1 + a)``, ``offset = offset0 + scale0 b``, with c, a and b starting at zero (the stored factors).
"""

from __future__ import annotations

import torch
from torch import nn

from deltacomp.quant import packing
from deltacomp.quant.packed import PackedModule


def _per_code(p: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """(r, G) per-group values -> (r, length), one per code."""
    return p if group_size == 0 else p.repeat_interleave(group_size, dim=1)[:, :length]


def _per_group(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r, length) per-code values -> (r, G), the sum over each group's codes (the adjoint of :func:`_per_code`)."""
    if group_size == 0:
        return t.sum(1, keepdim=True)
    return nn.functional.pad(t, (0, -t.shape[1] % group_size)).view(t.shape[0], -1, group_size).sum(-1)


class _Dequant(torch.autograd.Function):
    """``codes * scale + offset`` per group; the backward pass keeps only the uint8 codes (a float copy of every
    code, held for each matrix until its backward, would be 4 bytes a code: gigabytes at 7B)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
        ctx.save_for_backward(codes)
        ctx.group_size = group_size
        length = codes.shape[1]
        return codes.float() * _per_code(scale, group_size, length) + _per_code(offset, group_size, length)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        return None, _per_group(grad * codes.float(), ctx.group_size), _per_group(grad, ctx.group_size), None


class TunedSide(nn.Module):
    """One factor (U or V) of every bit group: rows of codes (r, length) with trained scales and offsets."""

    def __init__(self, sides, group_size: int, device):
        super().__init__()
        self.group_size = group_size
        self.sizes = [int(s.words.shape[0]) for s in sides]
        self.register_buffer("codes", torch.cat([packing.unpack(s.words.to(device), s.bits, s.length) for s in sides]))
        self.register_buffer("scale0", torch.cat([s.scale.float() for s in sides]).to(device))
        self.register_buffer("offset0", torch.cat([s.offset.float() for s in sides]).to(device))
        self.a = nn.Parameter(torch.zeros_like(self.scale0))
        self.b = nn.Parameter(torch.zeros_like(self.offset0))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset), each (r, G) float32."""
        return self.scale0 * (1 + self.a), self.offset0 + self.scale0 * self.b

    def forward(self) -> torch.Tensor:
        """The dequantized rows (r, length) float32."""
        scale, offset = self.scales()
        return _Dequant.apply(self.codes, scale, offset, self.group_size)


class TunedFactors(nn.Module):
    """The delta of one compressed matrix (its packed view), with S, scales and offsets trained."""

    def __init__(self, packed: PackedModule, device):
        super().__init__()
        self.packed = packed
        groups = packed.groups
        self.u = TunedSide([g.u for g in groups], packed.group_size, device)  # rows of U^T: (r, m)
        self.v = TunedSide([g.v for g in groups], packed.group_size, device)  # rows of V^T: (r, n)
        self.register_buffer("s0", torch.cat([g.s.float() for g in groups]).to(device))
        self.c = nn.Parameter(torch.zeros_like(self.s0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``delta x`` for x (..., n): (..., m) in x's dtype (the factors are made in float32, then cast: a bf16
        model's delta runs on tensor cores)."""
        s = (self.s0 * (1 + self.c)).to(x.dtype)
        return ((x @ self.v().to(x.dtype).T) * s) @ self.u().to(x.dtype)

    @torch.no_grad()
    def stored(self) -> dict[str, torch.Tensor]:
        """The module's stored tensors (``g{i}.u``, ``g{i}.u_scale``, ...) with the tuned values, in the order and
        dtypes they were stored (the package's byte counts stay right): the packed words unchanged, scales and
        offsets fp16, S in its stored dtype, within that dtype's finite range."""
        out = {}
        s = torch.split((self.s0 * (1 + self.c)).cpu(), self.u.sizes)
        sides = {name: [torch.split(t.cpu(), side.sizes) for t in side.scales()]
                 for name, side in (("u", self.u), ("v", self.v))}
        for i, g in enumerate(self.packed.groups):
            for name, packed in (("u", g.u), ("v", g.v)):
                scale, offset = sides[name]
                out[f"g{i}.{name}"] = packed.words
                out[f"g{i}.{name}_scale"] = scale[i].to(torch.float16)
                out[f"g{i}.{name}_offset"] = offset[i].to(torch.float16)
            top = torch.finfo(g.s.dtype).max
            out[f"g{i}.s"] = s[i].clamp(-top, top).to(g.s.dtype)
        return out


class TunedLinear(nn.Module):
    """A linear layer of the base weight plus a :class:`TunedFactors` delta: ``base(x) + delta x``."""

    def __init__(self, base_layer: nn.Linear, factors: TunedFactors):
        super().__init__()
        self.base_layer, self.factors = base_layer, factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.factors(x)
