"""Round-to-nearest asymmetric min-max quantization of rows, in groups along each row.

A row ``x`` of length L is cut into ``ceil(L / group_size)`` groups; each group has its own ``scale`` and
``offset`` so that ``x ~= code * scale + offset`` with ``code`` in [0, 2**bits - 1]. ``group_size = 0``
means one group per row.
"""

from __future__ import annotations

import torch


def num_groups(length: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-length // group_size)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, L) -> (R, G, g) view with the tail group padded by repeating the row's last value."""
    rows, length = x.shape
    g = length if group_size <= 0 else group_size
    pad = -length % g
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.view(rows, -1, g)


def fit(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and offset of each group: (R, L) -> two (R, G) float32 tensors."""
    xg = _grouped(x.float(), group_size)
    lo = xg.amin(dim=2)
    hi = xg.amax(dim=2)
    scale = (hi - lo) / ((1 << bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo


def expand(p: torch.Tensor, length: int, group_size: int) -> torch.Tensor:
    """Per-group parameters (R, G) -> per-entry (R, L)."""
    g = length if group_size <= 0 else group_size
    return p.repeat_interleave(g, dim=1)[:, :length]


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(R, L) floats -> (R, L) uint8 codes under the given per-group parameters."""
    length = x.shape[1]
    s = expand(scale, length, group_size)
    o = expand(offset, length, group_size)
    return torch.clamp(torch.round((x.float() - o) / s), 0, (1 << bits) - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R, L) codes -> (R, L) float32."""
    length = codes.shape[1]
    return codes.float() * expand(scale.float(), length, group_size) + expand(offset.float(), length, group_size)


def quantize_rows(x: torch.Tensor, bits: int, group_size: int, param_dtype=torch.float16):
    """Fit and quantize; parameters are rounded to ``param_dtype`` first so the stored ones are exact.

    Returns (codes uint8 (R, L), scale (R, G), offset (R, G)) with scale/offset in ``param_dtype``.
    """
    scale, offset = fit(x, bits, group_size)
    scale = scale.to(param_dtype)
    offset = offset.to(param_dtype)
    tiny = torch.finfo(param_dtype).tiny
    scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, tiny))
    return quantize(x, scale.float(), offset.float(), bits, group_size), scale, offset
