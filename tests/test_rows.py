"""Row-sparse vocabulary deltas: selection, round trip through a package, kernels, PEFT export, all-in totals."""

import json

import pytest
import torch
from click.testing import CliRunner

from deltacomp.calib.activations import LayerwiseHessians
from deltacomp.calib.head import head_moment
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.errors import PackageError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage
from deltacomp.rows import check_rows, is_token_table, scatter_rows, select_rows


def test_token_tables_are_the_vocabulary_matrices_whose_rows_are_tokens():
    assert is_token_table("model.embed_tokens.weight") and is_token_table("lm_head.weight")
    assert is_token_table("bert.embeddings.word_embeddings.weight") and is_token_table("transformer.wte.weight")
    for positions in ("bert.embeddings.position_embeddings.weight", "transformer.wpe.weight",
                      "model.decoder.embed_positions.weight"):
        assert not is_token_table(positions)
    assert not is_token_table("model.layers.0.self_attn.q_proj.weight")


def test_select_rows_keeps_the_rows_that_moved():
    d = torch.randn(100, 8) * 1e-5
    d[[3, 50, 97]] = torch.randn(3, 8)
    rows = select_rows(d, 0.999)
    assert rows.tolist() == [3, 50, 97]
    assert torch.equal(scatter_rows(d[rows], rows, 100)[rows], d[rows])
    assert select_rows(torch.randn(100, 8), 0.999) is None  # every row moved: dense
    assert select_rows(d, 1.0) is None
    assert check_rows(torch.tensor([1, 1], dtype=torch.int32), 2, 10) == "must be strictly increasing"
    assert "outside" in check_rows(torch.tensor([1, 10], dtype=torch.int32), 2, 10)


@pytest.fixture(scope="module")
def sparse_embedding_pair(llama_pair, tmp_path_factory):
    """The tiny Llama pair with a few embedding rows and lm_head rows changed (a fine-tune's token tables)."""
    from safetensors.torch import load_file, save_file

    base, ft, _ = llama_pair
    out = tmp_path_factory.mktemp("sparse_emb") / "ft"
    import shutil

    shutil.copytree(ft, out)
    files = sorted(out.glob("*.safetensors"))
    g = torch.Generator().manual_seed(0)
    for f in files:
        sd = load_file(f)
        for k in sd:
            if k.endswith(("embed_tokens.weight", "lm_head.weight")):
                sd[k] = sd[k].clone()
                sd[k][torch.arange(5, 40, 7)] += 0.05 * torch.randn(5, sd[k].shape[1], generator=g)
        save_file(sd, f, metadata={"format": "pt"})
    return base, out


def test_embeddings_are_compressed_row_sparse_and_rebuilt(sparse_embedding_pair, tmp_path):
    from deltacomp.package.reader import reconstruct_delta

    base, ft = sparse_embedding_pair
    m = compress(base, ft, tmp_path / "pkg", CompressConfig(), progress=False)
    b, f = Checkpoint(base), Checkpoint(ft)
    pkg = DeltaPackage(tmp_path / "pkg")
    names = [n for n in m["modules"] if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert names
    for name in names:
        rec = m["modules"][name]
        assert rec["action"] == "compress" and rec["rows"] == 5
        delta = f.read(name).float() - b.read(name).float()
        got = reconstruct_delta(pkg, name)
        assert float((got - delta).norm() / delta.norm()) < 0.2  # 5 rows: 2 vectors at 8 bits, 3 at 3
    files = sum(p.stat().st_size for p in (tmp_path / "pkg").rglob("*") if p.is_file())
    assert m["totals"]["package_bytes"] == files == sum(m["totals"]["bytes_by_kind"].values())
    assert m["totals"]["bytes_by_kind"]["embeddings"] > 0


def test_shared_allocation_keeps_token_tables_row_sparse(sparse_embedding_pair, tmp_path):
    """--budget-scope model compresses a token table's moved rows only, as the per-matrix path does: its vectors
    cost 5 + n entries instead of V + n, the row indices come off the shared budget, and the table rebuilds."""
    from deltacomp.package.reader import reconstruct_delta

    base, ft = sparse_embedding_pair
    m = compress(base, ft, tmp_path / "pkg", CompressConfig(bits=0.5, allocation="optimal", budget_scope="model"),
                 progress=False)
    b, f = Checkpoint(base), Checkpoint(ft)
    names = [n for n in m["modules"] if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert names and m["budget"]["achieved_all_in_bits_per_entry"] <= 0.5 + 0.1
    assert m["budget"]["achieved_factor_bits_per_entry"] <= 0.5
    for name in names:
        rec = m["modules"][name]
        assert rec["action"] == "compress" and rec["rows"] == 5
        delta = f.read(name).float() - b.read(name).float()
        got = reconstruct_delta(DeltaPackage(tmp_path / "pkg"), name)
        moved = delta.abs().sum(1) > 0
        assert not got[~moved].any() and float((got - delta).norm() / delta.norm()) < 0.9


def test_vocab_bits_set_the_token_tables_budget_alone(sparse_embedding_pair, tmp_path):
    base, ft = sparse_embedding_pair
    spent = {}
    for vocab_bits in (None, 4.0):
        config = CompressConfig(bits=0.5, vocab_bits=vocab_bits, rows_energy=1.0)  # every row: the whole budget
        m = compress(base, ft, tmp_path / f"pkg{vocab_bits}", config, progress=False)
        spent[vocab_bits] = {n: r["factor_bits_per_entry"] for n, r in m["modules"].items()
                             if r["action"] == "compress"}
        assert m["settings"]["vocab_bits"] == vocab_bits
    vocab = [n for n in spent[None] if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert vocab and len(spent[None]) > len(vocab)
    for name, bits in spent[4.0].items():
        if name in vocab:
            assert 0.5 < bits <= 4.0 and bits > 2 * spent[None][name]
        else:  # the other matrices keep --bits, unchanged
            assert bits == spent[None][name] <= 0.5
    result = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "bad"), "--vocab-bits",
                                      "2", "--budget-scope", "model"])
    assert result.exit_code != 0 and "--vocab-bits" in result.output and "Traceback" not in result.output


