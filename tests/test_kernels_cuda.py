"""The CUDA dequant-matmul kernel against a float64 oracle and the pure-torch twin (skipped without a GPU).

Relative error bounds, against float64 products of the dequantized factors: float32 activations 1e-4, fp16 2e-3,
bf16 1e-2 (the output is rounded to the activation dtype). Every check draws fresh random inputs; the memory the
output lands in is filled with NaN first, so an element the kernel does not write fails the check.
"""

import dataclasses
import itertools

import pytest
import torch
from packed_cases import ALL_WIDTHS, oracle, random_module, rel_err

from deltacomp import native
from deltacomp.kernels import DeltaBank, base_delta_linear, delta_linear
from deltacomp.kernels.dispatch import FUSED_MAX_DELTAS, FUSED_MAX_ROWS
from deltacomp.kernels.reference import delta_linear_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BOUND = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(576, 1535), (1535, 576), (4096, 11008), (11008, 4096), (192, 33)]


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    ext = native.extension()  # raises a remembered build or load failure
    if ext is None:
        pytest.skip(f"the CUDA extension is not available: {native.status().reason}")


def _poison(shape, dtype):
    """Leave freed cached blocks of the output's size filled with NaN: the op's output (allocated next, from the
    same size class) starts as NaN, so an element the kernel does not write fails the check."""
    blobs = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for _ in range(4)]
    del blobs


