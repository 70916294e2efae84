"""The Hugging Face Hub: the one module that imports huggingface_hub.

Endpoints and tokens come from huggingface_hub's usual sources (``HF_ENDPOINT``, ``HF_TOKEN``, the
cached login); ``HF_HUB_OFFLINE=1`` reads from the local cache only.
"""

from __future__ import annotations

import re
from pathlib import Path

from deltacomp.errors import DeltacompError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*", "*.bin"]


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (``@revision`` allowed at the end)."""
    return bool(_REPO_ID.match(text.split("@", 1)[0]))


def split_revision(repo: str) -> tuple[str, str | None]:
    if "@" in repo:
        repo_id, rev = repo.split("@", 1)
        return repo_id, rev or None
    return repo, None


def snapshot(repo: str, kind: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) a snapshot of ``repo`` (``org/name[@revision]``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision = split_revision(repo)
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns or MODEL_PATTERNS,
        )
    except RepositoryNotFoundError:
        raise DeltacompError(f"{repo}: Hub repo not found (or no access with the current token)") from None
    except LocalEntryNotFoundError:
        raise DeltacompError(
            f"{repo}: not in the local Hub cache and the Hub cannot be reached (offline?)"
        ) from None
    except HfHubHTTPError as e:
        raise DeltacompError(f"{repo}: Hub request failed ({_status(e)})") from None
    except OSError as e:
        raise DeltacompError(f"{repo}: cannot reach the Hub ({e.__class__.__name__})") from None
    return Path(path)


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else e.__class__.__name__
