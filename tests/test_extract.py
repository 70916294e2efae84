"""Pairing tensors: what is compressed, stored exactly, added, removed or resized; clear mismatch errors."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from deltacomp.config import CompressConfig
from deltacomp.errors import MismatchError
from deltacomp.extract import is_compressible, plan
from deltacomp.io.checkpoint import Checkpoint


def _ckpt(folder, tensors, model_type="llama"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file(tensors, folder / "model.safetensors")
    return Checkpoint(folder)


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj.weight", True),  # Llama / Mistral / Qwen
    ("model.layers.3.mlp.down_proj.weight", True),
    ("encoder.layer.2.attention.self.query.weight", True),  # BERT
    ("encoder.layer.2.output.dense.weight", True),
    ("transformer.h.1.attn.c_attn.weight", True),  # GPT-2
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", True),  # Mixtral experts
    ("model.layers.0.block_sparse_moe.gate.weight", False),  # the router stays exact
    ("model.embed_tokens.weight", True),  # token tables are compressed too (row-sparse when that is smaller)
    ("lm_head.weight", True),
    ("model.layers.0.input_layernorm.weight", False),
    ("model.layers.0.self_attn.q_proj.bias", False),
])
def test_default_patterns(name, expected):
    assert is_compressible(name, (64, 64), torch.float32, CompressConfig()) is expected


def test_small_or_non_float_matrices_stay_exact():
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not is_compressible(name, (8, 64), torch.float32, CompressConfig())
    assert not is_compressible(name, (64, 64), torch.int8, CompressConfig())


def test_actions(tmp_path, caplog):
    w = torch.ones(32, 32)
    base = _ckpt(tmp_path / "b", {
        "model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(32),
        "model.embed_tokens.weight": torch.ones(10, 32), "position_ids": torch.arange(4),
    })
    ft = _ckpt(tmp_path / "f", {
        "model.layers.0.mlp.up_proj.weight": w * 2, "model.norm.weight": torch.ones(32),
        "model.embed_tokens.weight": torch.ones(12, 32), "extra.weight": torch.ones(3),
    })
    with caplog.at_level(logging.WARNING):
        actions = {e.name: e.action for e in plan(base, ft, CompressConfig())}
    assert actions == {
        "model.layers.0.mlp.up_proj.weight": "compress", "model.norm.weight": "exact",
        "model.embed_tokens.weight": "resized", "extra.weight": "added", "position_ids": "removed",
    }
    assert "vocabulary resized from [10, 32] to [12, 32]" in caplog.text


def test_dtype_change_between_int_and_float_is_refused(tmp_path):
    base = _ckpt(tmp_path / "b", {"a.weight": torch.ones(4, 4), "ids": torch.arange(3)})
    ft = _ckpt(tmp_path / "f", {"a.weight": torch.ones(4, 4), "ids": torch.arange(3).float()})
    with pytest.raises(MismatchError, match="ids: dtype differs, base torch.int64 vs fine-tuned torch.float32"):
        plan(base, ft, CompressConfig())


def test_float_precision_change_is_allowed(tmp_path):
    base = _ckpt(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": torch.ones(32, 32)})
    ft = _ckpt(tmp_path / "f", {"model.layers.0.mlp.up_proj.weight": torch.ones(32, 32).bfloat16()})
    assert [e.action for e in plan(base, ft, CompressConfig())] == ["compress"]
