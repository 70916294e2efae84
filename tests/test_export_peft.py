"""PEFT LoRA export: real PEFT loads it on the base and reproduces deltacomp's own reconstruction (apply).

Bounds: merged weights (PEFT ``merge_and_unload``) match the applied checkpoint to 1e-5 relative to each
tensor's largest entry (measured ~4e-7 on the tiny models, ~1e-7 on MiniLM); model outputs with the adapter
unmerged match the applied model to 1e-4 absolute (measured ~3e-6 on MiniLM hidden states of scale ~5).
"""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltacomp.apply import apply
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.export.peft import VLLM_MAX_RANKS, PeftExportConfig, export_peft, vllm_rank
from deltacomp.package.reader import reconstruct_delta
from deltacomp.package.store import DeltaPackage

WEIGHT_BOUND = 1e-5  # max |merged - applied| / max |applied|, per tensor
OUTPUT_BOUND = 1e-4  # max |PEFT output - applied output|


@pytest.fixture(scope="session")
def llama_pkg(llama_packages):
    return llama_packages(2.0)


@pytest.fixture(scope="session")
def llama_applied(llama_pkg, llama_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_llama_applied") / "model"
    apply(llama_pkg, llama_pair[0], out, progress=False)
    return out


def _load(cls_name, path):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path).eval()


def _peft(cls_name, base_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(cls_name, base_dir), adapter_dir).eval()


def _worst_weight_diff(merged, reference) -> float:
    got, want = merged.state_dict(), reference.state_dict()
    assert set(want) <= set(got)
    worst = 0.0
    for k, w in want.items():
        if w.is_floating_point():
            worst = max(worst, float((got[k] - w).abs().max() / w.abs().max().clamp_min(1e-12)))
    return worst


def test_peft_reproduces_apply_on_tiny_llama(llama_pkg, llama_pair, llama_applied, tmp_path):
    base, _, _ = llama_pair
    summary = export_peft(llama_pkg, tmp_path / "adapter", base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["lora_alpha"] == config["r"] == summary["r"] == max(summary["ranks"].values())
    assert config["alpha_pattern"] == config["rank_pattern"] and config["rank_pattern"]  # GQA: k/v ranks differ
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert "model.norm" in config["modules_to_save"] and not config["lora_bias"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card

    model = _peft("LlamaForCausalLM", base, tmp_path / "adapter")
    reference = _load("LlamaForCausalLM", llama_applied)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
    assert diff < OUTPUT_BOUND
    assert _worst_weight_diff(model.merge_and_unload(), reference) < WEIGHT_BOUND


def test_factors_multiply_to_the_stored_delta(llama_pkg, llama_pair, tmp_path):
    export_peft(llama_pkg, tmp_path / "adapter", llama_pair[0])
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pkg = DeltaPackage(llama_pkg)
    for name, rec in pkg.modules.items():
        if rec["action"] != "compress":
            continue
        module = name.removesuffix(".weight")
        a = tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, in)
        b = tensors[f"base_model.model.{module}.lora_B.weight"]  # (out, r)
        want = reconstruct_delta(pkg, name)
        assert a.shape[1] == want.shape[1] and b.shape[0] == want.shape[0]
        assert float((b @ a - want).abs().max()) <= 1e-5 * float(want.abs().max())
        # sqrt(S) on each side: the two factors carry comparable magnitudes
        ratio = float(b.norm() / a.norm())
        assert 0.2 < ratio < 5, (name, ratio)


def test_bert_bias_deltas_and_full_modules(bert_pair, tmp_path):
    base, ft, _ = bert_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(bits=2.0), progress=False)
    apply(tmp_path / "pkg", base, tmp_path / "applied", progress=False)
    export_peft(tmp_path / "pkg", tmp_path / "adapter", base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION"  # CAUSAL_LM would break PEFT on an encoder
    assert config["lora_bias"] is True and "pooler.dense" in config["modules_to_save"]
    model = _peft("BertModel", base, tmp_path / "adapter")
    reference = _load("BertModel", tmp_path / "applied")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(input_ids=ids).last_hidden_state - reference(input_ids=ids).last_hidden_state).abs().max()
    assert diff < OUTPUT_BOUND
    assert _worst_weight_diff(model.merge_and_unload(), reference) < WEIGHT_BOUND


