"""Lazy reader of a Hugging Face model folder: safetensors (single or sharded) or pytorch_model*.bin.

Only headers are read at open; ``read(name)`` loads one tensor. A Hub repo id is resolved to a local
snapshot through :mod:`deltacomp.io.hub` (which also works offline from the local cache).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from deltacomp.errors import CheckpointError
from deltacomp.io.jsonfile import read_json
from deltacomp.io.paths import hub_cache_root, inside, resolve_folder
from deltacomp.io.safetensors_file import SafetensorsReader
from deltacomp.stages import stage, timed

SAFE_INDEX = "model.safetensors.index.json"
# read_many: tensors read at once (a read copies from the page cache or the disk without holding the GIL, so
# several overlap), and by default at most this many ahead of the caller
READ_THREADS = 4
BIN_INDEX = "pytorch_model.bin.index.json"
# Files a model folder carries besides its weights; apply copies them to the output.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def side_file(folder: Path, rel: str) -> Path | None:
    """A model folder's config or tokenizer file ``rel`` (inside the folder, or its Hub cache), or None."""
    root = hub_cache_root(folder) or folder
    f = inside(folder, rel, f"{folder}: {rel}", CheckpointError, root) if (folder / rel).exists() else folder / rel
    return f if f.is_file() else None


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A local model folder for ``source``: the folder itself, or a Hub snapshot for a repo id."""
    return resolve_folder(source, "model", CheckpointError, "folder")


def _load_weights_only(f: Path):
    """``torch.load`` with ``weights_only`` (never runs pickled code): memory-mapped for the zip format, read
    whole for the legacy format (which cannot be mapped). Any failure is one line."""
    import pickle

    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a bad pickle/zip; the legacy format cannot be mmapped
        pass
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{f}: holds pickled objects other than tensors; refused (deltacomp makes "
                              f"weights-only loads and never runs pickled code: convert it to safetensors)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{f}: cannot load as a weights-only torch checkpoint ({first})") from None


class Checkpoint:
    """The tensors of one model folder, read one at a time."""

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self.path = resolve_model_path(source)
        self.config = self._read_config()
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._readers: dict[Path, SafetensorsReader] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                reader = SafetensorsReader(f)
                self._readers[f] = reader
                names = reader.keys()
            else:
                names = list(self._load_bin(f))
            for name in names:
                if name in self._where:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in two weight files")
                self._where[name] = f
        if not self._where:
            raise CheckpointError(f"{self.path}: the weight files hold no tensors")

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        config = read_json(cfg, CheckpointError, f"{self.path}: not a model folder (no config.json)", str(cfg),
                           "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg}: config.json must hold a JSON object, got a {type(config).__name__}")
        return config

    def _weight_files(self) -> list[Path]:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor -> file")
                root = hub_cache_root(self.path) or self.path
                files = sorted({inside(self.path, f, f"{index}: weight_map", CheckpointError, root)
                                for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{self.path}: shard(s) named in {index_name} are missing: {missing}")
                return files
        root = hub_cache_root(self.path) or self.path
        for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
            files = sorted(self.path.glob(pattern))
            if files:
                return [inside(self.path, f.name, f"{self.path}: weight file", CheckpointError, root) for f in files]
        raise CheckpointError(
            f"{self.path}: not a model folder (no model.safetensors, sharded *.safetensors or pytorch_model*.bin)"
        )

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bins:
            state = _load_weights_only(f)
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise CheckpointError(f"{f}: not a state dict of named tensors")
            self._bins[f] = state
        return self._bins[f]

    # -- queries ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._where[name]
        if f in self._readers:
            return self._readers[f].tensors[name].shape
        return tuple(self._bins[f][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        f = self._where[name]
        if f in self._readers:
            return self._readers[f].tensors[name].dtype
        return self._bins[f][name].dtype

    @timed("load")
    def read(self, name: str) -> torch.Tensor:
        f = self._where[name]
        if f in self._readers:
            return self._readers[f].read(name)
        return self._bins[f][name].clone()

    def read_many(self, names: Iterable[str], ahead: int = READ_THREADS) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``names`` in order, read by :data:`READ_THREADS` threads at most
        ``ahead`` tensors ahead of the caller (so at most that many are held besides the caller's); the caller's
        waits are stage ``load``. An error is raised where its tensor's turn comes."""
        names = iter(names)
        with ThreadPoolExecutor(min(READ_THREADS, max(ahead, 1)), thread_name_prefix="deltacomp-read") as pool:
            pending: deque = deque()
            try:
                while True:
                    while len(pending) < max(ahead, 1) and (name := next(names, None)) is not None:
                        pending.append((name, pool.submit(self.read, name)))
                    if not pending:
                        return
                    name, future = pending.popleft()
                    with stage("load"):
                        tensor = future.result()
                    yield name, tensor
                    del tensor
            finally:
                for _, future in pending:
                    future.cancel()

    def read_sample(self, name: str, k: int) -> torch.Tensor:
        """Up to ``k`` evenly spaced elements of a tensor, flattened."""
        f = self._where[name]
        if f in self._readers:
            return self._readers[f].read_sample(name, k)
        flat = self._bins[f][name].reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(k, flat.numel())).round().long().unique()
        return flat[idx].clone()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.read(name)

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return f"{self.config.get('model_type', '?')}/{','.join(archs) or '?'}"
