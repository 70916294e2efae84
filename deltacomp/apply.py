"""Apply a delta package to its base: rebuild the fine-tuned checkpoint, one tensor at a time."""

from __future__ import annotations

import logging
import os
import shutil

from tqdm.auto import tqdm

from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.io.sharded_writer import DEFAULT_SHARD_BYTES, ShardedWriter
from deltacomp.package.reader import check_base, iter_weights
from deltacomp.package.store import DeltaPackage

log = logging.getLogger(__name__)


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
