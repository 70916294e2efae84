"""The fusion runtime's properties: static weights reproduce ``deltacomp apply``; identical deltas average to one;
the rule for tensors a package stores whole; configs, data files and gate folders read as untrusted input."""

import json
import shutil

import pytest
import torch

from deltacomp.errors import DeltacompError
from deltacomp.fusion import Example, FusionConfig, FusionError, FusionModel, TrainConfig, parse_weights, read_examples
from deltacomp.fusion.data import batches, encode
from deltacomp.fusion.folder import GATE_CONFIG, read_gate, safe_member
from deltacomp.fusion.gates.sentence import top_p_weights
from deltacomp.fusion.gates.topk import topk_weights
from deltacomp.package.store import DeltaPackage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_packages(llama_tok, tmp_path_factory):
    """The tiny Llama pair (with a byte tokenizer; its fine-tune also moves the norms, stored whole) compressed
    twice: 8-bit factors, and a 2-bit budget."""
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    base, ft, _ = llama_tok
    root = tmp_path_factory.mktemp("fusion_pkgs")
    compress(base, ft, root / "a", CompressConfig(bits=8.0, schedule=((8, None),)), progress=False)
    compress(base, ft, root / "b", CompressConfig(bits=2.0), progress=False)
    return base, root / "a", root / "b"


IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 64], [9, 9, 120, 33, 2, 250, 18, 77]])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_static_one_zero_equals_deltacomp_apply(tok_packages, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltacomp.apply import apply

    base, a, b = tok_packages
    apply(a, base, tmp_path / "applied", progress=False)
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied", dtype=torch.float32).eval()
    fm = FusionModel.from_packages(base, [a, b], gate="static", weights=(1.0, 0.0))
    assert len(fm.stored) > 0  # the norms are stored whole and follow the weights
    with torch.no_grad():
        want = applied(input_ids=IDS).logits
        got = fm.forward(IDS)
    assert _rel(got, want) < 1e-3
    mask = torch.ones_like(IDS)
    new = fm.generate_ids(IDS, mask, max_new_tokens=8)
    ref = applied.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           pad_token_id=fm.tokenizer.pad_token_id)[:, IDS.shape[1]:]
    assert torch.equal(new, ref)


def test_identical_deltas_at_half_equal_the_single_delta(tok_packages, tmp_path):
    base, a, _ = tok_packages
    shutil.copytree(a, tmp_path / "a2")
    one = FusionModel.from_packages(base, [a], gate="static", weights=(1.0,))
    two = FusionModel.from_packages(base, [a, tmp_path / "a2"], gate="static", weights=(0.5, 0.5))
    with torch.no_grad():
        assert _rel(two.forward(IDS), one.forward(IDS)) < 1e-5


def test_stored_tensor_rule(tok_packages):
    base, a, b = tok_packages
    fm = FusionModel.from_packages(base, [a, b], gate="token")
    name = next(iter(fm.stored.slots))
    slot, base_value = fm.stored.slots[name], fm.stored.base[name]
    d0, d1 = fm.stored.deltas[name]
    assert torch.allclose(slot, base_value + 0.5 * d0 + 0.5 * d1)  # dynamic gates: 1/k each
    with fm.variant([0.0, 1.0]):
        assert torch.allclose(slot, base_value + d1)
    with fm.variant(None):
        assert torch.equal(slot, base_value)
    assert torch.allclose(slot, base_value + 0.5 * d0 + 0.5 * d1)  # restored on exit
    assert torch.equal(FusionModel.from_packages(base, [a, b], gate="token", stored="base").stored.slots[name],
                       base_value)
    assert torch.allclose(FusionModel.from_packages(base, [a, b], gate="token", stored="1").stored.slots[name],
                          base_value + d1)
    static = FusionModel.from_packages(base, [a, b], gate="static", weights=(0.25, 0.5))
    assert torch.allclose(static.stored.slots[name], base_value + 0.25 * d0 + 0.5 * d1)


def test_deltas_never_become_dense(tok_packages):
    from deltacomp.kernels import DeltaLinear

    base, a, b = tok_packages
    fm = FusionModel.from_packages(base, [a, b], gate="token")
    layers = [m for m in fm.model.modules() if isinstance(m, DeltaLinear)]
    assert len(layers) == 14 and all(m.bank.num_deltas == 2 for m in layers)
    assert all(m.base_layer.weight.requires_grad is False for m in layers)


