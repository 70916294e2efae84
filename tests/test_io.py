"""Checkpoint reading and writing: safetensors round trips, shard indexes, .bin weights, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltacomp.errors import CheckpointError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from deltacomp.io.sharded_writer import ShardedWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.randint(-5, 5, (4, 4), dtype=torch.int32, generator=g),
        "e": torch.randn(2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
    }


def test_writer_output_is_standard_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    w = SafetensorsWriter(f, metadata={"format": "pt"})
    for k, t in _tensors().items():
        w.add(k, t)
    w.close()
    back = load_file(f)
    for k, t in _tensors().items():
        assert torch.equal(back[k], t) and back[k].dtype == t.dtype


def test_reader_reads_files_written_by_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file(_tensors(), f)
    r = SafetensorsReader(f)
    assert sorted(r.keys()) == sorted(_tensors())
    for k, t in _tensors().items():
        assert torch.equal(r.read(k), t)
    assert torch.equal(r.read_sample("a", 3), _tensors()["a"].reshape(-1)[[0, 7, 14]])


def test_aborted_writer_leaves_nothing(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors")
    w.add("a", torch.ones(3))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_index(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_bytes=100)
    for i in range(5):
        w.add(f"t{i}", torch.full((20,), float(i)))  # 80 bytes each: one per shard
    names = w.close()
    assert len(names) == 5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {f"t{i}" for i in range(5)}
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path)
    assert all(float(ckpt.read(f"t{i}")[0]) == i for i in range(5))


def test_read_many_keeps_order_reads_ahead_within_bounds_and_raises_at_the_bad_tensor(tmp_path, monkeypatch):
    save_file({f"t{i}": torch.full((3,), float(i)) for i in range(9)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path)
    names = [f"t{i}" for i in (4, 0, 8, 2, 6, 1, 7, 3, 5)]
    got = list(ckpt.read_many(names, ahead=3))
    assert [n for n, _ in got] == names and all(float(t[0]) == int(n[1:]) for n, t in got)

    started, read = [], ckpt.read
    monkeypatch.setattr(ckpt, "read", lambda name: started.append(name) or read(name))
    it = ckpt.read_many(names, ahead=3)
    next(it)
    assert len(started) <= 4  # the one handed over and at most 3 ahead
    it.close()

    def failing(name):
        if name == "t2":
            raise CheckpointError("t2 is unreadable")
        return read(name)

    monkeypatch.setattr(ckpt, "read", failing)
    seen = []
    with pytest.raises(CheckpointError, match="t2 is unreadable"):
        for n, _ in ckpt.read_many(names):
            seen.append(n)
    assert seen == ["t4", "t0", "t8"]  # the tensors before the bad one were handed over, none after


def test_missing_shard_is_named(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_bytes=100)
    for i in range(3):
        w.add(f"t{i}", torch.ones(20))
    names = w.close()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / names[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{names[1]}'\\]"):
        Checkpoint(tmp_path)


def test_pytorch_bin_checkpoints_load_weights_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    torch.save(_tensors(), tmp_path / "pytorch_model.bin")
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read("a"), _tensors()["a"]) and ckpt.shape("c") == (2, 3)


def test_a_pickle_that_is_not_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"a": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        Checkpoint(tmp_path)


def test_header_claiming_more_than_the_file(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(100)}, f)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsReader(f)
