"""Bad input: one clear line, a non-zero exit, and nothing half-written left behind."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from deltacomp.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, *needles, out=None):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_folder(tmp_path, llama_pair):
    base, _, _ = llama_pair
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, tmp_path / "nope", "-o", out), "no such folder", out=out)


def test_folder_that_is_not_a_model(tmp_path, llama_pair):
    base, _, _ = llama_pair
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, tmp_path / "junk", "-o", out), "not a model folder", out=out)
    (tmp_path / "junk" / "config.json").write_text("{}")
    assert_clean_failure(run("compress", base, tmp_path / "junk", "-o", out), "no model.safetensors", out=out)


def test_mismatched_architectures(tmp_path, llama_pair, bert_pair):
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", llama_pair[0], bert_pair[1], "-o", out), "architectures differ", out=out)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    bad = _copy(ft, tmp_path / "ft")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_weights(bad, lambda t: t.__setitem__(name, torch.zeros(100, 64)))
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, bad, "-o", out), name, "[160, 64]", "[100, 64]", out=out)


def test_truncated_safetensors(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    bad = _copy(ft, tmp_path / "ft")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, bad, "-o", out), "model.safetensors", "truncated", out=out)


def test_corrupt_safetensors_header(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    bad = _copy(ft, tmp_path / "ft")
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, bad, "-o", out), "model.safetensors", "corrupt", out=out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights(tmp_path, llama_pair, value):
    base, ft, _ = llama_pair
    bad = _copy(ft, tmp_path / "ft")
    # the last layer, so that the failure comes after part of the package was written
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_weights(bad, lambda t: t[name].__setitem__((3, 5), value))
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, bad, "-o", out), name, "NaN/Inf", out=out)


@pytest.mark.parametrize("bits, needle", [("0", "positive number"), ("-1", "positive number"),
                                          ("0.001", "too small for one singular vector")])
def test_budget_zero_or_too_small(tmp_path, llama_pair, bits, needle):
    base, ft, _ = llama_pair
    out = tmp_path / "pkg"
    assert_clean_failure(run("compress", base, ft, "-o", out, "--bits", bits), needle, out=out)


def test_unknown_method(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    assert_clean_failure(run("compress", base, ft, "-o", tmp_path / "p", "--method", "zip"), "known methods")


def test_existing_output_needs_overwrite(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run("compress", base, ft, "-o", out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a previous output of the same kind: never a user's folder
    assert_clean_failure(run("compress", base, ft, "-o", out, "--overwrite"), "not a previous deltacomp package")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    assert run("compress", base, ft, "-o", out, "--overwrite").exit_code == 0
    assert (out / "deltacomp.json").is_file()
    (out / "extra.txt").write_text("x")  # a previous package may be replaced
    assert run("compress", base, ft, "-o", out, "--overwrite").exit_code == 0
    assert not (out / "extra.txt").exists()


def test_unwritable_output(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_clean_failure(run("compress", base, ft, "-o", blocker / "pkg"), "cannot write here")


@pytest.fixture()
def package(tmp_path, llama_pair):
    base, ft, _ = llama_pair
    assert run("compress", base, ft, "-o", tmp_path / "pkg").exit_code == 0
    return tmp_path / "pkg"


def test_apply_to_the_wrong_base(tmp_path, package, llama_pair):
    _, ft, _ = llama_pair
    out = tmp_path / "model"
    assert_clean_failure(run("apply", package, "--base", ft, "-o", out), "is not the base", out=out)


def test_corrupt_package_file_is_named(tmp_path, package, llama_pair):
    base, _, _ = llama_pair
    f = package / "delta.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    out = tmp_path / "model"
    assert_clean_failure(run("apply", package, "--base", base, "-o", out), "delta.safetensors", "corrupt", out=out)
    f.write_bytes(bytes(data[:-100]))
    assert_clean_failure(run("inspect", package), "delta.safetensors", "truncated")


def test_not_a_package(tmp_path, llama_pair):
    assert_clean_failure(run("inspect", llama_pair[0]), "not a deltacomp package")
    assert_clean_failure(run("inspect", tmp_path / "missing"), "no such package")


def test_newer_package_format_is_refused(package):
    manifest = json.loads((package / "deltacomp.json").read_text())
    manifest["format_version"] = 99
    (package / "deltacomp.json").write_text(json.dumps(manifest))
    assert_clean_failure(run("inspect", package), "newer than this deltacomp reads")
