"""Paths read from untrusted files (a manifest, a shard index, a gate config) stay inside their folder.

:func:`inside` is the one check: a relative path given as text resolves under its folder, or the caller's
error is raised naming the path. Rejected: an empty or non-text path, an absolute path (POSIX or Windows
style), any ``..`` component, a backslash or NUL, and a path whose symlinks lead out of ``root`` (the folder
itself unless given: a Hub cache snapshot's links into the repo's ``blobs/`` stay inside the repo's cache
folder, which is the root there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from deltacomp.errors import DeltacompError

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relative(rel, what: str, error: type[DeltacompError] = DeltacompError) -> str:
    """``rel`` if it is a plain relative POSIX path (no ``..``, not absolute); else ``error`` naming it."""
    if not isinstance(rel, str) or not rel:
        raise error(f"{what}: a file path must be a non-empty string, got {rel!r}")
    if "\\" in rel or "\0" in rel or _DRIVE.match(rel):
        raise error(f"{what}: file path {rel!r} has a backslash, a NUL or a drive letter")
    p = PurePosixPath(rel)
    if p.is_absolute():
        raise error(f"{what}: file path {rel!r} is absolute; only paths inside the folder are allowed")
    if any(part == ".." for part in p.parts):
        raise error(f"{what}: file path {rel!r} leaves the folder ('..')")
    if not p.parts or p.parts == (".",):
        raise error(f"{what}: file path {rel!r} names the folder itself")
    return rel


def inside(folder: str | os.PathLike, rel, what: str, error: type[DeltacompError] = DeltacompError,
           root: str | os.PathLike | None = None) -> Path:
    """``folder / rel``, checked: ``rel`` is a plain relative path and, following symlinks, stays in ``root``."""
    check_relative(rel, what, error)
    path = Path(folder) / rel
    base = Path(os.path.realpath(root if root is not None else folder))
    real = Path(os.path.realpath(path))
    if real != base and base not in real.parents:
        raise error(f"{what}: file path {rel!r} is a symlink (or under one) that leads out of the folder")
    return path


def hub_cache_root(folder: Path) -> Path | None:
    """The repo's cache folder (``models--org--name``) when ``folder`` is one of its ``snapshots/<sha>``."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return None


def contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it (both resolved)."""
    outer, inner = Path(os.path.realpath(outer)), Path(os.path.realpath(inner))
    return inner == outer or outer in inner.parents


def resolve_folder(source: str | os.PathLike, kind: str, error: type[DeltacompError], what: str) -> Path:
    """A local folder for ``source``: the folder itself, or a Hub snapshot when it is a repo id
    (``org/name[@revision]``). ``kind`` is ``model`` (weights, config and tokenizer files are fetched) or
    ``package`` (fetched whole); ``what`` names the folder in ``error``'s message."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise error(f"{source}: not a {what}")
        return path
    from deltacomp.io.hub import looks_like_repo_id, snapshot

    if looks_like_repo_id(str(source)):
        return snapshot(str(source), kind=kind)
    raise error(f"{source}: no such {what} (and not a Hub repo id)")
