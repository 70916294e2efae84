"""Read a JSON file that a deltacomp folder must hold (a manifest, a gate config, a model config)."""

from __future__ import annotations

import json
from pathlib import Path

from deltacomp.errors import DeltacompError


def read_json(path: Path, error: type[DeltacompError], missing: str, label: str, what: str) -> object:
    """The parsed contents of ``path``; ``error(missing)`` when there is no such file, and an ``error`` that names
    ``label`` and ``what`` when it cannot be read or parsed. The caller checks the shape of what it gets."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{label}: unreadable {what} ({e})") from None
