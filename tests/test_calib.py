"""Calibration: reading text / JSON lines / chat files into token samples, clear errors for bad input (through
the CLI), layer-by-layer Hessians equal to a full forward's, and compress --calib end to end on tiny models."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import byte_tokenizer
from conftest import calib_text as _text

from deltacomp.apply import apply
from deltacomp.calib.activations import LayerwiseHessians
from deltacomp.calib.data import (
    CalibrationError,
    answer_start,
    load_samples,
    load_samples_and_answers,
    make_samples,
    tokenize,
)
from deltacomp.cli import cli
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.text_records import Chat, PromptAnswer, Text, read_records
from deltacomp.methods.base import get_method
from deltacomp.package.reader import reconstruct_delta
from deltacomp.package.store import DeltaPackage


# -- readers --------------------------------------------------------------------------------------------------
def test_plain_json_and_chat_files_give_samples(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "a.txt").write_text(_text())
    lines = _text().splitlines()
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    chat = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]} for t in lines]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    assert {type(r) for r in read_records(tmp_path / "a.txt")} == {Text}
    assert {type(r) for r in read_records(tmp_path / "b.jsonl", "body")} == {Text}
    assert {type(r) for r in read_records(tmp_path / "c.jsonl")} == {Chat}
    per_record = load_samples(tmp_path / "a.txt", tok)
    assert len(per_record) == 24 and all(len(s) == len(lines[0].encode()) for s in per_record[:1])
    windows = load_samples(tmp_path / "b.jsonl", tok, samples=5, seqlen=64, field="body")
    assert len(windows) == 5 and all(s.shape == (64,) for s in windows)
    chat_samples = load_samples(tmp_path / "c.jsonl", tok, samples=3)
    assert bytes(tok.decode(chat_samples[0]), "utf-8").startswith(b"<user> ")


def test_each_record_is_tokenized_by_its_kind():
    tok = byte_tokenizer()
    chat = Chat(({"role": "user", "content": "hi"},), 3)
    got = tokenize([Text("ab"), PromptAnswer("q: ", "yes"), chat], tok)
    assert got == [tok("ab")["input_ids"], tok("q: yes")["input_ids"], tok("<user> hi\n")["input_ids"]]
    tok.chat_template = None
    with pytest.raises(CalibrationError, match="^calibration file c.jsonl line 3: a conversation, but the tokenizer "
                                              "has no chat template$"):
        tokenize([chat], tok, source="calibration file c.jsonl")


def test_an_answer_starts_after_its_prompt_and_a_text_or_a_window_has_none(tmp_path):
    tok = byte_tokenizer()
    pa, text = PromptAnswer("q: ", "yes"), Text("q: yes")
    chat = Chat(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}))
    asked = Chat(({"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}))
    ids = tokenize([pa, text, chat, asked], tok)
    assert answer_start(pa, tok, ids[0]) == len(tok("q: ")["input_ids"])
    assert tok.decode(ids[0][answer_start(pa, tok, ids[0]):]) == "yes"
    assert tok.decode(ids[2][answer_start(chat, tok, ids[2]):]) == "<assistant> ok\n"
    assert answer_start(text, tok, ids[1]) is None and answer_start(asked, tok, ids[3]) is None
    assert answer_start(PromptAnswer("q: yes", ""), tok, ids[0]) is None  # nothing after the prompt

    def closing(text, **_):  # a tokenizer that closes every text with an id of its own (BERT's [SEP])
        return {"input_ids": [*tok(text)["input_ids"], 999]}

    assert answer_start(pa, closing, closing("q: yes")["input_ids"]) == len(tok("q: ")["input_ids"])
    lines = [json.dumps({"prompt": f"q{i}: ", "answer": "yes " * i}) for i in range(1, 5)]
    (tmp_path / "pa.jsonl").write_text("\n".join([*lines, json.dumps({"text": "a plain text"})]) + "\n")
    samples, starts = load_samples_and_answers(tmp_path / "pa.jsonl", tok)
    assert [tok.decode(s[a:]) for s, a in zip(samples, starts) if a is not None] == ["yes " * i for i in range(1, 5)]
    assert starts[-1] is None
    assert load_samples_and_answers(tmp_path / "pa.jsonl", tok, samples=2, seqlen=8)[1] == [None, None]


def test_records_tokenized_in_batches_keep_their_order_and_cut(monkeypatch):
    """Texts go to the tokenizer a batch at a time, conversations one by one between them: the same ids in the
    same order as one call per record, each text cut at ``max_chars`` first."""
    tok = byte_tokenizer()
    monkeypatch.setattr("deltacomp.calib.data.BATCH", 2)
    chat = Chat(({"role": "user", "content": "hi"},), 4)
    records = [Text("first"), PromptAnswer("q: ", "yes"), Text("third"), chat, Text("fifth one"), Text("6")]
    got = tokenize(records, tok, max_chars=4)
    assert got == [tok(t)["input_ids"] for t in ("firs", "q: y", "thir")] + [tok("<use")["input_ids"]] + [
        tok(t)["input_ids"] for t in ("fift", "6")]


def test_default_takes_short_records_up_to_the_token_budget():
    from deltacomp.calib.data import DEFAULT_SAMPLES, DEFAULT_TOKENS

    short = [[i % 7 + 1] * 10 for i in range(3000)]  # 30,000 tokens: all of it fits
    assert len(make_samples(short, None, None, 512)) == 3000
    long = [[1] * 4096 for _ in range(200)]  # each cut to 2048 positions: the budget holds exactly 128
    assert len(make_samples(long, None, None, 2048)) == DEFAULT_TOKENS // 2048 == DEFAULT_SAMPLES
    huge = [[1] * 8192 for _ in range(200)]  # longer than the budget allows: still the first 128 records
    assert len(make_samples(huge, None, None, 8192)) == DEFAULT_SAMPLES
    many = [[1] * 100 for _ in range(5000)]  # 500,000 tokens: the leading records within 262,144 tokens
    assert len(make_samples(many, None, None, 512)) == DEFAULT_TOKENS // 100


def test_make_samples_errors_say_what_was_available():
    with pytest.raises(CalibrationError, match="only 30 tokens, shorter than --calib-seqlen 64"):
        make_samples([[1] * 10, [2] * 19], None, 64, 128, sep=0)
    with pytest.raises(CalibrationError, match="holds only 2 windows of 16 tokens"):
        make_samples([[1] * 40], 5, 16, 128)
    with pytest.raises(CalibrationError, match="--calib-samples 9 asked, but .* only 2 records"):
        make_samples([[1, 2], [3]], 9, None, 128)
    with pytest.raises(CalibrationError, match="longer than the model's 128 positions"):
        make_samples([[1] * 400], 1, 256, 128)


BAD = {
    "empty": ("calib.txt", "\n\n", "is empty"),
    "field": ("calib.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n',
              "line 2: no field 'text' and no 'messages' (fields: prompt)"),
    "json": ("calib.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
    "short": ("calib.txt", "a few words\n", "has only 11 tokens, shorter than --calib-seqlen 64"),
    "missing": (None, None, "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_input_is_one_clear_line(case, llama_tok, tmp_path):
    base, ft, _ = llama_tok
    name, content, message = BAD[case]
    path = tmp_path / (name or "nope.txt")
    if content is not None:
        path.write_text(content)
    args = ["compress", str(base), str(ft), "-o", str(tmp_path / "pkg"), "--calib", str(path), "--no-progress"]
    if case == "short":
        args += ["--calib-seqlen", "64"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "pkg").exists()


def test_calib_with_another_method_is_refused():
    from deltacomp.config import CompressConfig
    from deltacomp.errors import DeltacompError
    from deltacomp.methods import method_for

    with pytest.raises(DeltacompError, match="mixed method only"):
        method_for(CompressConfig(method="lowrank", calib="x.txt"))
    with pytest.raises(DeltacompError, match="use --allocation optimal"):
        CompressConfig(budget_scope="model", allocation="schedule")
    with pytest.raises(DeltacompError, match="give --budget-scope model"):
        CompressConfig(calib="x.txt", allocation="optimal", sensitivity=True)
    with pytest.raises(DeltacompError, match="give --calib"):
        CompressConfig(calib="none", allocation="optimal", budget_scope="model", sensitivity=True)


# -- activations ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair,auto", [("llama_pair", "AutoModelForCausalLM"), ("bert_pair", "AutoModel")])
def test_layerwise_hessians_equal_a_full_forward(pair, auto, request):
    import transformers

    _, ft, deltas = request.getfixturevalue(pair)
    samples = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    samples.append(torch.randint(0, 256, (9,)))  # another length: its own batch
    got = {}
    for _, hs in LayerwiseHessians(ft, samples, set(deltas)):
        got.update(hs)
    assert set(got) == set(deltas)

    model = getattr(transformers, auto).from_pretrained(ft, attn_implementation="sdpa").eval()
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        key = name + ".weight"
        if key in deltas:
            def hook(m, inp, out, key=key):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for s in samples:
            model(input_ids=s[None])
    for key in deltas:
        want = sums[key] / counts[key]
        assert torch.allclose(got[key], want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), key


def test_whole_model_loads_every_weight_and_names_a_shape_its_config_does_not_have(llama_pair, tmp_path):
    import shutil

    from deltacomp.calib.activations import build_skeleton
    from deltacomp.errors import CheckpointError

    _, ft, _ = llama_pair
    ckpt = Checkpoint(ft)
    model, _, _, _, names = build_skeleton(ckpt, "cpu", torch.float32, whole=True)
    params = dict(model.named_parameters())
    loaded = [(key, name) for key, name in names.items() if name in params]
    assert len(loaded) == len(params)
    assert all(torch.equal(params[name].detach(), ckpt.read(key).float()) for key, name in loaded)

    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 1  # the checkpoint's MLP weights no longer fit the model it describes
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\]; the model its "
                                              r"config\.json describes has"):
        build_skeleton(Checkpoint(bad), "cpu", torch.float32, whole=True)


def test_shrink_moves_a_hessian_towards_its_scaled_identity():
    from deltacomp.calib.provider import _Cursor, shrink

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)
    h = x.T @ x / 50
    keep = h.clone()
    assert shrink(h, 0.0, 50) is h
    iso = float(h.diagonal().mean()) * torch.eye(6)
    assert torch.allclose(shrink(h, 1.0, 50), iso)
    half = shrink(h, 0.5, 50)
    assert torch.allclose(half, 0.5 * h + 0.5 * iso) and torch.equal(h, keep)  # the input is left as it was
    # auto (None): n / (n + T), from 6 / 7 for one token towards 0 as the tokens grow
    for tokens in (1, 6, 594):
        a = 6 / (6 + tokens)
        assert torch.allclose(shrink(h, None, tokens), (1 - a) * h + a * iso)
    # the cursor hands out shrunk Hessians, by name, layer after layer
    class Hessians:
        layer_of = {"a": 0, "b": 1}

        def __iter__(self):
            return iter([(0, {"a": h}), (1, {"b": 2 * h})])

    cursor = _Cursor(Hessians(), 0.25, 50)
    assert torch.allclose(cursor.get("a"), shrink(h, 0.25, 50))
    assert torch.allclose(cursor.get("b"), shrink(2 * h, 0.25, 50))
    assert cursor.get("unknown") is None


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["llama_tok", "bert_tok"])
@pytest.mark.parametrize("extra", [[], ["--allocation", "optimal"], ["--calib-shrink", "0.5"], ["--calib-shrink", "0"],
                                   ["--allocation", "optimal", "--allocation-bits", "2/1,3/2,4/2,4,8"],
                                   ["--allocation", "optimal", "--budget-scope", "model"],
                                   ["--allocation", "optimal", "--budget-scope", "model", "--sensitivity"]])
def test_compress_with_calibration_then_apply(pair, extra, request, tmp_path):
    base, ft, deltas = request.getfixturevalue(pair)
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(40))
    args = ["compress", str(base), str(ft), "-o", str(tmp_path / "pkg"), "--calib", str(calib), "--bits", "2",
            "--gptq-group-size", "32", "--no-progress", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = DeltaPackage(tmp_path / "pkg").manifest
    mods = {n: m for n, m in manifest["modules"].items() if m["action"] == "compress"}
    assert set(mods) == set(deltas)
    assert all(m["info"]["calibrated"] and m["info"]["group_size"] == 32 for m in mods.values())
    assert manifest["budget"]["achieved_factor_bits_per_entry"] <= 2.0
    if "--budget-scope" not in extra:
        assert all(m["factor_bits_per_entry"] <= 2.0 for m in mods.values())
    if "--allocation-bits" in extra:  # U/V widths: stored as chosen, and the factors export multiplies back
        pkg = DeltaPackage(tmp_path / "pkg")
        assert any("v_bits" in g for m in mods.values() for g in m["info"]["groups"])
        for name, m in mods.items():
            b_factor, a_factor = get_method("mixed").factors(pkg.parts(name), m["info"], tuple(m["shape"]))
            want = reconstruct_delta(pkg, name)
            assert float((b_factor @ a_factor - want).abs().max()) <= 1e-5 * float(want.abs().max())
    apply(tmp_path / "pkg", base, tmp_path / "model")
    out, b = Checkpoint(tmp_path / "model"), Checkpoint(base)
    assert manifest["settings"]["sensitivity"] == ("--sensitivity" in extra)
    if "--budget-scope" in extra:  # bits move between matrices: each keeps at least one vector
        assert all(m["info"]["rank"] >= 1 for m in mods.values())
        return
    for name, d in deltas.items():
        # GPTQ trades weight-space error for output error on the calibration inputs (tests/test_gptq.py):
        # the weights only have to stay close
        got = out.read(name) - b.read(name)
        assert float((got - d).norm() / d.norm()) < 0.5, name


def test_calib_use_splits_the_rounding_from_the_allocation(llama_tok, tmp_path):
    """--calib-use rounding keeps the uncalibrated allocation's widths and changes only the rounding (GPTQ);
    allocation keeps round-to-nearest at --group-size and lets the Hessian choose the widths."""
    base, ft, _ = llama_tok
    calib = tmp_path / "calib.txt"
    calib.write_text(_text(40))

    def compress(name, *extra):
        args = ["compress", str(base), str(ft), "-o", str(tmp_path / name), "--bits", "2", "--group-size", "32",
                "--gptq-group-size", "32", "--allocation", "optimal", "--no-progress", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        pkg = DeltaPackage(tmp_path / name)
        return pkg, {n: m for n, m in pkg.manifest["modules"].items() if m["action"] == "compress"}

    plain, plain_mods = compress("plain", "--calib", "none")
    rounded, rounded_mods = compress("rounding", "--calib", str(calib), "--calib-use", "rounding")
    weighed, weighed_mods = compress("allocation", "--calib", str(calib), "--calib-use", "allocation",
                                     "--group-size", "0")
    assert {n: m["info"]["groups"] for n, m in rounded_mods.items()} == \
        {n: m["info"]["groups"] for n, m in plain_mods.items()}
    assert any(not torch.equal(reconstruct_delta(rounded, n), reconstruct_delta(plain, n)) for n in plain_mods)
    assert all(m["info"]["calibrated"] for m in rounded_mods.values())
    assert all(m["info"]["group_size"] == 0 and m["info"]["calibrated"] for m in weighed_mods.values())
    assert {n: m["info"]["groups"] for n, m in weighed_mods.items()} != \
        {n: m["info"]["groups"] for n, m in plain_mods.items()}
