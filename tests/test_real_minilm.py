"""The real pair (all-MiniLM-L6-v2 and its SRE fine-tune) through the main job, ``deltacomp demo``."""

import pytest
import torch

from deltacomp.io.checkpoint import Checkpoint
from deltacomp.quality import encoder

pytestmark = pytest.mark.real


def test_behaviour_survives_compression(minilm_demo):
    q = minilm_demo["quality"]
    ft, ours = q["fine-tuned"], q["deltacomp mixed @ 1 bit"]
    assert abs(ours["behaviour"] - ft["behaviour"]) <= 0.02
    assert ours["behaviour"] - q["base"]["behaviour"] > 0.5  # the learned behaviour is really there
    assert ours["agreement"] >= 0.998


def test_budget_is_met_and_reported(minilm_demo):
    m = minilm_demo["manifest"]
    b, t = m["budget"], m["totals"]
    assert b["achieved_factor_bits_per_entry"] <= 1.0
    assert b["achieved_factor_bits_per_entry"] > 0.95  # the budget is used, not wasted
    assert 1.0 < b["achieved_all_in_bits_per_entry"] < 1.1  # scales, offsets and S beside it
    assert t["compressed_modules"] == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    for rec in m["modules"].values():
        if rec["action"] == "compress":
            assert rec["factor_bits_per_entry"] <= 1.0
    assert "ratio vs fp16 delta" in minilm_demo["output"]


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
