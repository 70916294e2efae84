"""Output sensitivity (deltacomp.calib.sensitivity): the block-by-block gradients equal a full model's."""

import pytest
import torch

from deltacomp.calib.activations import LayerwiseHessians, find_blocks
from deltacomp.calib.sensitivity import output_sensitivity


@pytest.mark.parametrize("pair,auto", [("llama_pair", "AutoModelForCausalLM"), ("bert_pair", "AutoModel")])
def test_sensitivity_equals_a_full_backward(pair, auto, request):
    import transformers

    _, ft, deltas = request.getfixturevalue(pair)
    samples = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    got = output_sensitivity(LayerwiseHessians(ft, samples, set(deltas)))
    assert set(got) == set(deltas)
    assert all(w > 0 for w in got.values())
    assert abs(sum(got.values()) / len(got) - 1) < 1e-6  # divided by their mean

    # the oracle: the whole model, gradients at every linear output of -log p(y) with y drawn from the model's own
    # next-token distribution (a causal LM's head), or of r . (last block's output) (an encoder: no head)
    model = getattr(transformers, auto).from_pretrained(ft, attn_implementation="sdpa").eval()
    outputs, last = {}, {}
    for name, mod in model.named_modules():
        if name + ".weight" in deltas:
            mod.register_forward_hook(lambda m, i, o, key=name + ".weight": outputs.__setitem__(key, o))
    _, blocks = find_blocks(model)
    blocks[-1].register_forward_hook(lambda m, i, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = model(input_ids=torch.stack(samples))
    gen = torch.Generator().manual_seed(0)
    if hasattr(out, "logits"):
        logits = out.logits.float().reshape(-1, out.logits.shape[-1])
        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
        objective = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    else:
        objective = (last["h"] * torch.randn(last["h"].shape, generator=gen)).sum()
    names = list(outputs)
    grads = torch.autograd.grad(objective, [outputs[n] for n in names])
    want = {n: float(g.pow(2).mean(-1).mean()) for n, g in zip(names, grads)}
    mean = sum(want.values()) / len(want)
    for n in names:
        assert got[n] == pytest.approx(want[n] / mean, rel=1e-3), n


def test_sensitivity_takes_at_most_max_tokens(llama_pair, monkeypatch):
    """Only the first batches within MAX_TOKENS are run backwards (memory): a second batch past the cap changes
    nothing."""
    from deltacomp.calib import sensitivity

    _, ft, deltas = llama_pair
    first = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    more = [torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(9))]  # another length: a batch
    monkeypatch.setattr(sensitivity, "MAX_TOKENS", 32)
    a = output_sensitivity(LayerwiseHessians(ft, first, set(deltas)))
    b = output_sensitivity(LayerwiseHessians(ft, first + more, set(deltas)))
    assert a == b
