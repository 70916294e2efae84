"""The real pair (all-MiniLM-L6-v2 and its SRE fine-tune) through the main job, ``deltacomp demo``."""

import pytest
import torch

from deltacomp.io.checkpoint import Checkpoint
from deltacomp.quality import encoder

pytestmark = pytest.mark.real


def test_behaviour_survives_compression(minilm_demo):
    q = minilm_demo["quality"]
    ft, ours = q["fine-tuned"], q["rebuilt from the package"]
    assert abs(ours["behaviour"] - ft["behaviour"]) <= 0.02
    assert ours["behaviour"] - q["base"]["behaviour"] > 0.5  # the learned behaviour is really there
    assert ours["agreement"] >= 0.999  # on held-out sentences


def test_budget_is_met_and_reported(minilm_demo):
    m = minilm_demo["manifest"]
    b, t = m["budget"], m["totals"]
    assert b["achieved_factor_bits_per_entry"] <= 1.0
    # 6 layers x (q, k, v, attention out, intermediate, output), word and position embeddings
    assert t["compressed_modules"] == 38
    for rec in m["modules"].values():
        if rec["action"] == "compress":
            assert rec["factor_bits_per_entry"] <= 1.0
    word = m["modules"]["embeddings.word_embeddings.weight"]
    assert word["action"] == "compress" and 1000 < word["rows"] < 5000  # the tokens the fine-tune moved
    files = sum(p.stat().st_size for p in (minilm_demo["dir"] / "package").rglob("*") if p.is_file())
    assert t["package_bytes"] == files <= 4.5e6  # every file counted
    assert t["fp16_delta_bytes"] / files >= 10
    assert sum(t["bytes_by_kind"].values()) == files
    out = minilm_demo["output"]
    assert "smaller than the fp16 delta" in out and "held-out sentences" in out
    assert len(out.splitlines()) <= 25 and "bits/entry" not in out  # a screenful; no per-module table


def test_int64_buffer_only_in_the_base_is_dropped(minilm_demo, minilm_pair):
    m = minilm_demo["manifest"]
    assert m["modules"]["embeddings.position_ids"]["action"] == "removed"
    applied = Checkpoint(minilm_demo["dir"] / "model")
    assert "embeddings.position_ids" not in applied
    assert sorted(applied.keys()) == sorted(Checkpoint(minilm_pair[1]).keys())


def test_applied_model_loads_with_its_tokenizer(minilm_demo):
    tok, model = encoder.load(minilm_demo["dir"] / "model")
    e = encoder.embed(tok, model, ["kubectl rollout undo"])
    assert e.shape == (1, 384) and torch.isfinite(e).all()
