"""The one-row fused calls of builds of ``cuda/check_standalone.cu`` side by side (no torch; prints a table).

Kernel changes are timed against the kernel they change in one machine's runs: each build is made from a git
revision (``--build``, where nvcc is: the binaries carry to the GPU machine) and the builds are then run in turn
(``--run``), each ``--repeats`` times, alternating, so that a drifting machine moves them all alike:

- ``--fused-cases``: the fused form's correctness cases (failures counted);
- ``--fused K``: the four calls of a Llama-2-7B layer at one row, bf16, a bank of K deltas (``--deltas``, each
  weighted 1 / K), U by block column (us a call);
- ``--layer K``: the four calls in turn over 32 layers (us a layer);
- with ``--tenants T[,T...]`` (each 1, 4 or 16), ``--stages T T 1 P``: the two-kernel op on T token rows, each on its
  own of T deltas (the multi-tenant plan; fp16), stage 1 alone and the whole call (us), on the Llama-2-7B q|k|v bank
  or, with ``--projections 1``, on q alone (a bank a projection, as the torch benchmarks lay it out).

``--no-calls`` leaves out ``--fused K`` and ``--layer K`` (the longest runs), for a change to the two-kernel op alone.
Each run's figures also go to stderr as it ends, so that a run cut short still shows what it timed.

A revision may carry patches, ``NAME=REV+PATCH[+PATCH...]`` (files, applied in order with ``git apply``), so that a
prepared change is built without a branch. ``--sources DIR`` writes each such tree's ``deltacomp``, ``cuda``,
``benchmarks`` (but its recorded results), ``tests`` and ``pyproject.toml`` to ``DIR/NAME`` instead, for the torch
benchmarks and the CUDA tests of a change on the GPU machine (the extension built just in time there from each tree).

    python benchmarks/standalone_builds.py --build DIR main=main change=HEAD [--arch sm_90a] [--define MACRO]
    python benchmarks/standalone_builds.py --sources DIR change=main+benchmarks/results/change.patch
    PYTHONPATH=. python benchmarks/standalone_builds.py --run DIR [main change] [--deltas 4] [--tenants 16,1]
        [--projections 1] [--no-calls] [--repeats 2] [--json F]

(``PYTHONPATH=.`` where the source tree is there but deltacomp is not installed, as on a bare GPU machine.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from deltacomp.report import format_table

ROOT = Path(__file__).resolve().parents[1]
CALLS = ("q|k|v", "o", "gate|up", "down")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MACRO = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FUSED_LINE = r"^fused, 1 row, bf16, {k} delta\(s\), (\S+)\s.*\| with U columns\s+([0-9.]+) us"
LAYER_LINE = r"^layer, 1 row, bf16, {k} delta\(s\), with U columns\s+the calls in turn\s+([0-9.]+) us"
CASES_LINE = re.compile(r"^passed: (\d+) failure\(s\)", re.MULTILINE)
STAGES_LINE = r"^R={t}\s+r_tile=1\s.*\| full ([0-9.]+) us, graph [0-9.]+ us, shrink ([0-9.]+) us"
TENANTS = (1, 4, 16)


def parse_fused(text: str, deltas: int = 1) -> dict[str, float]:
    """us a call with U by block column, by call name, from ``--fused K``'s output."""
    pattern = re.compile(FUSED_LINE.format(k=deltas))
    found = {}
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            found[m.group(1)] = float(m.group(2))
    missing = [c for c in CALLS if c not in found]
    if missing:
        raise ValueError(f"--fused {deltas} printed no time for {', '.join(missing)}")
    return found


def parse_layer(text: str, deltas: int = 1) -> float:
    """us a layer, the calls in turn with U by block column, from ``--layer K``'s output."""
    pattern = re.compile(LAYER_LINE.format(k=deltas))
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            return float(m.group(1))
    raise ValueError(f"--layer {deltas} printed no time for the calls in turn with U columns")