def test_forged_rows_are_refused(sparse_embedding_pair, tmp_path):
    base, ft = sparse_embedding_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(), progress=False)
    path = tmp_path / "pkg" / "deltacomp.json"
    manifest = json.loads(path.read_text())
    name = next(n for n, r in manifest["modules"].items() if "rows" in r)
    manifest["modules"][name]["rows"] = 10**9
    path.write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="rows"):
        DeltaPackage(tmp_path / "pkg")


def test_attach_merges_the_embedding_delta_and_wraps_linears(sparse_embedding_pair, tmp_path):
    """kernels.attach wraps only linear layers; an embedding's (or a row-sparse head's) delta is rebuilt dense
    into the model's weight."""
    from transformers import AutoModelForCausalLM

    from deltacomp.kernels import DeltaLinear, attach
    from deltacomp.package.reader import reconstruct_delta

    base, ft = sparse_embedding_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(), progress=False)
    pkg = DeltaPackage(tmp_path / "pkg")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    emb = model.get_input_embeddings().weight.detach().clone()
    wrapped = attach(model, [pkg])
    assert wrapped and all(isinstance(model.get_submodule(p), DeltaLinear) for p in wrapped)
    assert not any("embed" in p or "lm_head" in p for p in wrapped)
    want = emb + reconstruct_delta(pkg, "model.embed_tokens.weight")
    assert torch.allclose(model.get_input_embeddings().weight, want)


def test_peft_export_puts_the_embedding_under_modules_to_save(sparse_embedding_pair, tmp_path):
    base, ft = sparse_embedding_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(), progress=False)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "pkg"), "--base", str(base), "-o", str(tmp_path / "ad")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in cfg["modules_to_save"]


def test_all_in_budget_counts_scales_and_s(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    m = compress(base, ft, tmp_path / "pkg", CompressConfig(budget="all-in"), progress=False)
    assert m["budget"]["achieved_all_in_bits_per_entry"] <= 1.0
    for rec in m["modules"].values():
        if rec["action"] == "compress":
            assert rec["all_in_bits_per_entry"] <= 1.0


def test_cli_papercuts(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    help_text = CliRunner().invoke(cli, ["compress", "--help"]).output
    assert "[mixed|reference|lowrank|bitdelta|dense]" in help_text and "--budget [factors|all-in]" in help_text
    assert "[float32|bfloat16|float16]" in CliRunner().invoke(cli, ["eval", "--help"]).output
    assert "Texts scored per forward pass" in CliRunner().invoke(cli, ["eval", "--help"]).output
    assert "Replace package/ and model/" in CliRunner().invoke(cli, ["demo", "--help"]).output
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "p"), "-v"])
    assert r.exit_code == 0, r.output
    assert "bits/entry" in r.output  # the per-module table with -v after the subcommand
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "p")])
    assert "every file" in r.output and "norms and biases" in r.output


