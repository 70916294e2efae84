"""Apply a delta package to its base: rebuild the fine-tuned checkpoint, one tensor at a time."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from deltacomp.errors import MismatchError
from deltacomp.io.checkpoint import SIDE_FILES, Checkpoint, side_file
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.io.sharded_writer import DEFAULT_SHARD_BYTES, ShardedWriter
from deltacomp.package.manifest import MODEL_DIR
from deltacomp.package.reader import check_base, iter_weights
from deltacomp.package.store import DeltaPackage, sha256_file

log = logging.getLogger(__name__)


def apply(package: str | os.PathLike, base_src: str | os.PathLike, out: str | os.PathLike,
          overwrite: bool = False, progress: bool | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write the rebuilt fine-tuned checkpoint (config, tokenizer files, safetensors) to ``out``.

    Besides the weights, only the config and tokenizer files the manifest lists under ``model/`` are copied
    (:data:`~deltacomp.io.checkpoint.SIDE_FILES`, each checked to stay inside the package); never code, never
    weights, never an unlisted file. Those the manifest lists under ``base_files`` (the fine-tune's were the
    base's, byte for byte) are copied from the base after their sha256 is checked.
    """
    pkg = DeltaPackage(package)
    base = Checkpoint(base_src)
    check_base(pkg, base)
    inputs = (pkg.path, base.path)
    check_output(out, overwrite, "model", inputs)
    side = _side_files(pkg)
    from_base = _base_side_files(pkg, base)
    with atomic_dir(out, overwrite, "model", inputs) as tmp:
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
        for rel, src in [(rel, pkg.file(f"{MODEL_DIR}/{rel}")) for rel in side] + from_base:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
    return files


def _base_side_files(pkg: DeltaPackage, base: Checkpoint) -> list[tuple[str, Path]]:
    """(relative path, the base's file) of each side file the package takes from the base, its sha256 checked."""
    out = []
    for rel, digest in pkg.manifest.get("base_files", {}).items():
        f = side_file(Path(base.path), rel)
        if f is None or sha256_file(f) != digest:
            what = "does not have" if f is None else "has another"
            raise MismatchError(f"{base.source} {what} {rel}; the package relies on the base's {rel} (the "
                                f"fine-tune's was the same file, sha256 {digest[:12]}...)")
        out.append((rel, f))
    return out


def _side_files(pkg: DeltaPackage) -> list[str]:
    """The config and tokenizer files listed under ``model/`` (paths relative to it); others are skipped."""
    prefix = MODEL_DIR + "/"
    listed = [f[len(prefix):] for f in pkg.manifest["files"] if f.startswith(prefix)]
    skipped = [f for f in listed if f not in SIDE_FILES]
    if skipped:
        log.warning("%s: not copying %s from model/ (only config and tokenizer files are)", pkg.path,
                    ", ".join(skipped))
    return [f for f in listed if f in SIDE_FILES]
