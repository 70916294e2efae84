"""Settings are validated on construction and survive the manifest round trip."""

import pytest

from deltacomp.config import CompressConfig, parse_schedule
from deltacomp.errors import DeltacompError


def test_schedule_parsing():
    assert parse_schedule("8:2,3:32,2") == ((8, 2), (3, 32), (2, None))
    with pytest.raises(DeltacompError, match="bad schedule"):
        parse_schedule("8:x")


@pytest.mark.parametrize("kw, message", [
    ({"bits": 0}, "positive number"),
    ({"bits": float("nan")}, "positive number"),
    ({"bits": 32}, "more than fp16"),
    ({"schedule": ((5, 2),)}, "not supported"),
    ({"group_size": -1}, "group-size"),
    ({"include": ("(",)}, "bad pattern"),
    ({"device": "tpu"}, "cpu or cuda"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(DeltacompError, match=message):
        CompressConfig(**kw)


def test_round_trip_through_a_dict():
    c = CompressConfig(bits=0.5, schedule=((8, 4), (2, None)), group_size=64)
    d = c.to_dict()
    assert d["config_version"] == 1
    assert CompressConfig.from_dict(d) == c
