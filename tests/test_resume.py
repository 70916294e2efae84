"""An interrupted compress keeps its finished matrices; ``--resume`` finishes the same package from them."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import assert_same_package, cli_env, deltacomp

from deltacomp.resume import FOLDER, ResultStore

# runs `deltacomp ARGS...` and kills itself with SIGNAL as the SVD of matrix K (1-based) starts
KILLER = """
import os, signal, sys
from deltacomp import stages
from deltacomp.cli import main

sig, k = getattr(signal, sys.argv[1]), int(sys.argv[2])
class Kill:
    seen = 0
    def enter(self, name):
        if name == "svd":
            Kill.seen += 1
            if Kill.seen == k:
                os.kill(os.getpid(), sig)
    def exit(self, name):
        pass
sys.argv = ["deltacomp", *sys.argv[3:]]
with stages.observe(Kill()):
    main()
"""


def interrupted(args: list, sig: str, k: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, sig, str(k), *map(str, args)], env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def reference(llama_pair, tmp_path_factory):
    base, ft, _ = llama_pair
    out = tmp_path_factory.mktemp("reference") / "pkg"
    deltacomp("compress", base, ft, "--bits", "2", "--no-progress", "-o", out)
    return out


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_resume_after_a_kill_gives_the_same_package(llama_pair, reference, tmp_path, sig):
    base, ft, _ = llama_pair
    args = ["compress", base, ft, "--bits", "2", "--no-progress", "-o", tmp_path / "pkg"]
    k = random.randint(2, 12)  # the tiny Llama has 14 changed matrices
    r = interrupted(args, sig, k)
    assert r.returncode != 0, f"k={k}: {r.stderr}"
    [partial] = partials(tmp_path)
    assert sorted(p.name for p in partial.iterdir()) == [FOLDER]  # only the finished work stays
    done = [p for p in (partial / FOLDER).iterdir() if p.suffix == ".safetensors"]
    assert k - 1 <= len(done) < 16, f"k={k}"  # (the unchanged embeddings are finished without an SVD)
    if sig == "SIGTERM":
        assert "--resume" in r.stderr
    r = deltacomp(*args, "--resume", "-v")
    assert "finished matrices taken up" in r.stderr
    assert_same_package(reference, tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_without_resume_the_partial_work_is_reported_and_removed(llama_pair, reference, tmp_path):
    base, ft, _ = llama_pair
    args = ["compress", base, ft, "--bits", "2", "--no-progress", "-o", tmp_path / "pkg"]
    assert interrupted(args, "SIGKILL", 5).returncode != 0
    r = deltacomp(*args)
    assert "file(s) of finished work; removing them" in r.stderr and "--resume" in r.stderr
    assert_same_package(reference, tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_resume_with_other_settings_is_refused(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    args = ["compress", base, ft, "--no-progress", "-o", tmp_path / "pkg"]
    assert interrupted([*args, "--bits", "2"], "SIGKILL", 3).returncode != 0
    r = subprocess.run([sys.executable, "-m", "deltacomp.cli", *map(str, args), "--bits", "1", "--resume"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "used other settings or inputs than this command" in r.stderr, r.stderr
    [partial] = partials(tmp_path)  # still there for the right command
    assert len(list((partial / FOLDER).glob("*.safetensors"))) >= 2


def test_store_round_trip_keeps_order_and_is_whole(tmp_path):
    import torch

    store = ResultStore(tmp_path / FOLDER)
    assert store.start({"a": 1}) == 0
    tensors = {"z": torch.arange(3, dtype=torch.int32), "a": torch.ones(2, 2, dtype=torch.float16)}
    store.save("model.layers.0.q.weight", tensors, {"record": {"x": [1, 2.5]}})
    got, meta = store.load("model.layers.0.q.weight")
    assert list(got) == ["z", "a"] and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert meta == {"record": {"x": [1, 2.5]}}
    assert store.start({"a": 1}) == 1
    assert sorted(p.name for p in store.folder.iterdir()) == ["model.layers.0.q.weight.safetensors", "settings.json"]
    assert signal.SIGTERM  # (the CLI turns SIGTERM into an interruption that keeps this folder)
