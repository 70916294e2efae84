"""benchmarks/standalone_builds.py: the builds' outputs parsed, run in turn and tabled (stand-in binaries, no GPU)."""

import json
import stat
import subprocess
from pathlib import Path

import bench_scripts
import pytest
from bench_scripts import at_head, nvcc_stand_in, patch_file

FUSED = """programmatic dependent launch: on
fused, 1 row, bf16, {k} delta(s), q|k|v    fused  52.8 us | with U columns   {qkv} us | empty bank   36.0 us | x
fused, 1 row, bf16, {k} delta(s), o        fused   19.1 us | with U columns   17.0 us | empty bank   13.8 us | x
fused, 1 row, bf16, {k} delta(s), gate|up  fused  107.0 us | with U columns   75.2 us | empty bank   63.2 us | x
fused, 1 row, bf16, {k} delta(s), down     fused   42.7 us | with U columns   40.5 us | empty bank   34.1 us | x
"""
LAYER = """layer, 1 row, bf16, {k} delta(s), empty bank       the calls in turn  147.0 us | each alone, summed  147.1 us
layer, 1 row, bf16, {k} delta(s), with U columns   the calls in turn  {layer} us | each alone, summed  176.1 us
layer, 1 row, bf16, {k} delta(s), fused, U by row  the calls in turn  207.4 us | each alone, summed  196.7 us
"""

STAGES = """empty kernel launch: 2.10 us
R={t}  r_tile=1  stage1 grid (94,1,{t}) smem 16896 | stage2 grid (27,2,{t}) | full {call} us, graph 192.0 us, shrink \
{stage1} us, shrink+expand 196.6 us
"""


@pytest.fixture(scope="module")
def mod():
    return bench_scripts.load("standalone_builds")


