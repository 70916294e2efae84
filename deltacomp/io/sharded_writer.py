"""Write a model's tensors as safetensors shards with a Hugging Face shard index, one tensor at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deltacomp.io.safetensors_file import SafetensorsWriter
from deltacomp.stages import timed

DEFAULT_SHARD_BYTES = 5 * 1024**3


class ShardedWriter:
    """Append tensors; a new shard starts when the current one would pass ``max_shard_bytes``.

    ``close`` names the shards ``model-0000i-of-0000N.safetensors`` and writes the index, or names a
    single shard ``model.safetensors``. Memory stays at one tensor: bytes are spooled to disk.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 prefix: str = "model", metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.metadata = metadata
        self._shards: list[tuple[Path, list[str]]] = []
        self._writer: SafetensorsWriter | None = None
        self.total_bytes = 0

    @timed("write")
    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._writer is None or (self._writer.nbytes and self._writer.nbytes + size > self.max_shard_bytes):
            self._roll()
        assert self._writer is not None
        self._writer.add(name, tensor)
        self._shards[-1][1].append(name)
        self.total_bytes += size

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f".{self.prefix}-shard-{len(self._shards):05d}.safetensors"
        self._writer = SafetensorsWriter(path, self.metadata)
        self._shards.append((path, []))

    @timed("write")
    def close(self) -> list[str]:
        """Finish the files; return their final names."""
        if self._writer is None:
            self._roll()
        assert self._writer is not None
        self._writer.close()
        n = len(self._shards)
        if n == 1:
            names = [f"{self.prefix}.safetensors"]
        else:
            names = [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, tensors), name in zip(self._shards, names):
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

