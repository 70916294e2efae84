"""Every method through the registry: equal budgets, error bounds, exact reconstruction of what is stored."""

import pytest
import torch

from deltacomp.config import CompressConfig
from deltacomp.errors import BudgetError, DeltacompError
from deltacomp.methods.base import get_method


def _delta(m=128, n=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -1.0
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    return (u * s) @ v.T * 0.01


def _rel(method, delta, bits):
    m = get_method(method)
    c = m.compress(delta, CompressConfig(method=method, bits=bits))
    hat = m.reconstruct(c.tensors, c.info, tuple(delta.shape))
    assert hat.shape == delta.shape
    return float((hat - delta).norm() / delta.norm()), c


@pytest.mark.parametrize("method", ["mixed", "reference", "lowrank", "bitdelta"])
def test_budgeted_methods_stay_within_the_budget(method):
    delta = _delta()
    _, c = _rel(method, delta, 1.0)
    assert c.factor_bits <= 1.0 * delta.numel()
    assert c.total_bits >= c.factor_bits


def test_dense_is_fp16_exact():
    delta = _delta()
    err, c = _rel("dense", delta, 1.0)
    assert err < 1e-3 and c.factor_bits == 16 * delta.numel()


def test_quality_order_at_equal_bytes():
    delta = _delta()
    errs = {m: _rel(m, delta, 1.0)[0] for m in ("mixed", "lowrank", "bitdelta")}
    assert errs["mixed"] < errs["lowrank"] < errs["bitdelta"]


def test_mixed_recovers_a_low_rank_delta():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(200, 4, generator=g) @ torch.randn(4, 300, generator=g) * 0.01
    m = get_method("mixed")
    c = m.compress(delta, CompressConfig(bits=1.0, schedule=((8, 4), (2, None))))
    hat = m.reconstruct(c.tensors, c.info, tuple(delta.shape))
    assert float((hat - delta).norm() / delta.norm()) < 0.01  # all of the rank-4 part at 8 bits
    assert c.info["groups"][0] == {"bits": 8, "rank": 4}


def test_budget_errors():
    with pytest.raises(BudgetError, match="bitdelta stores 1 bit"):
        get_method("bitdelta").check_budget((64, 64), CompressConfig(bits=0.5))
    with pytest.raises(BudgetError, match="too small"):
        get_method("mixed").check_budget((64, 64), CompressConfig(bits=0.01))
    with pytest.raises(DeltacompError, match="known methods: bitdelta, dense, lowrank, mixed, reference"):
        get_method("nope")


@pytest.mark.parametrize("allocation", ["optimal", "schedule"])
def test_mixed_row_weight_spends_the_budget_on_the_weighted_rows(allocation):
    from deltacomp.calib.context import MatrixContext

    g = torch.Generator().manual_seed(5)
    delta = torch.randn(256, 48, generator=g) * 0.01  # every direction as large: the plain SVD picks at random
    heavy = slice(0, 24)
    w = torch.full((256,), 0.05)
    w[heavy] = 1.0
    m = get_method("mixed")
    config = CompressConfig(bits=1.0, allocation=allocation)
    errs = {}
    for label, ctx in (("plain", None), ("weighted", MatrixContext(row_weight=w))):
        c = m.compress(delta, config, ctx)
        hat = m.reconstruct(c.tensors, c.info, tuple(delta.shape))
        assert c.factor_bits <= delta.numel()
        errs[label] = (float((hat - delta)[heavy].norm() / delta[heavy].norm()),
                       float((hat - delta).norm() / delta.norm()))
    assert errs["weighted"][0] < 0.8 * errs["plain"][0]  # the weighted rows are kept far better
    assert errs["weighted"][1] < 1.0  # and U S is the plain delta's projection: the rest is not made worse than 0


def test_mixed_calibrated_takes_v_from_the_allocations_sweep_with_the_same_result(monkeypatch):
    """Calibrated, the factors take V's GPTQ rows from the allocation's sweep (an 8-bit V width, which the sweep
    does not quantize, on its own): the same package as quantizing V again."""
    from deltacomp.calib.context import MatrixContext
    from deltacomp.quant import allocate

    g = torch.Generator().manual_seed(3)
    delta = _delta(160, 256)
    x = torch.randn(1024, 256, generator=g) * torch.arange(1, 257).float() ** -0.7
    ctx = MatrixContext(hessian=x.T @ x / len(x))
    m = get_method("mixed")
    config = CompressConfig(bits=4.0, allocation="optimal", gptq_group_size=64)
    reused = m.compress(delta, config, ctx)
    assert any(grp.get("v_bits", grp["bits"]) == 8 for grp in reused.info["groups"])
    assert any(grp.get("v_bits", grp["bits"]) < 8 for grp in reused.info["groups"])
    plain = allocate.candidates

    def not_reused(*args, **kwargs):  # rows that the factors do not take: V quantized again
        c = plain(*args, **kwargs)
        c.v_gptq = not c.v_gptq
        return c
    monkeypatch.setattr(allocate, "candidates", not_reused)
    again = m.compress(delta, config, ctx)
    assert reused.info == again.info and reused.tensors.keys() == again.tensors.keys()
    for key, t in reused.tensors.items():
        assert torch.equal(t, again.tensors[key]), key
