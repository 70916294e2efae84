"""The one reader of a package's contents: base checks, packed views of compressed modules, rebuilt weights.

Every consumer (``apply``, ``export``, ``eval``, the kernels and the fusion runtime) reads a package through
this module. A compressed ``mixed`` module is read as a :class:`PackedModule`: per bit group, the packed int32
words of U and V (layout: :mod:`deltacomp.quant.packing`) with their widths, scales, offsets and S, checked
against the manifest's shapes and loaded without unpacking. Dequantizing is a separate, explicit step.
"""

from __future__ import annotations

import logging

import torch

from deltacomp.errors import MismatchError, PackageError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.safetensors_file import DTYPES
from deltacomp.methods.base import get_method
from deltacomp.package.fingerprint import FullFingerprint, fingerprint
from deltacomp.package.manifest import FP16_DELTA
from deltacomp.package.schema import stored_shape
from deltacomp.package.store import DeltaPackage
from deltacomp.quant.packed import PackedModule, packed_from_parts
from deltacomp.rows import check_rows, scatter_rows

log = logging.getLogger(__name__)
# a stored delta larger than this many times its weight's largest entry (or 1) is corrupt, not a fine-tune
ABSURD = 1e4


def _base_label(pkg: DeltaPackage) -> str:
    base = pkg.manifest["base"]
    return base.get("repo_id") or base.get("source") or "?"


def check_modules(pkg: DeltaPackage, base: Checkpoint) -> None:
    """Every module record against ``base``: names it has (or, for an added module, lacks), shapes it holds."""
    for name, rec in pkg.modules.items():
        action = rec["action"]
        if action == "added":
            if name in base:
                raise MismatchError(f"{pkg.path}: modules.{name} is 'added' but {base.source} already has it")
            continue
        if name not in base:
            raise MismatchError(f"{pkg.path}: modules.{name} is not a tensor of the base {base.source}")
        if action in ("compress", "exact") and tuple(rec["shape"]) != tuple(base.shape(name)):
            raise MismatchError(f"{pkg.path}: modules.{name}.shape is {rec['shape']} but the base's tensor is "
                                f"{list(base.shape(name))}")
        if rec.get("encoding") == FP16_DELTA and not base.dtype(name).is_floating_point:
            raise MismatchError(f"{pkg.path}: modules.{name} stores a float delta over a {base.dtype(name)} tensor")


def check_base(pkg: DeltaPackage, base: Checkpoint) -> None:
    """A fast first test that ``base`` is the package's base: the sampled fingerprint and the module records.

    The full fingerprint (every value) is checked by :func:`iter_weights`, which reads every base tensor anyway.
    """
    want = pkg.manifest["base"]["fingerprint"]
    got = fingerprint(base)
    if got != want:
        raise MismatchError(
            f"{base.source} is not the base this package was made from (weights fingerprint differs; "
            f"the package expects {_base_label(pkg)})"
        )
    check_modules(pkg, base)


def compressed_names(pkg: DeltaPackage) -> list[str]:
    return [name for name, rec in pkg.modules.items() if rec["action"] == "compress"]


