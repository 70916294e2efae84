"""Which kernels of ``cuda/delta_linear.cu`` a change touches: their PTX at two revisions, kernel by kernel (no GPU).

A kernel whose PTX is the same at both revisions compiles to the same machine code, so a change needs GPU timings
only of the paths that run the kernels it changed. Both revisions are compiled from one path (nvcc names the
anonymous namespace after the file's path), and the comparison ignores what carries no code: debug lines, label
numbers and the kernel's own name in its parameters and shared arrays (so that a template flag added to a kernel
compares its old instantiations with the new ones that keep the old behaviour: pass ``--flag``).

    python benchmarks/kernel_changes.py main HEAD [--arch sm_90a]
        [--flag 'ELb0EEEvNS0_10ExpandArgsE=EEEvNS0_10ExpandArgsE']
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from deltacomp.report import format_table

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^\.(?:visible \.)?entry (\S+)\(", re.MULTILINE)
LABEL = re.compile(r"\$L__BB\d+_")
LOCAL = re.compile(r"_ZZN\S*?E\d+(?=[A-Za-z_])")  # a kernel's static shared array: _ZZ<kernel>E<len><name>
NAMESPACE = re.compile(r"_GLOBAL__N__\w+?_\d+_delta_linear_cu_[0-9a-f]{8}")


def kernels(ptx: str) -> dict[str, str]:
    """Each kernel's name and a digest of its code, without debug lines, label numbers or its own name."""
    found = {}
    for m in ENTRY.finditer(ptx):
        end = ptx.find("\n}\n", m.start())
        if end < 0:
            raise ValueError(f"the PTX of {m.group(1)} has no end")
        name = m.group(1)
        lines = []
        for line in ptx[m.start():end].splitlines():
            if line.strip().startswith((".loc", "//")):
                continue
            lines.append(LOCAL.sub("LOCAL_", LABEL.sub("$L__BB_", line)).replace(name, "KERNEL"))
        found[NAMESPACE.sub("NS", name)] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    if not found:
        raise ValueError("no kernel entries in the PTX")
    return found


def compare(a: dict[str, str], b: dict[str, str], flags: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(kernel, verdict) in name order: same, changed, only in A or only in B. `flags` rename B's kernels
    (old, new: substrings of the mangled name) before they are matched with A's."""
    renamed = {}
    for name, digest in b.items():
        for old, new in flags:
            name = name.replace(old, new)
        renamed[name] = digest
    out = []
    for name in sorted(set(a) | set(renamed)):
        if name not in renamed:
            out.append((name, "only in A"))
        elif name not in a:
            out.append((name, "only in B"))
        else:
            out.append((name, "same" if a[name] == renamed[name] else "changed"))
    return out


def ptx_of(rev: str, arch: str, where: Path) -> str:
    """The PTX of cuda/delta_linear.cu at `rev`, compiled from `where` (the same path for every revision)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "cuda"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["rm", "-rf", str(where / "cuda")], check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    out = where / "out.ptx"
    made = subprocess.run(["nvcc", "-std=c++17", "-O3", "-ptx", f"-gencode=arch=compute_{arch[3:]},code={arch}",
                           "-o", str(out), "cuda/delta_linear.cu"], cwd=where, capture_output=True, text=True)
    if made.returncode != 0:
        sys.exit(f"error: compiling {rev} failed:\n{made.stderr.strip()}")
    return out.read_text()


def short(name: str) -> str:
    """A mangled kernel name without its namespaces, e.g. ``expand_kernelI6__halfLi1ELb1EE``."""
    return re.sub(r"^_ZN9deltacomp\d*NS\d*", "", name).split("EvNS0_")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a git revision (the baseline)")
    ap.add_argument("b", help="a git revision (the change)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--flag", action="append", default=[], metavar="OLD=NEW",
                    help="rename B's kernels before matching (a substring of the mangled name)")
    args = ap.parse_args(argv)
    flags = []
    for f in args.flag:
        old, sep, new = f.partition("=")
        if not sep or not old:
            sys.exit(f"error: --flag is OLD=NEW with OLD not empty, got {f!r}")
        flags.append((old, new))
    with tempfile.TemporaryDirectory() as tmp:
        a = kernels(ptx_of(args.a, args.arch, Path(tmp)))
        b = kernels(ptx_of(args.b, args.arch, Path(tmp)))
    verdicts = compare(a, b, flags)
    print(format_table(["kernel", "verdict"], [[short(n), v] for n, v in verdicts]))
    counts = {v: sum(1 for _, w in verdicts if w == v) for v in ("same", "changed", "only in A", "only in B")}
    print(", ".join(f"{k}: {n}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
