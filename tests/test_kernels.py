"""The delta bank and the dequant-matmul op's pure-torch twin (the CPU path and the CUDA kernel's oracle)."""

import pytest
import torch
from packed_cases import ALL_WIDTHS, oracle, random_module, rel_err

from deltacomp.errors import DeltacompError, MismatchError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.kernels import DeltaBank, attach, base_delta_linear, delta_linear, detach
from deltacomp.kernels.bank import DELTA, U_BITS, U_PARAMS, U_WORDS, V_BITS, V_PARAMS, V_WORDS
from deltacomp.kernels.reference import dequantize_rows
from deltacomp.package.reader import compressed_names, iter_weights, packed_module, reconstruct_delta
from deltacomp.package.store import DeltaPackage
from deltacomp.quality.weights import WeightSlots


@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_bank_rows_round_trip_exactly(group_size):
    mods = [random_module(100, 70, group_size=group_size, seed=s) for s in range(2)]
    bank = DeltaBank.build([mods])
    assert bank.rows.shape == (sum(m.rank for m in mods), 8)
    assert int((bank.rows[:, V_WORDS] % 4).abs().sum()) == 0 and int((bank.rows[:, U_WORDS] % 4).abs().sum()) == 0
    v = dequantize_rows(bank.v_words, bank.v_scale, bank.v_offset, bank.rows, (V_BITS, V_WORDS, V_PARAMS), 70)
    u = dequantize_rows(bank.u_words, bank.u_scale, bank.u_offset, bank.rows, (U_BITS, U_WORDS, U_PARAMS), 100)
    want_u, want_s, want_v = (torch.cat(t) for t in zip(*[(m.factors()[0].T, m.factors()[1], m.factors()[2].T)
                                                          for m in mods]))
    assert torch.equal(v, want_v) and torch.equal(u, want_u) and torch.equal(bank.s, want_s)


