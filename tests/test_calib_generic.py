"""``--calib auto`` (the default): the everyday text where the fine-tune can be run, else no calibration, decided
once and recorded (tests/test_quality_suite.py checks that the quality suite never scores the shipped text)."""

import json
import logging

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, calib_text
from safetensors.torch import load_file

from deltacomp.calib.generic import GENERIC_TEXT
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig


def _package(tmp_path, pair, name, **kw):
    base, ft, _ = pair
    manifest = compress(base, ft, tmp_path / name, CompressConfig(bits=0.5, **kw), progress=False)
    tensors = {}
    for f in sorted((tmp_path / name).glob("delta*.safetensors")):
        tensors.update(load_file(f))
    return manifest["settings"], tensors


def test_the_default_calibrates_on_the_shipped_text_as_if_it_were_given(llama_tok, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="deltacomp"):
        auto, auto_tensors = _package(tmp_path, llama_tok, "auto")
    assert auto["calib"] == "generic" and "calibrating on deltacomp's everyday English text" in caplog.text
    assert "get no calibration" not in caplog.text  # the token tables: --vocab-weights weighs them
    assert auto["allocation_bits"] == CompressConfig(calib="generic").to_dict()["allocation_bits"]
    given, given_tensors = _package(tmp_path, llama_tok, "given", calib=str(GENERIC_TEXT))
    assert given_tensors.keys() == auto_tensors.keys()
    assert all((given_tensors[k] == auto_tensors[k]).all() for k in auto_tensors)  # the same package, bit for bit
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltacomp"):
        _package(tmp_path, llama_tok, "unweighed", vocab_weights="off")
    assert "2 matrices are outside the transformer blocks and get no calibration (e.g. lm_head.weight)" in caplog.text
    plain, plain_tensors = _package(tmp_path, llama_tok, "none", calib="none")
    assert plain["calib"] is None and plain["allocation_bits"] == "2,3,4,8"
    assert any(not (plain_tensors[k] == auto_tensors[k]).all() for k in auto_tensors if k in plain_tensors)


def test_without_a_tokenizer_the_default_compresses_uncalibrated_and_says_why(llama_pair, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="deltacomp"):
        settings, _ = _package(tmp_path, llama_pair, "pkg")
    assert settings["calib"] is None and settings["allocation_bits"] == "2,3,4,8"
    assert "without calibration: no tokenizer in" in caplog.text


@pytest.mark.parametrize("kw", [{"method": "reference"}, {"excitation_power": 2.0}])
def test_settings_that_do_not_calibrate_take_the_default_as_none(llama_tok, tmp_path, kw):
    settings, _ = _package(tmp_path, llama_tok, "pkg", **kw)
    assert settings["calib"] is None


def test_options_that_need_calibration_say_why_the_default_cannot_give_it(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(tmp_path / "o"), "--sequential"])
    assert_one_line_error(r, "--sequential needs calibration", "no tokenizer in")
    assert not (tmp_path / "o").exists()


def test_the_cli_records_what_it_chose(llama_tok, tmp_path):
    base, ft, _ = llama_tok
    for calib, want in (([], "generic"), (["--calib", "none"], None), (["--calib", "generic"], "generic")):
        out = tmp_path / f"pkg{len(list(tmp_path.iterdir()))}"
        r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(out), "--bits", "0.5", *calib])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "deltacomp.json").read_text())["settings"]["calib"] == want



@pytest.mark.parametrize("join", [True, False])
def test_a_calibration_file_is_joined_by_the_everyday_text_unless_told_not(llama_tok, tmp_path, join):
    from deltacomp.calib.data import load_samples
    from deltacomp.calib.frequency import find_tokenizer
    from deltacomp.calib.provider import load_calibration
    from deltacomp.io.checkpoint import Checkpoint

    base, ft, _ = llama_tok
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(6))
    config = CompressConfig(calib=str(calib), calib_generic=join)
    got, starts = load_calibration(config.groups.calibration, Checkpoint(ft), Checkpoint(base))
    tok = find_tokenizer([ft])
    want = load_samples(calib, tok) + (load_samples(GENERIC_TEXT, tok) if join else [])
    assert len(got) == len(want) == 6 + 821 * join and all((a == b).all() for a, b in zip(got, want))
    assert starts == [None] * len(got)  # texts have no answers
    generic = CompressConfig(calib="generic", calib_generic=join)  # the everyday text is not taken twice
    assert len(load_calibration(generic.groups.calibration, Checkpoint(ft), Checkpoint(base))[0]) == 821


def test_a_folders_tokenizer_is_loaded_once_while_its_files_are_unchanged(llama_tok, tmp_path, monkeypatch):
    import shutil

    import transformers

    from deltacomp.calib.frequency import find_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(llama_tok[1], folder)
    loads = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, *a, **kw: loads.append(path) or real(path, *a, **kw))
    first = find_tokenizer([tmp_path / "none", folder])
    assert find_tokenizer([tmp_path / "none", folder]) is first and loads.count(str(folder)) == 1
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # a changed file: loaded again
    assert find_tokenizer([folder]) is not first and loads.count(str(folder)) == 2
    assert find_tokenizer([tmp_path / "none"]) is None
