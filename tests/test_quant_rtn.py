"""Round-to-nearest asymmetric quantization: the error bound, exact parameters, groups."""

import pytest
import torch

from deltacomp.quant import rtn


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 16, 50])
def test_min_max_error_at_most_half_a_step(bits, group_size):
    x = torch.randn(6, 130, generator=torch.Generator().manual_seed(bits))
    scale, offset = rtn.fit(x, bits, group_size, clip=False)
    scale, offset = scale.half(), offset.half()
    codes = rtn.quantize(x, scale.float(), offset.float(), bits, group_size)
    assert codes.shape == x.shape and int(codes.max()) < 1 << bits
    assert scale.shape == (6, rtn.num_groups(130, group_size))
    err = (rtn.dequantize(codes, scale, offset, group_size) - x).abs()
    step = rtn.expand(scale.float(), 130, group_size)
    # half a step, plus the fp16 rounding of the offset
    assert bool((err <= step / 2 + offset.float().abs().max() * 2**-10 + 1e-6).all())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_clipped_range_beats_min_max_on_every_row(bits):
    x = torch.randn(32, 300, generator=torch.Generator().manual_seed(7))

    def row_err(scale, offset):
        return (rtn.dequantize(rtn.quantize(x, scale, offset, bits, 0), scale, offset, 0) - x).pow(2).sum(1)

    plain, clipped = row_err(*rtn.fit(x, bits, 0, clip=False)), row_err(*rtn.fit(x, bits, 0))
    assert bool((clipped <= plain + 1e-6).all())
    if bits == 2:  # Gaussian rows: clipping the tails cuts the 2-bit error by at least a quarter
        assert float(clipped.sum()) < 0.75 * float(plain.sum())


def test_more_bits_lower_error():
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    errs = [float((rtn.dequantize(*rtn.quantize_rows(x, b, 0), 0) - x).norm()) for b in (1, 2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01 * float(x.norm())


def test_smaller_groups_lower_error():
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    whole = float((rtn.dequantize(*rtn.quantize_rows(x, 2, 0), 0) - x).norm())
    grouped = float((rtn.dequantize(*rtn.quantize_rows(x, 2, 32), 32) - x).norm())
    assert grouped < whole


def test_constant_rows_are_exact():
    x = torch.full((2, 40), 0.25)
    codes, scale, offset = rtn.quantize_rows(x, 2, 0)
    assert torch.equal(rtn.dequantize(codes, scale, offset, 0), x)


def _first_best_ratio(x, bits, group_size):
    """The clipped range as a loop over the ratios, keeping the first with the least error (the oracle)."""
    xg = rtn._grouped(x, group_size)
    lo, hi = xg.amin(2), xg.amax(2)
    best = scale = offset = None
    for ratio in rtn.CLIP_RATIOS:
        s, o = rtn._range_params(lo * ratio, hi * ratio, bits)
        q = torch.clamp(torch.round((xg - o[..., None]) / s[..., None]), 0, (1 << bits) - 1)
        err = (q * s[..., None] + o[..., None] - xg).pow(2).sum(2)
        better = err < best if best is not None else torch.ones_like(err, dtype=torch.bool)
        best = torch.where(better, err, best if best is not None else err)
        scale = torch.where(better, s, scale if scale is not None else s)
        offset = torch.where(better, o, offset if offset is not None else o)
    return scale, offset


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("group_size", [0, 32])
def test_clipped_range_is_the_first_ratio_with_least_error_in_blocks_or_whole(bits, group_size, monkeypatch):
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(20, 200, generator=g), torch.randint(-3, 4, (20, 200), generator=g).float(),
                   torch.full((3, 200), 0.5)])  # Gaussian rows, rows with ties between ratios, constant rows
    want = _first_best_ratio(x, bits, group_size)
    whole = rtn.fit(x, bits, group_size)
    monkeypatch.setattr(rtn, "_FIT_BLOCK", 7 * 200 * len(rtn.CLIP_RATIOS))  # blocks of 7 rows
    blocks = rtn.fit(x, bits, group_size)
    for got in (whole, blocks):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
