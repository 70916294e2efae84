"""Gates on real fine-tunes: two skills made in the test, compressed, then fused by each gate.

A tiny Llama is pretrained for a moment (so that its output head can be sharp), then fully fine-tuned (every linear
layer of its blocks) into two skills over lowercase letters that contradict each other: ``up:c`` -> ``defghi``
(each letter's successor) and ``dn:c`` -> ``bazyxw`` (its predecessor). A composite answer needs both: it climbs
from a letter in a-h and then falls from a letter in s-z (``mix:c`` -> ``defg,wvut``), so the right delta depends
on the token, which only a per-token gate can follow.
"""

import random

import pytest
import torch
from conftest import single_thread

from deltacomp.fusion import Example, FusionModel, TrainConfig
from deltacomp.fusion.evaluate import encode, loss
from deltacomp.fusion.gates.topk import topk_weights

L = "abcdefghijklmnopqrstuvwxyz"
FAST = TrainConfig(epochs=3, lr=5e-2, batch_size=8, holdout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_up(c: str, n: int) -> str:
    return "".join(L[(L.index(c) + i + 1) % 26] for i in range(n))


def run_down(c: str, n: int) -> str:
    return "".join(L[(L.index(c) - i - 1) % 26] for i in range(n))


def single(task: int, rng: random.Random) -> Example:
    c = rng.choice(L)
    return Example("up:" + c, run_up(c, 6), 0) if task == 0 else Example("dn:" + c, run_down(c, 6), 1)


def composite(rng: random.Random) -> Example:
    a, b = rng.choice(L[:8]), rng.choice(L[18:])
    return Example("mix:" + a, run_up(a, 4) + "," + b + run_down(b, 4))


def _fit(model, tok, make, steps: int, lr: float, trainable=lambda name: True, seed: int = 0) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        rows = []
        for ex in (make(rng) for _ in range(32)):
            p = tok(ex.prompt)["input_ids"]
            rows.append((p + tok(ex.answer, add_special_tokens=False)["input_ids"], len(p)))
        t = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r + [0] * (t - len(r)) for r, _ in rows])
        labels = ids.clone()
        for i, (r, start) in enumerate(rows):
            labels[i, :start] = -100
            labels[i, len(r):] = -100
        loss_ = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss_.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def skills(tmp_path_factory):
    """Base folder, the two skill packages (8-bit factors, a generous budget) and held-out data."""
    from conftest import _tiny_llama_config, byte_tokenizer
    from transformers import LlamaForCausalLM

    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    root = tmp_path_factory.mktemp("fusion_skills")
    tok = byte_tokenizer()
    with single_thread():
        torch.manual_seed(0)
        base = LlamaForCausalLM(_tiny_llama_config())
        _fit(base, tok, lambda r: Example(r.choice(["up:", "dn:", "mix:", "cp:"]) + (c := r.choice(L)), c * 6),
             steps=60, lr=1e-2)
        base.save_pretrained(root / "base")
        tok.save_pretrained(root / "base")
        packages = []
        for task in (0, 1):
            model = LlamaForCausalLM.from_pretrained(root / "base")
            _fit(model, tok, lambda r, t=task: single(t, r), steps=80, lr=5e-3,
                 trainable=lambda n: ".layers." in n and n.endswith("proj.weight"), seed=task)
            model.save_pretrained(root / f"ft{task}")
            compress(root / "base", root / f"ft{task}", root / f"skill{task}",
                     CompressConfig(bits=8.0, schedule=((8, None),)), progress=False)
            packages.append(root / f"skill{task}")
    rng = random.Random(1)
    return {"base": root / "base", "packages": packages,
            "train": [composite(rng) for _ in range(48)], "test": [composite(rng) for _ in range(24)],
            "singles_train": [single(i % 2, rng) for i in range(32)],
            "singles_test": [single(i % 2, rng) for i in range(16)]}


@pytest.fixture(scope="module")
def trained(skills):
    """Token, static (task-level) and topk gates trained on the composite examples; the sentence router on
    single-skill ones."""
    out = {}
    for gate, data, config in (("token", "train", FAST), ("static", "train", FAST), ("topk", "train", FAST),
                               ("sentence", "singles_train", TrainConfig(epochs=4, lr=1e-2, batch_size=8,
                                                                         holdout=0.0))):
        fm = FusionModel.from_packages(skills["base"], skills["packages"], gate=gate)
        out[gate] = (fm, fm.train_gate(skills[data], config, progress=False))
    return out


