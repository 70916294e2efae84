"""The one reader of a package's contents: base checks, packed views of compressed modules, rebuilt weights.

Every consumer (``apply``, ``export``, ``eval``, the kernels and the fusion runtime) reads a package through
this module. A compressed ``mixed`` module is read as a :class:`PackedModule`: per bit group, the packed int32
words of U and V (layout: :mod:`deltacomp.quant.packing`) with their widths, scales, offsets and S, checked
against the manifest's shapes and loaded without unpacking. Dequantizing is a separate, explicit step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltacomp.errors import MismatchError, PackageError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.safetensors_file import DTYPES
from deltacomp.methods.base import get_method
from deltacomp.package.fingerprint import fingerprint
from deltacomp.package.manifest import FP16_DELTA
from deltacomp.package.store import DeltaPackage
from deltacomp.quant import packing, rtn
from deltacomp.quant.factors import group_widths


def check_base(pkg: DeltaPackage, base: Checkpoint) -> None:
    want = pkg.manifest["base"]["fingerprint"]
    got = fingerprint(base)
    if got != want:
        raise MismatchError(
            f"{base.source} is not the base this package was made from (weights fingerprint differs; "
            f"the package expects {pkg.manifest['base'].get('source', '?')})"
        )


def compressed_names(pkg: DeltaPackage) -> list[str]:
    return [name for name, rec in pkg.modules.items() if rec["action"] == "compress"]


def reconstruct_delta(pkg: DeltaPackage, name: str) -> torch.Tensor:
    """The float32 delta of a compressed module as the package stores it."""
    rec = pkg.modules[name]
    method = get_method(rec["method"])
    return method.reconstruct(pkg.parts(name), rec["info"], tuple(rec["shape"]))


def stored_weight(pkg: DeltaPackage, name: str, base: Checkpoint) -> torch.Tensor:
    """The fine-tuned tensor of a module stored whole (exact, added, resized), decoding an fp16 delta."""
    rec = pkg.modules[name]
    t = pkg.tensor(name)
    if rec.get("encoding") == FP16_DELTA:
        return (base.read(name).float() + t.float()).to(DTYPES[rec["dtype"]])
    return t


def iter_weights(pkg: DeltaPackage, base: Checkpoint, rebuild: bool = True):
    """Yield (name, tensor) of the fine-tuned model rebuilt from ``base`` and ``pkg``, one at a time.

    ``rebuild=False`` yields the base weight of each compressed module (its delta then runs through the kernels).
    """
    modules = pkg.modules
    for name in base.keys():
        rec = modules.get(name)
        if rec is None:
            yield name, base.read(name)
        elif rec["action"] == "removed":
            continue
        elif rec["action"] == "compress":
            w = base.read(name)
            yield name, (w.float() + reconstruct_delta(pkg, name)).to(DTYPES[rec["dtype"]]) if rebuild else w
        else:
            yield name, stored_weight(pkg, name, base)
    for name, rec in modules.items():
        if rec["action"] == "added":
            yield name, pkg.tensor(name)


# -- the packed view ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedSide:
    """One factor of a bit group: ``r`` singular vectors of ``length`` codes, packed."""

    words: torch.Tensor  # (r, packed_words(length, bits)) int32
    scale: torch.Tensor  # (r, groups along length) fp16
    offset: torch.Tensor  # (r, groups along length) fp16
    bits: int
    length: int

    def dequantize(self, group_size: int) -> torch.Tensor:
        """(r, length) float32."""
        codes = packing.unpack(self.words, self.bits, self.length)
        return rtn.dequantize(codes, self.scale, self.offset, group_size)


@dataclass(frozen=True)
class PackedGroup:
    u: PackedSide  # rows of U_g^T: length m (out_features)
    v: PackedSide  # rows of V_g^T: length n (in_features)
    s: torch.Tensor  # (r,)

    @property
    def rank(self) -> int:
        return int(self.s.numel())


@dataclass(frozen=True)
class PackedModule:
    """A compressed matrix ``delta (m, n) = sum_g U_g diag(S_g) V_g^T`` as stored: nothing unpacked."""

    name: str
    shape: tuple[int, int]  # (m, n) = (out_features, in_features)
    group_size: int  # entries per (scale, offset) along a vector; 0 = one per vector
    groups: tuple[PackedGroup, ...]

    @property
    def rank(self) -> int:
        return sum(g.rank for g in self.groups)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized float32 ``u (m, r), s (r,), v (n, r)``."""
        u = torch.cat([g.u.dequantize(self.group_size) for g in self.groups], 0).T
        v = torch.cat([g.v.dequantize(self.group_size) for g in self.groups], 0).T
        s = torch.cat([g.s.float() for g in self.groups])
        return u, s, v

    def dense(self) -> torch.Tensor:
        """The float32 (m, n) delta."""
        u, s, v = self.factors()
        return (u * s) @ v.T


def _side(name: str, parts: dict, key: str, bits: int, length: int, rank: int, group_size: int) -> PackedSide:
    try:
        words, scale, offset = parts[key], parts[f"{key}_scale"], parts[f"{key}_offset"]
    except KeyError as e:
        raise PackageError(f"{name}: stored tensor {e.args[0]!r} is missing") from None
    want = {key: ((rank, packing.packed_words(length, bits)), torch.int32),
            f"{key}_scale": ((rank, rtn.num_groups(length, group_size)), torch.float16),
            f"{key}_offset": ((rank, rtn.num_groups(length, group_size)), torch.float16)}
    for k, t in ((key, words), (f"{key}_scale", scale), (f"{key}_offset", offset)):
        shape, dtype = want[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise PackageError(f"{name}: stored {k} is {t.dtype} {list(t.shape)}; the manifest implies "
                               f"{dtype} {list(shape)}")
    return PackedSide(words, scale, offset, bits, length)


def packed_from_parts(name: str, parts: dict[str, torch.Tensor], info: dict, shape: tuple[int, int]) -> PackedModule:
    """The packed view of a ``mixed`` module from its stored tensors and manifest ``info``, checked."""
    m, n = (int(d) for d in shape)
    gs = int(info["group_size"])
    groups = []
    for i, ((bu, bv), g) in enumerate(zip(group_widths(info), info["groups"])):
        r = int(g["rank"])
        s = parts.get(f"g{i}.s")
        if s is None or tuple(s.shape) != (r,) or not s.dtype.is_floating_point:
            raise PackageError(f"{name}: stored g{i}.s must be a float vector of {r} values")
        groups.append(PackedGroup(_side(name, parts, f"g{i}.u", bu, m, r, gs),
                                  _side(name, parts, f"g{i}.v", bv, n, r, gs), s))
    return PackedModule(name, (m, n), gs, tuple(groups))


def packed_module(pkg: DeltaPackage, name: str) -> PackedModule:
    """The packed view of a compressed ``mixed`` module of ``pkg``, its tensors checked against the manifest."""
    rec = pkg.modules.get(name)
    if rec is None or rec.get("action") != "compress":
        raise PackageError(f"{pkg.path}: {name} is not a compressed module of this package")
    if rec["method"] != "mixed":
        raise PackageError(f"{pkg.path}: {name} was compressed with {rec['method']!r}; packed factors exist only "
                           f"for 'mixed' packages")
    return packed_from_parts(name, pkg.parts(name), rec["info"], tuple(rec["shape"]))
