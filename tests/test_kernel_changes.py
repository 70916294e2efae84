"""benchmarks/kernel_changes.py: kernels compared by their PTX, without what carries no code (no nvcc, no GPU)."""

import subprocess
from pathlib import Path

import bench_scripts
import pytest
from bench_scripts import at_head, nvcc_stand_in, patch_file

NS = "_ZN9deltacomp48_GLOBAL__N__cfd59049_15_delta_linear_cu_fa1d85c2"


def kernel(name: str, body: str, label: int = 3, line: int = 10) -> str:
    """A PTX kernel entry as nvcc writes one: parameters named after it, a static shared array, labels, debug lines."""
    local = f"_ZZN9deltacomp{name[len('_ZN9deltacomp'):-1]}EE4smem"
    return (f".visible .entry {name}(\n\t.param .align 8 .b8 {name}_param_0[64]\n)\n{{\n"
            f"\t.shared .align 16 .b8 {local}[32768];\n"
            f"\t.loc\t1 {line} 3\n"
            f"\tld.param.u64 \t%rd1, [{name}_param_0];\n"
            f"\tmov.u32 \t%r1, {local};\n"
            f"{body}\n"
            f"\t@%p1 bra \t$L__BB{label}_2;\n"
            f"$L__BB{label}_2:\n"
            f"\t// begin inline asm\n"
            f"\tret;\n}}\n")


EXPAND = f"{NS}13expand_kernelI6__halfLi1EEEvNS0_10ExpandArgsE"
EXPAND_FLAG = f"{NS}13expand_kernelI6__halfLi1ELb0EEEvNS0_10ExpandArgsE"
EXPAND_INT = f"{NS}13expand_kernelI6__halfLi1ELb1EEEvNS0_10ExpandArgsE"
SHRINK = f"{NS}13shrink_kernelIfLi1ELb0EEEvNS0_10ShrinkArgsE"
ROW = f"{NS}10row_kernelIfLb0EEEvNS0_7RowArgsE"


@pytest.fixture(scope="module")
def mod():
    return bench_scripts.load("kernel_changes")


def test_what_carries_no_code_is_ignored(mod):
    a = mod.kernels(kernel(SHRINK, "\tadd.s32 \t%r2, %r1, 4;", label=3, line=10))
    b = mod.kernels(kernel(SHRINK, "\tadd.s32 \t%r2, %r1, 4;", label=7, line=912))  # moved in the file
    assert mod.compare(a, b) == [(next(iter(a)), "same")]
    c = mod.kernels(kernel(SHRINK, "\tadd.s32 \t%r2, %r1, 8;"))  # one immediate differs
    assert mod.compare(a, c) == [(next(iter(a)), "changed")]


def test_a_flag_matches_old_instantiations_with_new_ones(mod):
    body = "\tmul.lo.s32 \t%r3, %r1, %r2;"
    a = mod.kernels(kernel(EXPAND, body) + kernel(ROW, "\tret;"))
    b = mod.kernels(kernel(EXPAND_FLAG, body) + kernel(EXPAND_INT, "\tdp2a.lo.s32.s32 \t%r3, %r1, %r2, %r3;")
                    + kernel(ROW, "\tret;"))
    verdicts = dict((mod.short(n), v) for n, v in mod.compare(a, b))
    assert verdicts == {"expand_kernelI6__halfLi1EE": "only in A", "expand_kernelI6__halfLi1ELb0EE": "only in B",
                        "expand_kernelI6__halfLi1ELb1EE": "only in B", "row_kernelIfLb0EE": "same"}
    flagged = dict((mod.short(n), v) for n, v in
                   mod.compare(a, b, [("ELb0EEEvNS0_10ExpandArgsE", "EEEvNS0_10ExpandArgsE")]))
    assert flagged == {"expand_kernelI6__halfLi1EE": "same", "expand_kernelI6__halfLi1ELb1EE": "only in B",
                       "row_kernelIfLb0EE": "same"}


def test_bad_input_is_refused(mod):
    with pytest.raises(ValueError, match="no kernel entries"):
        mod.kernels("// nothing here\n")
    with pytest.raises(ValueError, match="has no end"):
        mod.kernels(f".visible .entry {ROW}(\n)\n{{\n\tret;\n")
    with pytest.raises(SystemExit, match="--flag is OLD=NEW"):
        mod.main(["main", "HEAD", "--flag", "no-equals-sign"])


PTXAS = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{ROW}' for 'sm_90a'
ptxas info    : Function properties for {ROW}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 3472 bytes smem
ptxas info    : Compiling entry function '{EXPAND_INT}' for 'sm_90a'
ptxas info    : Function properties for {EXPAND_INT}
    80 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 32772 bytes smem
"""


def test_registers_and_spills_are_read_and_shown(mod):
    found = mod.resources(PTXAS)
    names = {mod.short(n): v for n, v in found.items()}
    assert names == {"row_kernelIfLb0EE": (128, 0), "expand_kernelI6__halfLi1ELb1EE": (80, 44)}
    assert set(found) == set(mod.kernels(kernel(ROW, "\tret;") + kernel(EXPAND_INT, "\tret;")))  # the same names
    assert mod.either(80, 80) == "80" and mod.either(28, 44) == "28 -> 44"
    assert mod.either(None, 44) == "44" and mod.either(80, None) == "80" and mod.either(None, None) == "-"


def test_each_revision_is_compiled_from_its_own_sources(mod, tmp_path, monkeypatch):
    """Both revisions go through one folder: the second compiles its own cuda/ (a patched one here), not the first's."""
    source = at_head("cuda/delta_linear.cu")
    changed = source + "// the change\n"
    patch = patch_file(tmp_path, "change.patch", "cuda/delta_linear.cu", source, changed)

    def ptx(cmd, cwd):  # the "PTX" is the source nvcc was given
        (Path(cwd) / cmd[cmd.index("-o") + 1]).write_text((Path(cwd) / cmd[-1]).read_text())

    monkeypatch.setattr(subprocess, "run", nvcc_stand_in(ptx))
    folder = tmp_path / "build"
    folder.mkdir()
    assert mod.compiled("HEAD", "sm_90a", folder, False) == (source, {})
    assert mod.compiled(f"HEAD+{patch}", "sm_90a", folder, False) == (changed, {})
    with pytest.raises(SystemExit, match="no patch file"):
        mod.compiled(f"HEAD+{tmp_path / 'missing.patch'}", "sm_90a", folder, False)
