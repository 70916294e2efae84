"""The delta bank of a fusion: the packages fused over one base, verified and checked to share that base.

Each package is opened through :class:`~deltacomp.package.store.DeltaPackage` (every file checked against its
sha256); their manifests must name one base fingerprint, and that of the base checkpoint when one is given. The
sha256 of each package's manifest (which lists every file's sha256) identifies the exact package a gate was
trained with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from deltacomp.errors import MismatchError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.kernels.linear import check_same_base
from deltacomp.package.fingerprint import fingerprint
from deltacomp.package.manifest import MANIFEST
from deltacomp.package.store import DeltaPackage, sha256_file


def source_name(source: str | os.PathLike) -> str:
    """How a source is recorded: an absolute path for a local folder, else the Hub id as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)


def manifest_sha256(pkg: DeltaPackage) -> str:
    return sha256_file(pkg.path / MANIFEST)


class DeltaSet:
    """k verified packages over one base; ``sources`` as recorded, ``fingerprint`` the base's."""

    def __init__(self, sources: Sequence[str | os.PathLike], base: Checkpoint | None = None):
        if not sources:
            raise MismatchError("a fusion needs at least one delta package")
        self.sources = [source_name(s) for s in sources]
        self.packages = [DeltaPackage(s) for s in sources]
        check_same_base(self.packages)
        self.fingerprint = self.packages[0].manifest["base"]["fingerprint"]
        if base is not None:
            got = fingerprint(base)
            if got != self.fingerprint:
                raise MismatchError(f"{base.source} is not the base the deltas were made from (weights "
                                    f"fingerprint differs; {self.packages[0].path} expects "
                                    f"{self.packages[0].manifest['base'].get('source', '?')})")
        self.manifest_sha256 = [manifest_sha256(p) for p in self.packages]

    def __len__(self) -> int:
        return len(self.packages)

    def label(self, i: int) -> str:
        """A short name of delta i for tables: its folder name."""
        return f"delta {i} ({Path(self.sources[i]).name})"