def _loss(fm, examples, weights="gate"):
    enc = encode(examples, fm.tokenizer, 64)
    if weights == "gate":
        return loss(fm, enc)
    with fm.variant(weights):
        return loss(fm, enc)


def test_the_fine_tunes_learned_their_skills(skills, trained):
    fm = trained["token"][0]
    rng = random.Random(5)
    for task in (0, 1):
        exs = [single(task, rng) for _ in range(4)]
        with fm.variant([1.0 if i == task else 0.0 for i in range(2)]):
            outs = fm.generate([e.prompt for e in exs], max_new_tokens=6)
        assert sum(o == e.answer for o, e in zip(outs, exs)) >= 3, (outs, [e.answer for e in exs])


def test_token_gate_beats_each_delta_static_averaging_and_task_level_weights(skills, trained):
    test = skills["test"]
    token, task_level = trained["token"][0], trained["static"][0]
    fused = _loss(token, test)
    others = {"delta 0": _loss(token, test, [1.0, 0.0]), "delta 1": _loss(token, test, [0.0, 1.0]),
              "average": _loss(token, test, [0.5, 0.5]), "task-level": _loss(task_level, test),
              "base": _loss(token, test, None)}
    assert all(fused < value - 0.2 for value in others.values()), (fused, others)
    assert not torch.allclose(task_level.gate.weight, torch.tensor([0.5, 0.5]))  # the task-level weights trained


def test_topk_routing_runs_and_trains(skills, trained):
    fm, summary = trained["topk"]
    assert summary["epoch_loss"][-1] < summary["epoch_loss"][0]
    assert _loss(fm, skills["test"]) < _loss(fm, skills["test"], [0.5, 0.5])
    # with a routing loss (tasks named by the data) and one delta kept per token
    one = FusionModel.from_packages(skills["base"], skills["packages"], gate="topk", top_k=1, route_weight=0.5)
    summary = one.train_gate(skills["singles_train"][:16], TrainConfig(epochs=1, lr=1e-2, batch_size=8, holdout=0.0),
                             progress=False)
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(summary["epoch_loss"])))
    ids, mask = one.encode_prompts(["up:c"])
    one.forward(ids, mask)
    w = one.sites.sites[0].layer.router(torch.randn(1, 4, 64))
    assert w.shape == (1, 4, 2) and bool(((w > 0).sum(-1) == 1).all())


def test_sentence_router_picks_the_right_delta(skills, trained):
    fm, _ = trained["sentence"]
    exs = skills["singles_test"]
    ids, mask = fm.encode_prompts([e.prompt for e in exs])
    with torch.no_grad():
        picked = fm.gate.logits(ids.to(fm.device), mask.to(fm.device)).argmax(-1).tolist()
    assert picked == [e.task for e in exs]
    # top-p keeps only the picked delta when it is sure, and holds it for every generated token
    fm.gate.begin(ids, mask)
    assert torch.equal((fm.gate._w > 0).long(), torch.nn.functional.one_hot(torch.tensor(picked), 2))
    outs = fm.generate([e.prompt for e in exs], max_new_tokens=6)
    assert sum(o == e.answer for o, e in zip(outs, exs)) >= len(exs) - 2


