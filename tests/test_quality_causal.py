"""Pure quality metrics: KL, perplexity, top-1, batching, per-module error, data files."""

import json
import math

import pytest
import torch

from deltacomp.errors import DeltacompError
from deltacomp.evaluate import vector_bits
from deltacomp.quality import causal
from deltacomp.quality.modules import ModuleError, relative_error, summarise
from deltacomp.quality.texts import (
    CALIB_SENTENCES,
    EVAL_SENTENCES,
    GENERAL_SENTENCES,
    HELDOUT_SENTENCES,
    SRE_SENTENCES,
    read_texts,
)


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(7, 50)
    assert torch.allclose(causal.kl_full(logits, logits), torch.zeros(7), atol=1e-6)
    lp, ix = causal.top_k(logits, 5)
    assert torch.allclose(causal.kl_topk(lp, ix, logits), torch.zeros(7), atol=1e-6)


def test_kl_topk_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(9, 40, generator=g) * 3, torch.randn(9, 40, generator=g) * 3
    full = causal.kl_full(ref, other)
    assert torch.allclose(causal.kl_topk(*causal.top_k(ref, 40), other), full, atol=1e-5)
    for k in (1, 4, 16):
        part = causal.kl_topk(*causal.top_k(ref, k), other)
        assert bool((part <= full + 1e-5).all())
        assert bool((part > 0).all())


def test_kl_is_positive_for_different_distributions_and_grows_with_the_gap():
    ref = torch.randn(4, 30)
    near, far = ref + 0.1 * torch.randn(4, 30), ref + 2.0 * torch.randn(4, 30)
    lp, ix = causal.top_k(ref, 8)
    assert float(causal.kl_topk(lp, ix, near).mean()) < float(causal.kl_topk(lp, ix, far).mean())


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    vocab = 123
    labels = torch.randint(0, vocab, (64,))
    nll = causal.token_nll(torch.zeros(64, vocab), labels)
    assert causal.perplexity(float(nll.sum()), 64) == pytest.approx(vocab, rel=1e-5)
    assert causal.perplexity(0.0, 0) == math.inf
    assert causal.perplexity(1e6, 1) == math.inf  # overflow is reported, not raised


def test_top1_agreement():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert causal.top1_agreement(torch.tensor([1, 1]), logits).tolist() == [True, False]