def test_encoder_base_with_a_static_gate(bert_pair, tmp_path):
    from transformers import AutoModel

    from deltacomp.apply import apply
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    base, ft, _ = bert_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(bits=8.0, schedule=((8, None),)), progress=False)
    apply(tmp_path / "pkg", base, tmp_path / "applied", progress=False)
    fm = FusionModel.from_packages(base, [tmp_path / "pkg"], gate="token")
    assert fm.kind == "encoder" and len(fm.sites.blocks) == 2
    assert sum(s.layer.siblings is not None for s in fm.sites) == 6  # query|key|value (with biases) share a call
    with torch.no_grad(), fm.variant([1.0]):
        got = fm.forward(IDS[:, :6])
        want = AutoModel.from_pretrained(tmp_path / "applied").eval()(input_ids=IDS[:, :6]).last_hidden_state
    assert _rel(got, want) < 1e-3
    with pytest.raises(FusionError, match="causal LM"):
        fm.generate_ids(IDS, torch.ones_like(IDS), 2)


# -- pure parts ----------------------------------------------------------------------------------------------------
def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    w = top_p_weights(p, 0.6)
    assert torch.allclose(w, torch.tensor([[1.0, 0, 0], [0.4 / 0.75, 0.35 / 0.75, 0], [0, 0, 1.0]]))


def test_topk_weights():
    w = topk_weights(torch.tensor([[1.0, 3.0, 2.0]]), 2, 1.0)
    assert w[0, 0] == 0 and torch.allclose(w[0, 1:], torch.softmax(torch.tensor([3.0, 2.0]), 0))


@pytest.mark.parametrize("kw, needle", [
    ({"gate": "nope"}, "known gates: sentence, static, token, topk"),
    ({"gate": "static", "weights": (1.0,)}, "gives 1 weights for 2 deltas"),
    ({"gate": "static", "weights": (float("nan"), 1.0)}, "finite"),
    ({"gate": "static", "weights": (-0.5, 1.0)}, "must be >= 0"),
    ({"gate": "token", "weights": (0.5, 0.5)}, "learns its own"),
    ({"gate": "topk", "top_k": 3}, "more than the 2 deltas"),
    ({"gate": "sentence", "top_p": 0.0}, "--top-p"),
    ({"gate": "token", "temperature": 0}, "--temperature"),
    ({"gate": "token", "stored": "2"}, "--stored must be one of mix, base, 0, 1"),
])
def test_config_errors_say_what_was_given(kw, needle):
    with pytest.raises(DeltacompError, match=needle.replace("(", r"\(")):
        FusionConfig(num_deltas=2, **kw)


def test_config_round_trip_and_allowed_negative():
    c = FusionConfig(gate="static", num_deltas=2, weights=(1.5, -0.5), allow_negative=True)
    assert FusionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(FusionError, match="unknown fusion config keys"):
        FusionConfig.from_dict({**c.to_dict(), "evil": 1})
    with pytest.raises(FusionError, match="expected numbers"):
        parse_weights("0.5,x")
    with pytest.raises(FusionError, match="--batch-size"):
        TrainConfig(batch_size=0)


def test_data_formats(tmp_path):
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    (tmp_path / "pa.jsonl").write_text('{"prompt": "up:c", "answer": "def", "task": 0}\n'
                                       '{"prompt": "x", "answer": "y"}\n')
    assert read_examples(tmp_path / "pa.jsonl", tok) == [Example("up:c", "def", 0), Example("x", "y", None)]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    (ex,) = read_examples(tmp_path / "chat.jsonl", tok)
    assert ex.prompt == "<user> hi\n" and ex.answer == "<assistant> yo\n"
    (tmp_path / "t.txt").write_text("one line\n\nanother\n")
    assert read_examples(tmp_path / "t.txt", tok) == [Example("one line"), Example("another")]
    enc = encode([Example("ab", "cd"), Example("plain text")], tok, 64)
    b = next(batches(enc, 2, 0))
    assert b["labels"][0].tolist() == [-100, -100, *tok("cd")["input_ids"]] + [-100] * 6
    assert b["prompt_mask"][1].sum() == 10 and b["labels"][1, 0] == -100 and b["labels"][1, 1] != -100
    for text, needle in (("", "is empty"), ('{"prompt": "a", "answer": 3}\n', "string fields"),
                         ('{"prompt": "a", "answer": "b", "task": -1}\n', "delta index"),
                         ('{"other": 1}\n', "no field 'text'")):
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(FusionError, match=needle):
            read_examples(tmp_path / "bad.jsonl", tok)


