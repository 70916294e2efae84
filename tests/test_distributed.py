"""compress under torchrun (2 processes, gloo on the CPU): the same package, byte for byte, as one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import calib_text

from deltacomp.distributed import assign

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment of a ``deltacomp`` subprocess: this checkout, one thread a process, a fixed manifest date."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="1700000000", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def deltacomp(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    """``deltacomp ARGS`` in a subprocess, under torchrun with ``ranks`` processes when more than one."""
    launch = [sys.executable, "-m", "deltacomp.cli"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                  "-m", "deltacomp.cli"]
    r = subprocess.run([*launch, *map(str, args)], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_package(a: Path, b: Path) -> None:
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    assert [n for n in fa if fa[n] != fb[n]] == []


def test_assign_balances_by_size_and_is_fixed():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 40}
    owner = assign(sizes, 2)
    assert owner == assign(dict(reversed(sizes.items())), 2)  # the rule, not the order given
    load = [sum(s for n, s in sizes.items() if owner[n] == r) for r in range(2)]
    assert sorted(load) == [120, 140]  # largest first, to the lighter rank: within one matrix of even
    assert set(assign(sizes, 8).values()) == set(range(5))


@pytest.mark.parametrize("extra", [["--allocation", "schedule"], []], ids=["schedule", "default-optimal"])
def test_two_ranks_write_the_one_process_package(llama_pair, tmp_path, extra):
    base, ft, _ = llama_pair
    common = [base, ft, "--bits", "2", "--no-progress", *extra]
    deltacomp("compress", *common, "-o", tmp_path / "one")
    r = deltacomp("compress", *common, "-o", tmp_path / "two", ranks=2)
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert_same_package(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial folder left


@pytest.mark.parametrize("extra", [[], ["--sequential"]], ids=["calib", "sequential"])
def test_two_ranks_with_calibration(llama_tok, tmp_path, extra):
    """Calibrated: every rank runs the calibration forward and GPTQs its share of each block's matrices; on the CPU
    the Hessians are the same on every rank, so the package is the same bytes. ``--sequential`` runs on rank 0."""
    base, ft, _ = llama_tok
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(16))
    common = [base, ft, "--bits", "2", "--calib", calib, "--calib-samples", "8", "--no-progress", *extra]
    deltacomp("compress", *common, "-o", tmp_path / "one")
    deltacomp("compress", *common, "-o", tmp_path / "two", ranks=2)
    assert_same_package(tmp_path / "one", tmp_path / "two")
