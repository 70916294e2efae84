"""Apply a delta package to its base: rebuild the fine-tuned checkpoint, one tensor at a time."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from tqdm.auto import tqdm

from deltacomp.errors import MismatchError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.io.safetensors_file import DTYPES
from deltacomp.io.sharded_writer import DEFAULT_SHARD_BYTES, ShardedWriter
from deltacomp.methods.base import get_method
from deltacomp.package.fingerprint import fingerprint
from deltacomp.package.manifest import FP16_DELTA
from deltacomp.package.store import DeltaPackage

log = logging.getLogger(__name__)


def check_base(pkg: DeltaPackage, base: Checkpoint) -> None:
    want = pkg.manifest["base"]["fingerprint"]
    got = fingerprint(base)
    if got != want:
        raise MismatchError(
            f"{base.source} is not the base this package was made from (weights fingerprint differs; "
            f"the package expects {pkg.manifest['base'].get('source', '?')})"
        )


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


def iter_weights(pkg: DeltaPackage, base: Checkpoint):
    """Yield (name, tensor) of the fine-tuned model rebuilt from ``base`` and ``pkg``, one at a time."""
    modules = pkg.modules
    for name in base.keys():
        rec = modules.get(name)
        if rec is None:
            yield name, base.read(name)
        elif rec["action"] == "removed":
            continue
        elif rec["action"] == "compress":
            w = base.read(name)
            yield name, (w.float() + reconstruct_delta(pkg, name)).to(DTYPES[rec["dtype"]])
        else:
            yield name, stored_weight(pkg, name, base)
    for name, rec in modules.items():
        if rec["action"] == "added":
            yield name, pkg.tensor(name)


def apply(package: str | os.PathLike, base_src: str | os.PathLike, out: str | os.PathLike,
          overwrite: bool = False, progress: bool | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write the rebuilt fine-tuned checkpoint (config, tokenizer files, safetensors) to ``out``."""
    pkg = DeltaPackage(package)
    base = Checkpoint(base_src)
    check_base(pkg, base)
    check_output(out, overwrite)
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        try:
            n = len(base.keys()) + sum(r["action"] == "added" for r in pkg.modules.values())
            for name, t in tqdm(iter_weights(pkg, base), total=n, desc="apply", unit="tensor",
                                disable=progress is False if progress is not None else None):
                writer.add(name, t)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        model_dir = pkg.path / "model"
        if model_dir.is_dir():
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    return files