def parse_stages(text: str, tenants: int) -> dict[str, float]:
    """Stage 1 alone and the whole two-kernel call (us), from ``--stages T T 1``'s output."""
    m = re.search(STAGES_LINE.format(t=tenants), text, re.MULTILINE)
    if m is None:
        raise ValueError(f"--stages {tenants} {tenants} 1 printed no times for {tenants} row(s) in tiles of one")
    return {"stage 1": float(m.group(2)), "call": float(m.group(1))}


def parse_cases(text: str) -> int:
    """Failures counted by ``--fused-cases``."""
    m = CASES_LINE.search(text)
    if m is None:
        raise ValueError("--fused-cases printed no count of failures")
    return int(m.group(1))


TREE = ("deltacomp", "cuda", "benchmarks", "tests", "pyproject.toml")  # what --sources writes
TREE_LEAVES = ("benchmarks/results",)  # but not this: the recorded results (what travels to a GPU is capped)


def parse_revision(text: str, what: str) -> tuple[str, list[Path]]:
    """REV[+PATCH...] as (revision, patch files); a missing patch exits with a message naming `what`."""
    rev, *patches = text.split("+")
    if not rev or any(not p for p in patches):
        sys.exit(f"error: {what}: a revision is REV[+PATCH...], got {text!r}")
    files = [Path(p).resolve() for p in patches]
    missing = [p for p, f in zip(patches, files) if not f.is_file()]
    if missing:
        sys.exit(f"error: {what}: no patch file {missing[0]}")
    return rev, files


def parse_spec(spec: str) -> tuple[str, str, list[Path]]:
    """NAME=REV[+PATCH...] as (name, revision, patch files); a bad spec or a missing patch exits with a message."""
    name, sep, rest = spec.partition("=")
    if not sep or not NAME.match(name) or not rest:
        sys.exit(f"error: a build is NAME=REVISION[+PATCH...] with NAME in letters, digits, '-' and '_', got {spec!r}")
    return name, *parse_revision(rest, name)


def write_tree(rev: str, patches: list[Path], where: Path, paths: tuple[str, ...], leave: tuple[str, ...] = ()) -> None:
    """`paths` but `leave` as at git revision `rev` with `patches` applied, written into the empty folder `where`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *paths, *(f":(exclude){p}" for p in leave)],
                             capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    only = [*(f"--exclude={p}/*" for p in leave),
            *(f"--include={p}" if p == "pyproject.toml" else f"--include={p}/*" for p in paths)]
    for patch in patches:  # `where` is outside any git work tree here, so git apply patches it as files
        applied = subprocess.run(["git", "apply", *only, str(patch)], cwd=where, capture_output=True, text=True)
        if applied.returncode != 0:
            sys.exit(f"error: {patch.name} does not apply to {rev}: {applied.stderr.strip()}")


def described(rev: str, patches: list[Path]) -> str:
    """A tree's origin as REV+PATCH... (the patches by file name)."""
    return "+".join([rev, *(p.name for p in patches)])


def gencode(arch: str) -> str:
    """nvcc's flag for machine code of `arch` (e.g. sm_90a)."""
    return f"-gencode=arch=compute_{arch[3:]},code={arch}"


def build(out: Path, specs: list[str], arch: str, defines: tuple[str, ...] = ()) -> None:
    bad = [d for d in defines if not MACRO.match(d)]
    if bad:
        sys.exit(f"error: --define takes a macro name (letters, digits and '_'), got {bad[0]!r}")
    parsed = [parse_spec(spec) for spec in specs]  # every spec checked before the first build
    out.mkdir(parents=True, exist_ok=True)
    for name, rev, patches in parsed:
        with tempfile.TemporaryDirectory() as tmp:
            write_tree(rev, patches, Path(tmp), ("cuda",))
            cmd = ["nvcc", "-std=c++17", "-O3", "-lineinfo", gencode(arch), *(f"-D{d}" for d in defines), "-o",
                   str(out / name), str(Path(tmp) / "cuda" / "check_standalone.cu")]
            made = subprocess.run(cmd, capture_output=True, text=True)
            if made.returncode != 0:
                sys.exit(f"error: building {name} ({rev}) failed:\n{made.stderr.strip()}")
        print(f"built {name} from {described(rev, patches)}: {out / name}")


