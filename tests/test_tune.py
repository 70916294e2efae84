"""``--tune``: the compressed model's S, scales and offsets fitted end to end, codes and sizes kept."""

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, calib_text
from safetensors.torch import load_file

from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.package.reader import compressed_names, is_row_sparse, packed_module
from deltacomp.package.store import DeltaPackage
from deltacomp.tune.fit import Objective, answer_weights, batches
from deltacomp.tune.student import TunedFactors


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("delta*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune_calib") / "calib.txt"
    path.write_text(calib_text(40))
    return path


@pytest.fixture(scope="module")
def packages(llama_tok, calib, tmp_path_factory):
    """The tiny Llama pair at 0.5 bit calibrated on ``calib``, untuned and tuned for 3 epochs."""
    base, ft, _ = llama_tok
    out = tmp_path_factory.mktemp("tune")
    made = {}
    for name, tune in (("plain", 0), ("tuned", 3)):
        made[name] = compress(base, ft, out / name, CompressConfig(bits=0.5, calib=str(calib), tune=tune),
                              progress=False)
    return out, made


def test_a_stored_delta_runs_unchanged_before_tuning_and_is_stored_back_bit_for_bit(packages):
    out, _ = packages
    pkg = DeltaPackage(out / "plain")
    stored = _tensors(out / "plain")
    names = [n for n in compressed_names(pkg) if not is_row_sparse(pkg, n)]
    assert names
    for name in names:
        packed = packed_module(pkg, name)
        factors = TunedFactors(packed, "cpu")
        x = torch.randn(5, packed.shape[1])
        want = x @ packed.dense().T
        with torch.no_grad():
            got = factors(x)
        assert (got - want).norm() <= 1e-5 * want.norm()
        for local, t in factors.stored().items():
            key = f"{name}/{local}"
            assert t.dtype == stored[key].dtype and torch.equal(t, stored[key]), key


def test_tuning_starts_from_the_compressed_model(llama_tok, calib, packages, tmp_path):
    """The loss the tuning reports before its first step is the untuned package's, applied to the base, against the
    fine-tune: the student holds the base's weights plus the stored deltas, and the teacher the fine-tune's."""
    from transformers import LlamaForCausalLM

    from deltacomp.apply import apply
    from deltacomp.calib.provider import load_calibration
    from deltacomp.io.checkpoint import Checkpoint
    from deltacomp.tune.fit import HOLD_OUT, Objective

    base, ft, _ = llama_tok
    out, made = packages
    config = CompressConfig(bits=0.5, calib=str(calib), tune=3)
    samples = load_calibration(config.groups.calibration, Checkpoint(ft), Checkpoint(base))[0]
    held = batches(samples[HOLD_OUT - 1::HOLD_OUT])
    apply(out / "plain", base, tmp_path / "applied")
    compressed = LlamaForCausalLM.from_pretrained(tmp_path / "applied").eval()
    teacher = LlamaForCausalLM.from_pretrained(ft).eval()
    want = Objective(teacher, True, held, "cpu").mean(compressed)
    assert made["tuned"]["tuning"]["loss_before"] == pytest.approx(want, rel=1e-3)
    assert Objective(teacher, True, held, "cpu").mean(teacher) < 1e-6 < want  # the measure tells them apart


def test_tuning_keeps_every_code_and_byte_and_lowers_the_held_out_loss(packages):
    out, made = packages
    plain, tuned = made["plain"], made["tuned"]
    assert {k: v for k, v in plain["modules"].items()} == tuned["modules"]  # ranks, widths, bytes
    assert plain["totals"]["package_tensor_bytes"] == tuned["totals"]["package_tensor_bytes"]
    report = tuned["tuning"]
    assert "tuning" not in plain
    pkg = DeltaPackage(out / "tuned")  # the schema check of the report included
    linear = [n for n in compressed_names(pkg) if not is_row_sparse(pkg, n)]
    assert report["matrices"] == len(linear) and report["held_out_samples"] == 5 and report["loss"] == "kl_top64"
    assert report["loss_after"] < report["loss_before"] and report["kept_epoch"] >= 1
    a, b = _tensors(out / "plain"), _tensors(out / "tuned")
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        if key.endswith(("/rows",)) or a[key].dtype == torch.int32:
            assert torch.equal(a[key], b[key]), key  # packed codes and row indices
        else:
            moved += not torch.equal(a[key], b[key])
            assert bool(torch.isfinite(b[key].float()).all())
    assert moved > 0
    r = CliRunner().invoke(cli, ["inspect", str(out / "tuned")])
    assert r.exit_code == 0 and f"tuned: S, scales and offsets of {len(linear)} matrices, 3 epochs" in r.output


