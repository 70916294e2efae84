"""Pair base and fine-tuned tensors by name, decide what happens to each, and stream the pairs.

Actions:
    compress  a 2-D float weight of a linear layer (include/exclude patterns) whose delta is non-zero
    exact     any other changed tensor (norms, biases, embeddings...): stored as the fine-tune has it
    added     present in the fine-tune only: stored in full
    removed   present in the base only: dropped when the package is applied
    resized   shapes differ on the vocabulary axis (a resized embedding/lm_head): stored in full, warned
    same      unchanged: omitted
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltacomp.config import CompressConfig
from deltacomp.errors import CheckpointError, MismatchError
from deltacomp.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    name: str
    action: str  # compress | exact | added | removed | resized (same is decided while streaming)
    shape: tuple[int, ...]
    dtype: torch.dtype  # the fine-tune's dtype (the base's for removed tensors)


def check_compatible(base: Checkpoint, ft: Checkpoint) -> None:
    """Refuse pairs whose configs name different architectures or that share too few tensors."""
    for key in ("model_type", "architectures"):
        a, b = base.config.get(key), ft.config.get(key)
        if a is not None and b is not None and a != b:
            raise MismatchError(f"architectures differ: base {key}={a} but fine-tuned {key}={b}")
    shared = len(set(base.keys()) & set(ft.keys()))
    if shared < 0.5 * max(len(base.keys()), len(ft.keys())):
        raise MismatchError(
            f"base and fine-tune share only {shared} of {len(base.keys())}/{len(ft.keys())} tensor names: "
            "not the same architecture"
        )


def is_compressible(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: CompressConfig) -> bool:
    if len(shape) != 2 or not dtype.is_floating_point or min(shape) < config.min_dim:
        return False
    if not any(re.search(p, name) for p in config.include):
        return False
    return not any(re.search(p, name) for p in config.exclude)


def _is_vocab_resize(name: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) == 2 and a[1] == b[1] and a[0] != b[0] and bool(re.search(r"embed|lm_head|wte", name))


def plan(base: Checkpoint, ft: Checkpoint, config: CompressConfig) -> list[Entry]:
    """One entry per tensor name of either checkpoint, in the fine-tune's order, then base-only names."""
    entries = []
    for name in ft.keys():
        shape, dtype = ft.shape(name), ft.dtype(name)
        if name not in base:
            entries.append(Entry(name, "added", shape, dtype))
            continue
        bshape, bdtype = base.shape(name), base.dtype(name)
        if bshape != shape:
            if _is_vocab_resize(name, bshape, shape):
                log.warning("%s: vocabulary resized from %s to %s; stored in full", name, list(bshape), list(shape))
                entries.append(Entry(name, "resized", shape, dtype))
                continue
            raise MismatchError(f"{name}: shape differs, base {list(bshape)} vs fine-tuned {list(shape)}")
        if bdtype != dtype and not (bdtype.is_floating_point and dtype.is_floating_point):
            raise MismatchError(f"{name}: dtype differs, base {bdtype} vs fine-tuned {dtype}")
        action = "compress" if is_compressible(name, shape, dtype, config) else "exact"
        entries.append(Entry(name, action, shape, dtype))
    for name in base.keys():
        if name not in ft:
            entries.append(Entry(name, "removed", base.shape(name), base.dtype(name)))
    return entries


def check_finite(name: str, side: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{name}: {bad} NaN/Inf value(s) in the {side} weights")


def stream(base: Checkpoint, ft: Checkpoint, entries: list[Entry]) -> Iterator[tuple[Entry, torch.Tensor | None,
                                                                                      torch.Tensor | None]]:
    """Yield (entry, base tensor, fine-tuned tensor), one pair in memory at a time; checks NaN/Inf."""
    for e in entries:
        b = base.read(e.name) if e.name in base and e.action != "added" else None
        f = ft.read(e.name) if e.action != "removed" else None
        if f is not None:
            check_finite(e.name, "fine-tuned", f)
        if b is not None and e.action in ("compress", "exact"):
            check_finite(e.name, "base", b)
        yield e, b, f