def _finite(pkg: DeltaPackage, name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
        raise PackageError(f"{pkg.path}: modules.{name}: the {what} holds NaN or Inf values")
    return t


def reconstruct_delta(pkg: DeltaPackage, name: str) -> torch.Tensor:
    """The float32 delta of a compressed module as the package stores it (finite, checked); a row-sparse module's
    kept rows are put back in place, zeros elsewhere."""
    delta = delta_from_parts(pkg.parts(name), pkg.modules[name], f"{pkg.path}: modules.{name}")
    return _finite(pkg, name, delta, "rebuilt delta")


def delta_from_parts(parts: dict[str, torch.Tensor], rec: dict, where: str) -> torch.Tensor:
    """The float32 delta of a compressed module from its stored tensors ``parts`` (by local name) and its record
    ``rec`` (as the manifest keeps it): a row-sparse module's kept rows put back in place, zeros elsewhere. Stored
    rows that do not fit the record raise PackageError naming ``where``."""
    parts = dict(parts)
    rows = parts.pop("rows", None)
    if "rows" in rec:
        why = "is missing" if rows is None else check_rows(rows, rec["rows"], rec["shape"][0])
        if why:
            raise PackageError(f"{where}: the stored rows {why}")
    delta = get_method(rec["method"]).reconstruct(parts, rec["info"], stored_shape(rec))
    if rows is not None:
        delta = scatter_rows(delta, rows, rec["shape"][0])
    return delta


def is_row_sparse(pkg: DeltaPackage, name: str) -> bool:
    return "rows" in pkg.modules[name]


def _rebuilt(pkg: DeltaPackage, name: str, w: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w + delta`` in ``dtype``; refuses a delta out of all proportion to the weight (corrupt scales, 1e30)."""
    scale = max(float(w.float().abs().max()) if w.numel() else 0.0, 1.0)
    if delta.numel() and float(delta.abs().max()) > ABSURD * scale:
        raise PackageError(f"{pkg.path}: modules.{name}: the stored delta reaches {float(delta.abs().max()):.3g}, "
                           f"absurd for a weight of magnitude {scale:.3g}")
    return _finite(pkg, name, (w.float() + delta).to(dtype), "rebuilt weight")


def stored_weight(pkg: DeltaPackage, name: str, base: Checkpoint) -> torch.Tensor:
    """The fine-tuned tensor of a module stored whole (exact, added, resized), decoding an fp16 delta; of a
    compressed module, its base weight plus the rebuilt delta."""
    rec = pkg.modules[name]
    if rec["action"] == "compress":
        return _rebuilt(pkg, name, base.read(name), reconstruct_delta(pkg, name), DTYPES[rec["dtype"]])
    t = pkg.tensor(name)
    if rec.get("encoding") == FP16_DELTA:
        return _rebuilt(pkg, name, base.read(name), t.float(), DTYPES[rec["dtype"]])
    return t


def iter_weights(pkg: DeltaPackage, base: Checkpoint, rebuild: bool = True):
    """Yield (name, tensor) of the fine-tuned model rebuilt from ``base`` and ``pkg``, one at a time.

    Every base tensor is hashed as it is read; when the package records the base's full fingerprint, a base
    that differs anywhere raises MismatchError after the last tensor (before a caller's output is complete).
    ``rebuild=False`` yields the base weight of each compressed module (its delta then runs through the kernels).
    """
    check_modules(pkg, base)
    modules = pkg.modules
    full = FullFingerprint()
    for name in base.keys():
        rec = modules.get(name)
        w = base.read(name)
        full.add(name, w)
        if rec is None:
            yield name, w
        elif rec["action"] == "removed":
            continue
        elif rec["action"] == "compress":
            yield name, _rebuilt(pkg, name, w, reconstruct_delta(pkg, name), DTYPES[rec["dtype"]]) if rebuild else w
        elif rec.get("encoding") == FP16_DELTA:
            yield name, _rebuilt(pkg, name, w, pkg.tensor(name).float(), DTYPES[rec["dtype"]])
        else:
            yield name, pkg.tensor(name)
    for name, rec in modules.items():
        if rec["action"] == "added":
            yield name, pkg.tensor(name)
    want = pkg.manifest["base"].get("full_fingerprint")
    if want is None:
        log.info("%s: made before full base fingerprints; only the sampled one was checked", pkg.path)
    elif full.hexdigest() != want:
        raise MismatchError(f"{base.source} is not the base this package was made from (the full fingerprint of its "
                            f"weights differs; the package expects {_base_label(pkg)})")


# -- the packed view of a package's module -------------------------------------------------------------------
def packed_module(pkg: DeltaPackage, name: str) -> PackedModule:
    """The packed view of a compressed ``mixed`` module of ``pkg``, its tensors checked against the manifest."""
    rec = pkg.modules.get(name)
    if rec is None or rec.get("action") != "compress":
        raise PackageError(f"{pkg.path}: {name} is not a compressed module of this package")
    if rec["method"] != "mixed":
        raise PackageError(f"{pkg.path}: {name} was compressed with {rec['method']!r}; packed factors exist only "
                           f"for 'mixed' packages")
    if "rows" in rec:
        raise PackageError(f"{pkg.path}: {name} stores {rec['rows']} of its {rec['shape'][0]} rows; a row-sparse "
                           f"delta has no packed linear view (rebuild it with reconstruct_delta)")
    return packed_from_parts(name, pkg.parts(name), rec["info"], tuple(rec["shape"]))
