"""The quality suite's smoke run (a tiny random Llama on the CPU): every stage, its JSON and its tables."""

import json
import sys
from pathlib import Path

import bench_scripts
import pytest
from bench_scripts import BENCHMARKS


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling modules, as when run from benchmarks/
    try:
        yield bench_scripts.load("quality_suite")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_heldout_examples_are_never_trained_on(suite):
    from suite_tasks import TASKS, pig_latin_word, split

    for task in TASKS.values():
        held, train = split(task, 50, 2000)
        assert len({p for p, _ in held + train}) == 2050
        assert split(task, 50, 2000) == (held, train)  # the data are the seed's
    assert [pig_latin_word(w) for w in ("apple", "green", "string", "rhythm")] == \
        ["appleway", "eengray", "ingstray", "rhythmay"]


def test_calibration_files_are_replaced_whole_and_left_alone_when_unchanged(suite, tmp_path, monkeypatch):
    path, replaced, real = tmp_path / "calib.jsonl", [], suite.os.replace
    monkeypatch.setattr(suite.os, "replace", lambda src, dst: (replaced.append(Path(dst)), real(src, dst)))
    suite.write_lines(path, ["a", "b"])
    suite.write_lines(path, ["a", "b"])  # another unit's process, the same records: nothing written
    assert path.read_text() == "a\nb\n"
    suite.write_lines(path, ["c"])
    assert replaced == [path, path]  # each new text written aside, then moved over the file whole
    assert path.read_text() == "c\n" and [p.name for p in tmp_path.iterdir()] == ["calib.jsonl"]


def test_extra_settings_parse(suite):
    assert suite.parse_extra("calib 128 seq: calib=task128; sequential=true; seq-damp=0.3") == \
        ("calib 128 seq", {"calib": "task128", "sequential": True, "seq_damp": 0.3})
    with pytest.raises(SystemExit, match="expected 'LABEL"):
        suite.parse_extra("refit=false")


def test_smoke_runs_every_stage(suite, tmp_path, capsys):
    """A pair through every stage in processes of this script (``--jobs``; the fine-tune first, then the uncalibrated
    and the calibrated settings apart, each budget apart), merged into one JSON and its tables."""
    out = tmp_path / "suite.json"
    args = ["--smoke", "--work", str(tmp_path / "work"), "--pairs", "instruct", "--jobs", "2", "--split-settings",
            "--split-budgets", "--budgets", "1,0.25", "--extra", "no refit: refit=false", "--out", str(out)]
    results = suite.main(args)
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved["budgets"]) == {"1", "0.25"} and set(saved["pairs"]) == {"instruct"}
    labels = ["default", "reference", "lowrank", "bitdelta", "embedding whole", "calib task 4", "calib task 8",
              "calib task 16", "no calibration", "no refit"]
    for name in ("instruct",):
        info = saved["pairs"][name]
        assert info["heldout"] == 8 and info["train"]["last_loss"] < info["train"]["first_loss"]
        one = saved["budgets"]["1"][name]
        rows = {r["model"]: r for r in one["rows"]}
        assert list(rows) == ["base", "fine-tuned", *labels]
        assert rows["fine-tuned"]["answer"]["kl"] == 0.0 and rows["reference"]["answer"]["vs_reference"] == 1.0
        tokens = rows["fine-tuned"]["answer"]["tokens"]
        assert tokens > 0 and all(r["answer"]["tokens"] == tokens for r in rows.values())
        for label in labels:
            r = rows[label]
            assert r["answer"]["vs_reference"] == pytest.approx(r["answer"]["kl"] / rows["reference"]["answer"]["kl"])
            assert r["factor_bits_per_entry"] <= 1.0 and 0 <= r["exact_match"] <= 1
        assert rows["default"]["answer"]["kl"] < rows["base"]["answer"]["kl"]
        assert rows["embedding whole"]["package_bytes"] > rows["default"]["package_bytes"]  # the table not compressed
        quarter = saved["budgets"]["0.25"][name]
        assert "bitdelta" in quarter["skipped"] and "reference" in {r["model"] for r in quarter["rows"]}
        # the calibration files hold training dialogues only
        held = {json.dumps(p) for p in _heldout_prompts(name)}
        calib = (tmp_path / "work" / name / "calib_task16.jsonl").read_text().splitlines()
        assert len(calib) == 16 and not any(json.dumps(json.loads(c)["messages"][0]["content"]) in held for c in calib)
    assert results["budgets"].keys() == saved["budgets"].keys()
    assert list(saved["settings"]["compared"]) == labels  # both processes' settings
    assert "== 1 bit per entry ==" in printed and "summary at 0.25 bits per entry" in printed
    assert suite.main(["--render", str(out)]) == saved
    assert capsys.readouterr().out == printed


def _heldout_prompts(name: str) -> list[str]:
    from suite_tasks import TASKS, split

    return [p for p, _ in split(TASKS[name], 8, 120)[0]]


def test_pig_latin_holds_some_words_out_of_training(suite):
    from suite_tasks import TASKS, UNSEEN, split

    held, train = split(TASKS["piglatin"], 200, 2000)
    in_train = {w for p, _ in train for w in p.split(": ")[1].split()}
    assert not in_train & set(UNSEEN)
    unseen = sum(any(w in UNSEEN for w in p.split(": ")[1].split()) for p, _ in held)
    assert 0.3 < unseen / len(held) < 0.8


def test_resume_runs_only_units_not_finished_with_the_same_arguments(suite, tmp_path, monkeypatch):
    started = []

    class Finished:  # a unit's process: writes its JSON (the argument after the script) at once
        returncode = 0

        def __init__(self, cmd, **_):
            started.append(cmd[2])
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"unit": cmd[2]}))

        def poll(self):
            return 0

    monkeypatch.setattr(suite.subprocess, "Popen", Finished)
    assert suite._spawn([("a", ["A"]), ("b", ["B"])], 2, tmp_path) == [{"unit": "A"}, {"unit": "B"}]
    assert started == ["A", "B"]
    started.clear()
    (tmp_path / "part-c.json").write_text(json.dumps({"unit": "a run stopped before its end"}))  # no .args: rerun
    units = [("a", ["A"]), ("b", ["B changed"]), ("c", ["C"])]
    assert suite._spawn(units, 2, tmp_path, resume=True) == [{"unit": "A"}, {"unit": "B changed"}, {"unit": "C"}]
    assert started == ["B changed", "C"]
    started.clear()
    assert suite._spawn(units, 1, tmp_path) == [{"unit": "A"}, {"unit": "B changed"}, {"unit": "C"}]
    assert started == ["A", "B changed", "C"]  # without --resume every unit runs


def test_the_default_calibration_text_is_everyday_sentences_the_suite_never_scores(suite):
    from deltacomp.calib.generic import GENERIC_TEXT

    lines = [s for s in GENERIC_TEXT.read_text(encoding="utf-8").splitlines() if s.strip()]
    assert len(lines) == len(set(lines)) == 821
    calib, scored = suite.generic_text(smoke=False)
    assert calib == lines and len(scored) > 800 and not set(lines) & set(scored)
