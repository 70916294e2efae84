"""Round-to-nearest asymmetric quantization of rows, in groups along each row.

A row ``x`` of length L is cut into ``ceil(L / group_size)`` groups; each group has its own ``scale`` and
``offset`` so that ``x ~= code * scale + offset`` with ``code`` in [0, 2**bits - 1]. ``group_size = 0``
means one group per row.

The range of each group is its min-max range, or (``clip``) the one that minimises its squared error: the
min-max range shrunk towards zero by the best of :data:`CLIP_RATIOS` (1.0 included, so never worse than plain
min-max in squared error; at 2 bits it roughly halves it for Gaussian rows). Which one to use is decided by the
model's error, not the weights': for the singular vectors of fine-tuning deltas the min-max range kept the models
closer to their fine-tunes (the mixed method's ``--range``, BENCHMARKS.md).
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


CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(19))  # 1.00, 0.96, ..., 0.28
_FIT_BLOCK = 1 << 21  # entries (rows x length x ratios) fitted at a time on the CPU: 8 MB of float32 (64x on a GPU)


def _range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / ((1 << bits) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo


def fit(x: torch.Tensor, bits: int, group_size: int, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of each group: (R, L) -> two (R, G) float32 tensors.

    ``clip=False`` gives the plain min-max range; otherwise the MSE-best clipped range (module docstring): every
    ratio is tried at once, and the first one with the least error wins. Rows are independent, so long inputs are
    fitted in blocks of rows (small enough for the CPU's cache: the same result, faster).
    """
    block = _FIT_BLOCK if x.device.type == "cpu" else _FIT_BLOCK << 6
    rows = max(1, block // (len(CLIP_RATIOS) * max(1, x.shape[1])))
    if clip and bits < 8 and x.shape[0] > rows:
        parts = [fit(block, bits, group_size, clip) for block in x.split(rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xg = _grouped(x.float(), group_size)  # (R, G, g)
    lo, hi = xg.amin(dim=2), xg.amax(dim=2)  # (R, G)
    if not clip or bits >= 8:
        return _range_params(lo, hi, bits)
    ratio = torch.tensor(CLIP_RATIOS, device=x.device)[:, None, None]  # (C, 1, 1)
    scale, offset = _range_params(lo * ratio, hi * ratio, bits)  # (C, R, G)
    s, o = scale[..., None], offset[..., None]
    work = (xg - o).div_(s).round_().clamp_(0, (1 << bits) - 1)  # codes (C, R, G, g)
    err = work.mul_(s).add_(o).sub_(xg).pow_(2).sum(dim=3)  # (C, R, G)
    best = err.argmin(dim=0, keepdim=True)  # the first least error: the earliest ratio in a tie
    return scale.gather(0, best)[0], offset.gather(0, best)[0]


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


def quantize_rows(x: torch.Tensor, bits: int, group_size: int, param_dtype=torch.float16, clip: bool = True):
    """Fit (``clip`` as in :func:`fit`) and quantize; parameters are rounded to ``param_dtype`` first so the stored
    ones are exact.

    Returns (codes uint8 (R, L), scale (R, G), offset (R, G)) with scale/offset in ``param_dtype``.
    """
    scale, offset = stored_params(*fit(x, bits, group_size, clip), param_dtype)
    return quantize(x, scale.float(), offset.float(), bits, group_size), scale, offset


def stored_params(scale: torch.Tensor, offset: torch.Tensor, dtype=torch.float16):
    """Scale and offset rounded to the stored ``dtype``; a scale that rounds to zero becomes the smallest normal
    one (a constant group then keeps its codes at 0 and its value in the offset)."""
    scale, offset = scale.to(dtype), offset.to(dtype)
    tiny = torch.finfo(dtype).tiny
    return torch.where(scale.float() > 0, scale, torch.full_like(scale, tiny)), offset
