"""Sibling layers that read one input (q|k|v, gate|up) run as one call of the op over one bank."""

import pytest
import torch
from packed_cases import random_module, rel_err

from deltacomp.errors import DeltacompError
from deltacomp.kernels import DeltaBank, attach, delta_linear
from deltacomp.kernels.shared import sibling_sets
from deltacomp.package.store import DeltaPackage


def test_sibling_sets_are_named_within_one_parent():
    paths = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj",
             "m.layers.0.self_attn.o_proj", "m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj",
             "m.layers.0.mlp.down_proj", "m.layers.1.self_attn.q_proj", "m.layers.2.mlp.up_proj",
             "m.layers.2.other.gate_proj"]
    assert sibling_sets(paths) == [paths[:3], paths[4:6]]  # a lone q_proj, up_proj beside another parent's gate_proj


def test_bank_projection_is_that_projection_alone():
    """``projection(p)``: projection p's rows of every delta over the shared words and columns, computing what a
    bank built from that projection alone does; made once, and again after a move."""
    table = [[random_module(300, 70, seed=1), None, random_module(300, 70, seed=3)],
             [random_module(33, 70, seed=4), random_module(33, 70, seed=5), random_module(33, 70, seed=6)]]
    bank = DeltaBank.build(table)
    x, w = torch.randn(3, 70), torch.rand(3, 3)
    bounds = [0, 300, 333]
    both = delta_linear(x, bank, weights=w)
    for p in range(2):
        view = bank.projection(p)
        fresh = DeltaBank.build([table[p]])
        assert view is bank.projection(p) and view.num_deltas == 3 and view.out_features == fresh.out_features
        assert view.v_words.data_ptr() == bank.v_words.data_ptr() and view.u_cols.data_ptr() == bank.u_cols.data_ptr()
        assert torch.equal(view.spans, fresh.spans) and torch.equal(view.s, fresh.s)
        assert view.col_len == fresh.col_len > 0 and torch.equal(view.u_desc, fresh.u_desc)
        got = delta_linear(x, view, weights=w)
        assert torch.equal(got, delta_linear(x, fresh, weights=w))
        assert rel_err(got, both[:, bounds[p]:bounds[p + 1]]) < 1e-6
        assert rel_err(delta_linear(x, view.alone(2)), delta_linear(x, bank.alone(2))[:, bounds[p]:bounds[p + 1]]) \
            < 1e-6
    assert DeltaBank.build([table[0]]).projection(0).num_deltas == 3
    with pytest.raises(DeltacompError, match="projection 2 of a bank of 2"):
        bank.projection(2)
    kept = bank.projection(0)
    moved = bank.to(torch.float64)  # moved or cast: made again at once (the packed words keep their dtypes)
    assert moved._proj.keys() == {0, 1} and moved.projection(0) is not kept
    again = moved.projection(0)
    assert moved.to("cpu").projection(0) is again  # nothing moved: the views are kept


@pytest.fixture(scope="module")
def models(llama_pair, llama_packages):
    """The tiny Llama with two deltas, its siblings sharing their calls and not."""
    from transformers import LlamaForCausalLM

    base_dir = llama_pair[0]
    pkgs = [DeltaPackage(llama_packages(1.0)), DeltaPackage(llama_packages(2.0))]
    weights = torch.tensor([0.7, 0.3])
    out = {}
    for share in (True, False):
        model = LlamaForCausalLM.from_pretrained(base_dir).eval()
        out[share] = model, attach(model, pkgs, weights=weights, share_inputs=share)
    return out


def _count_calls(monkeypatch) -> list:
    import deltacomp.kernels.linear as linear

    calls = []
    for name in ("base_delta_linear", "delta_linear"):
        real = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *a, _real=real, **k: calls.append(a[1].out_features) or _real(*a, **k))
    return calls


def test_siblings_run_as_one_call_with_the_same_logits(models, monkeypatch):
    shared_model, shared = models[True]
    plain_model, plain = models[False]
    q, k, v = (shared[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert q.bank is k.bank is v.bank and [q.slot, k.slot, v.slot] == [0, 1, 2] and q.siblings is v.siblings
    assert (q.out_features, k.out_features) == (plain["model.layers.0.self_attn.q_proj"].out_features,
                                                plain["model.layers.0.self_attn.k_proj"].out_features)
    assert shared["model.layers.0.self_attn.o_proj"].siblings is None
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = _count_calls(monkeypatch)
    layers = shared_model.config.num_hidden_layers
    with torch.no_grad():
        got = shared_model(ids).logits
        assert len(calls) == 4 * layers  # q|k|v, o, gate|up, down
        want = plain_model(ids).logits
        assert len(calls) == 4 * layers + 7 * layers
    assert rel_err(got, want) < 1e-6
    assert q.siblings.outputs._value is None  # every sibling took its slice: nothing held past the call
    with torch.inference_mode():  # inference tensors keep no version counter
        assert rel_err(shared_model(ids).logits, want) < 1e-6


def test_a_sibling_runs_alone_unless_it_shares_the_input_and_the_mixture(models):
    """Called with another tensor than its siblings, with the input changed in place since, twice, or with its
    own router (a per-module gate), a sibling computes its own output."""
    _, shared = models[True]
    _, plain = models[False]
    names = [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]
    q, k, v = (shared[n] for n in names)
    pq, pk, pv = (plain[n] for n in names)
    x = torch.randn(2, 5, q.in_features)
    with torch.no_grad():
        assert rel_err(k(x.clone()), pk(x)) < 1e-6  # alone, first
        assert rel_err(q(x), pq(x)) < 1e-6
        assert rel_err(k(x.clone()), pk(x)) < 1e-6  # not the tensor q was called with
        assert rel_err(q(x), pq(x)) < 1e-6  # q again: computed again, not its old slice
        x.mul_(2)  # changed in place after q's call
        assert rel_err(k(x), pk(x)) < 1e-6 and rel_err(v(x), pv(x)) < 1e-6
        own = [torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5])]
        try:
            for layer, plain_layer, w in zip((q, k, v), (pq, pk, pv), own):
                layer.router = plain_layer.router = lambda _x, w=w: w
            assert not q.siblings.joined(q)
            for layer, plain_layer in zip((q, k, v), (pq, pk, pv)):
                assert rel_err(layer(x), plain_layer(x)) < 1e-6
        finally:
            for layer in (q, k, v, pq, pk, pv):
                layer.router = None


def test_attach_takes_the_weights_once_as_float32_on_the_models_device(llama_pair, llama_packages):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_pair[0]).eval()
    layers = attach(model, [DeltaPackage(llama_packages(1.0))], weights=[0.5])
    w = next(iter(layers.values())).weights
    assert torch.equal(w, torch.tensor([0.5])) and w.device == next(model.parameters()).device
    assert all(layer.weights is w for layer in layers.values())  # one tensor: the siblings share their calls
