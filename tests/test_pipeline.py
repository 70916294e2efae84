"""compress -> inspect -> apply on tiny real transformers models (Llama with GQA, BERT, sharded checkpoints)."""

import json

import pytest
import torch
from click.testing import CliRunner

from deltacomp.apply import apply
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage


def _delta_error(ft_dir, out_dir, deltas):
    """Relative error of the rebuilt deltas, over all compressed matrices together."""
    ft, out = Checkpoint(ft_dir), Checkpoint(out_dir)
    err = sum(float((out.read(n) - ft.read(n)).pow(2).sum()) for n in deltas)
    return (err / sum(float(d.pow(2).sum()) for d in deltas.values())) ** 0.5


@pytest.mark.parametrize("pair", ["llama_pair", "bert_pair", "llama_sharded_pair"])
def test_known_rank_delta_round_trips(pair, request, tmp_path):
    base, ft, deltas = request.getfixturevalue(pair)
    # a rank-4 delta fits entirely in 8-bit vectors at this budget: recovered to 8-bit precision
    config = CompressConfig(bits=2.0, schedule=((8, 4), (2, None)), exact="full", calib="none")  # round to nearest
    manifest = compress(base, ft, tmp_path / "pkg", config)
    compressed = [n for n, m in manifest["modules"].items() if m["action"] == "compress"]
    assert sorted(compressed) == sorted(deltas)
    assert manifest["budget"]["achieved_factor_bits_per_entry"] <= 2.0

    apply(tmp_path / "pkg", base, tmp_path / "model")
    ft_ckpt, out = Checkpoint(ft), Checkpoint(tmp_path / "model")
    assert sorted(out.keys()) == sorted(ft_ckpt.keys())
    for name in deltas:
        got = out.read(name) - Checkpoint(base).read(name)
        assert float((got - deltas[name]).norm() / deltas[name].norm()) < 0.01, name
    for name in ft_ckpt.keys():
        if name not in deltas:  # everything else is stored exactly or unchanged
            assert torch.equal(out.read(name), ft_ckpt.read(name)), name


def test_applied_llama_loads_and_matches_the_finetune(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ft, _ = llama_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(bits=2.0, schedule=((8, 4), (2, None))))
    apply(tmp_path / "pkg", base, tmp_path / "model")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(ft).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()(ids).logits
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())


def test_applied_bert_loads_with_automodel(bert_pair, tmp_path):
    from transformers import AutoModel

    base, ft, _ = bert_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig())
    apply(tmp_path / "pkg", base, tmp_path / "model")
    model = AutoModel.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "bert"


@pytest.mark.parametrize("method", ["mixed", "lowrank", "bitdelta", "dense"])
def test_every_method_through_the_cli(method, llama_pair, tmp_path):
    base, ft, deltas = llama_pair
    runner = CliRunner()
    r = runner.invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "pkg"), "--method", method,
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["inspect", str(tmp_path / "pkg"), "--json"])
    manifest = json.loads(r.output)
    assert manifest["method"] == method
    bound = 16.0 if method == "dense" else 1.0
    assert manifest["budget"]["achieved_factor_bits_per_entry"] <= bound
    r = runner.invoke(cli, ["apply", str(tmp_path / "pkg"), "--base", str(base), "-o", str(tmp_path / "model"),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    err = _delta_error(ft, tmp_path / "model", deltas)
    # 64 x 64 matrices at 1 bit: mixed holds the rank-4 delta at 8/8/3/3 bits, lowrank keeps rank 2 of 4
    assert err < {"dense": 1e-3, "mixed": 0.2, "lowrank": 0.75, "bitdelta": 0.75}[method]


def test_manifest_and_card(llama_sharded_pair, tmp_path):
    base, ft, _ = llama_sharded_pair
    config = CompressConfig(max_shard_bytes=2_000)
    manifest = compress(base, ft, tmp_path / "pkg", config)
    pkg = DeltaPackage(tmp_path / "pkg")
    assert pkg.manifest == manifest
    assert manifest["format_version"] == 3 and manifest["settings"]["bits"] == 1.0
    assert manifest["base"]["fingerprint"].startswith("sha256:")
    shards = [f for f in manifest["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and "delta.safetensors.index.json" in manifest["files"]
    assert "model/config.json" in manifest["files"]  # differs from the base's: stored
    assert "generation_config.json" in manifest["base_files"]  # the base's, byte for byte: not stored
    assert "model/generation_config.json" not in manifest["files"]
    assert manifest["totals"]["ratio_vs_finetuned"] > 1
    card = (tmp_path / "pkg" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: deltacomp" in card
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "pkg")]).output
    assert "model.layers.0.self_attn.q_proj.weight" in text and "smaller than the fp16 delta" in text


def test_progress_bar_on_request(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "p"), "--progress"])
    assert r.exit_code == 0 and "compress:" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_requested_without_a_gpu(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "p"), "--device", "cuda"])
    assert r.exit_code == 1 and "no CUDA GPU is available" in r.output
    assert not (tmp_path / "p").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_svd_on_the_gpu_matches_the_cpu(llama_pair, tmp_path):
    base, ft, deltas = llama_pair
    config = dict(bits=2.0, schedule=((8, 4), (2, None)))
    compress(base, ft, tmp_path / "cpu", CompressConfig(**config))
    compress(base, ft, tmp_path / "gpu", CompressConfig(device="cuda", **config))
    for d in ("cpu", "gpu"):
        apply(tmp_path / d, base, tmp_path / f"{d}-model")
    assert _delta_error(ft, tmp_path / "gpu-model", deltas) < 0.01


def test_exact_tensors_as_fp16_deltas(bert_pair, tmp_path):
    from transformers import AutoModel

    base, ft, _ = bert_pair
    full = compress(base, ft, tmp_path / "full", CompressConfig(exact="full"))
    half = compress(base, ft, tmp_path / "half", CompressConfig())  # fp16-delta is the default
    exact = [n for n, m in half["modules"].items() if m["action"] == "exact"]
    assert exact and all(half["modules"][n]["encoding"] == "fp16-delta" for n in exact)
    assert sum(half["modules"][n]["bytes"] for n in exact) * 2 == sum(full["modules"][n]["bytes"] for n in exact)
    apply(tmp_path / "half", base, tmp_path / "model")
    b, f, out = Checkpoint(base), Checkpoint(ft), Checkpoint(tmp_path / "model")
    for n in exact:
        delta = f.read(n) - b.read(n)
        assert out.read(n).dtype == f.read(n).dtype
        assert float((out.read(n) - f.read(n)).abs().max()) <= 1e-3 * float(delta.abs().max()) + 1e-7, n
    AutoModel.from_pretrained(tmp_path / "model")


def test_peft_export_decodes_fp16_deltas(bert_pair, tmp_path):
    from safetensors.torch import load_file

    from deltacomp.export.peft import export_peft

    base, ft, _ = bert_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(exact="fp16-delta"))
    export_peft(tmp_path / "pkg", tmp_path / "adapter", base)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = "encoder.layer.0.attention.output.LayerNorm.weight"  # under modules_to_save: the decoded weight
    assert float((saved["base_model.model." + name] - Checkpoint(ft).read(name)).abs().max()) < 1e-5
