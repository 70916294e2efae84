"""Per-module reconstruction error of a package: ||delta - delta_hat||_F / ||delta||_F, streamed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.manifest import bits_text
from deltacomp.package.reader import reconstruct_delta
from deltacomp.package.store import DeltaPackage


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(||delta - approx||_F^2, ||delta||_F^2) in float64, so that sums over modules stay exact enough."""
    d = delta.double()
    return float((d - approx.double()).pow(2).sum()), float(d.pow(2).sum())


@dataclass
class ModuleError:
    name: str
    shape: tuple[int, int]
    rank: int | None
    bits: str  # "8b x2 3b x32 2b x300" or "" for methods without bit groups
    err_sq: float
    norm_sq: float

    @property
    def relative(self) -> float:
        return math.sqrt(self.err_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


def module_errors(pkg: DeltaPackage, base: Checkpoint, ft: Checkpoint) -> Iterator[ModuleError]:
    """One :class:`ModuleError` per compressed module, one (base, fine-tune, reconstruction) triple at a time."""
    for name, rec in pkg.modules.items():
        if rec["action"] != "compress":
            continue
        delta = ft.read(name).float() - base.read(name).float()  # (m, n)
        err_sq, norm_sq = relative_error(delta, reconstruct_delta(pkg, name))
        info = rec.get("info", {})
        yield ModuleError(name, tuple(rec["shape"]), info.get("rank"), bits_text(info), err_sq, norm_sq)


def summarise(errors: list[ModuleError]) -> dict:
    """Mean of the per-module relative errors, the worst one, and the global error (all deltas as one vector)."""
    if not errors:
        return {"modules": 0, "mean": 0.0, "max": 0.0, "global": 0.0}
    rel = [e.relative for e in errors]
    norm = sum(e.norm_sq for e in errors)
    return {
        "modules": len(errors),
        "mean": sum(rel) / len(rel),
        "max": max(rel),
        "global": math.sqrt(sum(e.err_sq for e in errors) / norm) if norm > 0 else 0.0,
    }
