"""The plain reference: an exact SVD, the mixed method's schedule, min-max round-to-nearest per singular vector."""

import pytest
import torch

from deltacomp.config import EXCITATION_POWER, NOISE_WEIGHT, CompressConfig
from deltacomp.errors import BudgetError, DeltacompError
from deltacomp.methods import method_for
from deltacomp.methods.base import get_method
from deltacomp.methods.mixed import excitation_power, noise_weight
from deltacomp.quant import packing
from deltacomp.quant.budget import fill_schedule


def _delta(m=96, n=200, seed=0, decay=0.8):
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -decay
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    return (u * s) @ v.T * 0.01


def _compress(delta, bits, method="reference", **kw):
    m = get_method(method)
    c = m.compress(delta, CompressConfig(method=method, bits=bits, **kw))
    return c, m.reconstruct(c.tensors, c.info, tuple(delta.shape))


def _min_max(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One vector rounded to 2**bits levels between its min and max, scale and offset stored in fp16."""
    lo, hi = x.min(), x.max()
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    offset = lo.half().float()
    return torch.clamp(torch.round((x - offset) / scale), 0, 2**bits - 1) * scale + offset


def test_reference_is_the_svd_with_each_vector_rounded_between_its_min_and_max():
    delta = _delta()
    c, got = _compress(delta, 1.0)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    want, i = torch.zeros_like(delta), 0
    for g in fill_schedule(*delta.shape, 1.0):
        for _ in range(g.rank):
            want += s[i].half().float() * torch.outer(_min_max(u[:, i], g.bits), _min_max(vh[i], g.bits))
            i += 1
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert c.info["group_size"] == 0 and not c.info["calibrated"]


@pytest.mark.parametrize("shape", [(96, 200), (576, 192), (64, 64)])
@pytest.mark.parametrize("bits", [1.0, 0.5, 0.25])
def test_reference_spends_the_mixed_schedule_and_its_bits(shape, bits):
    """The same vectors at the same widths as ``mixed`` at that budget: equal factor bits, so neither row of a
    table wins by spending more."""
    delta = _delta(*shape)
    try:
        want = [(g.bits, g.rank) for g in fill_schedule(*shape, bits)]
    except BudgetError:
        with pytest.raises(BudgetError):
            get_method("reference").check_budget(shape, CompressConfig(method="reference", bits=bits))
        return
    ref, _ = _compress(delta, bits)
    mixed, _ = _compress(delta, bits, "mixed", allocation="schedule")
    assert [(g["bits"], g["rank"]) for g in ref.info["groups"]] == want
    assert ref.factor_bits == mixed.factor_bits <= bits * delta.numel()


def test_reference_error_is_within_the_min_max_bound():
    """Every entry of a min-max rounded vector is within one step of its value (half a step of rounding, the
    rest for the fp16 scale and offset), so the error is at most the dropped singular values' part plus
    ``sum_i s_i (e_u + e_v + e_u e_v)`` with ``e = sqrt(length) * range / (2**bits - 1)``. A clipped range or a
    refit of U and S breaks this bound vector by vector."""
    for seed, decay in ((0, 0.8), (1, 0.3), (2, 1.5)):
        delta = _delta(seed=seed, decay=decay)
        for bits in (1.0, 0.5):
            _, got = _compress(delta, bits)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            bound, i = 0.0, 0
            for g in fill_schedule(*delta.shape, bits):
                for _ in range(g.rank):
                    e_u, e_v = (float(x.max() - x.min()) * len(x) ** 0.5 / (2**g.bits - 1) for x in (u[:, i], vh[i]))
                    bound += float(s[i]) * (e_u + e_v + e_u * e_v)
                    i += 1
            tail = float(s[i:].pow(2).sum().sqrt())
            err = float((got - delta).norm())
            assert tail < err <= tail + bound, (seed, bits)


def test_reference_reads_only_the_budget_and_the_schedule():
    with pytest.raises(DeltacompError, match="mixed method only, not by 'reference'"):
        method_for(CompressConfig(method="reference", calib="calib.txt"))
    with pytest.raises(DeltacompError, match="mixed method only, not 'reference'"):
        method_for(CompressConfig(method="reference", allocation="optimal", budget_scope="model"))
    with pytest.raises(DeltacompError, match="mixed method only, not 'reference'"):
        method_for(CompressConfig(method="reference", allocation="optimal"))
    with pytest.raises(DeltacompError, match="--range mse is for the mixed method only, not 'lowrank'"):
        method_for(CompressConfig(method="lowrank", vector_range="mse"))
    with pytest.raises(DeltacompError, match="--noise-weight is for the mixed method only, not 'reference'"):
        method_for(CompressConfig(method="reference", noise_weight=0.5))
    with pytest.raises(DeltacompError, match="--excitation-power is for the mixed method only, not 'bitdelta'"):
        method_for(CompressConfig(method="bitdelta", excitation_power=1))
    with pytest.raises(DeltacompError, match="--vocab-weights counts.head is for the mixed method only, not 'lowrank'"):
        method_for(CompressConfig(method="lowrank", vocab_weights="head"))
    method_for(CompressConfig(method="reference", vocab_weights="off"))  # auto and off: accepted by every method
    delta = _delta()
    plain, _ = _compress(delta, 1.0)
    asked, _ = _compress(delta, 1.0, group_size=32, refit=False)  # a mixed setting: no effect
    assert all(torch.equal(plain.tensors[k], asked.tensors[k]) for k in plain.tensors)
    short, _ = _compress(delta, 1.0, schedule=((4, 8), (2, None)))
    assert [(g["bits"], g["rank"]) for g in short.info["groups"]][0] == (4, 8)


def test_reference_package_round_trips(llama_pair, tmp_path):
    from deltacomp.apply import apply
    from deltacomp.compress import compress
    from deltacomp.io.checkpoint import Checkpoint
    from deltacomp.package.reader import reconstruct_delta
    from deltacomp.package.store import DeltaPackage

    base, ft, deltas = llama_pair
    manifest = compress(base, ft, tmp_path / "pkg", CompressConfig(method="reference", bits=1.0), progress=False)
    assert manifest["method"] == "reference" and manifest["budget"]["achieved_factor_bits_per_entry"] <= 1.0
    pkg = DeltaPackage(tmp_path / "pkg")  # checks the manifest against the method's layout and the tensors
    apply(tmp_path / "pkg", base, tmp_path / "model")
    b, f, out = Checkpoint(base), Checkpoint(ft), Checkpoint(tmp_path / "model")
    method = get_method("reference")
    for name in deltas:
        delta = f.read(name).float() - b.read(name).float()
        c = method.compress(delta, CompressConfig(method="reference", bits=1.0))
        want = method.reconstruct(c.tensors, c.info, tuple(delta.shape))
        assert torch.equal(reconstruct_delta(pkg, name), want), name
        assert torch.allclose(out.read(name) - b.read(name), want, atol=1e-6), name
        # the fine-tune's deltas have rank 4 and every vector is kept (at 8, 3 or 2 bits): only rounding is left
        assert c.info["rank"] >= 4 and float((want - delta).norm() / delta.norm()) < 0.5, name


def test_mixed_default_quantizer_on_the_schedule_is_the_reference():
    """mixed's default quantizer (min-max range, no refit) on the schedule is exactly the reference; ``--range mse``
    is not."""
    delta = _delta(seed=3)
    ref, _ = _compress(delta, 1.0)
    mixed, _ = _compress(delta, 1.0, method="mixed", allocation="schedule", svd="full")  # the default quantizer
    assert ref.tensors.keys() == mixed.tensors.keys()
    assert all(torch.equal(ref.tensors[k], mixed.tensors[k]) for k in ref.tensors)
    clipped, _ = _compress(delta, 1.0, method="mixed", vector_range="mse", allocation="schedule", svd="full")
    assert not all(torch.equal(ref.tensors[k], clipped.tensors[k]) for k in ref.tensors)


def test_optimal_allocation_keeps_the_chosen_range():
    """Under ``--allocation optimal`` the stored vectors are rounded with the range asked for (the allocator's
    error estimate uses it too): with minmax every stored V row reaches the lowest and the highest code."""
    delta = _delta(seed=4)
    c, got = _compress(delta, 1.0, method="mixed", allocation="optimal")
    _, clipped = _compress(delta, 1.0, method="mixed", vector_range="mse", allocation="optimal")
    for i, g in enumerate(c.info["groups"]):
        bits = g.get("v_bits", g["bits"])
        codes = packing.unpack(c.tensors[f"g{i}.v"], bits, delta.shape[1])
        assert int(codes.min(1).values.max()) == 0 and int(codes.max(1).values.min()) == (1 << bits) - 1
    assert not torch.equal(got, clipped)


@pytest.mark.parametrize("setting, read, default, heavier", [("noise_weight", noise_weight, NOISE_WEIGHT, 1.0),
                                                                ("excitation_power", excitation_power,
                                                                 EXCITATION_POWER, 2.0)])
def test_an_allocation_weight_defaults_to_its_constant_and_a_heavier_one_keeps_fewer_vectors(setting, read, default,
                                                                                                heavier):
    """The default is the module's constant (the same package as asking for it): noise weight 0.1, excitation power
    0; a heavier noise weight (1) or power (2) keeps fewer vectors."""
    assert read(CompressConfig()) == default < heavier
    assert read(CompressConfig(**{setting: 0.5})) == 0.5
    delta = _delta()
    plain, _ = _compress(delta, 1.0, method="mixed")
    asked, _ = _compress(delta, 1.0, method="mixed", **{setting: default})
    assert all(torch.equal(plain.tensors[k], asked.tensors[k]) for k in plain.tensors)
    heavy, _ = _compress(delta, 1.0, method="mixed", **{setting: heavier})
    assert heavy.info["rank"] < plain.info["rank"]
