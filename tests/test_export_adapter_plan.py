"""Where each tensor of a package goes in a LoRA adapter, and what an adapter cannot express."""

import pytest

from deltacomp.errors import DeltacompError
from deltacomp.export.adapter_plan import is_embedding_like, plan_adapter


def rec(action, shape=(8, 8), dtype="F32"):
    return {"action": action, "shape": list(shape), "dtype": dtype}


MODULES = {
    "layers.0.q.weight": rec("compress"),
    "layers.0.q.bias": rec("exact", (8,)),
    "layers.0.norm.weight": rec("exact", (8,)),
    "embed.weight": rec("exact", (100, 8)),
    "embeddings.position_ids": rec("removed", (1, 64), "I64"),
}


def test_plan_sorts_tensors():
    plan = plan_adapter(MODULES)
    assert plan.lora == {"layers.0.q": "layers.0.q.weight"}
    assert plan.bias == {"layers.0.q": "layers.0.q.bias"}
    assert plan.save == {"layers.0.norm": {"layers.0.norm.weight"}, "embed": {"embed.weight"}}
    assert plan.ignored == ["embeddings.position_ids"] and not plan.dropped
    assert plan.needs_base() == ["layers.0.q.bias", "embed.weight", "layers.0.norm.weight"]


def test_lora_only_drops_everything_else_and_says_why():
    plan = plan_adapter(MODULES, lora_only=True)
    assert plan.lora and not plan.bias and not plan.save
    why = dict(plan.dropped)
    assert why["embed.weight"].startswith("full embedding/lm_head tensor")
    assert why["layers.0.norm.weight"].startswith("full tensor")
    assert why["layers.0.q.bias"].startswith("bias delta")


def test_no_full_modules_drops_them():
    plan = plan_adapter(MODULES, full_modules=False)
    assert not plan.save and {n for n, _ in plan.dropped} == {"layers.0.norm.weight", "embed.weight"}


@pytest.mark.parametrize("extra, words", [
    ({"new.weight": rec("added")}, "new.weight (a tensor the base does not have)"),
    ({"embed.weight": rec("resized", (120, 8))}, "embed.weight (a resized vocabulary)"),
    ({"layers.0.q.scale": rec("exact", (8,))}, "layers.0.q.scale (exact beside the compressed layers.0.q.weight)"),
    ({"layers.0.w.bias": rec("compress", (8, 8))}, "not the 2-D weight of a linear layer"),
])
def test_what_an_adapter_cannot_express_is_refused(extra, words):
    with pytest.raises(DeltacompError, match="use --format merged") as e:
        plan_adapter({**MODULES, **extra})
    assert words in str(e.value)


def test_removed_float_weight_is_dropped_with_a_reason():
    plan = plan_adapter({**MODULES, "old.weight": rec("removed")})
    assert dict(plan.dropped)["old.weight"].startswith("removed by the fine-tune")


def test_saved_module_may_not_hide_a_lora_target():
    # layers.0.p is a parameter of layers.0 itself: saving layers.0 whole would swallow its child layers.0.q
    with pytest.raises(DeltacompError, match="would hide the LoRA target layers.0.q"):
        plan_adapter({"layers.0.q.weight": rec("compress"), "layers.0.p": rec("exact", (8,))})


def test_embedding_names():
    assert is_embedding_like("model.embed_tokens") and is_embedding_like("lm_head")
    assert is_embedding_like("embeddings.word_embeddings") and is_embedding_like("transformer.wte")
    assert not is_embedding_like("embeddings.LayerNorm") and not is_embedding_like("model.norm")
