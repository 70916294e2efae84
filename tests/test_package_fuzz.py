"""Property: a package mutated by a hostile hand either fails with a clear DeltacompError or rebuilds exactly the
honest package's model. Mutations: hostile values anywhere in the manifest, hostile safetensors header fields
(the file's sha256 recomputed, a deliberate forgery), and byte flips anywhere (digests left alone).

What a forger with a valid alternative can change (swap two same-shaped tensors, claim another dtype) is a
different package, not a corrupt one: those mutations are not generated.
"""

import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltacomp.apply import _side_files
from deltacomp.errors import DeltacompError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.card import render_card
from deltacomp.package.reader import check_base, iter_weights
from deltacomp.package.store import DeltaPackage
from deltacomp.report import render_inspect

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HOSTILE = [None, True, -1, 0, 3, 2**40, 1.5, float("nan"), float("inf"), "", "../x", "/etc/hostname", "zz",
           [], {}, [1, -2], {"a": 1}]


def rebuild(folder: Path, base: Checkpoint):
    """What apply would write: the weights and the side files, read through the public reader."""
    pkg = DeltaPackage(folder)
    render_inspect(pkg.manifest)
    render_card(pkg.manifest)
    check_base(pkg, base)
    weights = dict(iter_weights(pkg, base))
    side = {rel: pkg.file(f"model/{rel}").read_bytes() for rel in _side_files(pkg)}
    return weights, side


@pytest.fixture(scope="module")
def honest(llama_packages, llama_pair):
    base = Checkpoint(llama_pair[0])
    folder = llama_packages(1.0)
    return folder, base, rebuild(folder, base)


def check(honest, mutate):
    folder, base, (weights, side) = honest
    with tempfile.TemporaryDirectory() as tmp:
        copy = shutil.copytree(folder, Path(tmp) / "pkg")
        mutate(copy)
        try:
            got_weights, got_side = rebuild(copy, base)
        except DeltacompError as e:
            assert "\n" not in str(e)
            return
    assert got_weights.keys() == weights.keys()
    for k, t in weights.items():
        assert got_weights[k].dtype == t.dtype and torch.equal(got_weights[k], t), k
    assert all(side.get(rel) == data for rel, data in got_side.items())


def _paths(node, prefix=()):
    """Every path into a JSON tree (keys and list indices)."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _set(tree, path, value, delete):
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@pytest.fixture(scope="module")
def manifest_paths(llama_packages):
    m = json.loads((llama_packages(1.0) / "deltacomp.json").read_text())
    return [p for p in _paths(m) if p]


@FUZZ
@given(data=st.data())
def test_hostile_manifest_values(honest, manifest_paths, data):
    path = data.draw(st.sampled_from(manifest_paths))
    value = data.draw(st.sampled_from(HOSTILE))
    delete = data.draw(st.booleans()) and path[0] not in ("files",)  # an unlisted file is a smaller package

    def mutate(folder):
        m = json.loads((folder / "deltacomp.json").read_text())
        _set(m, path, value, delete)
        (folder / "deltacomp.json").write_text(json.dumps(m))

    check(honest, mutate)


@FUZZ
@given(data=st.data())
def test_hostile_safetensors_headers(honest, data):
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "entry"]))
    value = data.draw(st.sampled_from(HOSTILE + [[10**12], [2, 3], [-1, 3], [5, 2], "I8", "Q9"]))
    pick = data.draw(st.integers(0, 10**6))

    def mutate(folder):
        path = folder / "delta.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        names = sorted(k for k in header if k != "__metadata__")
        name = names[pick % len(names)]
        if field == "__metadata__":
            header["__metadata__"] = value
        elif field == "entry":
            header[name] = value
        else:
            header[name][field] = value
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        m = json.loads((folder / "deltacomp.json").read_text())
        m["files"]["delta.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder / "deltacomp.json").write_text(json.dumps(m))

    check(honest, mutate)


@FUZZ
@given(data=st.data())
def test_byte_flips_anywhere(honest, data):
    which = data.draw(st.sampled_from(["deltacomp.json", "delta.safetensors", "model/config.json"]))
    at, xor = data.draw(st.integers(0, 10**9)), data.draw(st.integers(1, 255))

    def mutate(folder):
        path = folder / which
        raw = bytearray(path.read_bytes())
        raw[at % len(raw)] ^= xor
        path.write_bytes(bytes(raw))

    check(honest, mutate)
