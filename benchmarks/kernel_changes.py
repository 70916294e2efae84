"""Which kernels of ``cuda/delta_linear.cu`` a change touches: their PTX at two revisions, kernel by kernel (no GPU).

A kernel whose PTX is the same at both revisions compiles to the same machine code, so a change needs GPU timings
only of the paths that run the kernels it changed. Both revisions are compiled from one path (nvcc names the
anonymous namespace after the file's path), and the comparison ignores what carries no code: debug lines, label
numbers and the kernel's own name in its parameters and shared arrays (so that a template flag added to a kernel
compares its old instantiations with the new ones that keep the old behaviour: pass ``--flag``). ``--regs`` adds each
kernel's registers and spill stores (ptxas on the same PTX). Host code, such as the launch plans, is not compared.

A revision may carry patches (``REV+PATCH[+PATCH...]``, applied in order), so that a prepared change is compared
without a branch.

    python benchmarks/kernel_changes.py main HEAD [--arch sm_90a] [--regs]
        [--flag 'ELb0EEEvNS0_10ExpandArgsE=EEEvNS0_10ExpandArgsE']
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deltacomp.report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from standalone_builds import gencode, parse_revision, write_tree  # noqa: E402

ENTRY = re.compile(r"^\.(?:visible \.)?entry (\S+)\(", re.MULTILINE)
LABEL = re.compile(r"\$L__BB\d+_")
LOCAL = re.compile(r"_ZZN\S*?E\d+(?=[A-Za-z_])")  # a kernel's static shared array: _ZZ<kernel>E<len><name>
NAMESPACE = re.compile(r"_GLOBAL__N__\w+?_\d+_delta_linear_cu_[0-9a-f]{8}")
LOG_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
LOG_SPILL = re.compile(r"(\d+) bytes spill stores")
LOG_USED = re.compile(r"Used (\d+) registers")


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


def resources(log: str) -> dict[str, tuple[int, int]]:
    """Each kernel's registers and bytes of spill stores, from ptxas's ``-v`` report (named as by `kernels`)."""
    found, name, spill = {}, None, 0
    for line in log.splitlines():
        if m := LOG_ENTRY.search(line):
            name, spill = NAMESPACE.sub("NS", m.group(1)), 0
        elif name and (m := LOG_SPILL.search(line)):
            spill = int(m.group(1))
        elif name and (m := LOG_USED.search(line)):
            found[name], name = (int(m.group(1)), spill), None
    return found


def renamed(b: dict, flags: list[tuple[str, str]]) -> dict:
    """B's kernels with each flag's OLD replaced by its NEW in their names."""
    out = {}
    for name, value in b.items():
        for old, new in flags:
            name = name.replace(old, new)
        out[name] = value
    return out


def compare(a: dict[str, str], b: dict[str, str], flags: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(kernel, verdict) in name order: same, changed, only in A or only in B. `flags` rename B's kernels
    (old, new: substrings of the mangled name) before they are matched with A's."""
    renamed_b = renamed(b, flags)
    out = []
    for name in sorted(set(a) | set(renamed_b)):
        if name not in renamed_b:
            out.append((name, "only in A"))
        elif name not in a:
            out.append((name, "only in B"))
        else:
            out.append((name, "same" if a[name] == renamed_b[name] else "changed"))
    return out


def compiled(rev: str, arch: str, where: Path, regs: bool) -> tuple[str, dict[str, tuple[int, int]]]:
    """The PTX of cuda/delta_linear.cu at `rev` (REV[+PATCH...]), compiled from `where` (the same path for every
    revision), and with `regs` its kernels' registers and spill stores (ptxas on that PTX; otherwise empty)."""
    shutil.rmtree(where / "cuda", ignore_errors=True)
    write_tree(*parse_revision(rev, "revision"), where, ("cuda",))
    out = where / "out.ptx"
    made = subprocess.run(["nvcc", "-std=c++17", "-O3", "-ptx", gencode(arch), "-o", str(out), "cuda/delta_linear.cu"],
                          cwd=where, capture_output=True, text=True)
    if made.returncode != 0:
        sys.exit(f"error: compiling {rev} failed:\n{made.stderr.strip()}")
    if not regs:
        return out.read_text(), {}
    assembled = subprocess.run(["ptxas", f"-arch={arch}", "-v", "-o", str(where / "out.cubin"), str(out)],
                               capture_output=True, text=True)
    if assembled.returncode != 0:
        sys.exit(f"error: assembling {rev} failed:\n{assembled.stderr.strip()}")
    return out.read_text(), resources(assembled.stdout + assembled.stderr)


def either(a: int | None, b: int | None) -> str:
    """A figure at both revisions: one number where they agree (or only one has it), else ``A -> B``."""
    if a is None and b is None:
        return "-"
    if a is None or b is None or a == b:
        return str(a if b is None else b)
    return f"{a} -> {b}"


def short(name: str) -> str:
    """A mangled kernel name without its namespaces, e.g. ``expand_kernelI6__halfLi1ELb1EE``."""
    return re.sub(r"^_ZN9deltacomp\d*NS\d*", "", name).split("EvNS0_")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a git revision (the baseline), REV[+PATCH...]")
    ap.add_argument("b", help="a git revision (the change), REV[+PATCH...]")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--regs", action="store_true", help="also each kernel's registers and spill stores (ptxas -v)")
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
        ptx_a, res_a = compiled(args.a, args.arch, Path(tmp), args.regs)
        ptx_b, res_b = compiled(args.b, args.arch, Path(tmp), args.regs)
    verdicts = compare(kernels(ptx_a), kernels(ptx_b), flags)
    if args.regs:
        res_b = renamed(res_b, flags)
        rows = [[short(n), v, *(either(res_a.get(n, (None, None))[i], res_b.get(n, (None, None))[i]) for i in (0, 1))]
                for n, v in verdicts]
        print(format_table(["kernel", "verdict", "registers", "spill stores (bytes)"], rows))
    else:
        print(format_table(["kernel", "verdict"], [[short(n), v] for n, v in verdicts]))
    counts = {v: sum(1 for _, w in verdicts if w == v) for v in ("same", "changed", "only in A", "only in B")}
    print(", ".join(f"{k}: {n}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
