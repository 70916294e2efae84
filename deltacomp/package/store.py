"""Open a delta package (a folder or a Hub repo id), verify its files, read its tensors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from deltacomp.errors import CheckpointError, PackageError
from deltacomp.io.safetensors_file import SafetensorsReader
from deltacomp.package.manifest import read_manifest, tensor_key

_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_package_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.exists():
        return path
    from deltacomp.io.hub import looks_like_repo_id, snapshot

    if looks_like_repo_id(str(source)):
        return snapshot(str(source), kind="package", allow_patterns=None)
    raise PackageError(f"{source}: no such package folder (and not a Hub repo id)")


class DeltaPackage:
    """A verified package: the manifest, and lazy access to each module's stored tensors."""

    def __init__(self, source: str | os.PathLike, verify: bool = True):
        self.path = resolve_package_path(source)
        if not self.path.is_dir():
            raise PackageError(f"{source}: not a package folder")
        self.manifest = read_manifest(self.path)
        if verify:
            self.verify()
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, str] = {}
        for fname in self.manifest["files"]:
            if not fname.endswith(".safetensors"):
                continue
            try:
                reader = SafetensorsReader(self.path / fname)
            except CheckpointError as e:
                raise PackageError(str(e)) from None
            self._readers[fname] = reader
            for key in reader.keys():
                self._where[key] = fname

    def verify(self) -> None:
        """Check every file the manifest lists against its sha256; name the first that differs."""
        for fname, digest in self.manifest["files"].items():
            path = self.path / fname
            if not path.is_file():
                raise PackageError(f"{self.path}: package file {fname} is missing")
            if sha256_file(path) != digest:
                raise PackageError(f"{path}: corrupt or truncated (sha256 does not match the manifest)")

    @property
    def modules(self) -> dict[str, dict]:
        return self.manifest["modules"]

    def tensor(self, module: str, local: str | None = None) -> torch.Tensor:
        key = tensor_key(module, local)
        if key not in self._where:
            raise PackageError(f"{self.path}: tensor {key!r} named by the manifest is not in the package")
        return self._readers[self._where[key]].read(key)

    def parts(self, module: str) -> dict[str, torch.Tensor]:
        """The stored tensors of a compressed module, by local name."""
        prefix = module + "/"
        return {k[len(prefix):]: self.tensor(k) for k in self._where if k.startswith(prefix)}