@pytest.mark.real
def test_peft_reproduces_apply_on_real_minilm(minilm_pair, minilm_demo, tmp_path):
    from transformers import AutoTokenizer

    base, _ = minilm_pair
    summary = export_peft(minilm_demo["dir"] / "package", tmp_path / "adapter", base)
    assert summary["modules"] == 36 and "embeddings.word_embeddings" in summary["modules_to_save"]
    assert len(summary["bias_deltas"]) == 36  # the fine-tune moved every linear layer's bias
    model = _peft("BertModel", base, tmp_path / "adapter")
    reference = _load("BertModel", minilm_demo["dir"] / "model")
    tok = AutoTokenizer.from_pretrained(base)
    batch = tok(["pod keeps crashing", "CrashLoopBackOff", "disk pressure on the node"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        diff = (model(**batch).last_hidden_state - reference(**batch).last_hidden_state).abs().max()
    assert diff < OUTPUT_BOUND
    assert _worst_weight_diff(model.merge_and_unload(), reference) < WEIGHT_BOUND


def test_max_rank_keeps_the_best_truncation(llama_pkg, llama_pair, tmp_path):
    base, _, _ = llama_pair
    summary = export_peft(llama_pkg, tmp_path / "adapter", base, PeftExportConfig(max_rank=4))
    assert summary["r"] == 4 and set(summary["ranks"].values()) == {4}
    # the fine-tune's deltas have rank 4: cutting the package's factors to rank 4 keeps almost all of them
    assert summary["min_kept_energy"] > 0.99
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pkg = DeltaPackage(llama_pkg)
    name = "model.layers.0.mlp.down_proj.weight"
    full = reconstruct_delta(pkg, name)
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    got = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] @ \
        tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert float((got - best).abs().max()) <= 1e-4 * float(best.abs().max())
    _peft("LlamaForCausalLM", base, tmp_path / "adapter")  # PEFT loads the capped adapter


def test_full_rank_method_exports_a_truncated_svd_with_a_warning(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(method="bitdelta"), progress=False)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "pkg"), "-o", str(tmp_path / "adapter"), "--base",
                                 str(base), "--max-rank", "8"])
    assert r.exit_code == 0, r.output
    assert "bitdelta stores full-rank deltas" in r.stderr and "rank <= 8" in r.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
    model = _peft("LlamaForCausalLM", base, tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    pkg = DeltaPackage(tmp_path / "pkg")
    name = "model.layers.1.self_attn.q_proj.weight"
    full = reconstruct_delta(pkg, name)
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    from deltacomp.io.checkpoint import Checkpoint

    got = merged[name] - Checkpoint(base).read(name)
    assert float((got - best).abs().max()) <= 1e-4 * float(best.abs().max())


@pytest.fixture(scope="session")
def llama_vocab_pkg(llama_pair, tmp_path_factory):
    """A package whose fine-tune also changed the embeddings and the lm_head (full tensors)."""
    base, ft, _ = llama_pair
    tmp = tmp_path_factory.mktemp("peft_vocab")
    ft2 = tmp / "ft"
    shutil.copytree(ft, ft2)
    weights = load_file(ft2 / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key] + 1e-3 * torch.randn(weights[key].shape, generator=g)
    save_file(weights, ft2 / "model.safetensors", metadata={"format": "pt"})
    compress(base, ft2, tmp / "pkg", CompressConfig(bits=2.0), progress=False)
    return tmp / "pkg"


def test_embeddings_go_to_modules_to_save_for_peft(llama_vocab_pkg, llama_pair, tmp_path):
    base = llama_pair[0]
    summary = export_peft(llama_vocab_pkg, tmp_path / "adapter", base)
    assert {"model.embed_tokens", "lm_head"} <= set(summary["modules_to_save"])
    apply(llama_vocab_pkg, base, tmp_path / "applied", progress=False)
    model = _peft("LlamaForCausalLM", base, tmp_path / "adapter")
    assert _worst_weight_diff(model.merge_and_unload(), _load("LlamaForCausalLM", tmp_path / "applied")) \
        < WEIGHT_BOUND


def test_vllm_target_caps_rank_and_drops_full_tensors_with_a_warning(llama_vocab_pkg, llama_pair, tmp_path):
    out = tmp_path / "adapter"
    r = CliRunner().invoke(cli, ["export", str(llama_vocab_pkg), "-o", str(out), "--target", "vllm"])
    assert r.exit_code == 0, r.output
    warning = r.stderr
    assert "model.embed_tokens.weight" in warning and "lm_head.weight" in warning
    assert "full embedding/lm_head tensor" in warning and "model.norm.weight" in warning  # norms too
    assert "--max-lora-rank" in r.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["lora_bias"] is False
    assert config["r"] <= VLLM_MAX_RANKS[-1] and vllm_rank(config["r"]) in VLLM_MAX_RANKS
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    # vLLM loads no base: the export needs none; PEFT still loads it
    _peft("LlamaForCausalLM", llama_pair[0], out)


def test_vllm_rank_above_its_limit_is_refused(llama_pkg, tmp_path):
    r = CliRunner().invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "a"), "--target", "vllm",
                                 "--max-rank", "1024"])
    assert r.exit_code == 1 and "above what vLLM serves (512)" in r.output
    assert not (tmp_path / "a").exists()


def test_missing_base_is_asked_for_and_no_modules_to_save_works_without_it(llama_pkg, tmp_path):
    r = CliRunner().invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "a")])
    assert r.exit_code == 1 and "pass --base BASE" in r.output and "--no-modules-to-save" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    r = CliRunner().invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "a"), "--no-modules-to-save"])
    assert r.exit_code == 0, r.output
    assert "model.norm.weight" in r.stderr  # dropped, and said so
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["target_modules"][0].startswith("model.layers.")


def test_wrong_base_is_refused(llama_pkg, bert_pair, tmp_path):
    r = CliRunner().invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "a"), "--base", str(bert_pair[0])])
    assert r.exit_code == 1 and "not the base this package was made from" in r.output


def test_bad_inputs(llama_pkg, llama_pair, tmp_path):
    runner = CliRunner()
    (tmp_path / "taken").mkdir()
    r = runner.invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "taken"), "--base", str(llama_pair[0])])
    assert r.exit_code == 1 and "already exists (pass --overwrite" in r.output
    r = runner.invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "taken"), "--base", str(llama_pair[0]),
                            "--overwrite", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    with safe_open(tmp_path / "taken" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    r = runner.invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "x"), "--format", "gguf"])
    assert r.exit_code == 2 and "'gguf' is not one of 'peft', 'merged'" in r.output
    r = runner.invoke(cli, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "no such package folder" in r.output
    r = runner.invoke(cli, ["export", str(llama_pkg), "-o", str(tmp_path / "x"), "--max-rank", "0"])
    assert r.exit_code == 1 and "--max-rank must be a positive rank" in r.output
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left
