"""The Hugging Face Hub: the one module that imports huggingface_hub.

The endpoint (``HF_ENDPOINT``), the cache (``HF_HUB_CACHE`` or ``HF_HOME``) and offline mode
(``HF_HUB_OFFLINE=1``: the local cache only) are read from the environment at each call, so they can change
after import. The token comes from huggingface_hub's usual sources (``HF_TOKEN``, the cached login); this
module never reads, prints or writes it. Every failure becomes one :class:`HubError` line.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltacomp.errors import DeltacompError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*", "*.bin"]
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(DeltacompError):
    """A Hub request that failed: repo or revision not found, token rejected, Hub unreachable."""


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (``@revision`` allowed at the end)."""
    return bool(_REPO_ID.match(text.split("@", 1)[0]))


def split_revision(repo: str) -> tuple[str, str | None]:
    if "@" in repo:
        repo_id, rev = repo.split("@", 1)
        return repo_id, rev or None
    return repo, None


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (expected org/name)")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_url(repo_id: str) -> str:
    return f"{endpoint()}/{repo_id}"


@contextmanager
def progress_bars(show: bool | None) -> Iterator[None]:
    """huggingface_hub's download/upload bars on or off inside; None: on when stderr is a terminal."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show is None:
        show = sys.stderr.isatty()
    was_disabled = are_progress_bars_disabled()
    if show == was_disabled:
        enable_progress_bars() if show else disable_progress_bars()
    try:
        yield
    finally:
        if show == was_disabled:
            disable_progress_bars() if was_disabled else enable_progress_bars()


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of whichever HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _status(e: Exception) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _server_message(e: Exception) -> str:
    msg = getattr(e, "server_message", None) or ""
    return " ".join(str(msg).split())[:200]


@contextmanager
def hub_errors(what: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and transport exceptions raised inside into one-line :class:`HubError`."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint()
    try:
        yield
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision {revision or 'main'!r} not found on the Hub ({where})") from None
    except GatedRepoError:
        raise HubError(f"{what}: gated repo; request access on the Hub, then retry with a token that has it") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: Hub repo not found at {where} (or no access with the current token)") from None
    except HfHubHTTPError as e:
        code = _status(e)
        if code == 401:
            if get_token() is None:
                raise HubError(f"{what}: the Hub asks for a token (HTTP 401); log in with `hf auth login` "
                               "or set HF_TOKEN") from None
            raise HubError(f"{what}: the Hub rejected the token (HTTP 401); log in again with `hf auth login` "
                           "or set HF_TOKEN to a valid token") from None
        if code == 403:
            raise HubError(f"{what}: permission denied (HTTP 403); the token cannot write to this repo") from None
        detail = _server_message(e)
        raise HubError(f"{what}: Hub request failed (HTTP {code}{': ' + detail if detail else ''})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        reason = "offline mode (HF_HUB_OFFLINE=1)" if offline() else f"the Hub at {where} cannot be reached"
        raise HubError(f"{what}: not in the local Hub cache and {reason}") from None
    except _transport_errors() as e:
        raise HubError(f"{what}: cannot reach the Hub at {where} ({type(e).__name__})") from None


def snapshot(repo: str, kind: str = "model", allow_patterns: list[str] | None = None,
             progress: bool | None = None) -> Path:
    """Download (or find in the cache) a snapshot of ``repo`` (``org/name[@revision]``).

    ``kind="model"`` fetches weights, config and tokenizer files only; a package (``kind="package"``) is
    fetched whole.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(repo)
    patterns = allow_patterns or (MODEL_PATTERNS if kind == "model" else None)
    with hub_errors(repo, revision), progress_bars(progress):
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint(),
                                 cache_dir=cache_dir(), local_files_only=offline())
    return Path(path)


def snapshot_repo(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, commit) of a folder that is a Hub cache snapshot (``models--org--name/snapshots/<sha>``)."""
    real = Path(os.path.realpath(folder))
    repo = real.parent.parent.name
    if real.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    parts = repo[len("models--"):].split("--")
    return ("/".join(parts), real.name) if 1 <= len(parts) <= 2 and all(parts) else None


def resolve_revision(repo_id: str, revision: str | None) -> str:
    """The commit sha that ``revision`` (a branch, tag or sha; default main) names now."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        info = HfApi(endpoint=endpoint()).repo_info(repo_id, revision=revision)
    return info.sha


def download(repo: str, dest: Path, progress: bool | None = None) -> str:
    """Download every file of ``repo`` (``org/name[@revision]``) into the folder ``dest``; return the commit sha.

    The revision is pinned to a commit first, so a push landing meanwhile cannot mix two commits' files.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(repo)
    check_repo_id(repo_id)
    if offline():
        with hub_errors(repo, revision):
            cached = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True)
        shutil.copytree(cached, dest, dirs_exist_ok=True)
        return Path(cached).name
    sha = resolve_revision(repo_id, revision)
    with hub_errors(repo, revision), progress_bars(progress):
        snapshot_download(repo_id, revision=sha, local_dir=dest, endpoint=endpoint(), cache_dir=cache_dir())
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local-dir bookkeeping
    return sha


def upload(folder: Path, repo_id: str, private: bool | None = None, revision: str | None = None,
           message: str = "Upload with deltacomp", replace: list[str] | None = None,
           progress: bool | None = None) -> tuple[str, str]:
    """Create ``repo_id`` if needed (and branch ``revision``), commit every file of ``folder``; return
    (commit sha, commit url). Remote files matching ``replace`` patterns that ``folder`` lacks are deleted in
    the same commit."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if offline():
        raise HubError(f"{repo_id}: cannot push in offline mode (HF_HUB_OFFLINE=1)")
    api = HfApi(endpoint=endpoint())
    with hub_errors(repo_id, revision), progress_bars(progress):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message,
                                 repo_type="model", delete_patterns=replace)
    return info.oid, info.commit_url