def test_a_tuning_that_only_raises_the_held_out_loss_keeps_the_stored_factors(llama_tok, calib, packages, tmp_path):
    base, ft, _ = llama_tok
    out, _ = packages
    m = compress(base, ft, tmp_path / "p", CompressConfig(bits=0.5, calib=str(calib), tune=2, tune_lr=1.0),
                 progress=False)
    assert m["tuning"]["kept_epoch"] == 0 and m["tuning"]["loss_after"] == m["tuning"]["loss_before"]
    a, b = _tensors(out / "plain"), _tensors(tmp_path / "p")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_takes_the_tuned_results_without_tuning_again(llama_tok, calib, packages, tmp_path,
                                                                     monkeypatch):
    import deltacomp.compress as pipeline
    import deltacomp.tune.fit as fit

    base, ft, _ = llama_tok
    out, made = packages
    config = CompressConfig(bits=0.5, calib=str(calib), tune=3)
    real = pipeline._assemble

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        compress(base, ft, tmp_path / "p", config, progress=False)
    monkeypatch.setattr(pipeline, "_assemble", real)
    monkeypatch.setattr(fit, "build_skeleton", lambda *a, **k: pytest.fail("tuned a second time"))
    m = compress(base, ft, tmp_path / "p", config, progress=False, resume=True)
    assert m["tuning"] == made["tuned"]["tuning"]
    a, b = _tensors(out / "tuned"), _tensors(tmp_path / "p")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shared", [{}, {"budget_scope": "model", "sensitivity": True}])  # the latter: best's
def test_an_encoder_is_tuned_on_its_last_hidden_states(bert_tok, calib, tmp_path, shared):
    base, ft, _ = bert_tok
    m = compress(base, ft, tmp_path / "p", CompressConfig(bits=0.5, calib=str(calib), tune=2, **shared),
                 progress=False)
    t = m["tuning"]
    assert t["loss"] == "hidden_relative_mse" and t["matrices"] > 0 and t["loss_after"] <= t["loss_before"]


def test_batches_pad_each_sample_and_mask_the_padding():
    samples = [torch.arange(1, n + 1) for n in (3, 5, 2, 7, 1, 4, 6, 2, 3)]
    got = batches(samples)
    assert [len(ids) for ids, _ in got] == [8, 1]
    seen = [ids[i][mask[i].bool()] for ids, mask in got for i in range(len(ids))]
    assert all(torch.equal(a, b) for a, b in zip(seen, samples)) and len(seen) == len(samples)