def test_bank_columns_hold_every_u_row_exactly(monkeypatch):
    """U by block column, a set per (projection, delta): each row's words of every block, at its column offset;
    desc and pair agree. Banks the kernel's column path cannot take whole have none."""
    one = DeltaBank.build([[random_module(300, 70, seed=1)], [random_module(33, 70, seed=2)], [None]],
                          out_features=[300, 33, 20])
    several = DeltaBank.build([[random_module(300, 70, seed=3), None, random_module(300, 70, seed=4)],
                               [random_module(33, 70, seed=5), random_module(33, 70, seed=6), None]])
    for bank in (one, several):
        k = bank.num_deltas
        cols, desc, pair, info = bank.columns()
        assert info.shape == (len(bank.projs) * k, 3) and bank.col_len == int(info[:, 1].max()) > 0
        for p, (_, _, _, out) in enumerate(bank.projs.tolist()):
            for d in range(k):
                start, length, flag = info[p * k + d].tolist()
                assert length % 4 == 0 and start % 4 == 0 and flag == 1
                j0, j1 = bank.spans[p, d].item(), bank.spans[p, d + 1].item()
                assert length == -(-int(bank.rows[j0:j1, U_BITS].sum()) // 4) * 4
                for j in range(j0, j1):
                    bits, woff, poff = (int(bank.rows[j, f]) for f in (U_BITS, U_WORDS, U_PARAMS))
                    assert int(desc[j]) & 15 == bits
                    col_off = int(desc[j]) >> 4
                    for b in range(-(-out // 32)):
                        got = cols[start + b * length + col_off:][:bits]
                        assert torch.equal(got, bank.u_words[woff + b * bits:][:bits]), (p, d, j, b)
                    halves = [bank.u_scale[poff], bank.u_offset[poff]]
                    assert int(pair[j]) & 0xFFFF == int(halves[0].view(torch.int16)) & 0xFFFF
                    assert (int(pair[j]) >> 16) & 0xFFFF == int(halves[1].view(torch.int16)) & 0xFFFF
    grouped = DeltaBank.build([[random_module(300, 70, group_size=128, seed=1)], [random_module(33, 70, seed=2)]])
    grouped_one = DeltaBank.build([[random_module(40, 30, seed=3), random_module(40, 30, group_size=32, seed=4)]])
    five = DeltaBank.build([[random_module(40, 30, seed=s) for s in range(5)]])  # more deltas than the fused op takes
    monkeypatch.setattr("deltacomp.kernels.bank.COLUMN_MAX_ROWS", 3)
    long = DeltaBank.build([[random_module(300, 70, seed=1)], [random_module(33, 70, seed=2)]])
    for none in (grouped, grouped_one, five, long):
        assert all(t.numel() == 0 for t in none.columns()[:3]) and none.col_len == 0


def test_bank_alone_is_the_one_hot_weight():
    """``alone(d)``: delta d's rows as a bank of one delta over the shared words and columns, each projection's
    column words those of a bank built from delta d alone; it computes what a one-hot weight on d does."""
    table = [[random_module(300, 70, seed=1), None, random_module(300, 70, seed=3)],
             [random_module(33, 70, seed=4), random_module(33, 70, seed=5), random_module(33, 70, seed=6)]]
    bank = DeltaBank.build(table)
    x, y = torch.randn(3, 70), torch.randn(3, 333)
    for d in range(3):
        one = bank.alone(d)
        assert one is bank.alone(d) and one.num_deltas == 1 and one.v_words.data_ptr() == bank.v_words.data_ptr()
        fresh = DeltaBank.build([[row[d]] for row in table], out_features=[300, 33])
        assert one.col_len == fresh.col_len > 0 and one.u_cols.data_ptr() == bank.u_cols.data_ptr()
        assert torch.equal(one.u_desc, fresh.u_desc) and torch.equal(one.u_pair, fresh.u_pair)
        for (start, length, flag), (fstart, flength, fflag), out in zip(one.u_colinfo.tolist(),
                                                                         fresh.u_colinfo.tolist(), fresh.out_features):
            words = length * -(-out // 32)
            assert (length, flag) == (flength, fflag)
            assert torch.equal(one.u_cols[start:start + words], fresh.u_cols[fstart:fstart + words])
        assert torch.equal(one.s, fresh.s) and torch.equal(one.projs, fresh.projs)
        w = torch.nn.functional.one_hot(torch.full((3,), d), 3).float()
        assert rel_err(delta_linear(x, one, y), delta_linear(x, bank, y, weights=w)) < 1e-6
    assert fresh.alone(0) is fresh
    with pytest.raises(DeltacompError, match="delta 3 of a bank of 3"):
        bank.alone(3)
    kept = bank.alone(0)
    assert bank.to("cpu").alone(0) is kept  # nothing moved
    assert bank.to(torch.float64).alone(0) is not kept  # moved or cast: made again


def test_bank_spans_index_each_deltas_rows():
    table = [[random_module(130, 300, seed=1), None, random_module(130, 300, seed=2)],
             [None, random_module(64, 300, seed=4), random_module(64, 300, seed=5)]]
    bank = DeltaBank.build(table)
    assert bank.spans.shape == (2, 4)
    for p, (j0, j1, _, _) in enumerate(bank.projs.tolist()):
        spans = bank.spans[p].tolist()
        assert spans[0] == j0 and spans[-1] == j1 and spans == sorted(spans)
        for d in range(3):
            assert bank.rows[spans[d]:spans[d + 1], DELTA].eq(d).all()
            assert spans[d + 1] - spans[d] == (table[p][d].rank if table[p][d] is not None else 0)


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("group_size", [0, 128])
def test_twin_matches_dense_product(rows, group_size):
    g = torch.Generator().manual_seed(rows)
    table = [[random_module(130, 300, group_size=group_size, seed=1), None, random_module(130, 300, seed=2)],
             [random_module(64, 300, widths=ALL_WIDTHS[:3], seed=3), random_module(64, 300, seed=4), None]]
    bank = DeltaBank.build(table)
    x, y = torch.randn(rows, 300, generator=g), torch.randn(rows, 194, generator=g)
    w = torch.rand(rows, 3, generator=g)
    out = delta_linear(x, bank, y, weights=w)
    assert rel_err(out, oracle(x, y, w, table)) < 1e-6


def test_weights_forms_and_multi_tenant():
    mods = [random_module(48, 40, seed=s) for s in range(3)]
    bank = DeltaBank.build([mods])
    x = torch.randn(2, 4, 40)  # (B, T, n): leading dims are kept
    index = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    out = delta_linear(x, bank, index=index)
    assert out.shape == (2, 4, 48)
    for d in range(3):
        sel = index == d
        assert rel_err(out[sel], x[sel] @ mods[d].dense().T) < 1e-6
    both = delta_linear(x, bank, weights=torch.tensor([0.5, 0.0, 0.25]))
    want = x @ (0.5 * mods[0].dense() + 0.25 * mods[2].dense()).T
    assert rel_err(both, want) < 1e-6
    assert rel_err(delta_linear(x, bank), x @ sum(m.dense() for m in mods).T) < 1e-6


def test_dispatch_errors_name_the_numbers():
    bank = DeltaBank.build([[random_module(48, 40)]])
    with pytest.raises(DeltacompError, match="41 features; the delta bank expects 40"):
        delta_linear(torch.randn(3, 41), bank)
    with pytest.raises(DeltacompError, match="expected \\[3, 48\\]"):
        delta_linear(torch.randn(3, 40), bank, torch.randn(3, 47))
    with pytest.raises(DeltacompError, match="2 columns; the bank holds 1"):
        delta_linear(torch.randn(3, 40), bank, weights=torch.ones(2))
    with pytest.raises(DeltacompError, match="disagree on its output size"):
        DeltaBank.build([[random_module(48, 40), random_module(40, 40)]])


def test_gradients_match_finite_differences():
    mods = [random_module(12, 10, widths=ALL_WIDTHS[:3], rank_per_group=2, seed=s) for s in range(2)]
    bank = DeltaBank.build([mods])
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: delta_linear(a, bank, b, weights=c), (x, y, w))


def test_opcheck():
    mods = [random_module(40, 36, seed=s) for s in range(2)]
    bank = DeltaBank.build([mods, [None, random_module(20, 36, widths=ALL_WIDTHS[:5], seed=5)]])
    x, y, w = torch.randn(4, 36), torch.randn(4, 60), torch.rand(4, 2)
    torch.library.opcheck(torch.ops.deltacomp.delta_linear.default, (x, y, w, *bank.tensors()))


def test_compiles_with_fake_kernel():
    bank = DeltaBank.build([[random_module(40, 36)]])
    bank.cache_factors = False  # through the custom op (its fake kernel traces), not the CPU shortcut
    x, y = torch.randn(4, 36), torch.randn(4, 40)
    fn = torch.compile(lambda a, b: delta_linear(a, bank, b) * 2, backend="aot_eager", fullgraph=True)
    assert rel_err(fn(x, y), 2 * delta_linear(x, bank, y)) < 1e-6


def test_base_op_adds_the_base_product_to_the_twin():
    """``deltacomp::delta_linear_base`` = x @ cat(W)^T + bias + the deltas (float64 oracle), and opcheck passes."""
    table = [[random_module(40, 36, seed=1), random_module(40, 36, seed=2)],
             [None, random_module(20, 36, widths=ALL_WIDTHS[:5], seed=5)]]
    bank = DeltaBank.build(table)
    x, w = torch.randn(4, 36), torch.rand(4, 2)
    base, bias = [torch.randn(40, 36), torch.randn(20, 36)], torch.randn(60)
    out = torch.ops.deltacomp.delta_linear_base(x, base, bias, w, *bank.tensors())
    y = x.double() @ torch.cat(base).double().T + bias.double()
    assert rel_err(out, oracle(x, y, w, table)) < 1e-5
    torch.library.opcheck(torch.ops.deltacomp.delta_linear_base.default, (x, base, bias, w, *bank.tensors()))
    torch.library.opcheck(torch.ops.deltacomp.delta_linear_base.default, (x, base, None, w, *bank.tensors()))
    one = DeltaBank.build([[table[0][0]], [table[1][1]]])  # one delta: with U by block column
    args = (x, base, bias, w[:, :1].contiguous(), *one.base_op_args())
    assert one.col_len > 0
    assert torch.equal(torch.ops.deltacomp.delta_linear_base(*args),
                       torch.ops.deltacomp.delta_linear_base(*args[:14]))
    torch.library.opcheck(torch.ops.deltacomp.delta_linear_base.default, args)


def test_base_dispatch_matches_the_base_layer_plus_deltas():
    table = [[random_module(40, 36, seed=1)], [random_module(20, 36, widths=ALL_WIDTHS[:5], seed=2)]]
    bank = DeltaBank.build(table)
    x = torch.randn(2, 3, 36)
    base, bias = [torch.randn(40, 36), torch.randn(20, 36)], torch.randn(60)
    y = torch.nn.functional.linear(x, torch.cat(base), bias)
    assert rel_err(base_delta_linear(x, bank, base, bias), delta_linear(x, bank, y)) < 1e-6
    assert base_delta_linear(x, bank, base).shape == (2, 3, 60)
    with pytest.raises(DeltacompError, match=r"base weights \[\[40, 36\]\] do not match .* \[\[40, 36\], \[20, 36\]\]"):
        base_delta_linear(x, bank, base[:1])
    with pytest.raises(DeltacompError, match="35 features; the delta bank expects 36"):
        base_delta_linear(torch.randn(2, 35), bank, base)


def test_empty_bank_adds_nothing():
    bank = DeltaBank.build([[None]], out_features=[8], in_features=5)
    y = torch.randn(2, 8)
    assert torch.equal(delta_linear(torch.randn(2, 5), bank, y), y)


def test_attach_matches_apply(llama_pair, llama_packages):
    from transformers import LlamaForCausalLM

    base_dir, _, _ = llama_pair
    pkg = DeltaPackage(llama_packages(1.0))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    dense = LlamaForCausalLM.from_pretrained(base_dir).eval()
    WeightSlots(dense).load(iter_weights(pkg, Checkpoint(base_dir)))  # what ``deltacomp apply`` writes
    wrapped = attach(model, [pkg])
    assert len(wrapped) == len(compressed_names(pkg))
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert rel_err(got, want) < 1e-5
    with pytest.raises(MismatchError, match="already carries deltas"):
        attach(model, [pkg])
    assert detach(model) == len(wrapped)
    WeightSlots(model).load(Checkpoint(base_dir).items())  # detach leaves the stored tensors: put the base's back
    with torch.no_grad():
        base_logits = LlamaForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        assert rel_err(model(ids).logits, base_logits) < 1e-6


@pytest.mark.real
def test_twin_matches_apply_on_minilm(minilm_demo):
    pkg = DeltaPackage(minilm_demo["dir"] / "package")
    names = [n for n in compressed_names(pkg) if "rows" not in pkg.modules[n]]  # row-sparse: no packed view
    g = torch.Generator().manual_seed(0)
    for name in names[:: max(1, len(names) // 6)]:
        mod = packed_module(pkg, name)
        x = torch.randn(7, mod.shape[1], generator=g)
        want = x.double() @ reconstruct_delta(pkg, name).double().T
        assert rel_err(delta_linear(x, DeltaBank.build([[mod]])), want) < 1e-5, name


def test_cpu_path_keeps_dequantized_factors_and_matches_the_op():
    mods = [random_module(50, 40, seed=s) for s in range(2)]
    bank = DeltaBank.build([mods, [None, random_module(30, 40, widths=ALL_WIDTHS[:4], seed=9)]])
    x, y, w = torch.randn(6, 40), torch.randn(6, 80), torch.rand(6, 2)
    got = delta_linear(x, bank, y, weights=w)
    cached = bank.dequantized()
    assert bank.dequantized() is cached  # made once
    assert rel_err(got, torch.ops.deltacomp.delta_linear(x, y, w, *bank.tensors())) < 1e-6
    bank.cache_factors = False
    assert rel_err(delta_linear(x, bank, y, weights=w), got) < 1e-6
    bank.to(torch.float32)  # any move or cast drops the kept factors
    assert bank._factors is None
    bank.dequantized()
    bank.release_factors()
    assert bank._factors is None


def test_loader_remembers_why_and_raises_at_the_first_cuda_call(monkeypatch):
    import types

    from deltacomp import native

    monkeypatch.setattr(native, "_status", None)
    monkeypatch.delenv(native.JIT_ENV, raising=False)
    st = native.status()
    assert st.path == "twin" and "not built" in st.reason and native.extension() is None
    assert native.status() is st  # decided once

    old = types.SimpleNamespace(layout_version=lambda: 0, delta_linear=None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: old)
    assert native.status().path == "extension"  # found: no error at import or status time
    with pytest.raises(DeltacompError, match="reads bank layout 0; this deltacomp lays out layout 2"):
        native.extension()

    stale = types.SimpleNamespace(layout_version=lambda: 2, delta_linear=None)  # built before op_version existed
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: stale)
    with pytest.raises(DeltacompError, match="older sources than this deltacomp: rebuild"):
        native.extension()

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native.importlib, "import_module", broken)
    with pytest.raises(DeltacompError, match="does not load .*undefined symbol.*rebuild"):
        native.extension()


def test_doctor_reports_the_kernel_path():
    import json

    from click.testing import CliRunner

    from deltacomp.cli import cli

    r = CliRunner().invoke(cli, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["kernel_path"] in ("extension", "jit", "twin") and report["kernel_reason"]
    assert report["torch"] and "cuda_available" in report
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "kernel path:" in text and "GPUs:" in text
