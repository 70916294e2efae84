"""Gate folders through ``deltacomp push`` / ``pull`` against the loopback Hub (tests/hub_server.py)."""

import json

import pytest
from click.testing import CliRunner

from deltacomp.cli import cli
from deltacomp.fusion import FusionModel

REPO = "team/tiny-gate"


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def gate(llama_packages, llama_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub_gate") / "gate"
    fm = FusionModel.from_packages(llama_pair[0], [llama_packages(2.0), llama_packages(1.0)], gate="static",
                                   weights=(0.6, 0.4))
    fm.save(folder)
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_a_gate(hub, gate, tmp_path):
    r = run("push", gate, REPO)
    assert r.exit_code == 0, r.output
    assert "pushed 3 files" in r.output
    r = run("pull", REPO, "-o", tmp_path / "pulled", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["method"] == "static gate" and "fusion.json" in result["files"]
    pulled = files_of(tmp_path / "pulled")
    for name, data in files_of(gate).items():
        if name != "README.md":
            assert pulled[name] == data, name
    assert "library_name: deltacomp" in pulled["README.md"].decode()
    # the pulled gate runs over the recorded packages, and names them as it was made
    fm = FusionModel.load(tmp_path / "pulled")
    assert fm.gate.weight.tolist() == pytest.approx([0.6, 0.4])


def test_pull_refuses_a_corrupt_gate(hub, gate, tmp_path):
    assert run("push", gate, REPO).exit_code == 0
    data = (gate / "gate.safetensors").read_bytes()
    hub.tamper(REPO, "gate.safetensors", data[:-3] + b"xyz")  # the server now serves other bytes
    r = run("pull", REPO, "-o", tmp_path / "pulled")
    assert r.exit_code == 1 and "gate.safetensors is corrupt or truncated" in r.output, r.output
    assert not (tmp_path / "pulled").exists()


def test_push_refuses_a_corrupt_gate_folder(hub, gate, tmp_path):
    import shutil

    shutil.copytree(gate, tmp_path / "g")
    (tmp_path / "g" / "gate.safetensors").write_bytes(b"broken")
    r = run("push", tmp_path / "g", REPO)
    assert r.exit_code == 1 and "corrupt or truncated" in r.output, r.output
    assert REPO not in hub.repos
