"""Settings are validated on construction and survive the manifest round trip."""

import pytest

from deltacomp.config import UV_ALLOCATION_BITS, CompressConfig, format_bits, parse_bits, parse_schedule
from deltacomp.errors import DeltacompError


def test_schedule_parsing():
    assert parse_schedule("8:2,3:32,2") == ((8, 2), (3, 32), (2, None))
    with pytest.raises(DeltacompError, match="bad schedule"):
        parse_schedule("8:x")


def test_allocation_widths_parsing():
    assert parse_bits("2,3,4,8") == ((2, 2), (3, 3), (4, 4), (8, 8))
    assert parse_bits(" 3/2, 2/1,2,3/2 ") == ((2, 1), (2, 2), (3, 2))  # by total width; duplicates dropped
    assert format_bits(parse_bits("2/1,3,8/4")) == "2/1,3,8/4"
    for bad in ("3/x", "2,,a", "/2"):
        with pytest.raises(DeltacompError, match="bad bit set"):
            parse_bits(bad)


@pytest.mark.parametrize("kw, message", [
    ({"allocation_bits": ((5, 2),)}, "width 5 is not supported"),
    ({"allocation_bits": ()}, "bit set is empty"),
    ({"bits": 0}, "positive number"),
    ({"bits": float("nan")}, "positive number"),
    ({"bits": 32}, "more than fp16"),
    ({"schedule": ((5, 2),)}, "not supported"),
    ({"group_size": -1}, "group-size"),
    ({"noise_weight": 0}, "noise-weight must be in"),
    ({"noise_weight": 1.5}, "noise-weight must be in"),
    ({"noise_weight": float("nan")}, "noise-weight must be in"),
    ({"noise_weight": 0.5, "allocation": "schedule"}, "give one of the two"),
    ({"excitation_power": -1}, "excitation-power must be in"),
    ({"excitation_power": 9}, "excitation-power must be in"),
    ({"excitation_power": float("inf")}, "excitation-power must be in"),
    ({"excitation_power": 2, "allocation": "schedule"}, "give one of the two"),
    ({"excitation_power": 2, "calib": "calib.txt"}, "add --calib-use rounding to keep it"),
    ({"include": ("(",)}, "bad pattern"),
    ({"device": "tpu"}, "cpu or cuda"),
    ({"device": "cuda:99"}, "--device cuda:99"),  # the one device check: this machine has no such GPU
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(DeltacompError, match=message):
        CompressConfig(**kw)


def test_round_trip_through_a_dict():
    c = CompressConfig(bits=0.5, schedule=((8, 4), (2, None)), group_size=64)
    d = c.to_dict()
    assert d["config_version"] == 1
    assert d["allocation_bits"] == "2,3,4,8"  # the widths the default chose, recorded
    assert CompressConfig.from_dict(d).to_dict() == d
    uv = CompressConfig(allocation="optimal", allocation_bits=parse_bits("2/1,3/2,4"))
    assert uv.to_dict()["allocation_bits"] == "2/1,3/2,4"
    assert CompressConfig.from_dict(uv.to_dict()) == uv


def test_allocation_widths_default_to_u_v_pairs_with_calibration_only():
    """--calib auto counts as no calibration until a compression settles it (deltacomp.calib.generic)."""
    assert CompressConfig().widths == parse_bits("2,3,4,8")
    assert CompressConfig(calib="none").widths == parse_bits("2,3,4,8")
    for calib in ("calib.txt", "generic"):
        assert CompressConfig(calib=calib).widths == parse_bits(UV_ALLOCATION_BITS)
        assert CompressConfig(calib=calib, calib_use="rounding").widths == parse_bits("2,3,4,8")
    assert any(u > v for u, v in parse_bits(UV_ALLOCATION_BITS))
    mine = CompressConfig(calib="calib.txt", allocation_bits=parse_bits("2,3"))
    assert mine.widths == ((2, 2), (3, 3))


def test_settings_of_packages_with_a_list_of_widths_still_load():
    d = {**CompressConfig().to_dict(), "allocation_bits": [2, 3, 4, 8]}
    assert CompressConfig.from_dict(d).widths == ((2, 2), (3, 3), (4, 4), (8, 8))


@pytest.mark.parametrize("setting, before, given", [("noise_weight", 1.0, 0.3), ("excitation_power", 0.0, 1.5)])
def test_settings_of_packages_written_before_an_allocation_weight_read_as_weight_error(setting, before, given):
    """A package written before the noise weight counted rounding noise as weight error (1); one written before the
    excitation power weighed every direction alike (0)."""
    d = CompressConfig(allocation="optimal").to_dict()
    assert d[setting] is None and getattr(CompressConfig.from_dict(d), setting) is None  # the default, kept
    del d[setting]
    assert getattr(CompressConfig.from_dict(d), setting) == before
    assert getattr(CompressConfig.from_dict(CompressConfig(**{setting: given}).to_dict()), setting) == given
    fixed = CompressConfig(allocation="schedule").to_dict()
    del fixed[setting]
    assert getattr(CompressConfig.from_dict(fixed), setting) is None  # a schedule reads no weight


def test_settings_of_packages_written_before_the_shrink_by_size_read_as_measured():
    d = CompressConfig(calib="calib.txt").to_dict()
    assert d["calib_shrink"] is None and CompressConfig.from_dict(d).calib_shrink is None  # auto, kept
    del d["calib_shrink"]
    assert CompressConfig.from_dict(d).calib_shrink == 0.0


def test_the_excitation_power_is_kept_where_calibration_only_rounds():
    assert CompressConfig(excitation_power=2, calib="calib.txt", calib_use="rounding").excitation_power == 2
