"""``deltacomp fuse create|train|generate|eval`` through click's CliRunner: the happy path, and every error of the
issue giving one clear line, a non-zero exit and no output folder."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error

from deltacomp.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fuse_setup(llama_tok, tmp_path_factory):
    """Two packages over the tiny Llama (with a tokenizer), one package over another base, and data files."""
    from conftest import _llama, save_pair

    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    base, ft, _ = llama_tok
    root = tmp_path_factory.mktemp("fuse_cli")
    compress(base, ft, root / "a", CompressConfig(bits=4.0, schedule=((8, None),)), progress=False)
    compress(base, ft, root / "b", CompressConfig(bits=2.0, schedule=((8, None),)), progress=False)
    other_base, other_ft, _ = save_pair(root / "other", _llama, seed=1)
    compress(other_base, other_ft, root / "other_pkg", CompressConfig(bits=2.0, schedule=((8, None),)),
             progress=False)
    rows = [{"prompt": f"say {w}:", "answer": f" {w}"} for w in "alpha beta gamma delta eps zeta eta theta".split()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (root / "empty.jsonl").write_text("\n")
    return {"base": base, "a": root / "a", "b": root / "b", "other_base": other_base,
            "other_pkg": root / "other_pkg", "train": root / "train.jsonl", "short": root / "short.jsonl",
            "empty": root / "empty.jsonl"}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_nothing_written(folder):
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")], "partial folder left"


def test_create_generate_eval(fuse_setup, tmp_path):
    s = fuse_setup
    gate = tmp_path / "gate"
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--delta", s["b"], "--gate", "static",
            "--weights", "0.7,0.3", "-o", gate)
    assert r.exit_code == 0, r.output
    assert "static gate over 2 deltas" in r.output and (gate / "fusion.json").is_file()
    r = run("fuse", "generate", gate, "--prompt", "say alpha:", "--prompt", "x", "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [o["prompt"] for o in out] == ["say alpha:", "x"]
    r = run("fuse", "eval", gate, "--data", s["train"], "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [row["model"] for row in rows][0] == "base" and len(rows) == 4
    assert all(0 <= row["exact_match"] <= 1 for row in rows)
    r = run("fuse", "eval", gate, "--data", s["train"], "--no-exact")
    assert r.exit_code == 0 and "fused (static gate)" in r.output, r.output


@pytest.mark.parametrize("gate, extra", [("token", []), ("sentence", ["--top-p", "0.9"]),
                                         ("static", ["--weights", "1,0"])])
def test_train_writes_a_gate(fuse_setup, tmp_path, gate, extra):
    s = fuse_setup
    r = run("fuse", "train", "--base", s["base"], "--delta", s["a"], "--delta", s["b"], "--gate", gate, *extra,
            "--data", s["train"], "--epochs", "1", "--batch-size", "4", "-o", tmp_path / "g", "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"trained the {gate} gate on 7 examples (2 steps)" in r.output and "held-out loss" in r.output
    doc = json.loads((tmp_path / "g" / "fusion.json").read_text())
    assert doc["training"]["heldout_examples"] == 1 and doc["config"]["gate"] == gate


@pytest.mark.parametrize("weights, needle", [
    ("0.5", "gives 1 weights for 2 deltas"),
    ("nan,1", "finite"),
    ("-1,2", "must be >= 0"),
    ("a,b", "expected numbers"),
])
def test_bad_weights(fuse_setup, tmp_path, weights, needle):
    s = fuse_setup
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--delta", s["b"], "--gate", "static",
            "--weights", weights, "-o", tmp_path / "g")
    assert_one_line_error(r, needle)
    assert_nothing_written(tmp_path / "g")


def test_deltas_over_different_bases(fuse_setup, tmp_path):
    s = fuse_setup
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--delta", s["other_pkg"], "-o", tmp_path / "g")
    assert_one_line_error(r, "other_pkg", "another base")
    assert_nothing_written(tmp_path / "g")


def test_deltas_over_another_base_than_given(fuse_setup, tmp_path):
    s = fuse_setup
    r = run("fuse", "create", "--base", s["other_base"], "--delta", s["a"], "-o", tmp_path / "g")
    assert_one_line_error(r, "is not the base the deltas were made from")
    assert_nothing_written(tmp_path / "g")


def test_gate_whose_package_changed(fuse_setup, tmp_path):
    s = fuse_setup
    shutil.copytree(s["a"], tmp_path / "a")
    gate = tmp_path / "gate"
    assert run("fuse", "create", "--base", s["base"], "--delta", tmp_path / "a", "--delta", s["b"], "-o",
               gate).exit_code == 0
    manifest = json.loads((tmp_path / "a" / "deltacomp.json").read_text())
    manifest["finetuned"]["source"] = "something else"
    (tmp_path / "a" / "deltacomp.json").write_text(json.dumps(manifest))
    r = run("fuse", "generate", gate, "--prompt", "hi")
    assert_one_line_error(r, "delta 0", str(tmp_path / "a"), "manifest sha256", "changed")
    r = run("fuse", "eval", gate, "--data", s["train"])
    assert_one_line_error(r, "delta 0")


def test_gate_for_another_base(fuse_setup, tmp_path):
    s = fuse_setup
    gate = tmp_path / "gate"
    assert run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--delta", s["b"], "-o", gate).exit_code == 0
    r = run("fuse", "generate", gate, "--base", s["other_base"], "--prompt", "hi")
    assert_one_line_error(r, "is a gate for another base")


@pytest.mark.parametrize("data, needle", [("empty", "is empty"), ("short", "2 usable examples")])
def test_empty_or_short_training_data(fuse_setup, tmp_path, data, needle):
    s = fuse_setup
    r = run("fuse", "train", "--base", s["base"], "--delta", s["a"], "--delta", s["b"], "--data", s[data],
            "-o", tmp_path / "g", "--no-progress")
    assert_one_line_error(r, needle)
    assert_nothing_written(tmp_path / "g")


def test_other_errors(fuse_setup, tmp_path):
    s = fuse_setup
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--gate", "mlp", "-o", tmp_path / "g")
    assert_one_line_error(r, "unknown gate 'mlp'", "static, token")
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "--load-in-4bit", "--load-in-8bit",
            "-o", tmp_path / "g")
    assert_one_line_error(r, "not both")
    r = run("fuse", "generate", tmp_path / "nowhere", "--prompt", "x")
    assert_one_line_error(r, "not a gate folder")
    assert_nothing_written(tmp_path / "g")
    (tmp_path / "exists").mkdir()
    r = run("fuse", "create", "--base", s["base"], "--delta", s["a"], "-o", tmp_path / "exists")
    assert_one_line_error(r, "already exists")
