"""push / pull / inspect / apply against a loopback Hub (tests/hub_server.py) with the real huggingface_hub client."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error
from hub_server import BAD_TOKEN, TOKEN

from deltacomp.apply import apply
from deltacomp.cli import cli
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.io.checkpoint import Checkpoint

REPO = "team/tiny-delta"



@pytest.fixture(scope="session")
def packages(llama_packages, tmp_path_factory):
    """Two packages of the tiny Llama at different budgets; the first (a copy) carries an eval.json."""
    tmp = tmp_path_factory.mktemp("hub_pkgs")
    shutil.copytree(llama_packages(2.0), tmp / "a")
    evaluation = {"kind": "causal", "data": "built-in text", "rows": [
        {"model": "base", "ppl": 310.2, "kl": 0.41, "top1": 0.62},
        {"model": "fine-tuned", "ppl": 300.1, "kl": 0.0, "top1": 1.0},
        {"model": "mixed (package)", "factor_bits_per_entry": 1.98, "all_in_bits_per_entry": 2.2,
         "package_bytes": 51234, "error": {"mean": 0.0123}, "ppl": 300.3, "kl": 0.0004, "top1": 0.991},
    ]}
    (tmp / "a" / "eval.json").write_text(json.dumps(evaluation))
    return tmp / "a", llama_packages(1.0)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a partial folder was left"


def test_push_then_pull_is_bit_identical(hub, packages, tmp_path):
    a, _ = packages
    r = run("push", a, REPO)
    assert r.exit_code == 0, r.output
    commit = hub.repos[REPO].branches["main"]
    assert commit in r.output and f"{hub.url}/{REPO}" in r.output
    r = run("pull", REPO, "-o", tmp_path / "pulled")
    assert r.exit_code == 0, r.output
    assert commit in r.output and "all verified" in r.output
    pulled, local = files_of(tmp_path / "pulled"), files_of(a)
    card = pulled.pop("README.md").decode()
    local.pop("README.md")
    assert pulled == local  # every package file, the manifest and eval.json, byte for byte
    assert card.startswith("---\nlibrary_name: deltacomp\n")  # a local base: no base_model claim
    assert "- deltacomp-mixed" in card and f"# {REPO}" in card and f"deltacomp pull {REPO}" in card
    assert "## Quality" in card and "| mixed (package) | 1.980 | 2.200 | 0.05 | 0.0123 | 300.300 |" in card


def test_pushing_again_makes_a_new_revision_and_old_ones_stay_pullable(hub, packages, tmp_path):
    a, b = packages
    assert run("push", a, REPO, "--json").exit_code == 0
    first = hub.repos[REPO].branches["main"]
    r = run("push", b, REPO, "--json")
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)["commit"]
    assert second == hub.repos[REPO].branches["main"] and second != first
    assert run("pull", REPO, "-o", tmp_path / "now").exit_code == 0
    now = json.loads((tmp_path / "now" / "deltacomp.json").read_text())
    assert now["settings"]["bits"] == 1.0
    assert not (tmp_path / "now" / "eval.json").exists()  # b has no eval: a's stale one was removed
    assert run("pull", f"{REPO}@{first}", "-o", tmp_path / "then").exit_code == 0
    then = files_of(tmp_path / "then")
    then.pop("README.md")
    assert then == {k: v for k, v in files_of(a).items() if k != "README.md"}
    # a branch: created from main on first use; main does not move
    r = run("push", a, REPO, "--revision", "v2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["revision"] == "v2"
    assert hub.repos[REPO].branches["main"] == second
    assert run("pull", f"{REPO}@v2", "-o", tmp_path / "v2").exit_code == 0
    assert json.loads((tmp_path / "v2" / "deltacomp.json").read_text())["settings"]["bits"] == 2.0


def test_repo_not_found(hub, tmp_path):
    r = run("pull", "team/missing", "-o", tmp_path / "out")
    assert_one_line_error(r, "team/missing", "Hub repo not found")
    assert_nothing_written(tmp_path, "out")
    r = run("inspect", "team/missing")
    assert_one_line_error(r, "Hub repo not found")
    r = run("pull", f"{REPO}@nope", "-o", tmp_path / "out")
    assert_one_line_error(r, "not found")


def test_revision_not_found(hub, packages, tmp_path):
    assert run("push", packages[1], REPO).exit_code == 0
    r = run("pull", f"{REPO}@no-such-branch", "-o", tmp_path / "out")
    assert_one_line_error(r, "revision 'no-such-branch' not found")
    assert_nothing_written(tmp_path, "out")


def test_rejected_token(hub, packages, monkeypatch, tmp_path):
    assert run("push", packages[1], REPO).exit_code == 0
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    r = run("push", packages[1], REPO)
    assert_one_line_error(r, "rejected the token (HTTP 401)")
    r = run("pull", REPO, "-o", tmp_path / "out")
    assert_one_line_error(r, "rejected the token (HTTP 401)")
    assert_nothing_written(tmp_path, "out")
    monkeypatch.delenv("HF_TOKEN")
    r = run("push", packages[1], "team/other")
    assert_one_line_error(r, "asks for a token (HTTP 401)", "HF_TOKEN")
    assert "team/other" not in hub.repos


def test_server_down(hub, packages, tmp_path):
    url = hub.url
    hub.stop()
    r = run("pull", REPO, "-o", tmp_path / "out")
    assert_one_line_error(r, f"cannot reach the Hub at {url}")
    assert_nothing_written(tmp_path, "out")
    r = run("push", packages[1], REPO)
    assert_one_line_error(r, f"cannot reach the Hub at {url}")
    r = run("inspect", REPO)
    assert_one_line_error(r, "not in the local Hub cache", url)


def test_private_repo_is_invisible_without_a_token(hub, packages, monkeypatch, tmp_path):
    assert run("push", packages[1], REPO, "--private").exit_code == 0
    assert hub.repos[REPO].private
    monkeypatch.delenv("HF_TOKEN")
    r = run("pull", REPO, "-o", tmp_path / "out")
    assert_one_line_error(r, "Hub repo not found")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert run("pull", REPO, "-o", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_download_is_named_and_nothing_is_written(hub, packages, tmp_path, damage):
    assert run("push", packages[1], REPO).exit_code == 0
    good = (packages[1] / "delta.safetensors").read_bytes()
    bad = good[: len(good) // 2] if damage == "truncate" else good[:-1] + bytes([good[-1] ^ 1])
    hub.tamper(REPO, "delta.safetensors", bad)
    r = run("pull", REPO, "-o", tmp_path / "out")
    assert_one_line_error(r, REPO, "delta.safetensors is corrupt or truncated")
    assert_nothing_written(tmp_path, "out")
    r = run("inspect", REPO)  # a load through the Hub cache checks the same digests
    assert_one_line_error(r, "delta.safetensors", "corrupt or truncated")


def test_corrupted_local_package_is_named_and_never_pushed(hub, packages, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages[1], pkg)
    data = (pkg / "model" / "config.json").read_bytes()
    (pkg / "model" / "config.json").write_bytes(data[:-10])
    r = run("inspect", pkg)
    assert_one_line_error(r, "config.json: corrupt or truncated")
    r = run("push", pkg, REPO)
    assert_one_line_error(r, "config.json: corrupt or truncated")
    assert REPO not in hub.repos
    (pkg / "delta.safetensors").unlink()
    (pkg / "model" / "config.json").write_bytes(data)
    assert_one_line_error(run("inspect", pkg), "package file delta.safetensors is missing")


def test_inspect_and_apply_take_a_hub_id(hub, packages, llama_pair, tmp_path):
    base = llama_pair[0]
    assert run("push", packages[1], REPO).exit_code == 0
    r = run("inspect", REPO)
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj.weight" in r.output
    r = run("inspect", REPO, "--json")
    assert json.loads(r.stdout)["settings"]["bits"] == 1.0
    r = run("apply", REPO, "--base", base, "-o", tmp_path / "from_hub")
    assert r.exit_code == 0, r.output
    apply(packages[1], base, tmp_path / "local", progress=False)
    got, want = Checkpoint(tmp_path / "from_hub"), Checkpoint(tmp_path / "local")
    assert all(got.read(k).equal(want.read(k)) for k in want.keys())


def test_push_with_peft_loads_in_peft(hub, packages, llama_pair, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = llama_pair[0]
    r = run("push", packages[0], REPO, "--with-peft", "--base", base, "--base-model", "org/tiny-llama")
    assert r.exit_code == 0, r.output
    assert run("pull", REPO, "-o", tmp_path / "pulled").exit_code == 0
    card = (tmp_path / "pulled" / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-llama\n") and "- peft" in card and 'subfolder="peft"' in card
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "pulled" / "peft")
    assert model.peft_config["default"].r > 0
    assert_one_line_error(run("push", packages[0], REPO, "--base-model", "/a/local/path"), "not a Hub repo id")


def test_bad_repo_ids_and_outputs(hub, packages, tmp_path):
    assert_one_line_error(run("push", packages[1], "no-slash"), "'no-slash' is not a Hub repo id")
    (tmp_path / "taken").mkdir()
    assert run("push", packages[1], REPO).exit_code == 0
    assert_one_line_error(run("pull", REPO, "-o", tmp_path / "taken"), "already exists (pass --overwrite")
    assert run("pull", REPO, "-o", tmp_path / "taken", "--overwrite").exit_code == 0
    assert (tmp_path / "taken" / "deltacomp.json").is_file()
    assert_one_line_error(run("push", packages[1], REPO, "--max-rank", "8"), "only apply with --with-peft")


def test_the_token_never_appears_in_output_or_files(hub, packages, llama_pair, tmp_path):
    outputs = [
        run("-v", "push", packages[0], REPO, "--with-peft", "--base", llama_pair[0], "--progress"),
        run("-v", "pull", REPO, "-o", tmp_path / "pulled", "--progress"),
        run("-v", "inspect", REPO, "--json"),
        run("-v", "pull", "team/missing", "-o", tmp_path / "x"),
    ]
    assert [r.exit_code for r in outputs] == [0, 0, 0, 1], [r.output for r in outputs]
    assert TOKEN in hub.seen_tokens  # the client did authenticate with it
    for r in outputs:
        assert TOKEN not in r.output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for commit in hub.repos[REPO].commits.values():
        assert all(TOKEN.encode() not in data for data in commit.files.values())


def test_compress_takes_hub_ids_online_then_offline_from_the_cache(hub, llama_pair, tmp_path, monkeypatch):
    from deltacomp.io import hub as hub_io

    base, ft, _ = llama_pair
    for folder, repo in ((base, "team/tiny-base"), (ft, "team/tiny-finetuned")):
        hub_io.upload(Path(folder), repo)
    r = run("compress", "team/tiny-base", "team/tiny-finetuned", "-o", tmp_path / "online")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "online" / "deltacomp.json").read_text())
    assert manifest["base"]["repo_id"] == "team/tiny-base"
    compress(base, ft, tmp_path / "local", CompressConfig(), progress=False)
    assert files_of(tmp_path / "online")["delta.safetensors"] == files_of(tmp_path / "local")["delta.safetensors"]

    hub.stop()  # the server is gone: the cache alone must do, with HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("compress", "team/tiny-base", "team/tiny-finetuned", "-o", tmp_path / "offline")
    assert r.exit_code == 0, r.output
    r = run("compress", "team/not-cached", "team/tiny-finetuned", "-o", tmp_path / "missing")
    assert_one_line_error(r, "team/not-cached")
    assert_nothing_written(tmp_path, "missing")


@pytest.mark.parametrize("listed", ["/etc/hostname", "../../outside.txt"])
def test_pull_refuses_a_manifest_listing_paths_outside_the_package(hub, packages, tmp_path, listed):
    assert run("push", packages[1], REPO).exit_code == 0
    manifest = json.loads((packages[1] / "deltacomp.json").read_text())
    manifest["files"][listed] = "0" * 64  # would let a package probe whether a local file has a given hash
    hub.tamper(REPO, "deltacomp.json", json.dumps(manifest).encode())
    r = run("pull", REPO, "-o", tmp_path / "out")
    assert_one_line_error(r, listed)
    assert_nothing_written(tmp_path, "out")


def test_pull_keeps_only_the_files_a_package_consists_of(hub, packages, tmp_path):
    a, _ = packages
    assert run("push", a, REPO).exit_code == 0
    main = hub.repos[REPO].branches["main"]
    hub.commit(REPO, "main", {"evil.py": b"import os\n", "model/extra.bin": b"x" * 10}, [], "add unlisted files")
    assert hub.repos[REPO].branches["main"] != main
    r = run("pull", REPO, "-o", tmp_path / "pulled")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "pulled" / "evil.py").exists() and not (tmp_path / "pulled" / "model" / "extra.bin").exists()
    pulled, local = files_of(tmp_path / "pulled"), files_of(a)
    pulled.pop("README.md"), local.pop("README.md")
    assert pulled == local
