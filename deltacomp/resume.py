"""The finished matrices of a compression, kept in its partial output so that an interrupted run can resume.

A compression writes each compressed matrix's result to ``resume/`` inside the output's partial folder
(:func:`deltacomp.io.output.atomic_dir`) as soon as it is done: one safetensors file a matrix, its tensors in their
stored form (packed factors, scales...) and, in the file's metadata, what the package's manifest needs of it (the
module's record, the byte and bit counts, the base tensor's digest for the full fingerprint). A file is written
under a temporary name and renamed, so a kill leaves whole files only. The package is then assembled from these
files in the one-process order; ``resume/`` is removed before the manifest is written.

``resume/settings.json`` names what the results were made with (settings, inputs, the compressed matrices):
``--resume`` with anything else is refused rather than mixing two runs' matrices into one package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltacomp.errors import DeltacompError
from deltacomp.stages import timed

FOLDER = "resume"
SETTINGS = "settings.json"
_META = "deltacomp_result"


def _file_name(name: str) -> str:
    if re.fullmatch(r"[\w.\-]{1,200}", name) and not name.startswith("."):
        return name + ".safetensors"
    return "sha256-" + hashlib.sha256(name.encode()).hexdigest() + ".safetensors"


class ResultStore:
    """The results of finished matrices in ``folder`` (the ``resume/`` of a partial output), by tensor name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def check(self, identity: dict) -> None:
        """Refuse results made with another ``identity`` than this run's."""
        path = self.folder / SETTINGS
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = None
        if kept != json.loads(json.dumps(identity)):
            raise DeltacompError(f"--resume: the interrupted run in {self.folder.parent} used other settings or "
                                 f"inputs than this command; run the same command again, or drop --resume to "
                                 f"start afresh")

    def start(self, identity: dict) -> int:
        """Record ``identity`` (JSON-able) or check it against results already here; return their count."""
        self.folder.mkdir(exist_ok=True)
        path = self.folder / SETTINGS
        if path.exists():
            self.check(identity)
        else:
            tmp = self.folder / f".{SETTINGS}.tmp"
            tmp.write_text(json.dumps(identity, indent=1) + "\n")
            os.replace(tmp, path)
        return len(list(self.folder.glob("*.safetensors")))

    def has(self, name: str) -> bool:
        return (self.folder / _file_name(name)).is_file()

    @timed("store")
    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Keep one matrix's ``tensors`` (in this order) and ``meta`` (JSON-able); whole or not at all."""
        path = self.folder / _file_name(name)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        body = {"name": name, "keys": list(tensors), **meta}
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp),
                  metadata={_META: json.dumps(body)})
        os.replace(tmp, path)

    @timed("store")
    def load(self, name: str, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """The ``tensors`` (in the order saved; none read unless ``tensors``) and ``meta`` of a finished matrix."""
        path = self.folder / _file_name(name)
        try:
            with safe_open(str(path), "pt") as f:
                body = json.loads(f.metadata()[_META])
                keys = body.pop("keys")
                out = {k: f.get_tensor(k) for k in keys} if tensors else {}
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise DeltacompError(f"{path}: unreadable result of a finished matrix ({e})") from None
        if body.pop("name") != name:
            raise DeltacompError(f"{path}: holds another matrix than {name}")
        return out, body