def stand_in(folder: Path, name: str, qkv: float, layer: float, failures: int = 0, fail_layer: bool = False,
             deltas: str = "$2", call: float = 190.2, stage1: float = 93.2):
    """An executable that prints what check_standalone prints for the four modes the script runs (for the number
    of deltas it is asked for, unless `deltas` names one)."""
    script = folder / name
    layer_text = LAYER.format(layer=layer, k=deltas)
    layer_out = "echo 'cuda error' >&2; exit 3" if fail_layer else f"cat <<E\n{layer_text}E\n "
    script.write_text(
        "#!/bin/sh\n"
        f"case \"$1\" in\n"
        f"  --fused-cases) echo 'passed: {failures} failure(s)';;\n"
        f"  --fused) cat <<E\n{FUSED.format(qkv=qkv, k=deltas)}E\n  ;;\n"
        f"  --layer) {layer_out};;\n"
        f"  --stages) cat <<E\n{STAGES.format(t='$2', call=call, stage1=stage1)}E\n  ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_outputs_are_parsed(mod):
    calls = mod.parse_fused(FUSED.format(qkv=43.6, k=1))
    assert calls == {"q|k|v": 43.6, "o": 17.0, "gate|up": 75.2, "down": 40.5}
    assert mod.parse_layer(LAYER.format(layer=176.4, k=1)) == 176.4
    assert mod.parse_fused(FUSED.format(qkv=80.1, k=4), 4)["q|k|v"] == 80.1
    assert mod.parse_layer(LAYER.format(layer=311.4, k=4), 4) == 311.4
    with pytest.raises(ValueError, match="--fused 4 printed no time for q\\|k\\|v, o"):
        mod.parse_fused(FUSED.format(qkv=43.6, k=1), 4)  # one delta's lines do not stand for four
    assert mod.parse_cases("...\npassed: 3 failure(s)\n") == 3
    with pytest.raises(ValueError, match="gate\\|up"):
        mod.parse_fused("\n".join(line for line in FUSED.format(qkv=1, k=1).splitlines() if "gate|up" not in line))
    with pytest.raises(ValueError, match="calls in turn"):
        mod.parse_layer(LAYER.format(layer=1, k=1).splitlines()[0])
    with pytest.raises(ValueError, match="failures"):
        mod.parse_cases("nothing")


def test_builds_run_in_turn_and_are_tabled(mod, tmp_path, capsys):
    runs = tmp_path / "builds"
    runs.mkdir()
    stand_in(runs, "a-main", qkv=43.6, layer=176.4)
    stand_in(runs, "b-change", qkv=43.4, layer=175.3)
    stand_in(runs, "c-broken", qkv=1.0, layer=1.0, failures=2)
    stand_in(runs, "d-crash", qkv=1.0, layer=1.0, fail_layer=True)
    out = tmp_path / "r.json"
    assert mod.main(["--run", str(runs), "--repeats", "2", "--json", str(out)]) == 1  # a build failed
    captured = capsys.readouterr()
    text = captured.out
    assert "b-change --fused 1: q|k|v 43.4, o 17.0, gate|up 75.2, down 40.5" in captured.err
    assert "b-change --layer 1: 175.3" in captured.err and "d-crash --layer" not in captured.err
    lines = {line.split()[0]: line for line in text.splitlines() if line[:1] in "abcd"}
    assert "43.6" in lines["a-main"] and "176.4" in lines["a-main"] and "1.0000x" in lines["a-main"]
    assert "175.3" in lines["b-change"] and f"{175.3 / 176.4:.4f}x" in lines["b-change"]
    assert lines["c-broken"].split()[1] == "2"
    assert "d-crash: d-crash --layer 1 exited with 3: cuda error" in text
    saved = json.loads(out.read_text())
    assert len(saved["b-change"]["calls"]) == 2 and saved["b-change"]["layer"] == [175.3, 175.3]
    assert saved["d-crash"]["error"]


def test_builds_run_in_the_order_named(mod, tmp_path, capsys):
    stand_in(tmp_path, "main", qkv=43.6, layer=176.4)
    stand_in(tmp_path, "change", qkv=43.4, layer=175.3)
    assert mod.main(["--run", str(tmp_path), "main", "change", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("main", "change"))]
    assert [r[0] for r in rows] == ["main", "change"]
    assert rows[0][-1] == "1.0000x" and rows[1][-1] == f"{175.3 / 176.4:.4f}x"


def test_bad_arguments_are_refused(mod, tmp_path):
    with pytest.raises(SystemExit, match="NAME=REVISION"):
        mod.main(["--build", str(tmp_path), "no-revision"])
    with pytest.raises(SystemExit, match="letters, digits"):
        mod.main(["--build", str(tmp_path), "../x=HEAD"])
    with pytest.raises(SystemExit, match="no built binaries"):
        mod.main(["--run", str(tmp_path)])
    stand_in(tmp_path, "main", qkv=43.6, layer=176.4)
    with pytest.raises(SystemExit, match="not NAME=REVISION"):
        mod.main(["--run", str(tmp_path), "a=HEAD"])
    with pytest.raises(SystemExit, match="no build named other .*there: main"):
        mod.main(["--run", str(tmp_path), "other"])
    with pytest.raises(SystemExit, match="git archive"):
        mod.main(["--build", str(tmp_path), "x=no-such-revision-here"])


def test_no_ratio_when_the_first_build_fails(mod, tmp_path, capsys):
    stand_in(tmp_path, "main", qkv=43.6, layer=176.4, fail_layer=True)
    stand_in(tmp_path, "change", qkv=43.4, layer=175.3)
    assert mod.main(["--run", str(tmp_path), "main", "change", "--repeats", "1"]) == 1
    change = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("change"))
    assert change[-2] == "175.3" and change[-1] == "-"