@pytest.fixture(scope="module")
def dense_embedding_pair(llama_tok, tmp_path_factory):
    """The tiny Llama pair (byte tokenizer) with every row of embed_tokens and lm_head moved (a tied head's
    fine-tune), by a delta of full rank."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, ft = llama_tok[:2]
    out = tmp_path_factory.mktemp("dense_emb") / "ft"
    shutil.copytree(ft, out)
    g = torch.Generator().manual_seed(1)
    for f in sorted(out.glob("*.safetensors")):
        sd = load_file(f)
        for k in sd:
            if k.endswith(("embed_tokens.weight", "lm_head.weight")):
                sd[k] = sd[k] + 0.02 * torch.randn(sd[k].shape, generator=g)
        save_file(sd, f, metadata={"format": "pt"})
    return base, out


def test_vocab_weights_counts_keep_the_frequent_tokens_rows_better(dense_embedding_pair, tmp_path):
    from transformers import AutoTokenizer

    from deltacomp.calib.frequency import count_tokens, text_token_lists
    from deltacomp.calib.generic import GENERIC_TEXT
    from deltacomp.package.reader import reconstruct_delta

    base, ft = dense_embedding_pair
    counts = count_tokens(text_token_lists(GENERIC_TEXT, AutoTokenizer.from_pretrained(ft)), 256)
    frequent = counts.argsort(descending=True)[:16]  # the byte tokenizer: mostly lower-case letters and the space
    b, f = Checkpoint(base), Checkpoint(ft)
    err, stored = {}, {}
    for weights in ("off", "counts", "head", "auto"):
        config = CompressConfig(bits=0.5, rows_energy=1.0, vocab_weights=weights, allocation="schedule", calib="none")
        m = compress(base, ft, tmp_path / weights, config, progress=False)
        assert m["settings"]["vocab_weights"] == weights
        pkg = DeltaPackage(tmp_path / weights)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            delta = f.read(name).float() - b.read(name).float()
            got = reconstruct_delta(pkg, name)
            err[weights, name] = float((got - delta)[frequent].norm() / delta[frequent].norm())
        stored[weights] = {n: r["bytes"] for n, r in m["modules"].items() if r["action"] == "compress"}
        calibrated = {n: r["info"]["calibrated"] for n, r in m["modules"].items() if r["action"] == "compress"}
        # head: the untied lm_head is weighted by its inputs too (GPTQ), nothing else is
        assert calibrated["lm_head.weight"] == (weights in ("head", "auto"))
        assert not calibrated["model.embed_tokens.weight"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert err["counts", name] < 0.9 * err["off", name]
        assert err["auto", name] == err["head", name]  # auto is head where the model has a tokenizer
    assert stored["counts"] == stored["off"]  # the same bytes: the weights only choose the vectors


def test_vocab_weights_auto_without_a_tokenizer_is_off_without_a_warning(llama_pair, tmp_path, caplog):
    base, ft, _ = llama_pair  # no tokenizer files
    config = dict(bits=0.5, rows_energy=1.0, allocation="schedule")
    with caplog.at_level("DEBUG", logger="deltacomp"):
        compress(base, ft, tmp_path / "auto", CompressConfig(**config), progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "tokenizer" in r.message]
    compress(base, ft, tmp_path / "off", CompressConfig(vocab_weights="off", **config), progress=False)
    for f in (tmp_path / "off").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "auto" / f.name).read_bytes()
    with caplog.at_level("WARNING", logger="deltacomp"):
        compress(base, ft, tmp_path / "head", CompressConfig(vocab_weights="head", **config), progress=False)
    assert any("no tokenizer" in r.message for r in caplog.records)  # asked for: told why it is not done


def test_methods_that_do_not_weigh_rows_skip_the_token_pass(llama_tok, tmp_path, monkeypatch):
    """The default --vocab-weights auto costs a method that does not read row weights nothing: no pass of the
    fine-tune over the token text."""
    import deltacomp.calib.frequency as frequency

    def fail(*args, **kwargs):
        raise AssertionError("token weights computed for a method that does not read them")

    monkeypatch.setattr(frequency, "token_table_contexts", fail)
    base, ft, _ = llama_tok
    for method in ("reference", "lowrank"):
        compress(base, ft, tmp_path / method, CompressConfig(method=method, bits=2.0), progress=False)
    with pytest.raises(AssertionError, match="token weights computed"):
        compress(base, ft, tmp_path / "mixed", CompressConfig(bits=2.0), progress=False)


def test_calibration_text_is_read_once_for_the_token_weights_too(dense_embedding_pair, tmp_path, monkeypatch):
    """With --calib the token tables are weighted on the calibration samples the layers use, not a second read."""
    from conftest import calib_text

    import deltacomp.calib.provider as provider

    calls = []
    real = provider.load_calibration
    monkeypatch.setattr(provider, "load_calibration", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, ft = dense_embedding_pair
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(16))
    config = CompressConfig(bits=2.0, rows_energy=1.0, calib=str(calib), calib_samples=8)
    walks = []
    real_walk = LayerwiseHessians.block_inputs
    monkeypatch.setattr(LayerwiseHessians, "block_inputs", lambda self: walks.append(1) or real_walk(self))
    m = compress(base, ft, tmp_path / "pkg", config, progress=False)
    assert len(calls) == 1
    assert len(walks) == 1  # the head's inputs: the calibration's walk through the fine-tune, taken on
    assert m["modules"]["lm_head.weight"]["info"]["calibrated"]  # the head was weighted by its inputs
    # the same package as with a walk of the head's own
    monkeypatch.setattr(provider._Cursor, "head_moment",
                        lambda self: head_moment(self.hessians.ckpt, self.hessians.samples))
    compress(base, ft, tmp_path / "own", config, progress=False)
    assert len(walks) == 3
    a, b = _package_tensors(tmp_path / "pkg"), _package_tensors(tmp_path / "own")
    assert any("lm_head" in k for k in a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _package_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return {f"{p.name}:{k}": t for p in sorted(folder.glob("*.safetensors")) for k, t in load_file(p).items()}
