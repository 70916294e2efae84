"""Share packages on the Hub: ``push`` a verified package with a generated card, ``pull`` one back, verified.

A push uploads exactly the files the manifest lists, the manifest, an ``eval.json`` when there is one, a
README model card made for the repo, and optionally a PEFT adapter under ``peft/``; each push is one commit.
A pull downloads into a hidden folder, checks every file against the manifest's sha256, and only then
moves it into place: a corrupted or truncated file is named and nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from deltacomp.errors import PackageError
from deltacomp.io import hub
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.io.paths import inside
from deltacomp.package.card import EVAL_FILE, load_eval, render_card
from deltacomp.package.manifest import MANIFEST, read_manifest
from deltacomp.package.store import DeltaPackage, sha256_file

log = logging.getLogger(__name__)
PEFT_FOLDER = "peft"
# files a push owns: a new push removes the ones its package lacks (stale shards, an old eval or adapter)
OWNED = ["delta*.safetensors", "delta*.json", "model/*", f"{PEFT_FOLDER}/*", EVAL_FILE, MANIFEST]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def stage(pkg: DeltaPackage, folder: Path, repo_id: str | None = None, base_model: str | None = None,
          peft_folder: str | None = None) -> list[str]:
    """Lay out ``pkg`` for upload in ``folder`` (files, manifest, eval, a card for ``repo_id``); return the paths."""
    names = [*pkg.manifest["files"], MANIFEST]
    if pkg.file(EVAL_FILE).is_file():
        names.append(EVAL_FILE)
    for name in names:  # each checked inside the package (DeltaPackage.file) and, being relative, inside folder
        _link_or_copy(pkg.file(name), inside(folder, name, f"{folder}: staging", PackageError))
    evaluation = load_eval(pkg.path, pkg.manifest)
    card = render_card(pkg.manifest, repo_id=repo_id, evaluation=evaluation, base_model=base_model,
                       peft_folder=peft_folder)
    (folder / "README.md").write_text(card)
    return [*names, "README.md"]


def push(package: str | os.PathLike, repo_id: str, private: bool | None = None, revision: str | None = None,
         with_peft: bool = False, base: str | os.PathLike | None = None, peft_config=None,
         base_model: str | None = None, message: str | None = None, progress: bool | None = None) -> dict:
    """Upload ``package`` (folder or Hub id) to ``repo_id`` as one commit; return repo, revision, commit and url.

    ``with_peft`` also exports the package as a PEFT LoRA adapter into ``peft/`` (``base`` and
    ``peft_config`` as for :func:`deltacomp.export.peft.export_peft`). ``base_model`` sets the card's
    ``base_model`` metadata when the package was made from a local folder.
    """
    hub.check_repo_id(repo_id)
    if base_model is not None:
        hub.check_repo_id(base_model)
    pkg = DeltaPackage(package)  # verifies every file: a corrupt package is never uploaded
    with tempfile.TemporaryDirectory(prefix="deltacomp-push-") as tmp:
        folder = Path(tmp) / "repo"
        folder.mkdir()
        files = stage(pkg, folder, repo_id, base_model, PEFT_FOLDER if with_peft else None)
        if with_peft:
            from deltacomp.export.peft import PeftExportConfig, export_peft

            export_peft(pkg.path, folder / PEFT_FOLDER, base, peft_config or PeftExportConfig(), progress=False)
            files += [f"{PEFT_FOLDER}/{p.name}" for p in sorted((folder / PEFT_FOLDER).iterdir())]
        text = message or f"Upload {pkg.manifest['method']} delta package ({len(files)} files) with deltacomp"
        log.info("uploading %d files to %s", len(files), repo_id)
        sha, url = hub.upload(folder, repo_id, private=private, revision=revision, message=text, replace=OWNED,
                              progress=progress)
    return {"repo_id": repo_id, "revision": revision or "main", "commit": sha, "url": url, "files": files}


def verify_folder(folder: Path, label: str) -> dict:
    """Check every file the manifest of ``folder`` lists against its sha256; errors name ``label`` and the file."""
    manifest = read_manifest(folder)
    for name, digest in manifest["files"].items():
        path = inside(folder, name, f"{label}: files", PackageError)
        if not path.is_file():
            raise PackageError(f"{label}: package file {name} is missing")
        if sha256_file(path) != digest:
            raise PackageError(f"{label}: {name} is corrupt or truncated (sha256 does not match the manifest)")
    return manifest


def pull(repo: str, out: str | os.PathLike, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Download the package ``repo`` (``org/name[@revision]``) into ``out``, verified; return repo, commit, files."""
    repo_id, _ = hub.split_revision(repo)
    hub.check_repo_id(repo_id)
    check_output(out, overwrite, "package")
    with atomic_dir(out, overwrite, "package") as tmp:
        sha = hub.download(repo, tmp, progress)
        if not (tmp / MANIFEST).is_file():
            raise PackageError(f"{repo}: not a deltacomp package (no {MANIFEST} in the repo); nothing was written")
        manifest = verify_folder(tmp, repo)
        DeltaPackage(tmp, verify=False)  # the tensor files open: headers consistent with their sizes
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return {"repo": repo, "commit": sha, "path": str(out), "files": files, "method": manifest["method"]}
