"""GPTQ on rows and columns, and on the SVD factors: lower output error than round-to-nearest on the
calibration distribution (a property that can fail), identical to RTN's format and exact under H = I."""

import pytest
import torch

from deltacomp.quant import factors, gptq, rtn
from deltacomp.quant.budget import BitGroup
from deltacomp.quant.factors import quantize_gptq


def _inputs(n, tokens=2048, seed=0):
    """Correlated, anisotropic inputs X (tokens, n) and their second moment H."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 3)
    return x, x.T @ x / tokens


def _out_err(w, w_q, x):
    return float(((w - w_q) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_rows_beats_rtn_on_the_calibration_inputs(bits, act_order):
    x, h = _inputs(192)
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(1)) / 192**0.5
    codes, scale, offset = gptq.gptq_rows(w, h, torch.full((48,), bits), 64, act_order=act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert scale.shape == (48, 3) and scale.dtype == torch.float16
    got = _out_err(w, rtn.dequantize(codes, scale, offset, 64), x)
    base = _out_err(w, rtn.dequantize(*rtn.quantize_rows(w, bits, 64, clip=False), 64), x)  # the same range
    assert got < 0.85 * base, (got, base)


@pytest.mark.parametrize("clip", [False, True])
def test_gptq_with_identity_hessian_is_round_to_nearest_over_the_same_range(clip):
    w = torch.randn(16, 100)
    codes, scale, offset = gptq.gptq_rows(w, torch.eye(100), torch.full((16,), 3), 32, act_order=False, clip=clip)
    want = rtn.quantize_rows(w, 3, 32, clip=clip)
    assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and torch.equal(offset, want[2])


def test_gptq_levels_span_each_vector_by_default_and_clip_only_when_asked():
    x, h = _inputs(128, seed=5)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(6)) / 128**0.5
    w[:, 7] *= 12  # one outlying coordinate per vector, which an MSE-best range clips
    bits = torch.full((24,), 2)
    minmax = rtn.stored_params(*rtn.fit(w, 2, 0, clip=False))
    _, scale, offset = gptq.gptq_rows(w, h, bits, 0)
    assert torch.equal(scale, minmax[0]) and torch.equal(offset, minmax[1])
    _, scale_c, offset_c = gptq.gptq_rows(w, h, bits, 0, clip=True)
    top = (offset_c.float() + 3 * scale_c.float()).squeeze(1)
    assert bool((top < w.amax(1) - 1e-3).any())  # the clipped range leaves some vector's maximum outside
    _, uscale, uoffset = gptq.gptq_columns(w.T, h[:24, :24], bits, 0)
    assert torch.equal(uscale, minmax[0]) and torch.equal(uoffset, minmax[1])


def test_gptq_columns_give_one_row_of_codes_per_column_with_its_own_width():
    x, h = _inputs(40, seed=3)
    w = torch.randn(100, 40, generator=torch.Generator().manual_seed(6))
    bits = torch.tensor([8] * 2 + [3] * 8 + [2] * 30)
    codes, scale, offset = gptq.gptq_columns(w, h, bits, 32)
    assert codes.shape == (40, 100) and scale.shape == (40, 4)
    assert all(int(codes[i].max()) < 2 ** int(b) for i, b in enumerate(bits))
    got = rtn.dequantize(codes, scale, offset, 32).T  # (100, 40)
    plain = torch.cat([rtn.dequantize(*rtn.quantize_rows(w.T[i:i + 1], int(b), 32), 32) for i, b in enumerate(bits)]).T
    assert _out_err(w, got, x) < 0.9 * _out_err(w, plain, x)


def test_gptq_on_svd_factors_beats_rtn_on_the_layer_output():
    """A delta with a decaying spectrum, quantized 8/3/2 at 1 bit per entry: GPTQ (V then U, refits under H)
    has a lower output error ||(dW - dW_hat) X^T|| than round-to-nearest with the weight-space refit."""
    m, n = 160, 128
    g = torch.Generator().manual_seed(4)
    s_true = torch.arange(1, n + 1).float() ** -0.8
    delta = (torch.randn(m, n, generator=g) / m**0.5 * s_true) @ (torch.randn(n, n, generator=g) / n**0.5)
    x, h = _inputs(n, seed=5)
    groups = [BitGroup(8, 2), BitGroup(3, 8), BitGroup(2, 40)]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, s, v = u[:, :50], s[:50], vh[:50].T
    rtn_fg = factors.quantize_rtn(delta, u, s, v, groups, 32, refit=True)
    gptq_fg = quantize_gptq(delta, u, s, v, groups, h, 32)
    err_rtn = _out_err(delta, factors.reconstruct(rtn_fg, 32), x)
    err_gptq = _out_err(delta, factors.reconstruct(gptq_fg, 32), x)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # stored exactly like the RTN groups
    t_rtn, t_gptq = factors.to_tensors(rtn_fg), factors.to_tensors(gptq_fg)
    assert {k: v.shape for k, v in t_rtn.items()} == {k: v.shape for k, v in t_gptq.items()}


def _kernel_contract(calls):
    """A stand-in for the extension's ``gptq_block`` that keeps its contract (cuda/gptq_block.h) and checks what it
    is given: row-major float32 operands, w not written, only the block's columns of codes written."""

    def block(w, hinv, scale, offset, maxq, codes, start, width):
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (w, hinv, scale, offset, maxq, codes))
        assert w.shape == scale.shape == offset.shape == maxq.shape == codes.shape and hinv.shape == (w.shape[1],) * 2
        assert 1 <= width <= gptq.KERNEL_COLUMNS and start + width <= w.shape[1]
        calls.append((start, width))
        at = slice(start, start + width)
        before = codes.clone()
        q, err = gptq._block_step(w[:, at].clone(), hinv[at, at].clone(), scale[:, at], offset[:, at], maxq[:, at])
        codes[:, at] = q
        assert torch.equal(codes[:, :start], before[:, :start]) and torch.equal(codes[:, at.stop:], before[:, at.stop:])
        return err

    return block


@pytest.mark.parametrize("act_order", [True, False])
def test_the_block_kernel_path_gives_the_column_loop_s_codes(monkeypatch, act_order):
    """gptq_core's path through the extension's block step (emulated here on the CPU): the same codes as the column
    loop, for rows and columns, a partial last block, and a transposed (non-contiguous) input."""
    x, h = _inputs(300)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(300, 40, generator=g) / 300**0.5  # V (n, r): its rows of V^T are the vectors, a transposed view
    bits = torch.tensor([4, 3, 2, 2]).repeat(10)
    want_rows = gptq.gptq_rows(v.T, h, bits, 64, act_order=act_order)
    u = torch.randn(130, 40, generator=g)
    h_u = v.T @ h @ v
    want_cols = gptq.gptq_columns(u, h_u, bits, 32, act_order=act_order)
    calls = []
    monkeypatch.setattr(gptq, "_block_kernel", lambda w: _kernel_contract(calls))
    got_rows = gptq.gptq_rows(v.T, h, bits, 64, act_order=act_order)
    got_cols = gptq.gptq_columns(u, h_u, bits, 32, act_order=act_order)
    assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
    assert all(torch.equal(a, b) for a, b in zip(got_cols, want_cols))
    assert calls == [(0, 128), (128, 128), (256, 44), (0, 40)]
