"""Open a delta package (a folder or a Hub repo id), verify its files, read its tensors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from deltacomp.errors import CheckpointError, PackageError
from deltacomp.io.paths import hub_cache_root, inside, resolve_folder
from deltacomp.io.safetensors_file import SafetensorsReader
from deltacomp.package.manifest import read_manifest, tensor_key
from deltacomp.package.schema import check_tensors

_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_package_path(source: str | os.PathLike) -> Path:
    """A local package folder for ``source``: the folder itself, or a Hub snapshot for a repo id."""
    return resolve_folder(source, "package", PackageError, "package folder")


def verify_files(folder: Path, files: dict[str, str], label: str | None = None, root: Path | None = None) -> None:
    """Check every file of ``files`` (path relative to ``folder`` -> sha256) and name the first that differs.

    Errors name the file's path, or with ``label`` (a Hub repo a download came from) the label and the name.
    """
    for name, digest in files.items():
        path = inside(folder, name, f"{label or folder}: files", PackageError, root)
        if not path.is_file():
            raise PackageError(f"{label or folder}: package file {name} is missing")
        if sha256_file(path) != digest:
            where = f"{label}: {name} is" if label else f"{path}:"
            raise PackageError(f"{where} corrupt or truncated (sha256 does not match the manifest)")


class DeltaPackage:
    """A verified package: the manifest, and lazy access to each module's stored tensors.

    A package is untrusted input: opening one checks the manifest against the schema
    (:mod:`deltacomp.package.schema`), confines every listed path to the folder, and checks the tensors the
    safetensors headers declare against the manifest. Only files the manifest lists are ever read.
    """

    def __init__(self, source: str | os.PathLike, verify: bool = True):
        self.path = resolve_package_path(source)
        self._root = hub_cache_root(self.path) or self.path
        self.manifest = read_manifest(self.path)
        if verify:
            self.verify()
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, str] = {}
        stored = {}
        for fname in self.manifest["files"]:
            if not fname.endswith(".safetensors"):
                continue
            try:
                reader = SafetensorsReader(self.file(fname))
            except CheckpointError as e:
                raise PackageError(str(e)) from None
            self._readers[fname] = reader
            for key, info in reader.tensors.items():
                if key in self._where:
                    raise PackageError(f"{self.path}: tensor {key!r} is stored in both {self._where[key]} and {fname}")
                self._where[key] = fname
                stored[key] = (info.shape, info.dtype)
        check_tensors(self.manifest, stored, str(self.path))

    def file(self, rel: str) -> Path:
        """The path of a package file, checked to stay inside the package folder."""
        return inside(self.path, rel, f"{self.path}: files", PackageError, self._root)

    def verify(self) -> None:
        """Check every file the manifest lists against its sha256; name the first that differs."""
        verify_files(self.path, self.manifest["files"], root=self._root)

    @property
    def modules(self) -> dict[str, dict]:
        return self.manifest["modules"]

    def tensor(self, module: str, local: str | None = None) -> torch.Tensor:
        """A stored tensor; a floating-point one holding NaN or Inf is refused, naming it."""
        key = tensor_key(module, local)
        if key not in self._where:
            raise PackageError(f"{self.path}: tensor {key!r} named by the manifest is not in the package")
        t = self._readers[self._where[key]].read(key)
        if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
            raise PackageError(f"{self.path}: stored tensor {key!r} holds NaN or Inf values")
        return t

    def parts(self, module: str) -> dict[str, torch.Tensor]:
        """The stored tensors of a compressed module, by local name."""
        prefix = module + "/"
        return {k[len(prefix):]: self.tensor(k) for k in self._where if k.startswith(prefix)}