def test_a_bank_of_several_deltas_is_timed(mod, tmp_path, capsys):
    stand_in(tmp_path, "main", qkv=80.5, layer=311.4)
    stand_in(tmp_path, "change", qkv=79.9, layer=309.0)
    assert mod.main(["--run", str(tmp_path), "main", "change", "--deltas", "4", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("1 row, bf16, 4 deltas, each weighted 1/4,")
    change = next(line.split() for line in text.splitlines() if line.startswith("change"))
    assert change[2] == "79.9" and change[-2] == "309.0" and change[-1] == f"{309.0 / 311.4:.4f}x"
    stand_in(tmp_path, "change", qkv=79.9, layer=309.0, deltas="1")  # answers for one delta whatever it is asked
    assert mod.main(["--run", str(tmp_path), "main", "change", "--deltas", "4", "--repeats", "1"]) == 1
    assert "change: --fused 4 printed no time for q|k|v" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--deltas must be 1 to 16"):
        mod.main(["--run", str(tmp_path), "--deltas", "0"])


def test_the_multi_tenant_op_is_timed(mod, tmp_path, capsys):
    out = STAGES.format(t=16, call=185.1, stage1=93.6)
    assert mod.parse_stages(out, 16) == {"stage 1": 93.6, "call": 185.1}
    with pytest.raises(ValueError, match="--stages 4 4 1 printed no times for 4 row"):
        mod.parse_stages(out, 4)  # sixteen rows' line does not stand for four
    runs = tmp_path / "builds"
    runs.mkdir()
    stand_in(runs, "main", qkv=43.6, layer=176.4, call=190.2, stage1=93.2)
    stand_in(runs, "change", qkv=43.4, layer=175.3, call=185.1, stage1=93.6)
    js = tmp_path / "r.json"
    assert mod.main(["--run", str(runs), "main", "change", "--tenants", "16", "--repeats", "2", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    table = text[text.index("16 row(s), each on its own of 16 delta(s)"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("main", "change"))}
    assert rows["main"][1:] == ["93.2", "190.2", "1.0000x"]
    assert rows["change"][1:] == ["93.6", "185.1", f"{185.1 / 190.2:.4f}x"]
    assert json.loads(js.read_text())["change"]["tenants 16"] == [{"stage 1": 93.6, "call": 185.1}] * 2
    for bad in ("8", "16,16", "16,", "one"):
        with pytest.raises(SystemExit, match="--tenants must list 1, 4 or 16, each once"):
            mod.main(["--run", str(runs), "--tenants", bad])


def test_the_multi_tenant_op_alone_at_several_row_counts(mod, tmp_path, capsys):
    runs = tmp_path / "builds"
    runs.mkdir()
    stand_in(runs, "main", qkv=43.6, layer=176.4, call=190.2, stage1=93.2)
    stand_in(runs, "change", qkv=43.4, layer=175.3, call=185.1, stage1=93.6, fail_layer=True)
    js = tmp_path / "r.json"
    # the change's --layer would fail: --no-calls never runs it
    assert mod.main(["--run", str(runs), "main", "change", "--tenants", "16,1", "--no-calls", "--repeats", "1",
                     "--json", str(js)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "layer in turn" not in text and text.startswith("failed fused cases: main 0, change 0")
    # each run's figures on stderr as it ends, in the order run
    assert captured.err.splitlines() == ["main --fused-cases: 0 failure(s)", "change --fused-cases: 0 failure(s)",
                                         "main --stages 16 16 1 3: stage 1 93.2, call 190.2",
                                         "main --stages 1 1 1 3: stage 1 93.2, call 190.2",
                                         "change --stages 16 16 1 3: stage 1 93.6, call 185.1",
                                         "change --stages 1 1 1 3: stage 1 93.6, call 185.1"]
    assert text.index("16 row(s), each on its own of 16") < text.index("1 row(s), each on its own of 1 delta(s)")
    saved = json.loads(js.read_text())
    assert saved["main"]["calls"] == [] and saved["main"]["layer"] == []
    assert saved["change"]["tenants 1"] == [{"stage 1": 93.6, "call": 185.1}]
    with pytest.raises(SystemExit, match="--no-calls leaves nothing to time without --tenants"):
        mod.main(["--run", str(runs), "--no-calls"])
    # q alone (a bank a projection, as the torch benchmarks lay it out): the fifth argument of --stages
    assert mod.main(["--run", str(runs), "main", "--tenants", "16", "--no-calls", "--repeats", "1",
                     "--projections", "1"]) == 0
    captured = capsys.readouterr()
    assert "main --stages 16 16 1 1: stage 1 93.2, call 190.2" in captured.err
    assert "16 row(s), each on its own of 16 delta(s) (the q bank)" in captured.out


def test_builds_take_the_macros_named(mod, tmp_path, monkeypatch):
    """--define MACRO reaches nvcc as -DMACRO (timing builds); anything but a macro name is refused before a build."""
    seen = []

    def nvcc(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mod, "write_tree", lambda rev, patches, where, paths: None)
    monkeypatch.setattr(mod.subprocess, "run", nvcc)
    assert mod.main(["--build", str(tmp_path), "trace=HEAD", "--define", "DELTACOMP_SHRINK_TRACE"]) == 0
    assert "-DDELTACOMP_SHRINK_TRACE" in seen[0] and seen[0][seen[0].index("-o") + 1] == str(tmp_path / "trace")
    with pytest.raises(SystemExit, match="--define takes a macro name"):
        mod.main(["--build", str(tmp_path), "t=HEAD", "--define", "X=1; rm"])
    assert len(seen) == 1


def test_a_revision_with_patches_is_written_as_a_source_tree(mod, tmp_path, capsys):
    """--sources NAME=REV+PATCH+PATCH: the tree at REV with the patches applied in order; bad ones refused."""
    header, project = at_head("cuda/delta_linear.h"), at_head("pyproject.toml")
    first = patch_file(tmp_path, "a.patch", "cuda/delta_linear.h", header, header + "// first change\n")
    second = patch_file(tmp_path, "b.patch", "cuda/delta_linear.h", header + "// first change\n",
                        header + "// first change\n// second change\n")
    third = patch_file(tmp_path, "c.patch", "pyproject.toml", project, project + "# third change\n")
    out = tmp_path / "trees"
    assert mod.main(["--sources", str(out), f"x=HEAD+{first}+{second}+{third}", "plain=HEAD"]) == 0
    assert "wrote x from HEAD+a.patch+b.patch+c.patch" in capsys.readouterr().out
    assert (out / "x" / "cuda" / "delta_linear.h").read_text().endswith("// first change\n// second change\n")
    assert (out / "x" / "pyproject.toml").read_text() == project + "# third change\n"
    assert (out / "plain" / "cuda" / "delta_linear.h").read_text() == header
    assert (out / "x" / "deltacomp" / "native.py").read_text() == at_head("deltacomp/native.py")
    assert sorted(p.name for p in (out / "x").iterdir()) == sorted(mod.TREE)
    assert (out / "x" / "benchmarks" / "kernel_speed.py").is_file()
    assert not (out / "x" / "benchmarks" / "results").exists()  # left behind: recorded results only
    with pytest.raises(SystemExit, match="b.patch does not apply to HEAD"):
        mod.main(["--sources", str(out), f"y=HEAD+{second}"])  # made against the first patch's result
    with pytest.raises(SystemExit, match="y: no patch file .*missing.patch"):
        mod.main(["--sources", str(out), f"y=HEAD+{tmp_path / 'missing.patch'}"])
    with pytest.raises(SystemExit, match=r"y: a revision is REV\[\+PATCH\.\.\.\], got 'HEAD\+'"):
        mod.main(["--sources", str(out), "y=HEAD+"])
    assert not (out / "y").exists()


def test_a_build_compiles_the_patched_sources(mod, tmp_path, monkeypatch, capsys):
    """--build NAME=REV+PATCH hands nvcc cuda/ as at REV with the patch applied; every spec is checked first."""
    source = at_head("cuda/check_standalone.cu")
    change = patch_file(tmp_path, "change.patch", "cuda/check_standalone.cu", source, source + "// the change\n")
    compiled = {}

    def record(cmd, cwd):
        compiled[Path(cmd[cmd.index("-o") + 1]).name] = Path(cmd[-1]).read_text()

    monkeypatch.setattr(mod.subprocess, "run", nvcc_stand_in(record))
    assert mod.main(["--build", str(tmp_path / "b"), f"change=HEAD+{change}", "main=HEAD"]) == 0
    assert compiled["change"] == source + "// the change\n" and compiled["main"] == source
    assert "built change from HEAD+change.patch" in capsys.readouterr().out
    compiled.clear()
    with pytest.raises(SystemExit, match="no patch file"):
        mod.main(["--build", str(tmp_path / "b"), "main=HEAD", "other=HEAD+nowhere.patch"])
    assert compiled == {}  # the good spec before the bad one was not built either
