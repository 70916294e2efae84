"""The output head's input moment, collected block by block, against the whole model's."""

import torch

from deltacomp.calib.head import head_moment, walk_moment
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


def test_head_moment_takes_a_walk_on_from_the_block_it_reached(llama_tok):
    """The calibration's walk, stopped after the first block (the last one with a wanted matrix), taken on to the
    head: the same moment as a walk of its own, and one walk through the blocks."""
    from deltacomp.calib.activations import LayerwiseHessians

    ft = Checkpoint(llama_tok[1])
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 256, (10,), generator=g) for _ in range(4)]
    layers = LayerwiseHessians(ft, samples, {"model.layers.0.mlp.down_proj.weight"})
    assert [i for i, _ in layers] == [0]  # the walk ends after block 0
    loads = []
    real = layers.load_block
    layers.load_block = lambda i: loads.append(i) or real(i)
    got = walk_moment(layers)
    assert loads == [1]  # only the block the walk had not run
    want = head_moment(ft, samples)
    assert torch.equal(got, want)
