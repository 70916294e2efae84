"""Outputs that appear whole or not at all, and never in place of an input.

An output is built in a hidden sibling folder ``.NAME.partial-PID-*`` and renamed into place when complete.
Rules, checked before any work and again just before the final rename:

* an output never replaces or sits around an input (``compress B F -o F``, ``apply -o BASE``); a new
  subfolder of an input is allowed;
* ``--overwrite`` replaces only an empty folder or a previous deltacomp output of the same kind (recognised
  by the marker file :data:`MARKER` it leaves, or for a package by its manifest);
* a symlinked output is followed: its target is what gets written;
* leftovers of killed runs (partial folders, moved-away old outputs) whose process is gone are removed; finished
  work an interrupted run kept for a resume (``atomic_dir``'s ``keep``) is reported as it goes, or taken over;
* outputs get the permissions of a plain ``mkdir`` (the umask's), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltacomp.errors import OutputError
from deltacomp.io.paths import contains

log = logging.getLogger(__name__)
MARKER = ".deltacomp-output"
KINDS = ("package", "model", "adapter", "gate")


def output_kind(folder: Path) -> str | None:
    """The kind of deltacomp output ``folder`` holds ("empty" for an empty folder), or None."""
    try:
        if not any(folder.iterdir()):
            return "empty"
    except OSError:
        return None
    try:
        kind = json.loads((folder / MARKER).read_text()).get("kind")
        if kind in KINDS:
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    try:  # a package written before outputs carried the marker
        if json.loads((folder / "deltacomp.json").read_text()).get("format") == "deltacomp-delta":
            return "package"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def mark(folder: Path, kind: str) -> None:
    """Mark ``folder`` as a deltacomp output of ``kind``."""
    (folder / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def _real(dest: str | os.PathLike) -> Path:
    dest = Path(dest)
    return Path(os.path.realpath(dest)) if dest.is_symlink() else dest


def check_output(dest: str | os.PathLike, overwrite: bool, kind: str | tuple[str, ...] | None = None,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The folder to write for ``dest``, or OutputError: ``dest`` is or holds an input, or sits inside one and
    exists; exists without ``overwrite``; is a file; is not a previous output of ``kind`` (one or several kinds)."""
    dest = _real(dest)
    for src in inputs:
        src = Path(src)
        if not src.exists():
            continue
        if contains(dest, src):
            raise OutputError(f"{dest}: is (or holds) the input {src}; refusing to write over an input")
        if contains(src, dest) and (dest.exists() or dest.is_symlink()):
            raise OutputError(f"{dest}: lies inside the input {src}; refusing to replace part of an input "
                              f"(a new subfolder is fine)")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise OutputError(f"{dest}: already exists (pass --overwrite to replace it)")
        if not dest.is_dir():
            raise OutputError(f"{dest}: exists and is not a folder; refusing to replace it")
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds is not None and output_kind(dest) not in ("empty", *kinds):
            raise OutputError(f"{dest}: not a previous deltacomp {' or '.join(kinds)} output; refusing to replace it "
                              f"(--overwrite replaces only those; remove it yourself or choose another folder)")
    return dest


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_dead(parent: Path, pattern: re.Pattern) -> None:
    """Remove the entries of ``parent`` whose name ``pattern`` matches with group 1 the id of a dead process."""
    try:
        leftovers = [(p, m) for p in parent.iterdir() if (m := pattern.match(p.name))]
    except OSError:
        return
    for p, m in leftovers:
        if not _alive(int(m.group(1))):
            log.warning("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


def _stale_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:partial|old)-(\d+)(?:-.*)?$")


def clean_stale(parent: Path, name: str, keep: str | None = None) -> None:
    """Remove ``.NAME.partial-PID-*`` and ``.NAME.old-PID`` folders in ``parent`` left by dead processes; a partial
    holding work kept for a resume (its ``keep`` subfolder) is reported with what it held."""
    if keep is not None:
        for p in _kept(parent, name, keep):
            if _alive(int(_stale_pattern(name).match(p.name).group(1))):
                continue
            n = sum(1 for f in (p / keep).iterdir() if not f.name.startswith("."))
            log.warning("%s: an interrupted run left %d file(s) of finished work; removing them (the same command "
                        "with --resume continues from them instead)", p, n)
    remove_dead(parent, _stale_pattern(name))


def _kept(parent: Path, name: str, keep: str) -> list[Path]:
    """Partial folders of dead runs for ``name`` that hold a ``keep`` subfolder, newest first."""
    pattern = _stale_pattern(name)
    try:
        found = [p for p in parent.iterdir() if (m := pattern.match(p.name)) and ".partial-" in p.name
                 and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))) and (p / keep).is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: (p / keep).stat().st_mtime, reverse=True)


@contextmanager
def scratch_dir(label: str) -> Iterator[Path]:
    """A temporary folder ``deltacomp-LABEL-PID-*`` for one run, removed after it; those of killed runs go first."""
    remove_dead(Path(tempfile.gettempdir()), re.compile(rf"^deltacomp-{re.escape(label)}-(\d+)-"))
    with tempfile.TemporaryDirectory(prefix=f"deltacomp-{label}-{os.getpid()}-") as tmp:
        yield Path(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def kept_work(dest: str | os.PathLike, keep: str) -> Path | None:
    """The ``keep`` subfolder that :func:`atomic_dir` with ``resume`` would take up for ``dest``, or None."""
    dest = _real(dest)
    found = _kept(dest.parent if str(dest.parent) else Path("."), dest.name, keep)
    return found[0] / keep if found else None


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False, kind: str | tuple[str, ...] | None = None,
               inputs: Iterable[str | os.PathLike] = (), keep: str | None = None,
               resume: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on failure it is removed.

    ``kind`` marks the output (and limits ``overwrite`` to outputs of that kind; of several kinds, the body writes
    the :data:`MARKER` of the one it made, else the first is marked); ``inputs`` are never replaced.

    ``keep`` names a subfolder of finished work that outlives an interruption (Ctrl-C, SIGTERM through the CLI, or
    a kill): the partial folder then stays, holding it alone. With ``resume``, the newest such subfolder of an
    interrupted run for ``dest`` is moved into the new folder before the body runs; without, it is reported and
    removed with the rest of the dead run's partial folder.
    """
    inputs = list(inputs)
    dest = check_output(dest, overwrite, kind, inputs)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        adopt = _kept(parent, dest.name, keep)[:1] if keep is not None and resume else []
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=parent))
        tmp.chmod(0o777 & ~_umask())
        for old in adopt:
            log.info("resuming from %s", old / keep)
            (old / keep).rename(tmp / keep)
        clean_stale(parent, dest.name, keep)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
        if kind is not None and not (tmp / MARKER).exists():
            mark(tmp, kind if isinstance(kind, str) else kind[0])
        try:  # again: another run may have written dest meanwhile
            check_output(dest, overwrite, kind, inputs)
        except OutputError as e:
            raise OutputError(f"{e}; it changed while this run worked, so this run's output was discarded") from None
    except KeyboardInterrupt:
        if keep is not None and (tmp / keep).is_dir():
            for p in tmp.iterdir():
                if p.name == keep:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            log.warning("interrupted: the finished work stays in %s; the same command with --resume continues "
                        "from it", tmp / keep)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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
