"""A loopback Hugging Face Hub for tests: enough of the Hub's HTTP API for the real huggingface_hub client.

Routes (model repos, ``org/name`` ids; the client reaches them through ``HF_ENDPOINT``, so the real
``create_repo``, ``upload_folder``, ``hf_hub_download`` and ``snapshot_download`` run): create a repo, create a
branch, preupload (every file ``regular``: contents travel in the commit), commit (ndjson), repo info at a
revision, the file tree, and ``HEAD``/``GET`` of ``/{repo}/resolve/{rev}/{path}``. Every commit gets its own sha;
old commits stay readable by sha. Tokens listed in ``bad_tokens`` get a 401; writes need a token; a private repo is
a 404 (``RepoNotFound``) to anyone without a good token, as on the Hub. Repos live in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev, rev)
        return self.commits.get(sha)


TOKEN = "hf_good_TOKEN_3f9a1c"
BAD_TOKEN = "hf_revoked_TOKEN_77e2b0"


class HubServer:
    """``with HubServer() as hub: ...``; ``hub.url`` is the endpoint; ``hub.requests`` logs (method, path)."""

    def __init__(self, good_tokens: tuple[str, ...] = ("hf_good_token",), bad_tokens: tuple[str, ...] = ()):
        self.good_tokens, self.bad_tokens = set(good_tokens), set(bad_tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.seen_tokens: list[str] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- state changes, also used directly by tests ---

    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        with self._lock:
            if repo_id in self.repos:
                return False
            repo = Repo(private=private)
            sha = self._new_sha(repo_id, "", {})
            repo.commits[sha] = Commit(sha, {}, "initial commit")
            repo.branches["main"] = sha
            self.repos[repo_id] = repo
            return True

    def commit(self, repo_id: str, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        with self._lock:
            repo = self.repos[repo_id]
            files = dict(repo.commits[repo.branches[branch]].files)
            for path in deleted:
                files = {p: d for p, d in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            files.update(added)
            sha = self._new_sha(repo_id, repo.branches[branch], files)
            repo.commits[sha] = Commit(sha, files, message)
            repo.branches[branch] = sha
            return sha

    def tamper(self, repo_id: str, path: str, data: bytes, rev: str = "main") -> None:
        """Change a file's bytes in place (same commit sha): a corrupted transfer or storage."""
        with self._lock:
            self.repos[repo_id].resolve(rev).files[path] = data

    def _new_sha(self, repo_id: str, parent: str, files: dict[str, bytes]) -> str:
        self._counter += 1
        h = hashlib.sha1(f"{repo_id}\0{parent}\0{self._counter}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        return h.hexdigest()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        # --- plumbing ---

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[7:] if auth.startswith("Bearer ") else None

        def _auth(self, write: bool) -> bool | None:
            """True: a good token; False: none (reads only); None: a 401 was sent."""
            token = self._token()
            if token is not None:
                hub.seen_tokens.append(token)
            if token in hub.bad_tokens or (token is not None and token not in hub.good_tokens):
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            if write and token is None:
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            return token is not None

        def _repo(self, repo_id: str, authed: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not authed):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            return repo

        def _commit(self, repo_id: str, repo: Repo, rev: str) -> Commit | None:
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return commit

        # --- routes ---

        def do_HEAD(self):
            self._route()

        def do_GET(self):
            self._route()

        def do_POST(self):
            self._route()

        def _route(self):
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            hub.requests.append((self.command, url.path))
            try:
                if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
                    return self._create()
                if parts[:2] == ["api", "validate-yaml"] and self.command == "POST":
                    return self._validate_yaml()
                if len(parts) == 4 and parts[:2] == ["api", "models"] and self.command == "GET":
                    return self._info(f"{parts[2]}/{parts[3]}", "main")
                if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                    repo_id, verb, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
                    if verb == "revision" and self.command == "GET":
                        return self._info(repo_id, "/".join(rest))
                    if verb == "tree" and self.command == "GET":
                        return self._tree(repo_id, rest[0], "/".join(rest[1:]))
                    if verb == "preupload" and self.command == "POST":
                        return self._preupload(repo_id, "/".join(rest))
                    if verb == "commit" and self.command == "POST":
                        return self._commit_route(repo_id, "/".join(rest))
                    if verb == "branch" and self.command == "POST":
                        return self._branch(repo_id, "/".join(rest))
                if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                    return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                self._error(404, None, f"no route for {self.command} {url.path}")
            except BrokenPipeError:
                pass

        def _create(self):
            authed = self._auth(write=True)
            if authed is None:
                return
            body = json.loads(self._body() or b"{}")
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            private = bool(body.get("private")) or body.get("visibility") == "private"
            if not hub.create_repo(repo_id, private):
                message = "You already created this model repo"
                return self._json(409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message})
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self):
            """The Hub checks a README's metadata before a commit; here: ``base_model`` must be a repo id."""
            content = json.loads(self._body() or b"{}").get("content", "")
            for line in content.split("\n---", 1)[0].splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "base_model" and not _REPO_ID.match(value.strip()):
                    return self._error(400, None, f"Invalid metadata in README.md: base_model {value.strip()!r} "
                                                  "is not a valid model id")
            self._json(200, {"errors": [], "warnings": []})

        def _info(self, repo_id: str, rev: str):
            authed = self._auth(write=False)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            if (commit := self._commit(repo_id, repo, rev)) is None:
                return
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []})

        def _tree(self, repo_id: str, rev: str, prefix: str):
            authed = self._auth(write=False)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            if (commit := self._commit(repo_id, repo, rev)) is None:
                return
            entries, dirs = [], set()
            for path in sorted(commit.files):
                if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                    continue
                data = commit.files[path]
                entries.append({"type": "file", "path": path, "oid": git_blob_sha(data), "size": len(data)})
                parent = path.rpartition("/")[0]
                while parent and parent != prefix.rstrip("/"):
                    dirs.add(parent)
                    parent = parent.rpartition("/")[0]
            entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
            self._json(200, entries)

        def _preupload(self, repo_id: str, rev: str):
            authed = self._auth(write=True)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            if self._commit(repo_id, repo, rev) is None:
                return
            body = json.loads(self._body() or b"{}")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in body.get("files", [])]
            self._json(200, {"files": files, "commitOid": repo.resolve(rev).sha})

        def _commit_route(self, repo_id: str, rev: str):
            authed = self._auth(write=True)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            if rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            added, deleted, message = {}, [], ""
            for line in self._body().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item.get("key"), item.get("value", {})
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        return self._error(400, None, "only base64 file contents are supported")
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
                else:
                    return self._error(400, None, f"unsupported commit operation {key!r} (no LFS here)")
            sha = hub.commit(repo_id, rev, added, deleted, message)
            self._json(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                             "pullRequestUrl": None})

        def _branch(self, repo_id: str, branch: str):
            authed = self._auth(write=True)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            body = json.loads(self._body() or b"{}")
            if branch in repo.branches:
                return self._error(409, None, f"Reference refs/heads/{branch} already exists")
            start = repo.resolve(body.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "RevisionNotFound", "Invalid starting point")
            repo.branches[branch] = start.sha
            self._json(200, {})

        def _resolve(self, repo_id: str, rev: str, path: str):
            authed = self._auth(write=False)
            if authed is None or (repo := self._repo(repo_id, authed)) is None:
                return
            if (commit := self._commit(repo_id, repo, rev)) is None:
                return
            if path not in commit.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
            data = commit.files[path]
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"'}
            self._send(200, data, headers, content_type="application/octet-stream")

    return Handler