def sources(out: Path, specs: list[str]) -> None:
    for name, rev, patches in [parse_spec(spec) for spec in specs]:
        with tempfile.TemporaryDirectory() as tmp:  # outside the repository, so that git apply patches files
            write_tree(rev, patches, Path(tmp), TREE, TREE_LEAVES)
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.copytree(tmp, out / name)
        print(f"wrote {name} from {described(rev, patches)}: {out / name}")


def run_one(binary: Path, *args: str) -> str:
    done = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name} {' '.join(args)} exited with {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def progress(line: str) -> None:
    """Each run's figures as it ends (us), on stderr: a run cut short still shows what it timed."""
    print(line, file=sys.stderr, flush=True)


def tenants_key(t: int) -> str:
    return f"tenants {t}"  # a build's runs of the two-kernel op on t rows over t deltas


def run(folder: Path, repeats: int, names: list[str], deltas: int = 1, tenants: tuple[int, ...] = (),
        calls: bool = True, projections: int = 3) -> dict:
    found = {p.name: p for p in folder.iterdir() if p.is_file() and NAME.match(p.name) and p.stat().st_mode & 0o111}
    if not found:
        sys.exit(f"error: no built binaries in {folder} (run --build first)")
    unknown = [n for n in names if n not in found]
    if unknown:
        sys.exit(f"error: no build named {', '.join(unknown)} in {folder} (there: {', '.join(sorted(found))})")
    builds = [found[n] for n in names] if names else [found[n] for n in sorted(found)]
    results = {b.name: {"failures": None, "calls": [], "layer": [], **{tenants_key(t): [] for t in tenants},
                        "error": None} for b in builds}
    for b in builds:
        try:
            results[b.name]["failures"] = parse_cases(run_one(b, "--fused-cases"))
            progress(f"{b.name} --fused-cases: {results[b.name]['failures']} failure(s)")
        except (RuntimeError, ValueError) as e:
            results[b.name]["error"] = str(e)
    for _ in range(repeats):
        for b in builds:
            r = results[b.name]
            if r["error"]:
                continue
            try:
                if calls:
                    r["calls"].append(parse_fused(run_one(b, "--fused", str(deltas)), deltas))
                    progress(f"{b.name} --fused {deltas}: " + ", ".join(f"{c} {v}" for c, v in r["calls"][-1].items()))
                    r["layer"].append(parse_layer(run_one(b, "--layer", str(deltas)), deltas))
                    progress(f"{b.name} --layer {deltas}: {r['layer'][-1]}")
                for t in tenants:
                    stages = ("--stages", str(t), str(t), "1", str(projections))
                    r[tenants_key(t)].append(parse_stages(run_one(b, *stages), t))
                    progress(f"{b.name} {' '.join(stages)}: " + ", ".join(
                        f"{k} {v}" for k, v in r[tenants_key(t)][-1].items()))
            except (RuntimeError, ValueError) as e:
                r["error"] = str(e)
    return results


def median_of(r: dict, key: str, field: str | None = None) -> float | None:
    """The median of a build's `key` runs (of each run's `field` where given); None after an error or without runs."""
    if r["error"] or not r[key]:
        return None
    return statistics.median(x if field is None else x[field] for x in r[key])


def vs_first(value: float, first: float | None) -> str:
    return f"{value / first:.4f}x" if first else "-"  # no ratio without the first build's


def render(results: dict) -> str:
    headers = ["build", "cases failed", *CALLS, "sum", "layer in turn", "layer vs first"]
    first = median_of(next(iter(results.values())), "layer")
    rows = []
    for name, r in results.items():
        layer = median_of(r, "layer")
        if layer is None:
            rows.append([name, r["failures"] if r["failures"] is not None else "-", *["-"] * (len(headers) - 2)])
            continue
        med = {c: median_of(r, "calls", c) for c in CALLS}
        rows.append([name, r["failures"], *(f"{med[c]:.1f}" for c in CALLS), f"{sum(med.values()):.1f}",
                     f"{layer:.1f}", vs_first(layer, first)])
    return format_table(headers, rows)


def render_tenants(results: dict, tenants: int) -> str:
    """The two-kernel op on T rows over as many deltas: medians, and the call against the first build's."""
    key = tenants_key(tenants)
    first = median_of(next(iter(results.values())), key, "call")
    rows = []
    for name, r in results.items():
        call = median_of(r, key, "call")
        if call is None:
            rows.append([name, "-", "-", "-"])
            continue
        rows.append([name, f"{median_of(r, key, 'stage 1'):.1f}", f"{call:.1f}", vs_first(call, first)])
    return format_table(["build", "stage 1", "call", "call vs first"], rows)


def parse_tenants(text: str) -> tuple[int, ...]:
    """``--tenants``: a comma-separated list of 1, 4 and 16, each once, in the order given."""
    if not text:
        return ()
    parts = text.split(",")
    if any(p not in {str(t) for t in TENANTS} for p in parts) or len(set(parts)) != len(parts):
        sys.exit(f"error: --tenants must list 1, 4 or 16, each once, separated by commas, got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", type=Path, metavar="DIR", help="build each NAME=REVISION into DIR/NAME")
    mode.add_argument("--run", type=Path, metavar="DIR", help="run the builds in DIR in turn")
    mode.add_argument("--sources", type=Path, metavar="DIR",
                      help="write each NAME=REVISION's source tree into DIR/NAME (for torch runs of a change)")
    ap.add_argument("specs", nargs="*", metavar="NAME=REVISION[+PATCH...] | NAME",
                    help="--build, --sources: what to build or write; --run: which builds, in this order (default: "
                         "all, by name)")
    ap.add_argument("--arch", default="sm_90a", choices=["sm_80", "sm_90", "sm_90a"])
    ap.add_argument("--define", action="append", default=[], metavar="MACRO",
                    help="--build: compile with -DMACRO, e.g. the timing builds' DELTACOMP_SHRINK_TRACE or "
                         "DELTACOMP_ROW_TRACE (repeatable)")
    ap.add_argument("--deltas", type=int, default=1, help="deltas in the bank of the timed calls (--run)")
    ap.add_argument("--tenants", default="",
                    help="also time the two-kernel op on T rows over T deltas, for each T of a comma-separated list "
                         "of 1, 4 and 16 (--run)")
    ap.add_argument("--projections", type=int, default=3, choices=[1, 3],
                    help="--tenants on the q|k|v bank (3) or q alone (1) (--run)")
    ap.add_argument("--no-calls", action="store_true", help="leave out the fused calls and the layer (--run)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.build:
        if not args.specs:
            sys.exit("error: --build needs at least one NAME=REVISION")
        build(args.build, args.specs, args.arch, tuple(args.define))
        return 0
    if args.sources:
        if not args.specs:
            sys.exit("error: --sources needs at least one NAME=REVISION")
        sources(args.sources, args.specs)
        return 0
    if any("=" in name for name in args.specs):
        sys.exit("error: --run takes the names of builds (what --build made), not NAME=REVISION")
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    if not 1 <= args.deltas <= 16:
        sys.exit("error: --deltas must be 1 to 16")
    tenants = parse_tenants(args.tenants)
    if args.no_calls and not tenants:
        sys.exit("error: --no-calls leaves nothing to time without --tenants")
    results = run(args.run, args.repeats, args.specs, args.deltas, tenants, not args.no_calls, args.projections)
    if not args.no_calls:
        bank = "one delta" if args.deltas == 1 else f"{args.deltas} deltas, each weighted 1/{args.deltas}"
        print(f"1 row, bf16, {bank}, U by block column; us, medians over the repeats, builds run in turn")
        print(render(results))
    else:
        print("failed fused cases: " + ", ".join(f"{name} {r['failures']}" for name, r in results.items()))
    for t in tenants:
        bank = "the q|k|v bank" if args.projections == 3 else "the q bank"
        print(f"\n{t} row(s), each on its own of {t} delta(s) ({bank}), tiles of one row, fp16 (--stages): us, "
              "medians over the repeats")
        print(render_tenants(results, t))
    for name, r in results.items():
        if r["error"]:
            print(f"{name}: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["error"] or r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