def _check(table, rows, dtype, weights=None, index=None, seed=0, row_tile=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = DeltaBank.build(table).to("cuda")
    n, m = bank.in_features, sum(bank.out_features)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    y = (torch.randn(rows, m, device="cuda", generator=g) * 0.1).to(dtype)
    if index is not None:
        w = torch.nn.functional.one_hot(index.long(), bank.num_deltas).float()
    else:
        w = torch.ones(rows, bank.num_deltas, device="cuda") if weights is None else weights.float().expand(rows, -1)
    w = w.contiguous()
    _poison((rows, m), dtype)
    dispatch_tile = 1 if index is not None else 0  # what the dispatch point asks for
    out = torch.ops.deltacomp.delta_linear(x, y, w, *bank.tensors(), dispatch_tile if row_tile is None else row_tile)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == (rows, m)
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    if row_tile is None:
        assert rel_err(delta_linear(x, bank, y, weights=weights, index=index), out) < 1e-6  # the dispatch point
    want = oracle(x.cpu(), y.cpu(), w.cpu(), table)
    err = rel_err(out.cpu(), want)
    assert err < BOUND[dtype], f"relative error {err:.2e} over the bound {BOUND[dtype]:.0e}"
    twin = delta_linear_reference(x, y, w, *bank.tensors())
    assert rel_err(out, twin) < BOUND[dtype]
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group_size", [0, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_width_one_delta(shape, group_size, dtype):
    per_group = min(4, min(shape) // len(ALL_WIDTHS))
    mod = random_module(*shape, widths=ALL_WIDTHS, rank_per_group=per_group, group_size=group_size, seed=shape[0])
    for rows in (1, 3, 16, 33, 64):
        _check([[mod]], rows, dtype, seed=rows)


@pytest.mark.parametrize("bits", [(1, 1), (2, 2), (3, 3), (4, 4), (8, 8), (3, 1), (1, 8)])
def test_single_width_float32(bits):
    mod = random_module(1000, 777, widths=(bits,), rank_per_group=24, group_size=128, seed=bits[0])
    for rows in (1, 7, 64):
        _check([[mod]], rows, torch.float32, seed=rows)


def _gated_table(n, group_sizes=(0, 128, 0)):
    """Four projections of n inputs (q|k|v-like and one wider) over three deltas, some cells empty; delta d's rows in
    parameter groups of group_sizes[d] (0: one a row)."""
    return [[random_module(m, n, widths=ALL_WIDTHS[: 4 + p], group_size=gs, seed=10 * p + d) if (p + d) % 4 else None
             for d, gs in enumerate(group_sizes)] for p, m in enumerate((576, 192, 192, 1100))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_projections_and_gated_deltas(dtype):
    """q|k|v-like projections sharing one input, three deltas, per-row gate weights (some exactly zero)."""
    table = _gated_table(1535)
    for rows in (1, 5, 16, 40):
        w = torch.rand(rows, 3, device="cuda")
        w[::3, 1] = 0
        _check(table, rows, dtype, weights=w, seed=rows)


@pytest.mark.parametrize("row_tile", [1, 2, 4, 8, 5])
def test_row_tile_cap_changes_the_split_not_the_result(row_tile):
    table = [[random_module(700, 576, widths=ALL_WIDTHS, rank_per_group=3, group_size=gs, seed=d) for d, gs in
              enumerate((0, 128, 0))]]
    for rows in (3, 16, 33):
        w = torch.rand(rows, 3, device="cuda")
        w[1::2, 2] = 0
        _check(table, rows, torch.float16, weights=w, seed=rows, row_tile=row_tile)


def test_bank_built_from_gpu_tensors_equals_the_cpu_built_one():
    """Packed words already on the GPU (as a benchmark or a user may hold them) give the same bank, U by block column
    included, as the same words on the CPU."""
    mod = random_module(96, 64, seed=5)

    def side(p):
        return dataclasses.replace(p, words=p.words.cuda(), scale=p.scale.cuda(), offset=p.offset.cuda())

    on_gpu = dataclasses.replace(mod, groups=tuple(dataclasses.replace(g, u=side(g.u), v=side(g.v), s=g.s.cuda())
                                                   for g in mod.groups))
    cpu, gpu = DeltaBank.build([[mod]]), DeltaBank.build([[on_gpu]])
    assert cpu.col_len == gpu.col_len > 0
    for a, b in zip((*cpu.tensors(), *cpu.columns()), (*gpu.tensors(), *gpu.columns())):
        assert torch.equal(a, b.cpu())


def test_multi_tenant_sixteen_deltas():
    table = [[random_module(576, 576, widths=ALL_WIDTHS[:4], group_size=0, seed=d) for d in range(16)]]
    for rows in (16, 33):
        index = torch.randint(0, 16, (rows,), device="cuda")
        _check(table, rows, torch.bfloat16, index=index, seed=rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multi_tenant_every_width_ragged_input(dtype):
    """The multi-tenant plan (one-row tiles, each row on one of several deltas, its stage-1 CTAs walking their row's
    groups) over every width pair, both group sizes and an input length that ends in a partial block."""
    table = [[random_module(700, 1535, widths=ALL_WIDTHS, rank_per_group=5, group_size=(0, 128)[d % 2], seed=40 + d)
              for d in range(6)]]
    for rows in (6, 19):
        index = torch.randint(0, 6, (rows,), device="cuda")
        _check(table, rows, dtype, index=index, seed=rows)


def test_multi_tenant_longest_x_tile():
    """The multi-tenant plan at Llama-2-7B's down input (11,008) with enough groups that a CTA takes the whole input
    (one K slice): its x tile (352 blocks of 132 bytes, 46,464) beside the kernel's static tables passes 48 KB, so the
    launch needs the opt-in (without it, "kernel launch failed: invalid argument")."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, deltas = 16, 4
    groups = -(-3 * sms // (rows * deltas))  # of 32 rank rows a delta: the row tiles' groups fill 3 CTAs an SM
    table = [[random_module(256, 11008, widths=ALL_WIDTHS[2:4], rank_per_group=16 * groups, seed=60 + d)
              for d in range(deltas)]]
    _check(table, rows, torch.bfloat16, index=torch.arange(rows, device="cuda") % deltas, seed=7)


def test_cuda_graph_and_compile():
    mod = random_module(1024, 768, widths=ALL_WIDTHS, rank_per_group=5, group_size=128)
    bank = DeltaBank.build([[mod]]).to("cuda")
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    want = delta_linear(x, bank, y)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        delta_linear(x, bank, y)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = delta_linear(x, bank, y)
    x2 = torch.randn_like(x)
    x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static, delta_linear(x2, bank, y)) < 1e-6
    compiled = torch.compile(lambda a, b: delta_linear(a, bank, b), fullgraph=True)
    assert rel_err(compiled(x2, y), delta_linear(x2, bank, y)) < 1e-6
    assert rel_err(want, delta_linear(x2 * 0 + x2, bank, y)) > 0  # the inputs really changed


def _check_base(table, rows, dtype, weights=None, bias=True, seed=0):
    """The fused op (base product beside the delta's kernels) against the float64 oracle, the twin, and the base
    layer's product followed by the unfused op. Base weights are scaled so that the base and the deltas' parts of
    the output are of one size: the bound then covers both."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = DeltaBank.build(table).to("cuda")
    n, m = bank.in_features, sum(bank.out_features)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    base = [(torch.randn(o, n, device="cuda", generator=g) / n ** 0.5).to(dtype) for o in bank.out_features]
    b = (torch.randn(m, device="cuda", generator=g) * 0.1).to(dtype) if bias else None
    w = torch.ones(rows, bank.num_deltas, device="cuda") if weights is None else weights.float().expand(rows, -1)
    w = w.contiguous()
    _poison((rows, m), dtype)
    out = torch.ops.deltacomp.delta_linear_base(x, base, b, w, *bank.tensors())
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == (rows, m)
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    y = x.double() @ torch.cat(base).double().T + (b.double() if bias else 0)
    want = oracle(x.cpu(), y.cpu(), w.cpu(), table)
    err = rel_err(out.cpu(), want)
    assert err < BOUND[dtype], f"relative error {err:.2e} over the bound {BOUND[dtype]:.0e}"
    bounds = [0, *itertools.accumulate(bank.out_features)]  # the base layers' products, then the op
    y = torch.cat([torch.nn.functional.linear(x, t, None if b is None else b[lo:hi])
                   for t, lo, hi in zip(base, bounds, bounds[1:])], dim=1)
    unfused = delta_linear(x, bank, y, weights=w)
    assert rel_err(out, unfused) < BOUND[dtype]
    # With U by block column (the one-row kernel reads U from them where every segment qualifies): the same bound.
    _poison((rows, m), dtype)
    out_cols = torch.ops.deltacomp.delta_linear_base(x, base, b, w, *bank.base_op_args())
    assert torch.isfinite(out_cols).all(), "unwritten or non-finite outputs"
    err = rel_err(out_cols.cpu(), want)
    assert err < BOUND[dtype], f"with columns: relative error {err:.2e} over the bound {BOUND[dtype]:.0e}"
    fused = rows <= FUSED_MAX_ROWS and bank.num_deltas <= FUSED_MAX_DELTAS  # what the dispatch point runs
    assert rel_err(base_delta_linear(x, bank, base, b, weights=w), out_cols if fused else unfused) < 1e-6


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_base_product_fused_every_width(shape, dtype):
    mod = random_module(*shape, widths=ALL_WIDTHS, rank_per_group=min(4, min(shape) // len(ALL_WIDTHS)),
                        group_size=128 if shape[0] % 2 else 0, seed=shape[1])
    for rows in (1, 3, 8, 16, 33):
        _check_base([[mod]], rows, dtype, bias=rows % 2 == 1, seed=rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_base_product_fused_projections_and_gated_deltas(dtype):
    n = 1536
    table = _gated_table(n)
    for rows in (1, 5, 16):
        w = torch.rand(rows, 3, device="cuda")
        w[::3, 1] = 0
        _check_base(table, rows, dtype, weights=w, seed=rows)
    _check_base([[random_module(64, 44, widths=ALL_WIDTHS[:3])]], 2, dtype)  # rows of 88 bytes: no 16-byte loads
    # Every delta's rows of one parameter group: the one-row kernel takes U by block column, segment by segment over
    # the deltas in use (every one, the middle one alone, the outer two).
    plain = _gated_table(n, group_sizes=(0, 0, 0))
    assert DeltaBank.build(plain).col_len > 0
    for w in ([0.7, 0.2, 0.5], [0.0, 0.9, 0.0], [0.3, 0.0, 0.6]):
        _check_base(plain, 1, dtype, weights=torch.tensor([w], device="cuda"), seed=7)


def test_one_row_kernel_shared_memory_just_under_48_kb():
    """One row with U by block column where the kernel's dynamic shared memory (x, 36 floats a block of 32 inputs,
    then one slice's columns) is just under 48 KB: with its static shared memory the CTA passes 48 KB, so the launch
    needs the opt-in (counting the dynamic part alone, it failed with "invalid argument")."""
    col_bytes = 256 * 8 * 4  # 256 rank rows of 8-bit U: columns of 2,048 words
    n = (48 * 1024 - 1024 - col_bytes) // 144 * 32  # over 48 KB with any static part past 1 KB (the kernel's: 3 KB)
    mod = random_module(256, n, widths=[(8, 1)], rank_per_group=256, seed=5)
    assert DeltaBank.build([[mod]]).col_len * 4 == col_bytes
    for dtype in (torch.bfloat16, torch.float16):
        _check_base([[mod]], 1, dtype)


def test_one_row_kernel_uneven_shares_with_u_by_block_column():
    """One row over two projections of 16 * (5 * sms + sms // 5 + 1) outputs each, U by block column: gate|up's uneven
    shares (5.2 slices of 16 outputs a CTA on a GPU of 132 SMs: 5 or 6 a CTA, each CTA's columns of its own). Every
    output is written, with the oracle's value."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = 16 * (5 * sms + sms // 5 + 1)
    table = [[random_module(m, 512, widths=ALL_WIDTHS[:3], rank_per_group=8, seed=s)] for s in (1, 2)]
    assert DeltaBank.build(table).col_len > 0
    for dtype in (torch.bfloat16, torch.float16):
        _check_base(table, 1, dtype, seed=3)


def test_a_delta_alone_equals_its_one_hot_weight():
    """``DeltaBank.alone(d)`` (one-delta banks over the shared words, with U by block column where the rows have one
    parameter group) through the dispatch point against a one-hot weight on d over the whole bank."""
    n = 1536
    bank = DeltaBank.build(_gated_table(n)).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [(torch.randn(o, n, device="cuda", generator=g) / n ** 0.5).to(torch.bfloat16) for o in bank.out_features]
    assert bank.alone(0).col_len > 0 and bank.alone(1).col_len == 0  # delta 1 has groups of 128
    for rows in (1, 5):
        x = torch.randn(rows, n, device="cuda", generator=g).to(torch.bfloat16)
        for d in range(3):
            w = torch.nn.functional.one_hot(torch.full((rows,), d, device="cuda"), 3).float()
            want = base_delta_linear(x, bank, base, None, weights=w)
            assert rel_err(base_delta_linear(x, bank.alone(d), base, None), want) < BOUND[torch.bfloat16]


def test_base_product_empty_bank_and_graph_capture():
    empty = DeltaBank.build([[None]], out_features=[300], in_features=256).to("cuda")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16) / 16
    out = base_delta_linear(x, empty, [wt])
    assert rel_err(out, (x.double() @ wt.double().T)) < BOUND[torch.bfloat16]

    mod = random_module(1024, 768, widths=ALL_WIDTHS, rank_per_group=5, group_size=128)
    bank = DeltaBank.build([[mod]]).to("cuda")
    x = torch.randn(FUSED_MAX_ROWS, 768, device="cuda", dtype=torch.bfloat16)  # the fused path of the dispatch
    wt = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16) / 28
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        base_delta_linear(x, bank, [wt])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = base_delta_linear(x, bank, [wt])
    x2 = torch.randn_like(x)
    x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static, base_delta_linear(x2, bank, [wt])) < 1e-6
    compiled = torch.compile(lambda a: torch.ops.deltacomp.delta_linear_base(a, [wt], None, torch.ones(
        a.shape[0], 1, device="cuda"), *bank.tensors()), fullgraph=True)
    assert rel_err(compiled(x2), base_delta_linear(x2, bank, [wt])) < 1e-6


def test_base_product_counters_across_streams_and_graphs():
    """The fused op hands its first stage's results on through counters that each call leaves zero: calls of growing
    sizes, eager on two streams and replayed from two graphs in turn, all give the unfused result."""
    banks = [DeltaBank.build([[random_module(m, 512, widths=ALL_WIDTHS, rank_per_group=r, seed=m)]]).to("cuda")
             for m, r in ((256, 2), (640, 9))]
    weights = [torch.randn(b.out_features[0], 512, device="cuda", dtype=torch.float16) / 23 for b in banks]
    xs = [torch.randn(rows, 512, device="cuda", dtype=torch.float16) for rows in (1, 3)]

    def calls():
        return [torch.ops.deltacomp.delta_linear_base(x, [wt], None, torch.ones(x.shape[0], 1, device="cuda"),
                                                     *bank.tensors()) for x in xs for bank, wt in zip(banks, weights)]

    def unfused():
        return [delta_linear(x, bank, x @ wt.T) for x in xs for bank, wt in zip(banks, weights)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(calls())
        graphs.append(graph)
    for step in range(3):
        for x in xs:
            x.copy_(torch.randn_like(x))
        want = unfused()
        side.wait_stream(torch.cuda.current_stream())
        graphs[step % 2].replay()
        with torch.cuda.stream(side):
            side_outs = calls()
        eager = calls()
        torch.cuda.synchronize()
        for got in (outs[step % 2], side_outs, eager):
            assert max(rel_err(g, w) for g, w in zip(got, want)) < BOUND[torch.float16]


def test_extension_checks_name_the_numbers():
    mod = random_module(64, 48, widths=ALL_WIDTHS[:3])
    bank = DeltaBank.build([[mod]]).to("cuda")
    x = torch.randn(4, 48, device="cuda", dtype=torch.float16)
    y = torch.randn(5, 64, device="cuda", dtype=torch.float16)
    w = torch.ones(4, 1, device="cuda")
    with pytest.raises(RuntimeError, match="5"):
        torch.ops.deltacomp.delta_linear(x, y, w, *bank.tensors())
    with pytest.raises(RuntimeError, match="cpu|device"):
        torch.ops.deltacomp.delta_linear(x, y[:4], w.cpu(), *bank.tensors())
    with pytest.raises(RuntimeError, match="dtype|Float|Half"):
        torch.ops.deltacomp.delta_linear(x, y[:4].float(), w, *bank.tensors())
    wt = torch.randn(64, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="2 base weights for a bank of 1 projections"):
        torch.ops.deltacomp.delta_linear_base(x, [wt, wt], None, w, *bank.tensors())
    with pytest.raises(RuntimeError, match="base weight 0 has 47 columns but x has 48"):
        torch.ops.deltacomp.delta_linear_base(x, [wt[:, :47].contiguous()], None, w, *bank.tensors())
    with pytest.raises(RuntimeError, match="bias has 63 values for 64 outputs"):
        torch.ops.deltacomp.delta_linear_base(x, [wt], wt[:, 0][:63].contiguous(), w, *bank.tensors())
    with pytest.raises(RuntimeError, match="dtype|Float|Half"):
        torch.ops.deltacomp.delta_linear_base(x, [wt.float()], None, w, *bank.tensors())


@pytest.mark.parametrize("share", [True, False], ids=["siblings-shared", "siblings-alone"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 10)], ids=["fused-base", "base-then-delta"])
def test_attached_model_on_gpu_matches_cpu(llama_pair, llama_packages, shape, share):
    from transformers import LlamaForCausalLM

    from deltacomp.kernels import attach
    from deltacomp.package.store import DeltaPackage

    base_dir, _, _ = llama_pair
    pkg = DeltaPackage(llama_packages(1.0))
    ids = torch.randint(0, 256, shape)  # one token row runs the fused base product, 30 do not
    cpu = LlamaForCausalLM.from_pretrained(base_dir).eval()
    gpu = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to("cuda").eval()
    attach(cpu, [pkg], share_inputs=False)
    attach(gpu, [pkg], share_inputs=share)  # q|k|v and gate|up as one call of the op, or each layer alone
    with torch.no_grad():
        assert rel_err(gpu(ids.cuda()).logits.float().cpu(), cpu(ids).logits) < 2e-2
