"""A script of benchmarks/ loaded as a module, for the tests of its helpers; and, for the scripts that build revisions,
the repository's files at HEAD, patches of them and an nvcc stand-in."""

import difflib
import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load(name: str):
    """benchmarks/NAME.py as a module named NAME."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def at_head(path: str) -> str:
    """The repository's file `path` as at HEAD."""
    return subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


def patch_file(folder: Path, name: str, path: str, old: str, new: str) -> Path:
    """folder/name: a unified diff of one file from `old` to `new`, as git diff writes it (a/ and b/ prefixes)."""
    diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}")
    (folder / name).write_text("".join(diff))
    return folder / name


def nvcc_stand_in(on_nvcc):
    """A subprocess.run that hands nvcc's commands to on_nvcc(cmd, cwd) (each a success, nothing compiled) and runs
    every other command."""
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[0] != "nvcc":
            return real_run(cmd, **kw)
        on_nvcc(cmd, kw.get("cwd"))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run
