"""Outputs that appear whole or not at all: build in a hidden sibling folder, rename when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltacomp.errors import OutputError


def check_output(dest: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing ``dest`` unless ``overwrite``; refuse a file where a folder must go."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise OutputError(f"{dest}: already exists (pass --overwrite to replace it)")
        if not dest.is_dir():
            raise OutputError(f"{dest}: exists and is not a folder; refusing to replace it")
    return dest


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on failure it is removed."""
    dest = check_output(dest, overwrite)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=parent))
    except OSError as e:
        raise OutputError(f"{dest}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if dest.exists():
            old = parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not dest.exists():
            old.rename(dest)
        raise OutputError(f"{dest}: cannot move the finished output into place ({e.strerror or e})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
