"""``--preset``: the settings each preset sets, explicit options over the preset, ``best`` without ``--calib``; the
default allocation (mixed: optimal, accepted by every method) and ``--schedule`` implying the
schedule."""

import json

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, calib_text

from deltacomp.cli import cli
from deltacomp.config import CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.methods import get_method, method_for
from deltacomp.presets import PRESETS, settle

OPTIONS = {"method": "mixed", "calib": None, "allocation": "auto", "sequential": False, "schedule": "8:2,3:32,2"}


@pytest.mark.parametrize("preset, want", [
    ("fast", {"allocation": "schedule", "calib": None, "sequential": False, "tune": 0}),
    ("balanced", {"allocation": "auto", "calib": "auto", "sequential": False, "tune": 0}),
    ("best", {"allocation": "optimal", "calib": "c.txt", "sequential": False, "tune": 3}),
])
def test_a_preset_sets_method_calibration_allocation_and_sequential(preset, want):
    given = {"calib"} if preset == "best" else set()
    got = settle({**OPTIONS, "calib": "c.txt" if preset == "best" else None}, given, preset)
    assert {k: got[k] for k in want} == want and got["method"] == "mixed"
    assert set(PRESETS[preset]) >= {"method", "allocation", "sequential", "tune"}


def test_explicit_options_override_the_preset():
    got = settle({**OPTIONS, "calib": "c.txt", "allocation": "schedule", "sequential": True},
                 {"calib", "allocation", "sequential"}, "best")
    assert (got["calib"], got["allocation"], got["sequential"]) == ("c.txt", "schedule", True)
    assert settle({**OPTIONS, "calib": "c.txt"}, {"calib"}, "fast")["calib"] == "c.txt"  # fast, calibrated
    assert settle({**OPTIONS, "schedule": "8:4,2"}, {"schedule"}, "balanced")["allocation"] == "schedule"


@pytest.mark.parametrize("options, given, preset, message", [
    ({}, set(), "best", "--preset best calibrates: give --calib FILE"),
    ({"method": "lowrank"}, {"method"}, "fast", "--preset fast chooses the settings of the mixed method"),
    ({"allocation": "optimal"}, {"allocation", "schedule"}, None, "give one of the two"),
])
def test_settle_refuses_what_cannot_be_meant(options, given, preset, message):
    with pytest.raises(DeltacompError, match=message):
        settle({**OPTIONS, **options}, given, preset)


def test_a_schedule_given_implies_the_schedule_and_refuses_optimal():
    assert settle(dict(OPTIONS), {"schedule"})["allocation"] == "schedule"
    assert settle(dict(OPTIONS), set())["allocation"] == "auto"
    assert CompressConfig(schedule=((8, 4), (2, None))).allocation == "schedule"
    with pytest.raises(DeltacompError, match="give one of the two"):
        CompressConfig(schedule=((8, 4), (2, None)), allocation="optimal")


@pytest.mark.parametrize("method", ["reference", "lowrank", "bitdelta", "dense"])
def test_the_default_allocation_is_accepted_by_every_method_and_resolved_by_each(method):
    assert method_for(CompressConfig(method=method)).resolve(CompressConfig(method=method)).allocation == "schedule"
    mixed = get_method("mixed")  # optimal at every budget (as measured)
    assert [mixed.resolve(CompressConfig(bits=b)).allocation for b in (2.0, 1.0, 0.5, 0.25)] == ["optimal"] * 4
    assert mixed.resolve(CompressConfig(bits=0.5, allocation="schedule")).allocation == "schedule"
    with pytest.raises(DeltacompError, match=f"--allocation optimal is for the mixed method only, not '{method}'"):
        method_for(CompressConfig(method=method, allocation="optimal"))


def test_old_settings_without_an_allocation_read_as_the_schedule():
    d = CompressConfig().to_dict()
    del d["allocation"]
    assert CompressConfig.from_dict(d).allocation == "schedule"


def _compress(tmp_path, pair, *args):
    base, ft, _ = pair
    out = tmp_path / f"pkg{len(list(tmp_path.iterdir()))}"
    r = CliRunner().invoke(cli, ["compress", str(base), str(ft), "-o", str(out), "--no-progress", *map(str, args)])
    return r, (json.loads((out / "deltacomp.json").read_text())["settings"] if r.exit_code == 0 else None)


def test_cli_default_and_presets_write_what_they_chose(tmp_path, llama_tok):
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text())
    (tmp_path / "pkgs").mkdir()
    work = tmp_path / "pkgs"
    runs = {"default": [], "fast": ["--preset", "fast"],
            "fast+optimal": ["--preset", "fast", "--allocation", "optimal"],
            "best": ["--preset", "best", "--calib", calib, "--calib-samples", 4],
            "best+seq": ["--preset", "best", "--calib", calib, "--calib-samples", 4, "--sequential"],
            "schedule": ["--schedule", "8:4,2"], "default@0.5": ["--bits", 0.5]}
    got = {}
    for name, args in runs.items():
        r, settings = _compress(work, llama_tok, *args)
        assert r.exit_code == 0, (name, r.output)
        calib = settings["calib"] if settings["calib"] in (None, "generic") else "file"
        got[name] = (settings["allocation"], calib, settings["sequential"], settings["tune"])
    assert got == {"default": ("optimal", "generic", False, 0), "fast": ("schedule", None, False, 0),
                   "fast+optimal": ("optimal", None, False, 0), "best": ("optimal", "file", False, 3),
                   "best+seq": ("optimal", "file", True, 3), "schedule": ("schedule", "generic", False, 0),
                   "default@0.5": ("optimal", "generic", False, 0)}


@pytest.mark.parametrize("args, words", [
    (["--preset", "best"], ["--preset best calibrates", "--calib FILE"]),
    (["--preset", "best", "--calib", "none"], ["--preset best calibrates", "--calib FILE"]),
    (["--preset", "fast", "--method", "bitdelta"], ["--preset fast", "--method bitdelta"]),
    (["--schedule", "8:4,2", "--allocation", "optimal"], ["give one of the two"]),
    (["--method", "reference", "--allocation", "optimal"], ["mixed method only, not 'reference'"]),
])
def test_cli_refusals_are_one_line(tmp_path, args, words):
    r = CliRunner().invoke(cli, ["compress", str(tmp_path / "b"), str(tmp_path / "f"), "-o", str(tmp_path / "o"),
                                 *args])
    assert_one_line_error(r, *words)
    assert not (tmp_path / "o").exists()


def test_best_shares_the_budget_by_sensitivity_on_an_encoder_only(tmp_path, bert_tok, llama_tok):
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text())
    best = ["--preset", "best", "--calib", calib, "--calib-samples", 4, "--tune", 0]
    got = {}
    for name, pair, extra in (("encoder", bert_tok, []), ("decoder", llama_tok, []),
                              ("encoder, matrix", bert_tok, ["--budget-scope", "matrix"])):
        r, settings = _compress(tmp_path, pair, *best, *extra)
        assert r.exit_code == 0, (name, r.output)
        got[name] = (settings["budget_scope"], settings["sensitivity"])
    assert got == {"encoder": ("model", True), "decoder": ("matrix", False), "encoder, matrix": ("matrix", False)}
    kinds = []
    settle({**OPTIONS, "calib": "c.txt"}, {"calib"}, "balanced", kind=lambda: kinds.append(1) or "encoder")
    assert kinds == []  # read only where the preset has settings by kind