def test_answer_weights_mark_the_positions_that_predict_an_answer_and_the_loss_counts_only_those(llama_tok):
    from transformers import AutoModelForCausalLM

    samples = [torch.arange(3, 3 + n) for n in (6, 4, 9)]
    weights = answer_weights(samples, [2, None, 8])
    assert len(weights) == 1 and weights[0].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 9,
                                                         [0, 0, 0, 0, 0, 0, 0, 1, 0]]
    model = AutoModelForCausalLM.from_pretrained(llama_tok[1]).eval().requires_grad_(False)
    plain = Objective(model, True, batches(samples), "cpu")
    weighted = Objective(model, True, batches(samples), "cpu", weights)
    none = Objective(model, True, batches(samples[1:2]) + batches(samples), "cpu",  # a batch without answers first
                     answer_weights(samples[1:2], [None]) + weights)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.05 * torch.randn_like(model.get_input_embeddings().weight))
        ids, mask = plain.data[0]
        per_token = plain._token_losses(plain._outputs(model, ids, mask), plain.targets[0])
    on = weights[0][mask.bool()].bool()
    assert weighted.loss(model, 0) == pytest.approx(float(per_token[on].mean()), rel=1e-5)
    assert plain.loss(model, 0) == pytest.approx(float(per_token.mean()), rel=1e-5)
    assert none.loss(model, 0) == 0.0 and none.mean(model) == pytest.approx(weighted.loss(model, 0), rel=1e-6)
    plain.balance(model, weights)  # the answers' and the other tokens' KL, each relative to its value now, half each
    assert plain.loss(model, 0) == pytest.approx(1.0, rel=1e-5)
    other = (mask.bool() & ~weights[0].bool())[mask.bool()]
    a, p = float(per_token[on].mean()), float(per_token[other].mean())
    want = (per_token[on] / a).sum() / (2 * on.sum()) + (per_token[other] / p).sum() / (2 * other.sum())
    assert float(want) == pytest.approx(1.0, rel=1e-5)
    held = Objective(model, True, batches(samples[:1]), "cpu")
    held.balance(model, answer_weights(samples[:1], [2]), shares=plain)  # the shares measured on the fit batches
    assert held.shares == plain.shares and held.by_tokens


def test_tuning_on_answers_and_auto_balance_chat_records_and_plain_text_is_refused(llama_tok, calib, tmp_path):
    import json

    base, ft, _ = llama_tok
    chats = tmp_path / "chat.jsonl"
    lines = calib_text(40).splitlines()
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant",
                                                                                      "content": b[:40]}]}) + "\n"
                             for a, b in zip(lines, lines[1:])))
    m = compress(base, ft, tmp_path / "p", CompressConfig(bits=0.5, calib=str(chats), tune=3, tune_on="answers"),
                 progress=False)
    t = m["tuning"]
    assert t["loss"] == "kl_top64_answers" and t["loss_after"] < t["loss_before"] and t["held_out_samples"] == 4
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "q"), "--calib", str(calib),
                                 "--tune", "2", "--tune-on", "answers"])
    assert_one_line_error(r, "--tune-on answers: no calibration sample has an answer")
    m = compress(base, ft, tmp_path / "b", CompressConfig(bits=0.5, calib=str(chats), tune=2), progress=False)
    t = m["tuning"]  # --tune-on auto: balanced; held out, measured with the training samples' shares: near 1 before
    assert t["loss"] == "kl_top64_balanced" and 0.5 < t["loss_before"] < 2 and t["loss_after"] <= t["loss_before"]
    assert not (tmp_path / "q").exists()
    with pytest.raises(DeltacompError, match="--tune-on must be one of auto, all, answers, balanced"):
        CompressConfig(calib=str(calib), tune=2, tune_on="prompts")


def test_tuning_needs_calibration_and_the_mixed_method(llama_pair, llama_tok, tmp_path):
    with pytest.raises(DeltacompError, match="--tune fits the compressed model"):
        CompressConfig(tune=2, calib=None)
    with pytest.raises(DeltacompError, match="whole number of epochs"):
        CompressConfig(tune=-1)
    base, ft, _ = llama_tok
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "a"), "--method", "reference",
                                 "--tune", "2"])
    assert_one_line_error(r, "--tune is for the mixed method only")
    base, ft, _ = llama_pair  # no tokenizer: the default text cannot be used
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "b"), "--tune", "2"])
    assert_one_line_error(r, "--tune needs calibration", "no tokenizer in")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("key, value", [("loss_after", -1.0), ("kept_epoch", "3"), ("loss", 7)])
