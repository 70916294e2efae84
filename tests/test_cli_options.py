"""deltacomp compress's options come from CompressConfig's fields: one default, one parse, one place."""

import dataclasses

import pytest

from deltacomp.cli.core import COMPRESS_OPTIONS, compress
from deltacomp.config import GROUPS, CompressConfig, format_schedule, parse_schedule
from deltacomp.errors import DeltacompError
from deltacomp.methods import get_method, method_for


def test_every_option_default_is_the_fields():
    params = {p.name: p for p in compress.params}
    fields = {f.name: f for f in dataclasses.fields(CompressConfig)}
    for name in COMPRESS_OPTIONS:
        opt, f = params[name], fields[name]
        if f.metadata["multiple"] or f.metadata["is_flag"]:
            continue
        shown = f.metadata["shown"] if f.metadata["shown"] is not None else f.default
        assert opt.default == shown, name
    assert format_schedule(CompressConfig().schedule) == params["schedule"].default
    assert parse_schedule(params["schedule"].default) == CompressConfig().schedule


def test_options_left_at_their_defaults_give_the_default_config():
    defaults = {p.name: (() if p.multiple else p.default) for p in compress.params if p.name in COMPRESS_OPTIONS}
    defaults["sequential"] = False
    assert CompressConfig.from_options(**defaults) == CompressConfig()


def test_every_field_has_a_group():
    grouped = [n for g in GROUPS for n in CompressConfig.group_fields(g)]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(CompressConfig))


@pytest.mark.parametrize("method", ["reference", "lowrank", "bitdelta", "dense"])
@pytest.mark.parametrize("setting", [{"calib": "x.txt"}, {"budget": "all-in"},
                                     {"budget_scope": "model", "allocation": "optimal"}, {"allocation": "optimal"}])
def test_a_method_refuses_the_settings_it_does_not_use(method, setting):
    with pytest.raises(DeltacompError, match=f"mixed method only, not (by )?'{method}'"):
        method_for(CompressConfig(method=method, **setting))
    assert method_for(CompressConfig(method="mixed", **setting)).name == "mixed"
    assert not set(get_method(method).neutral_settings()).isdisjoint(setting)  # a baseline resets it


def test_compress_checks_the_settings_against_the_method_before_reading_anything(tmp_path):
    from deltacomp.compress import compress as run

    with pytest.raises(DeltacompError, match="mixed method only, not by 'lowrank'"):
        run(tmp_path / "no-base", tmp_path / "no-ft", tmp_path / "pkg", CompressConfig(method="lowrank", calib="x"))
    assert not (tmp_path / "pkg").exists()


def test_the_groups_are_frozen_configs_that_check_their_own_settings():
    config = CompressConfig(calib="x.txt", damp=0.05, allocation="schedule")
    assert config.groups.calibration.damp == 0.05 and config.groups.quantization.method == "mixed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.groups.calibration.damp = 0.1
    with pytest.raises(DeltacompError, match="--damp must be in"):
        dataclasses.replace(config.groups.calibration, damp=2.0)
    for bad in (-0.1, 1.5, float("nan"), "often"):
        with pytest.raises(DeltacompError, match="--calib-shrink must be auto or in"):
            dataclasses.replace(config.groups.calibration, calib_shrink=bad)
    with pytest.raises(DeltacompError, match="--calib-use must be one of both, rounding, allocation"):
        dataclasses.replace(config.groups.calibration, calib_use="gptq")
    with pytest.raises(DeltacompError, match="use --allocation optimal"):
        dataclasses.replace(config.groups.allocation, budget_scope="model")
