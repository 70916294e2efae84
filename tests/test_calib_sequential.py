"""Sequential calibration: the two streams stay in step (an exact student reproduces the plain Hessians), matrices
come in the model's call order, the fitted delta, bad option combinations, and the gain on the real MiniLM pair."""

import pytest
import torch
from click.testing import CliRunner
from conftest import calib_text as _text

from deltacomp.apply import apply
from deltacomp.calib.activations import LayerwiseHessians
from deltacomp.calib.sequential import SequentialCalibration, target_delta
from deltacomp.cli import cli
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage


def _samples():
    out = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return out + [torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(9))]


def _plain(ft, samples, names):
    got = {}
    for _, hs in LayerwiseHessians(ft, samples, names):
        got.update(hs)
    return got


def _close(a, b, tol=1e-4):
    return float((a - b).norm() / b.norm()) < tol


@pytest.mark.parametrize("pair", ["llama_pair", "bert_pair"])
def test_an_exact_student_follows_the_teacher(pair, request):
    """Given the true deltas, the student is the fine-tune: C = H_s = the plain Hessian, for every matrix."""
    base, ft, deltas = request.getfixturevalue(pair)
    b = Checkpoint(base)
    samples = _samples()
    want = _plain(Checkpoint(ft), samples, set(deltas))
    seq = SequentialCalibration(Checkpoint(ft), samples, set(deltas))
    assert sorted(seq.order) == sorted(want)
    for name in seq.order:
        h, c = seq.moments(name)
        assert _close(h, want[name]) and _close(c, want[name]), name
        seq.done(name, b.read(name), deltas[name].float())


def test_order_follows_the_calls_and_the_student_moves(llama_pair):
    base, ft, deltas = llama_pair
    b = Checkpoint(base)
    seq = SequentialCalibration(Checkpoint(ft), _samples(), set(deltas))
    block0 = [n.split(".layers.0.")[1].split(".")[1] for n in seq.order if ".layers.0." in n]
    assert set(block0[:3]) == {"q_proj", "k_proj", "v_proj"} and block0[3] == "o_proj"
    assert set(block0[4:6]) == {"gate_proj", "up_proj"} and block0[6] == "down_proj"
    layers = [int(n.split(".layers.")[1].split(".")[0]) for n in seq.order]
    assert layers == sorted(layers)
    first = seq.order[0]
    h, c = seq.moments(first)
    assert torch.allclose(h, c)  # nothing compressed upstream yet
    seq.done(first, b.read(first), torch.zeros_like(deltas[first]))  # the student keeps the base's q
    for name in seq.order[1:4]:
        h, c = seq.moments(name)
        seq.done(name, b.read(name), deltas[name].float())
    assert not _close(c, h, 1e-3)


def test_target_delta_is_the_delta_when_the_streams_agree_and_fits_the_outputs_otherwise():
    g = torch.Generator().manual_seed(0)
    wb, d = torch.randn(24, 16, generator=g), 0.1 * torch.randn(24, 16, generator=g)
    xt = torch.randn(400, 16, generator=g)
    h = xt.T @ xt / 400
    assert torch.allclose(target_delta(wb, wb + d, h, h, 1e-6), d, atol=1e-4)
    xs = xt @ (torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g))  # an upstream error a layer can undo
    hs, c = xs.T @ xs / 400, xt.T @ xs / 400
    y = xt @ (wb + d).T
    fitted = target_delta(wb, wb + d, hs, c, 1e-6)
    err = lambda dw: float((y - xs @ (wb + dw).T).norm())  # noqa: E731
    assert err(fitted) < 0.01 * err(d)


@pytest.mark.parametrize("extra,message", [
    ([], "--sequential needs calibration, and the default text cannot be used: no tokenizer in"),
    (["--calib", "none"], "give --calib"),
    (["--calib", "CALIB", "--seq-damp", "0"], "--seq-damp must be a positive"),
    (["--calib", "CALIB", "--calib-shrink", "2"], "--calib-shrink must be auto or in [0, 1]"),
])
def test_bad_sequential_options_are_one_line(extra, message, llama_pair, tmp_path):
    base, ft, _ = llama_pair
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(8))
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "pkg"), "--sequential",
                                 "--no-progress", *extra])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and message in r.output, r.output
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("pair,extra", [("llama_tok", []), ("bert_tok", []),
                                        ("llama_tok", ["--allocation", "optimal", "--budget-scope", "model"]),
                                        ("llama_tok", ["--calib-shrink", "0.5"])],
                         ids=["llama", "bert", "llama-model-scope", "llama-shrink"])
def test_compress_sequential_then_apply(pair, extra, request, tmp_path):
    """With --budget-scope model each matrix gets its share of the shared budget and its vectors are chosen again on
    its sequential target: the package stays within the model's budget, and every matrix keeps a vector (the
    shared allocation weighs errors by the inputs, so a matrix's weight error is not bounded there)."""
    base, ft, deltas = request.getfixturevalue(pair)
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(40))
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "pkg"), "--calib", str(calib),
                                 "--bits", "2", "--gptq-group-size", "32", "--sequential", "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    manifest = DeltaPackage(tmp_path / "pkg").manifest
    mods = {n: m for n, m in manifest["modules"].items() if m["action"] == "compress"}
    assert set(mods) == set(deltas) and all(m["info"]["calibrated"] for m in mods.values())
    assert manifest["settings"]["sequential"] and manifest["budget"]["achieved_factor_bits_per_entry"] <= 2.0
    apply(tmp_path / "pkg", base, tmp_path / "model")
    out, b = Checkpoint(tmp_path / "model"), Checkpoint(base)
    for name, d in deltas.items():
        assert mods[name]["info"]["rank"] >= 1
        if not extra:
            assert float(((out.read(name) - b.read(name)) - d).norm() / d.norm()) < 0.6, name


def test_sequential_beats_plain_calibration_on_the_real_pair(minilm_pair, tmp_path):
    """At 0.25 bit per entry, held-out agreement with the fine-tune: plain calibration 0.99783; sequential 0.99788
    with torch on 2 threads, 0.99794 on 1 (the result depends on the reduction order upstream of the fit's solve),
    0.99803 in BENCHMARKS.md."""
    from deltacomp.evaluate import EvalConfig, evaluate_packages
    from deltacomp.quality.texts import CALIB_SENTENCES, HELDOUT_SENTENCES

    base, ft = minilm_pair
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB_SENTENCES) + "\n")
    packages = []
    for label, extra in (("plain", []), ("sequential", ["--sequential"])):
        out = tmp_path / label
        r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(out), "--bits", "0.25", "--calib",
                                     str(calib), "--allocation", "optimal", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        packages.append((label, DeltaPackage(out), 0.0))
    rows = evaluate_packages(packages, Checkpoint(base), Checkpoint(ft),
                             EvalConfig(texts=HELDOUT_SENTENCES, compare=(), batch_size=64))["rows"]
    cos = {r["model"]: r["cos_mean"] for r in rows}
    assert cos["sequential"] > cos["plain"] + 2e-5, cos