def test_a_malformed_tuning_report_is_refused(packages, tmp_path, key, value):
    import json
    import shutil

    from deltacomp.errors import PackageError

    out, _ = packages
    shutil.copytree(out / "tuned", tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "deltacomp.json").read_text())
    manifest["tuning"][key] = value
    (tmp_path / "p" / "deltacomp.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=f"tuning.{key}"):
        DeltaPackage(tmp_path / "p")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_on_cuda_lowers_the_held_out_loss_and_writes_a_valid_package(llama_tok, calib, tmp_path):
    """On the GPU (whose compression may choose other bit groups than the CPU's: compared with nothing but itself)."""
    base, ft, _ = llama_tok
    m = compress(base, ft, tmp_path / "p", CompressConfig(bits=0.5, calib=str(calib), tune=3, device="cuda"),
                 progress=False)
    report = m["tuning"]
    assert report["loss_after"] < report["loss_before"] and report["held_out_samples"] == 5
    pkg = DeltaPackage(tmp_path / "p")  # the schema check of the report included
    linear = [n for n in compressed_names(pkg) if not is_row_sparse(pkg, n)]
    assert report["matrices"] == len(linear) > 0
    assert all(bool(torch.isfinite(t.float()).all()) for t in _tensors(tmp_path / "p").values())


@pytest.mark.parametrize("causal", [True, False])
def test_a_batch_in_slices_gives_the_same_loss_and_gradients_and_out_of_memory_slices_it(llama_tok, bert_tok,
                                                                                         causal, monkeypatch):
    from transformers import AutoModel, AutoModelForCausalLM

    from deltacomp.tune.fit import Objective

    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained((llama_tok if causal else bert_tok)[1])
    model.eval().requires_grad_(False)
    torch.manual_seed(0)
    samples = [torch.randint(3, 200, (n,)) for n in (9, 4, 7, 12, 5)]
    fit = Objective(model, causal, batches(samples), "cpu")  # the teacher: the model as it is
    weight = model.get_input_embeddings().weight
    weight.add_(0.05 * torch.randn_like(weight)).requires_grad_(True)  # the student: moved away from it

    def run(parts):
        fit.parts = parts
        weight.grad = None
        return fit.loss(model, 0, backward=True), weight.grad.clone()

    whole, grad = run(1)
    assert whole > 0
    for parts in (2, 3, 5, 9):
        loss, g = run(parts)
        assert loss == pytest.approx(whole, rel=1e-5) and torch.allclose(g, grad, rtol=1e-4, atol=1e-7)
    real, calls = fit._outputs, []

    def short_of_memory(*a):
        calls.append(fit.parts)
        if fit.parts < 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*a)

    monkeypatch.setattr(fit, "_outputs", short_of_memory)
    opt = torch.optim.SGD([weight], lr=0.0)
    fit.parts = 1
    assert fit.step(model, 0, opt) == pytest.approx(whole, rel=1e-5) and fit.parts == 4
    assert calls[:2] == [1, 2] and torch.allclose(weight.grad, grad, rtol=1e-4, atol=1e-7)
    fit.parts = 5
    monkeypatch.setattr(fit, "_outputs", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA oom")))
    with pytest.raises(DeltacompError, match="one calibration sample does not fit in GPU memory"):
        fit.step(model, 0, opt)


@pytest.mark.parametrize("group_size, length", [(0, 37), (16, 64), (16, 70)])
def test_the_dequantized_rows_and_their_gradients_match_autograd(group_size, length):
    from deltacomp.tune.student import _Dequant, _per_code

    g = torch.Generator().manual_seed(group_size + length)
    groups = 1 if group_size == 0 else -(-length // group_size)
    codes = torch.randint(0, 16, (5, length), generator=g, dtype=torch.uint8)
    scale, offset = (torch.randn(5, groups, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    weight = torch.randn(5, length, generator=g, dtype=torch.float64)
    want = codes.double() * _per_code(scale, group_size, length) + _per_code(offset, group_size, length)
    (ws, wo) = torch.autograd.grad((want * weight).sum(), (scale, offset))
    got = _Dequant.apply(codes, scale, offset, group_size)
    (gs, go) = torch.autograd.grad((got.double() * weight).sum(), (scale, offset))
    assert torch.allclose(got.double(), want, rtol=1e-6) and torch.allclose(gs, ws) and torch.allclose(go, wo)