def test_gate_folder_is_read_as_untrusted_input(tok_packages, tmp_path):
    base, a, b = tok_packages
    FusionModel.from_packages(base, [a, b], gate="static", weights=(0.7, 0.3)).save(tmp_path / "g")
    doc = json.loads((tmp_path / "g" / GATE_CONFIG).read_text())
    assert doc["config"]["weights"] == [0.7, 0.3] and len(doc["deltas"]) == 2
    for bad, needle in ((lambda d: d["files"].update({"../x": "0" * 64}), "leaves the folder"),
                        (lambda d: d["files"].update({"/etc/passwd": "0" * 64}), "is absolute"),
                        (lambda d: d["deltas"][0].update({"manifest_sha256": 5}), "manifest_sha256"),
                        (lambda d: d["config"].update({"top_p": "a lot"}), "--top-p"),
                        (lambda d: d.update({"format_version": 99}), "newer"),
                        (lambda d: d.pop("base"), "lacks base")):
        broken = json.loads(json.dumps(doc))
        bad(broken)
        shutil.copytree(tmp_path / "g", tmp_path / "h", dirs_exist_ok=True)
        (tmp_path / "h" / GATE_CONFIG).write_text(json.dumps(broken))
        with pytest.raises(FusionError, match=needle):
            read_gate(tmp_path / "h")
    with pytest.raises(FusionError, match="leaves the folder"):
        safe_member(tmp_path, "a/../../b", "x")
    (tmp_path / "g" / "gate.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(FusionError, match="corrupt or truncated"):
        FusionModel.load(tmp_path / "g")


def test_training_needs_enough_examples(tok_packages):
    base, a, b = tok_packages
    fm = FusionModel.from_packages(base, [a, b], gate="token")
    with pytest.raises(FusionError, match="no examples"):
        fm.train_gate([])
    with pytest.raises(FusionError, match="2 usable examples"):
        fm.train_gate([Example("ab", "cd")] * 2)
    with pytest.raises(FusionError, match=r"task\(s\) \[5\]"):
        fm.train_gate([Example("ab", "cd", 5)] * 8, TrainConfig(epochs=1))



def test_variants_nest(tok_packages):
    base, a, b = tok_packages
    fm = FusionModel.from_packages(base, [a, b], gate="token")
    name = next(iter(fm.stored.slots))
    slot, base_value, (d0, _) = fm.stored.slots[name], fm.stored.base[name], fm.stored.deltas[name]
    with fm.variant([1.0, 0.0]):
        with fm.variant(None):
            assert torch.equal(slot, base_value)
        assert torch.allclose(slot, base_value + d0)
        assert fm.sites.sites[0].layer.weights.tolist() == [1.0, 0.0]
    assert fm.sites.sites[0].layer.router is not None


def test_a_compressed_embedding_follows_the_stored_rule(llama_tok, tmp_path):
    """An embedding table no linear layer holds: its compressed delta is rebuilt and mixed like a stored tensor,
    so static weights (1, 0) still give ``deltacomp apply``'s embedding."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from deltacomp.apply import apply
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    base, ft, _ = llama_tok
    shutil.copytree(ft, tmp_path / "ft")
    weights = load_file(tmp_path / "ft" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    rows = torch.arange(0, 256, 4)  # a quarter of the vocabulary moves, with a rank-2 change
    change = torch.randn(len(rows), 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.05
    weights["model.embed_tokens.weight"][rows] += change
    save_file(weights, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    compress(base, tmp_path / "ft", tmp_path / "pkg", CompressConfig(bits=8.0, schedule=((8, None),)), progress=False)
    assert DeltaPackage(tmp_path / "pkg").modules["model.embed_tokens.weight"]["action"] == "compress"
    apply(tmp_path / "pkg", base, tmp_path / "applied", progress=False)
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied", dtype=torch.float32).eval()
    shutil.copytree(tmp_path / "pkg", tmp_path / "pkg2")
    fm = FusionModel.from_packages(base, [tmp_path / "pkg", tmp_path / "pkg2"], gate="static", weights=(1.0, 0.0))
    assert "model.embed_tokens.weight" in fm.stored.slots
    embed = fm.model.get_input_embeddings().weight
    assert _rel(embed, applied.get_input_embeddings().weight) < 1e-6
    with torch.no_grad():
        assert _rel(fm.forward(IDS), applied(input_ids=IDS).logits) < 1e-3
