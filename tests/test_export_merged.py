"""``deltacomp export --format merged``: the same full checkpoint that ``apply`` writes."""

import json

from click.testing import CliRunner

from deltacomp.apply import apply
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.io.checkpoint import Checkpoint


def test_merged_export_equals_apply(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(bits=2.0), progress=False)
    apply(tmp_path / "pkg", base, tmp_path / "applied", progress=False)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "pkg"), "--format", "merged", "--base", str(base),
                                 "-o", str(tmp_path / "merged"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == ["model.safetensors"]
    got, want = Checkpoint(tmp_path / "merged"), Checkpoint(tmp_path / "applied")
    assert sorted(got.keys()) == sorted(want.keys())
    for name in want.keys():
        assert got.read(name).equal(want.read(name)), name
    assert (tmp_path / "merged" / "config.json").read_text() == (ft / "config.json").read_text()


def test_merged_export_needs_a_base_and_refuses_peft_options(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    compress(base, ft, tmp_path / "pkg", CompressConfig(bits=2.0), progress=False)
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "pkg"), "--format", "merged", "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and "--format merged needs --base BASE" in r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "pkg"), "--format", "merged", "--base", str(base),
                                 "--max-rank", "4", "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and "--max-rank only applies to --format peft" in r.output
    assert not (tmp_path / "m").exists()
