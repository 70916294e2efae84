"""Quantized SVD factors: the refit lowers the error, stored tensors round-trip exactly."""

import torch

from deltacomp.lowrank.svd import svd
from deltacomp.quant import factors, packing
from deltacomp.quant.budget import BitGroup, fill_schedule, vector_cost
from deltacomp.quant.packed import packed_from_parts


def _delta(m=96, n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.8  # decaying spectrum
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    return (u * s) @ v.T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_refit_lowers_the_error():
    delta = _delta()
    groups = fill_schedule(*delta.shape, 2.0)
    u, s, v = svd(delta, sum(g.rank for g in groups))
    plain = factors.reconstruct(factors.quantize_rtn(delta, u, s, v, groups, 0, refit=False), 0)
    refit = factors.reconstruct(factors.quantize_rtn(delta, u, s, v, groups, 0, refit=True), 0)
    assert _rel(refit, delta) < _rel(plain, delta)
    assert _rel(refit, delta) < 0.5


def _packed(tensors, groups, group_size, shape):
    """The packed view of stored tensors, with the manifest info that describes them."""
    info = {"group_size": group_size, "groups": [{"bits": g.bits, "rank": g.rank, "v_bits": g.v_bits or g.bits}
                                                 for g in groups]}
    return packed_from_parts("m", tensors, info, shape)


def test_stored_tensors_round_trip_exactly():
    delta = _delta(seed=1)
    groups = fill_schedule(*delta.shape, 1.0)
    u, s, v = svd(delta, sum(g.rank for g in groups))
    fg = factors.quantize_rtn(delta, u, s, v, groups, 16)
    tensors = factors.to_tensors(fg)
    back = _packed(tensors, groups, 16, tuple(delta.shape))
    assert torch.equal(back.dense(), factors.reconstruct(fg, 16))
    for a, b in zip(fg, back.groups):
        assert torch.equal(a.u.codes, packing.unpack(b.u.words, b.u.bits, b.u.length))
        assert torch.equal(a.v.codes, packing.unpack(b.v.words, b.v.bits, b.v.length))


def test_uv_widths_round_trip_and_pack_each_factor_at_its_own_width():
    m, n = 96, 160
    delta = _delta(m, n, seed=3)
    groups = [BitGroup(4, 3, 2), BitGroup(3, 5, 1), BitGroup(2, 6)]
    u, s, v = svd(delta, 14)
    fg = factors.quantize_rtn(delta, u, s, v, groups, 32)
    assert [int(g.v.codes.max()) for g in fg] == [3, 1, 3]  # V's codes stay within V's width
    tensors = factors.to_tensors(fg)
    back = _packed(tensors, groups, 32, (m, n))
    assert [(g.u.bits, g.v.bits) for g in back.groups] == [(4, 2), (3, 1), (2, 2)]
    assert torch.equal(back.dense(), factors.reconstruct(fg, 32))
    payload = sum(t.numel() * 32 for k, t in tensors.items() if k.endswith((".u", ".v")))
    assert payload == sum(g.rank * vector_cost(g.bits, m, n, g.v_bits) for g in groups)


def test_packed_payload_matches_the_budget():
    delta = _delta(384, 1536, seed=2)
    groups = fill_schedule(384, 1536, 1.0)
    u, s, v = svd(delta, sum(g.rank for g in groups))
    tensors = factors.to_tensors(factors.quantize_rtn(delta, u, s, v, groups, 0))
    payload = sum(t.numel() * 32 for k, t in tensors.items() if k.endswith((".u", ".v")))
    assert payload <= 384 * 1536
