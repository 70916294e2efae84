"""``deltacomp eval`` on the tiny Llama and BERT pairs and on the real MiniLM pair; bad inputs."""

import json

import pytest
import torch
from click.testing import CliRunner

from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.package.reader import reconstruct_delta
from deltacomp.package.store import DeltaPackage


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level tokenizer of 256 tokens (the tiny models' vocabulary), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0], pad_token=alphabet[0]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_package(llama_packages):
    return llama_packages(1.0)


def _eval(*args):
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    return result


def _rows(output: str) -> dict:
    return {r["model"]: r for r in json.loads(output)["rows"]}


def test_eval_causal_tiny_llama(llama_pair, llama_package, byte_tokenizer, tmp_path):
    base, ft, _ = llama_pair
    saved = tmp_path / "eval.json"
    r = _eval(llama_package, "--base", base, "--finetuned", ft, "--tokenizer", byte_tokenizer, "--json",
              "--save-json", saved)
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert set(rows) == {"base", "fine-tuned", "mixed (package)", "reference", "lowrank", "bitdelta"}
    result = json.loads(saved.read_text())
    assert result["rows"][2]["model"] == "mixed (package)" and result["rows"][3]["model"] == "reference"
    ref = rows["fine-tuned"]
    assert ref["kl"] == 0.0 and ref["top1"] == 1.0 and ref["tokens"] > 1000
    # the tokens scored, once for the report; every model is scored on the same ones
    assert result["scored"] == {"unit": "tokens", "count": ref["tokens"]}
    assert {r["tokens"] for r in result["rows"]} == {ref["tokens"]}
    # the plain reference's row, and each package's KL as a ratio to its
    assert result["reference"] == "reference" and rows["reference"]["method"] == "reference"
    assert rows["reference"]["vs_reference"] == 1.0
    for label in ("mixed (package)", "lowrank", "bitdelta"):
        assert rows[label]["vs_reference"] == pytest.approx(rows[label]["kl"] / rows["reference"]["kl"])
    assert "vs_reference" not in rows["base"] and "vs_reference" not in rows["fine-tuned"]
    mixed, low = rows["mixed (package)"], rows["lowrank"]
    # the tiny fine-tune's deltas have rank 4: mixed precision keeps them at 1 bit, fp16 low-rank (rank 2) cannot
    assert mixed["error"]["global"] < 0.3 < low["error"]["global"]
    assert mixed["kl"] < low["kl"] and mixed["kl"] < rows["base"]["kl"]
    assert mixed["top1"] > rows["base"]["top1"]
    # the per-module error is the package's own reconstruction error
    pkg = DeltaPackage(llama_package)
    m = mixed["modules"][0]
    from deltacomp.io.checkpoint import Checkpoint

    delta = Checkpoint(ft).read(m["name"]).float() - Checkpoint(base).read(m["name"]).float()
    want = float((delta - reconstruct_delta(pkg, m["name"])).norm() / delta.norm())
    assert m["relative_error"] == pytest.approx(want, rel=1e-4)


def test_eval_table_data_file_and_plots(llama_pair, llama_package, byte_tokenizer, tmp_path):
    base, ft, _ = llama_pair
    data = tmp_path / "data.txt"
    data.write_text("the first sample of text\n\nanother sample, a little longer than the first one\n")
    plots = tmp_path / "plots"
    r = _eval(llama_package, "--base", base, "--finetuned", ft, "--tokenizer", byte_tokenizer, "--data", data,
              "--compare", "lowrank", "--plot", plots, "--plot-budgets", "0.5,1", "--modules")
    assert r.exit_code == 0, r.output
    assert "data.txt (2 samples)" in r.output and "KL(ft||model)" in r.output and "KL / reference" in r.output
    assert "tokens (every next token of every sample) scored per model" in r.output
    assert "reference: the plain reference" in r.output  # not named in --compare, reported all the same
    assert "lowrank" in r.output and "bitdelta" not in r.output
    assert "model.layers.1.self_attn.q_proj.weight" in r.output  # --modules
    for name in ("spectra.png", "bits.png", "error_vs_budget.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_encoder_tiny_bert(bert_pair, byte_tokenizer, tmp_path):
    base, ft, _ = bert_pair
    pkg = tmp_path / "pkg"
    compress(base, ft, pkg, CompressConfig(bits=0.5), progress=False)
    r = _eval(pkg, "--base", base, "--finetuned", ft, "--tokenizer", byte_tokenizer, "--json")
    assert r.exit_code == 0, r.output
    rows, result = _rows(r.stdout), json.loads(r.stdout)
    assert "bitdelta" not in rows and "bitdelta" in result["skipped"]  # 1 bit > a 0.5 budget
    assert rows["fine-tuned"]["cos_mean"] == 1.0
    assert rows["mixed calib optimal (package)"]["cos_mean"] > rows["base"]["cos_mean"]
    assert rows["mixed calib optimal (package)"]["samples"] >= 100
    assert result["scored"] == {"unit": "sentences", "count": rows["mixed calib optimal (package)"]["samples"]}
    gap = 1 - rows["mixed calib optimal (package)"]["cos_mean"], 1 - rows["reference"]["cos_mean"]
    assert rows["mixed calib optimal (package)"]["vs_reference"] == pytest.approx(gap[0] / gap[1])


def test_eval_of_a_reference_package_takes_its_row_as_the_reference(llama_pair, byte_tokenizer, tmp_path):
    base, ft, _ = llama_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(method="reference", bits=1.0), progress=False)
    r = _eval(tmp_path / "pkg", "--base", base, "--finetuned", ft, "--tokenizer", byte_tokenizer, "--compare", "none",
              "--max-samples", "4", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert [row["model"] for row in result["rows"]] == ["base", "fine-tuned", "reference (package)"]
    assert result["reference"] == "reference (package)" and result["rows"][2]["vs_reference"] == 1.0


def test_the_reference_comes_first_and_once_unless_switched_off():
    from deltacomp.evaluate import EvalConfig, baseline_methods

    assert baseline_methods(EvalConfig()) == ("reference", "lowrank", "bitdelta", "mixed")
    assert baseline_methods(EvalConfig(compare=("mixed", "reference"))) == ("reference", "mixed")
    assert baseline_methods(EvalConfig(compare=("lowrank",), reference=False)) == ("lowrank",)
    assert baseline_methods(EvalConfig(compare=(), reference=False)) == ()


def test_eval_errors_are_one_clear_line(llama_pair, bert_pair, llama_package, byte_tokenizer, tmp_path):
    base, ft, _ = llama_pair
    cases = [
        ((llama_package, "--base", bert_pair[0], "--finetuned", ft), "is not the base this package was made from"),
        ((llama_package, "--base", base, "--finetuned", ft, "--tokenizer", byte_tokenizer, "--data",
          tmp_path / "missing.txt"), "missing.txt: no such file"),
        ((llama_package, "--base", base, "--finetuned", ft, "--compare", "lowrank,zip"), "unknown method 'zip'"),
        ((llama_package, "--base", base, "--finetuned", ft), "no tokenizer files"),
        ((tmp_path / "nope", "--base", base, "--finetuned", ft), "no such package folder"),
    ]
    for args, message in cases:
        r = _eval(*args)
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


@pytest.mark.real
def test_eval_real_minilm(minilm_pair, tmp_path):
    base, ft = minilm_pair
    pkg = tmp_path / "pkg"
    compress(base, ft, pkg, CompressConfig(bits=1.0, calib="none"), progress=False)  # the demo compresses at default
    r = _eval(pkg, "--base", base, "--finetuned", ft, "--compare", "lowrank,bitdelta", "--json")
    assert r.exit_code == 0, r.output
    rows = _rows(r.stdout)
    assert rows["base"]["cos_mean"] < 0.95
    assert rows["mixed optimal (package)"]["cos_mean"] > 0.995
    assert rows["mixed optimal (package)"]["cos_mean"] > rows["lowrank"]["cos_mean"] > rows["base"]["cos_mean"]
    assert rows["mixed optimal (package)"]["error"]["global"] < rows["lowrank"]["error"]["global"]
    assert torch.isfinite(torch.tensor(rows["bitdelta"]["cos_mean"]))


def test_baselines_drop_the_settings_only_mixed_takes(tmp_path):
    from types import SimpleNamespace

    from deltacomp.evaluate import baseline_config

    if "calib" not in CompressConfig.__dataclass_fields__:
        pytest.skip("this deltacomp has no calibration settings")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    settings = CompressConfig(method="mixed", bits=1.0, calib=str(calib), allocation="optimal").to_dict()
    pkg = SimpleNamespace(manifest={"settings": settings})
    low = baseline_config(pkg, "lowrank")
    assert low.method == "lowrank" and low.calib is None and low.allocation == "auto"
    ref = baseline_config(pkg, "reference")
    assert ref.method == "reference" and ref.calib is None and ref.bits == 1.0
    all_in = SimpleNamespace(manifest={"settings": CompressConfig(budget="all-in").to_dict()})
    for method in ("reference", "lowrank", "bitdelta"):  # they take no all-in budget: the factor budget
        assert baseline_config(all_in, method).budget == "factors"
    assert baseline_config(all_in, "mixed").budget == "all-in"
    mixed = baseline_config(pkg, "mixed", bits=0.5)
    assert mixed.calib == str(calib) and mixed.allocation == "optimal" and mixed.bits == 0.5
    calib.unlink()
    assert baseline_config(pkg, "mixed").calib is None  # the file is gone: an uncalibrated baseline, not a failure


def test_package_label_names_the_settings():
    from deltacomp.evaluate import package_label

    assert package_label({"method": "mixed", "settings": {"allocation": "schedule"}}) == "mixed"
    manifest = {"method": "mixed", "settings": {"calib": "c.txt", "allocation": "optimal", "budget_scope": "model"}}
    assert package_label(manifest) == "mixed calib optimal model-scope"
