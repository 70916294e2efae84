"""Share packages on the Hub: ``push`` a verified package with a generated card, ``pull`` one back, verified.

A push uploads exactly the files the manifest lists, the manifest, an ``eval.json`` when there is one, a
README model card made for the repo, and optionally a PEFT adapter under ``peft/`` (built by the caller); each
push is one commit.
A pull downloads into a hidden folder, checks every file against the manifest's sha256, and only then
moves it into place: a corrupted or truncated file is named and nothing is left behind. A fusion gate folder
(:mod:`deltacomp.fusion.folder`: ``fusion.json`` with its own files table) is pushed and pulled the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from deltacomp.errors import PackageError
from deltacomp.fusion.folder import GATE_CONFIG, GATE_WEIGHTS, is_gate_folder, read_gate
from deltacomp.fusion.folder import render_card as gate_card
from deltacomp.io import hub
from deltacomp.io.output import MARKER, atomic_dir, check_output, mark, scratch_dir
from deltacomp.io.paths import inside
from deltacomp.package.card import EVAL_FILE, load_eval, render_card
from deltacomp.package.manifest import MANIFEST, read_manifest
from deltacomp.package.store import DeltaPackage, verify_files

log = logging.getLogger(__name__)
PEFT_FOLDER = "peft"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")  # what push --with-peft puts there
# files a push owns: a new push removes the ones its package lacks (stale shards, an old eval or adapter)
OWNED = ["delta*.safetensors", "delta*.json", "model/*", f"{PEFT_FOLDER}/*", EVAL_FILE, MANIFEST, GATE_CONFIG,
         GATE_WEIGHTS]


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
         attach: dict[str, Path] | None = None, base_model: str | None = None, message: str | None = None,
         progress: bool | None = None) -> dict:
    """Upload ``package`` (folder or Hub id) to ``repo_id`` as one commit; return repo, revision, commit and url.

    ``attach`` maps a folder of the repo to a local folder uploaded with the package (``peft/``: the package
    exported as a PEFT LoRA adapter, which ``deltacomp push --with-peft`` builds first); the card links it.
    ``base_model`` sets the card's ``base_model`` metadata when the package was made from a local folder.
    """
    hub.check_repo_id(repo_id)
    attach = attach or {}
    if is_gate_folder(package):
        if attach or base_model is not None:
            raise PackageError(f"{package} is a fusion gate; --with-peft and --base-model apply to packages only")
        return _push_gate(Path(package), repo_id, private, revision, message, progress)
    if base_model is not None:
        hub.check_repo_id(base_model)
    pkg = DeltaPackage(package)  # verifies every file: a corrupt package is never uploaded
    with scratch_dir("push") as tmp:
        folder = Path(tmp) / "repo"
        folder.mkdir()
        files = stage(pkg, folder, repo_id, base_model, PEFT_FOLDER if PEFT_FOLDER in attach else None)
        for name, src in attach.items():
            dst = inside(folder, name, f"{folder}: staging", PackageError)
            for p in sorted(Path(src).iterdir()):
                _link_or_copy(p, dst / p.name)
                files.append(f"{name}/{p.name}")
        text = message or f"Upload {pkg.manifest['method']} delta package ({len(files)} files) with deltacomp"
        log.info("uploading %d files to %s", len(files), repo_id)
        sha, url = hub.upload(folder, repo_id, private=private, revision=revision, message=text, replace=OWNED,
                              progress=progress)
    return {"repo_id": repo_id, "revision": revision or "main", "commit": sha, "url": url, "files": files}


def _push_gate(folder: Path, repo_id: str, private, revision, message, progress) -> dict:
    """Upload a gate folder, verified first: its files table, ``fusion.json`` and a card, as one commit."""
    doc = read_gate(folder)
    with scratch_dir("push") as tmp:
        staged = Path(tmp) / "repo"
        staged.mkdir()
        files = [*doc["files"], GATE_CONFIG]
        for name in files:
            _link_or_copy(folder / name, staged / name)
        (staged / "README.md").write_text(gate_card(doc, repo_id))
        files.append("README.md")
        text = message or f"Upload {doc['config'].gate} fusion gate over {len(doc['deltas'])} deltas with deltacomp"
        sha, url = hub.upload(staged, repo_id, private=private, revision=revision, message=text, replace=OWNED,
                              progress=progress)
    return {"repo_id": repo_id, "revision": revision or "main", "commit": sha, "url": url, "files": files}


def verify_folder(folder: Path, label: str) -> dict:
    """Check every file the manifest of ``folder`` lists against its sha256; errors name ``label`` and the file."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest["files"], label)
    return manifest


def _keep_only(folder: Path, keep: set[str], label: str) -> None:
    """Remove what a pulled repo holds beyond the files a deltacomp package or gate consists of."""
    extra = [p for p in folder.rglob("*") if p.is_file() and str(p.relative_to(folder)) not in keep]
    if extra:
        log.warning("%s: left out %d file(s) the package does not list: %s", label, len(extra),
                    ", ".join(sorted(str(p.relative_to(folder)) for p in extra)[:8]))
    for p in extra:
        p.unlink()
    for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def pull(repo: str, out: str | os.PathLike, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Download the package ``repo`` (``org/name[@revision]``) into ``out``, verified; return repo, commit, files."""
    repo_id, _ = hub.split_revision(repo)
    hub.check_repo_id(repo_id)
    check_output(out, overwrite, ("package", "gate"))
    with atomic_dir(out, overwrite, ("package", "gate")) as tmp:
        sha = hub.download(repo, tmp, progress)
        if is_gate_folder(tmp) and not (tmp / MANIFEST).is_file():
            doc = read_gate(tmp, repo)  # schema, paths and every file's sha256
            method, listed = f"{doc['config'].gate} gate", [*doc["files"], GATE_CONFIG]
            mark(tmp, "gate")
        elif not (tmp / MANIFEST).is_file():
            raise PackageError(f"{repo}: not a deltacomp package (no {MANIFEST} in the repo) nor a gate (no "
                               f"{GATE_CONFIG}); nothing was written")
        else:
            manifest = verify_folder(tmp, repo)
            DeltaPackage(tmp, verify=False)  # the tensor files open: headers consistent with their sizes
            method = manifest["method"]
            listed = [*manifest["files"], MANIFEST, EVAL_FILE, *(f"{PEFT_FOLDER}/{f}" for f in PEFT_FILES)]
        _keep_only(tmp, {*listed, "README.md", MARKER}, repo)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return {"repo": repo, "commit": sha, "path": str(out), "files": files, "method": method}