class _ByteTok:
    """The minimal tokenizer interface make_batches needs: one token per character."""

    pad_token, eos_token, padding_side = "\0", "\0", "right"

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[ord(c) % 256 for c in t][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


class _Bigram(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.table = torch.nn.Embedding(256, 256)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_batches_score_every_next_token_and_a_model_agrees_with_itself():
    texts = ["hello world", "ab", "x", "a longer sample of text"]
    batches = causal.make_batches(_ByteTok(), texts, max_length=16, batch_size=3)
    assert sum(b.labels.numel() for b in batches) == sum(min(len(t), 16) - 1 for t in texts)
    model, other = _Bigram(0), _Bigram(1)
    ref = causal.score_reference(model, batches, k=256)
    same = causal.score(model, batches, ref)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    assert same["ppl"] == pytest.approx(ref.metrics["ppl"], rel=1e-6)
    diff = causal.score(other, batches, ref)
    assert diff["kl"] > 0.1 and diff["top1"] < 0.5


def test_relative_error_and_summary():
    d = torch.randn(8, 6)
    err_sq, norm_sq = relative_error(d, d * 0.9)
    e = ModuleError("a", (8, 6), 3, "", err_sq, norm_sq)
    assert e.relative == pytest.approx(0.1, rel=1e-6)
    s = summarise([e, ModuleError("b", (8, 6), 3, "", 0.0, 4.0)])
    assert s["modules"] == 2 and s["mean"] == pytest.approx(0.05, rel=1e-6) and s["max"] == pytest.approx(0.1)
    assert s["global"] == pytest.approx(math.sqrt(err_sq / (norm_sq + 4.0)))
    assert summarise([])["global"] == 0.0


def test_vector_bits_expands_groups():
    assert vector_bits({"groups": [{"bits": 8, "rank": 2}, {"bits": 3, "rank": 1}]}) == [8, 8, 3]
    assert vector_bits({"rank": 3}) == [16, 16, 16]
    assert vector_bits({"vector_bits": [4, 2]}) == [4, 2]
    assert vector_bits({}) == []


def test_read_texts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first paragraph\nstill first\n\nsecond one\n\n\n")
    assert read_texts(tmp_path / "p.txt") == ["first paragraph\nstill first", "second one"]
    (tmp_path / "l.txt").write_text("one\ntwo\n\nthree")
    assert read_texts(tmp_path / "l.txt") == ["one\ntwo", "three"]
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\n")
    assert read_texts(tmp_path / "lines.txt", max_samples=2) == ["one", "two"]
    rows = [{"text": "a"}, {"prompt": "q", "response": "r"}, {"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_texts(tmp_path / "d.jsonl") == ["a", "q\nr", "hi"]


@pytest.mark.parametrize("content, message", [
    (None, "data file .*d.txt: no such file"),
    ("\n\n  \n", "data file .*d.txt is empty"),
    ('{"text": ""}\n', "data file .*d.jsonl holds no text"),
    ('{"text": "a"}\nnot json\n', "d.jsonl line 2: not valid JSON"),
    ('{"label": 1}\n', "d.jsonl line 1: no field 'text' and no 'messages' \\(fields: label\\)"),
])
def test_read_texts_errors(tmp_path, content, message):
    path = tmp_path / ("d.jsonl" if content and "{" in content else "d.txt")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DeltacompError, match=message):
        read_texts(path)


def test_the_sentence_set_is_large_and_mixes_domains():
    assert len(EVAL_SENTENCES) >= 100 and len(set(EVAL_SENTENCES)) == len(EVAL_SENTENCES)
    assert not set(CALIB_SENTENCES) & set(HELDOUT_SENTENCES)
    assert set(CALIB_SENTENCES) | set(HELDOUT_SENTENCES) == set(EVAL_SENTENCES)
    for half in (CALIB_SENTENCES, HELDOUT_SENTENCES):
        assert set(half) & set(SRE_SENTENCES) and set(half) & set(GENERAL_SENTENCES)


def test_model_kind():
    from deltacomp.quality.weights import model_kind

    assert model_kind({"architectures": ["LlamaForCausalLM"]}) == "causal"
    assert model_kind({"architectures": ["GPT2LMHeadModel"]}) == "causal"
    assert model_kind({"architectures": ["BertModel"]}) == "encoder"
    assert model_kind({"model_type": "llama"}) == "causal"  # a config written without architectures (GGUF)
    assert model_kind({"model_type": "bert"}) == "encoder"


def test_weight_slots_find_a_name_with_or_without_the_model_prefix_and_check_its_shape():
    from deltacomp.errors import MismatchError
    from deltacomp.quality.weights import WeightSlots

    class Tiny(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 2)

    tiny = Tiny()
    slots = WeightSlots(tiny)
    assert slots.slot("weight", (2, 3)) is tiny.model.weight
    assert slots.slot("model.weight", torch.Size([2, 3]), "pkg") is tiny.model.weight
    assert slots.slot("lm_head.weight", (2, 3)) is None
    with pytest.raises(MismatchError, match=r"^weight: shape \[3, 3\] \(in pkg\) does not fit the model's \[2, 3\]$"):
        slots.slot("weight", (3, 3), "pkg")
    assert slots.load([("bias", torch.ones(2)), ("other.bias", torch.ones(2))]) == 1
    assert tiny.model.bias.tolist() == [1.0, 1.0]
    with pytest.raises(MismatchError, match=r"^bias: shape \[5\] does not fit the model's \[2\]$"):
        slots.load([("bias", torch.ones(5))])
    with pytest.raises(MismatchError, match="the model has no such weight"):
        slots.load([("other.bias", torch.ones(2))], required={"other.bias"})


def test_answer_batches_score_only_the_answers_and_a_probe_scores_against_its_reference():
    items = [([5, 6, 7, 8, 9], 3), ([1, 2], 1), ([3, 4, 5, 6], 2)]
    batches = causal.answer_batches(items, pad_id=0, batch_size=2)
    assert [b.labels.tolist() for b in batches] == [[8, 9, 2], [5, 6]]
    assert batches[0].positions.tolist() == [[0, 2], [0, 3], [1, 0]]  # position t predicts token t + 1
    probe = causal.BatchScorer(batches, k=256)
    with pytest.raises(RuntimeError, match="score the reference model first"):
        probe.score(None, _Bigram(0))
    assert probe.reference(None, _Bigram(0))["tokens"] == 5
    assert probe.score(None, _Bigram(0))["kl"] == pytest.approx(0.0, abs=1e-6)
    assert probe.score(None, _Bigram(1))["kl"] > 0.1
    with pytest.raises(ValueError, match="answer must start inside"):
        causal.answer_batches([([1, 2], 2)], pad_id=0)
