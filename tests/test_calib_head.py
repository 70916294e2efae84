"""The output head's input moment, collected block by block, against the whole model's."""

import torch

from deltacomp.calib.head import head_moment
from deltacomp.io.checkpoint import Checkpoint


def test_head_moment_is_the_whole_models_final_hidden_moment(llama_tok):
    from transformers import AutoModelForCausalLM

    ft = llama_tok[1]
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 256, (12,), generator=g) for _ in range(5)] + [torch.randint(0, 256, (7,),
                                                                                             generator=g)]
    got = head_moment(Checkpoint(ft), samples)
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    xs = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, inp: xs.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for s in samples:
            model(input_ids=s[None])
    handle.remove()
    x = torch.cat(xs)  # (tokens, d)
    want = x.T @ x / x.shape[0]
    assert got.shape == (64, 64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_head_moment_of_an_encoder_is_none(bert_tok):
    assert head_moment(Checkpoint(bert_tok[1]), [torch.arange(1, 9)]) is None