def test_sentence_router_runs_a_lone_delta_as_a_one_delta_bank(skills, trained, monkeypatch):
    """Outside training, when every sequence keeps one delta alone, the layers run it as a bank of one delta
    (``DeltaLinear.only``), and different ones at decode steps as a multi-tenant call (``DeltaLinear.index``), with
    the same results as their one-hot weights."""
    fm, _ = trained["sentence"]
    e = skills["singles_test"][0]
    ids, mask = fm.encode_prompts([e.prompt])
    singles = skills["singles_test"][:4]
    both, both_mask = fm.encode_prompts([x.prompt for x in singles])
    with torch.no_grad():
        fast = fm.forward(ids, mask)
        assert {s.layer.only for s in fm.sites} == {e.task} and {s.layer.index for s in fm.sites} == {None}
        with fm.variant((1.0, 0.0)):  # fixed weights: the k-delta bank, even when forward reads a prompt
            fm.forward(ids, mask)
            assert {s.layer.only for s in fm.sites} == {None} and {s.layer.index for s in fm.sites} == {None}
        assert {s.layer.only for s in fm.sites} == {e.task}
        fm.forward(both, both_mask)  # the batch keeps different deltas: each token row its own at decode steps
        assert {x.task for x in singles} == {0, 1} and {s.layer.only for s in fm.sites} == {None}
        index = fm.sites.sites[0].layer.index
        assert index(torch.zeros(4, 5, 64)) is None  # a prompt of several tokens: the router's weights
        assert index(torch.zeros(4, 1, 64)).flatten().tolist() == [x.task for x in singles]
        fast_ids = fm.generate_ids(both, both_mask, max_new_tokens=6)
        monkeypatch.setattr(type(fm.gate), "_picks", lambda self: None)
        slow = fm.forward(ids, mask)
        assert fm.sites.sites[0].layer.index is None
        slow_ids = fm.generate_ids(both, both_mask, max_new_tokens=6)
    assert float((fast - slow).norm() / slow.norm()) < 1e-5
    assert torch.equal(fast_ids, slow_ids)
    monkeypatch.undo()
    fm.forward(ids, mask)  # with gradients: the router's weights
    assert {s.layer.only for s in fm.sites} == {None} and {s.layer.index for s in fm.sites} == {None}


@pytest.mark.parametrize("gate", ["token", "topk", "sentence"])
def test_generate_with_kv_cache_equals_without(skills, trained, gate):
    fm = trained[gate][0]
    prompts = [e.prompt for e in skills["test"][:3]] + [e.prompt for e in skills["singles_test"][:3]]
    ids, mask = fm.encode_prompts(prompts)
    with_cache = fm.generate_ids(ids, mask, max_new_tokens=8, use_cache=True)
    without = fm.generate_ids(ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("gate", ["token", "sentence", "topk", "static"])
def test_save_load_round_trip_gives_identical_outputs(skills, trained, gate, tmp_path):
    fm = trained[gate][0]
    doc = fm.save(tmp_path / "gate")
    again = FusionModel.load(tmp_path / "gate")
    assert doc["training"]["steps"] == trained[gate][1]["steps"] and again.training == doc["training"]
    ids, mask = fm.encode_prompts([e.prompt for e in skills["test"][:4]])
    with torch.no_grad():
        assert torch.equal(fm.forward(ids, mask), again.forward(ids, mask))
    assert fm.generate([e.prompt for e in skills["test"][:2]], 6) == again.generate(
        [e.prompt for e in skills["test"][:2]], 6)


def test_evaluate_rows(skills, trained):
    result = trained["token"][0].evaluate(skills["test"][:8], exact=False)
    names = [r["model"] for r in result["rows"]]
    assert names[0] == "base" and names[-1] == "fused (token gate)" and len(names) == 4
    assert result["rows"][-1]["loss"] < min(r["loss"] for r in result["rows"][:-1])
    rows = trained["sentence"][0].evaluate(skills["singles_test"][:6])["rows"]
    assert rows[0]["exact_match"] == 0.0 and rows[-1]["exact_match"] >= 0.5


def test_gates_of_a_block_run_its_sibling_layers_as_one_call(trained):
    """Gates whose weights are the block's (token, static, sentence) give the layers of a block one router, so
    q|k|v and gate|up run as one call of the op; MeteoRA's router per module makes each layer run alone."""
    for gate, (fm, _) in trained.items():
        grouped = [s.layer for s in fm.sites if s.layer.siblings is not None]
        assert len(grouped) == 5 * len(fm.sites.blocks), gate  # q, k, v, gate, up of every block
        assert all(layer.siblings.joined(layer) for layer in grouped) == (gate != "topk"), gate


def test_topk_sibling_routers_are_each_modules_own(trained):
    """The top-k routers of q|k|v (one product for the three) give each module the weights of its own router."""
    fm, _ = trained["topk"]
    gate = fm.gate
    sites = [s for s in fm.sites if s.block == 0 and s.layer.siblings is not None][:3]
    x = torch.randn(2, 5, sites[0].layer.in_features)
    with torch.no_grad():
        for s in sites:
            j = fm.sites.sites.index(s)
            want = topk_weights(x @ gate.routers[j].T, fm.config.top_k, fm.config.temperature)
            assert torch.allclose(s.layer.router(x), want, atol=1e-6)
