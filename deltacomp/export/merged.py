"""The merged export: the full fine-tuned checkpoint, rebuilt by :func:`deltacomp.apply.apply`."""

from __future__ import annotations

import os

from deltacomp.apply import apply
from deltacomp.io.sharded_writer import DEFAULT_SHARD_BYTES


def export_merged(package: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                  overwrite: bool = False, progress: bool | None = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write base + package as a full checkpoint folder (safetensors, config, tokenizer); return its weight files."""
    return apply(package, base, out, overwrite=overwrite, progress=progress, max_shard_bytes=max_shard_bytes)
