"""GPTQ's block step as one CUDA kernel (cuda/gptq_block.cu) against the same step through torch (skipped without a
GPU or without the extension).

The kernel rounds each operation once, as torch's column loop does; the column update's multiply-subtract may be
fused differently there, so a code may land on the other side of a rounding boundary: at most 1 in 1,000 codes
differ, and the layer's output error stays within 1% of the torch path's.
"""

import pytest
import torch

from deltacomp import native
from deltacomp.quant import gptq, rtn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ext():
    module = native.extension()  # raises a remembered build or load failure
    if module is None:
        pytest.skip(f"the CUDA extension is not available: {native.status().reason}")
    return module


@pytest.fixture
def torch_path(monkeypatch):
    """Run gptq through torch's eager column loop while the fixture is on."""
    def use(on: bool):
        monkeypatch.setattr(gptq, "USE_KERNEL", not on)
        monkeypatch.setattr(gptq, "USE_CUDA_GRAPHS", False)
    return use


def _problem(rows, cols, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(4 * cols, cols, device="cuda", generator=g) @ torch.randn(cols, cols, device="cuda", generator=g)
    h = x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, device="cuda", generator=g) / cols**0.5
    return x, h, w


def _out_err(w, w_q, x):
    return float(((w - w_q) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("rows,cols", [(300, 700), (1, 128), (65, 129)])
def test_kernel_rows_match_the_torch_step(ext, torch_path, rows, cols, act_order):
    x, h, w = _problem(rows, cols, seed=rows + cols)
    bits = torch.tensor([8, 4, 3, 2, 1], device="cuda").repeat(rows // 5 + 1)[:rows]
    runs = {}
    for on in (False, True):
        torch_path(on)
        runs[on] = gptq.gptq_rows(w, h, bits, 128, act_order=act_order)
    (codes, scale, offset), (want, scale_t, offset_t) = runs[False], runs[True]
    assert torch.equal(scale, scale_t) and torch.equal(offset, offset_t)
    assert bool((codes.long() <= (1 << bits.long()[:, None]) - 1).all())
    assert float((codes != want).float().mean()) <= 1e-3
    err = _out_err(w, rtn.dequantize(codes, scale, offset, 128), x)
    assert err == pytest.approx(_out_err(w, rtn.dequantize(want, scale_t, offset_t, 128), x), rel=1e-2)


def test_kernel_columns_match_the_torch_step(ext, torch_path):
    x, h, w = _problem(200, 160, seed=5)  # U (m, r): its 160 columns are the vectors, H (r, r)
    bits = torch.tensor([4, 3, 2, 2], device="cuda").repeat(40)
    runs = {}
    for on in (False, True):
        torch_path(on)
        runs[on] = gptq.gptq_columns(w, h, bits, 32)
    assert float((runs[False][0] != runs[True][0]).float().mean()) <= 1e-3


def test_kernel_writes_every_code_of_its_columns_and_no_other(ext):
    _, h, w = _problem(40, 300, seed=7)
    hinv = gptq._inverse_cholesky(h, 0.01).contiguous()
    scale, offset = torch.full_like(w, 0.01), torch.full_like(w, -0.05)
    maxq = torch.full_like(w, 15.0)
    codes = torch.full_like(w, float("nan"))
    err = ext.gptq_block(w, hinv, scale, offset, maxq, codes, 128, 100)
    assert err.shape == (40, 100) and bool(torch.isfinite(err).all())
    assert bool(torch.isfinite(codes[:, 128:228]).all()) and bool(torch.isnan(codes[:, :128]).all())
    assert bool(torch.isnan(codes[:, 228:]).all())
    assert bool(((codes[:, 128:228] >= 0) & (codes[:, 128:228] <= 15)).all())


def test_kernel_checks_name_the_numbers(ext):
    w = torch.zeros(8, 300, device="cuda")
    h = torch.eye(300, device="cuda")
    args = (torch.ones_like(w), torch.zeros_like(w), torch.ones_like(w), torch.zeros_like(w))
    with pytest.raises(RuntimeError, match="width must be 1 to 128, got 129"):
        ext.gptq_block(w, h, *args, 0, 129)
    with pytest.raises(RuntimeError, match=r"columns \[200, 328\) are not within w's 300"):
        ext.gptq_block(w, h, *args, 200, 128)
    with pytest.raises(RuntimeError, match=r"hinv must be \(300, 300\)"):
        ext.gptq_block(w, h[:299, :299].contiguous(), *args, 0, 128)
    with pytest.raises(RuntimeError, match="maxq must have w's shape"):
        ext.gptq_block(w, h, *args[:2], args[2][:4].contiguous(), args[3], 0, 128)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.gptq_block(w, h, args[0].half(), *args[1:], 0, 128)
