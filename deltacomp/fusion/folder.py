"""The gate folder: ``fusion.json`` (config, base, deltas, files table) and ``gate.safetensors`` (the gate's weights).

``fusion.json``::

    {"format": "deltacomp-fusion", "format_version": 1, "deltacomp_version": "...",
     "base": {"source": "<path or Hub id>", "fingerprint": "sha256:..."},
     "deltas": [{"source": "<path or Hub id>", "manifest_sha256": "<hex>"}, ...],
     "config": {FusionConfig}, "training": {...} or null,
     "files": {"gate.safetensors": "<hex sha256>"}}

A folder comes from anywhere (a Hub pull), so it is read as untrusted input: the schema and every type are checked,
each file named by the table must be a plain relative path inside the folder, and every file is checked against
its sha256 before the weights are read (safetensors only: never pickle).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from deltacomp import __version__
from deltacomp.fusion.config import FusionConfig, FusionError
from deltacomp.io.jsonfile import read_json
from deltacomp.io.paths import inside
from deltacomp.package.store import sha256_file

GATE_CONFIG = "fusion.json"
GATE_WEIGHTS = "gate.safetensors"
FORMAT = "deltacomp-fusion"
FORMAT_VERSION = 1
_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_gate_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / GATE_CONFIG).is_file()


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise FusionError(f"{where}: {what}")


def safe_member(folder: Path, name: object, where: str) -> Path:
    """``folder / name`` for a plain relative path that stays inside ``folder``; anything else is a FusionError."""
    return inside(folder, name, where, FusionError)


def check_schema(doc: object, where: str) -> dict:
    """Validate a parsed ``fusion.json``; return it with ``config`` as a :class:`FusionConfig`."""
    _require(isinstance(doc, dict), where, "not a JSON object")
    _require(doc.get("format") == FORMAT, where, f"not a deltacomp gate (format {doc.get('format')!r})")
    version = doc.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool), where, "format_version is not an integer")
    _require(version <= FORMAT_VERSION, where,
             f"gate format {version} is newer than this deltacomp reads ({FORMAT_VERSION}); upgrade deltacomp")
    missing = [k for k in ("base", "deltas", "config", "files") if k not in doc]
    _require(not missing, where, f"lacks {', '.join(missing)}")
    base = doc["base"]
    _require(isinstance(base, dict) and isinstance(base.get("source"), str) and isinstance(base.get("fingerprint"),
                                                                                          str),
             where, "'base' must be an object with string 'source' and 'fingerprint'")
    deltas = doc["deltas"]
    _require(isinstance(deltas, list) and len(deltas) > 0, where, "'deltas' must be a non-empty list")
    for i, d in enumerate(deltas):
        _require(isinstance(d, dict) and isinstance(d.get("source"), str)
                 and isinstance(d.get("manifest_sha256"), str) and bool(_HEX.match(d["manifest_sha256"])),
                 where, f"delta {i} must have a string 'source' and a hex 'manifest_sha256'")
    files = doc["files"]
    _require(isinstance(files, dict) and GATE_WEIGHTS in files, where, f"'files' must list {GATE_WEIGHTS}")
    for name, digest in files.items():
        _require(isinstance(digest, str) and bool(_HEX.match(digest)), where, f"sha256 of {name!r} is not hex")
    _require(doc.get("training") is None or isinstance(doc["training"], dict), where, "'training' must be an object")
    config = FusionConfig.from_dict(doc["config"])
    _require(config.num_deltas == len(deltas), where,
             f"the config is for {config.num_deltas} deltas but {len(deltas)} are listed")
    return {**doc, "config": config}


def read_gate(folder: str | os.PathLike, label: str | None = None, verify: bool = True) -> dict:
    """Read and validate ``folder/fusion.json``; check every listed file's sha256 (errors name ``label``)."""
    folder = Path(folder)
    where = label or str(folder)
    doc = read_json(folder / GATE_CONFIG, FusionError, f"{where}: not a gate folder (no {GATE_CONFIG})", where,
                    GATE_CONFIG)
    doc = check_schema(doc, f"{where}/{GATE_CONFIG}")
    if verify:
        for name, digest in doc["files"].items():
            member = safe_member(folder, name, where)
            _require(member.is_file(), where, f"gate file {name} is missing")
            _require(sha256_file(member) == digest, where,
                     f"{name} is corrupt or truncated (sha256 does not match {GATE_CONFIG})")
    return doc


def write_gate(folder: Path, config: FusionConfig, state: dict[str, torch.Tensor], base: dict, deltas: list[dict],
               training: dict | None = None) -> dict:
    """Write the gate's weights and ``fusion.json`` into ``folder`` (a fresh, temporary one); return the doc."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(folder / GATE_WEIGHTS))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "deltacomp_version": __version__,
           "base": base, "deltas": deltas, "config": config.to_dict(), "training": training,
           "files": {GATE_WEIGHTS: sha256_file(folder / GATE_WEIGHTS)}}
    (folder / GATE_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def read_weights(folder: Path, doc: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = safe_member(folder, GATE_WEIGHTS, str(folder))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FusionError(f"{path}: not a readable safetensors file ({e})") from None


def render_card(doc: dict, repo_id: str | None = None) -> str:
    """A short README for a gate repo on the Hub."""
    cfg = doc["config"]
    gate = cfg.gate if isinstance(cfg, FusionConfig) else cfg["gate"]
    lines = ["---", "library_name: deltacomp", "tags:", "- deltacomp", "- delta-fusion", "---", "",
             f"# {repo_id or 'deltacomp fusion gate'}", "",
             f"A deltacomp `{gate}` gate that mixes {len(doc['deltas'])} compressed deltas over one base "
             f"(`{doc['base']['source']}`).", "", "Deltas:", ""]
    lines += [f"- `{d['source']}` (manifest sha256 `{d['manifest_sha256'][:16]}...`)" for d in doc["deltas"]]
    lines += ["", "Run it with `deltacomp fuse generate GATE --prompt \"...\"` (pass `--base`/`--delta` when the "
                  "recorded paths are not on this machine).", ""]
    return "\n".join(lines)
