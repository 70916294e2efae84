"""The package manifest ``deltacomp.json``: what was compressed, how, and what it costs."""

from __future__ import annotations

import json
from pathlib import Path

from deltacomp.errors import PackageError
from deltacomp.io.jsonfile import read_json

MANIFEST = "deltacomp.json"
FORMAT = "deltacomp-delta"
# 2: a compressed vocabulary matrix may store only some rows (``rows``); totals count every file
# 3: the fine-tune's config and tokenizer files that equal the base's are not stored: ``base_files`` lists them
#    (relative path -> sha256) and apply copies them from the base
FORMAT_VERSION = 3
# the lines of ``totals.bytes_by_kind``: compressed matrices, embeddings/lm_head (compressed or stored),
# norms and biases, other stored tensors, and metadata (manifest, card, config and tokenizer files, headers)
BYTE_KINDS = ("matrices", "embeddings", "norms_biases", "other", "metadata")
# ``encoding`` of an exactly stored module whose tensor is its delta in fp16 (``compress --exact fp16-delta``)
FP16_DELTA = "fp16-delta"
# the folder of a package holding the fine-tune's config and tokenizer files (those that differ from the base's)
MODEL_DIR = "model"
REQUIRED = ("format", "format_version", "deltacomp_version", "base", "finetuned", "method", "settings",
            "budget", "modules", "totals", "files")


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    manifest = read_json(path, PackageError, f"{folder}: not a deltacomp package (no {MANIFEST})", str(path),
                         "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a deltacomp manifest")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise PackageError(f"{path}: manifest lacks {', '.join(missing)}")
    from deltacomp.package.schema import check_manifest

    return check_manifest(manifest, str(path))


def bits_text(info: dict) -> str:
    """A package module's bit groups: ``8b x2 3/2b x10`` (U/V where V's width differs from U's)."""
    return " ".join(f"{g['bits']}{'/' + str(g['v_bits']) if 'v_bits' in g else ''}b x{g['rank']}"
                    for g in info.get("groups") or [])


def tensor_key(module: str, local: str | None) -> str:
    """Name of a stored tensor: ``module/local`` for a compressed module's parts, ``module`` for full tensors."""
    return module if local is None else f"{module}/{local}"
