"""A fake Hugging Face Hub, served over real HTTP on 127.0.0.1, for tests.

`FakeHub` implements the part of the Hub protocol that `huggingface_hub` 2.4 uses to
read model repos: `snapshot_download`, `hf_hub_download`, and `HfApi.model_info`,
`repo_info`, `list_repo_files`, `list_repo_tree`. Repos are local directories.

Endpoints (model repos only; `rev` is `main` or the repo's commit sha):

* `GET /api/models/{repo}[/revision/{rev}]`: model info (`id`, `sha`, `siblings`);
  `?blobs=true` adds each file's size, blob id and LFS info.
* `GET /api/models/{repo}/tree/{rev}[/{path}]`: folder listing; `?recursive=true`
  lists every file and folder below `path`.
* `HEAD|GET /{repo}/resolve/{rev}/{filename}`: a regular file is sent with
  `X-Repo-Commit`, `ETag` (its git blob sha1) and `Content-Length`. An LFS file gets
  a 302 to a second, "CDN" server (another port, so the client treats it as a
  foreign host and drops the token) with `X-Repo-Commit`, `X-Linked-Etag` (sha256)
  and `X-Linked-Size`, as on the real Hub.
* `HEAD|GET {cdn_url}/lfs/{sha256}`: LFS content.

`Range: bytes=...` is honoured on file content (the client resumes interrupted
downloads with it). Errors carry the `X-Error-Code` that the client maps to typed
exceptions: `RepoNotFound` (`RepositoryNotFoundError`), `RevisionNotFound`
(`RevisionNotFoundError`), `EntryNotFound` (`RemoteEntryNotFoundError`). A repo added
with `token=` is private: without a token the answer is 401 `RepoNotFound` (like
the real Hub), with a wrong one 401 "Invalid credentials in Authorization header".

In-process use: pass `endpoint=hub.url` to `huggingface_hub` functions. Setting
`HF_ENDPOINT` in `os.environ` has no effect once `huggingface_hub` is imported:
`huggingface_hub.constants` reads it at import time.

Subprocess use (e.g. CLI tests): `FakeHub.subprocess_env` builds an environment with

* `HF_ENDPOINT=<hub.url>`, which the child's `huggingface_hub` reads at import;
* `HF_HOME=<an empty temp dir>`, so that the child uses neither the developer's Hub
  cache nor their saved token;
* `HF_HUB_DISABLE_TELEMETRY=1` and `HF_HUB_DISABLE_PROGRESS_BARS=1`;
* no `HF_HUB_OFFLINE` nor `TRANSFORMERS_OFFLINE` (either one blocks every request);
* no `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` unless a token is asked for;
* no `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_XET_CACHE`, which would override
  the locations under `HF_HOME`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ("DEFAULT_LFS_PATTERNS", "FakeHub")

DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.onnx",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.ot",
    "*.model",
)
"""Files stored in LFS when the served directory has no `.gitattributes`."""

# Paths are matched before percent-decoding, so that an encoded `/` (as in the
# revision `refs%2Fpr%2F1`) stays inside its segment.
_RESOLVE_RE = re.compile(r"^/(?P<repo>(?:[^/]+/)?[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_RE = re.compile(
    r"^/api/models/(?P<repo>(?:[^/]+/)?[^/]+?)"
    r"(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?$"
)
_CDN_RE = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20
_ENV_TO_DROP = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return _sha1(b"blob %d\0" % len(data) + data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _lfs_patterns_from_gitattributes(directory: Path) -> list[str] | None:
    """The `filter=lfs` patterns of `directory/.gitattributes`; None if it is absent."""
    attributes = directory / ".gitattributes"
    if not attributes.is_file():
        return None
    patterns: list[str] = []
    for line in attributes.read_text(encoding="utf-8").splitlines():
        pattern, *attrs = line.split() or [""]
        if pattern and not pattern.startswith("#") and "filter=lfs" in attrs:
            patterns.append(pattern)
    return patterns


def _matches_any(path: str, patterns: Sequence[str]) -> bool:
    """Roughly gitattributes matching: a pattern without `/` matches the basename."""
    basename = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else basename, pattern) for pattern in patterns)


@dataclass(frozen=True)
class _File:
    """One file of a served repo."""

    repo_id: str
    path: str
    source: Path
    size: int
    blob_id: str
    """Git blob sha1 of the content, or of the LFS pointer for an LFS file."""
    lfs_sha256: str | None = None
    lfs_pointer_size: int | None = None

    @classmethod
    def read(cls, repo_id: str, path: str, source: Path, *, lfs: bool) -> _File:
        size = source.stat().st_size
        if not lfs:
            return cls(repo_id, path, source, size, _git_blob_sha1(source.read_bytes()))
        sha256 = _sha256_file(source)
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n").encode()
        return cls(repo_id, path, source, size, _git_blob_sha1(pointer), sha256, len(pointer))


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    sha: str
    files: Mapping[str, _File]
    token: str | None

    def folders(self) -> set[str]:
        """Every folder holding at least one file, as repo paths."""
        out: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out


class _HttpError(Exception):
    """Raised while handling a request to answer with an error status."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        *,
        code: str | None = None,
        commit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, *, cdn: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.cdn = cdn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHub:
    """A fake Hugging Face Hub on 127.0.0.1; start and stop it as a context manager.

    Attributes:
        requests: `(method, path)` of every request to the hub and its CDN, in order,
            with the path percent-decoded and without its query string. LFS content
            is fetched from the CDN as `/lfs/{sha256}`; `downloaded` tells which
            files were fetched.
        downloads: `(repo_id, filename)` for every GET that sent a file's content.

    Example:
        ```python
        with FakeHub() as hub:
            sha = hub.add_repo("org/model", tmp_path / "model")
            hf_hub_download("org/model", "config.json", endpoint=hub.url)
            assert hub.downloaded("org/model") == {"config.json"}
        ```
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.downloads: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._lfs: dict[str, _File] = {}
        self._failures: list[tuple[re.Pattern[str], int, str | None]] = []
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._url: str | None = None
        self._cdn_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the hub and its CDN, each on a free port, in background threads."""
        if self._servers:
            raise RuntimeError("FakeHub already started")
        hub, cdn = _Server(self, cdn=False), _Server(self, cdn=True)
        self._servers = [hub, cdn]
        self._url, self._cdn_url = hub.url, cdn.url
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fakehub-{'cdn' if server.cdn else 'hub'}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and close the ports: `url` then refuses connections."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:PORT`: the `endpoint` / `HF_ENDPOINT`."""
        if self._url is None:
            raise RuntimeError("FakeHub not started")
        return self._url

    @property
    def cdn_url(self) -> str:
        """Base URL of the server that LFS downloads are redirected to."""
        if self._cdn_url is None:
            raise RuntimeError("FakeHub not started")
        return self._cdn_url

    # -- content and test helpers ------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        directory: Path,
        revision_sha: str | None = None,
        *,
        lfs_patterns: Sequence[str] | None = None,
        token: str | None = None,
    ) -> str:
        """Serve the files below `directory` as model repo `repo_id`, branch `main`.

        The directory is read now (sizes, hashes): later changes to it are not seen.
        Adding a repo id again replaces the repo.

        Args:
            repo_id: `namespace/name`, or a bare `name`.
            directory: Every file below it is served, at its relative path.
            revision_sha: The commit sha of `main`. Default: a sha1 of the repo id
                and the content, so it is the same from run to run.
            lfs_patterns: Which files are stored in LFS (redirected to the CDN and
                listed with LFS info), as gitattributes patterns. Default: the
                `filter=lfs` patterns of the directory's `.gitattributes`, else
                `DEFAULT_LFS_PATTERNS`.
            token: Make the repo private, readable with this bearer token only.

        Returns:
            The commit sha of `main`.
        """
        if revision_sha is not None and not re.fullmatch(r"[0-9a-f]{40}", revision_sha):
            raise ValueError(f"revision_sha must be 40 hex digits: {revision_sha!r}")
        if lfs_patterns is None:
            from_attributes = _lfs_patterns_from_gitattributes(directory)
            lfs_patterns = from_attributes or DEFAULT_LFS_PATTERNS
        files: dict[str, _File] = {}
        for source in sorted(p for p in directory.rglob("*") if p.is_file()):
            path = source.relative_to(directory).as_posix()
            lfs = _matches_any(path, lfs_patterns)
            files[path] = _File.read(repo_id, path, source, lfs=lfs)
        if revision_sha is None:
            listing = "".join(f"{path}\0{f.blob_id}\n" for path, f in files.items())
            revision_sha = _sha1(f"{repo_id}\n{listing}".encode())
        with self._lock:
            self._repos[repo_id] = _Repo(repo_id, revision_sha, files, token)
            for file in files.values():
                if file.lfs_sha256 is not None:
                    self._lfs[file.lfs_sha256] = file
        return revision_sha

    def sha(self, repo_id: str) -> str:
        """The commit sha of the `main` branch of `repo_id`."""
        return self._repos[repo_id].sha

    def downloaded(self, repo_id: str) -> set[str]:
        """Filenames of `repo_id` whose content has been sent at least once."""
        with self._lock:
            return {name for repo, name in self.downloads if repo == repo_id}

    def fail(self, path_pattern: str, status: int = 500, *, method: str | None = None) -> None:
        """From now on, answer matching requests with a bare `status` error.

        Args:
            path_pattern: Regular expression searched in the decoded request path.
            status: HTTP status of the answer, which has no `X-Error-Code`. Mind
                that the client retries 5xx answers with back-off (seconds) for
                most requests; not the HEAD of a file it already has, though.
            method: Fail only requests with this method (`"GET"`, `"HEAD"`).
        """
        with self._lock:
            self._failures.append((re.compile(path_pattern), status, method))

    def clear_failures(self) -> None:
        """Undo every `fail` call."""
        with self._lock:
            self._failures.clear()

    def subprocess_env(
        self,
        hf_home: Path,
        base: Mapping[str, str] | None = None,
        *,
        token: str | None = None,
    ) -> dict[str, str]:
        """The environment for a child process that must use this hub.

        Args:
            hf_home: An empty folder, for the child's `HF_HOME`.
            base: The environment to adapt; `os.environ` if None.
            token: The child's `HF_TOKEN`; none if None.

        Returns:
            A copy of `base` adapted as the module docstring describes.
        """
        env = dict(os.environ if base is None else base)
        for name in _ENV_TO_DROP:
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # -- called by the request handlers, in server threads -----------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _record_download(self, file: _File) -> None:
        with self._lock:
            self.downloads.append((file.repo_id, file.path))

    def _check_failures(self, method: str, path: str) -> None:
        with self._lock:
            failures = list(self._failures)
        for pattern, status, only in failures:
            if (only is None or only == method) and pattern.search(path):
                raise _HttpError(HTTPStatus(status), f"Injected failure ({status})")

    def _repo(self, repo_id: str, authorization: str | None) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, "Repository not found", code="RepoNotFound")
        if repo.token is not None and authorization != f"Bearer {repo.token}":
            if authorization is None:
                raise _HttpError(HTTPStatus.UNAUTHORIZED, "Repository not found", code="RepoNotFound")
            raise _HttpError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return repo

    def _lfs_file(self, sha256: str) -> _File | None:
        with self._lock:
            return self._lfs.get(sha256)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # One request per connection, so that no pooled connection outlives `stop()`.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        hub._record(self.command, unquote(split.path))
        try:
            hub._check_failures(self.command, unquote(split.path))
            if self.server.cdn:
                self._serve_cdn(split.path)
            elif match := _RESOLVE_RE.match(split.path):
                repo = hub._repo(unquote(match["repo"]), self.headers["Authorization"])
                revision = unquote(match["rev"])
                self._check_revision(repo, revision)
                self._serve_resolve(repo, unquote(match["file"]))
            elif match := _API_RE.match(split.path):
                repo = hub._repo(unquote(match["repo"]), self.headers["Authorization"])
                revision = unquote(match["rev"]) if match["rev"] else "main"
                self._check_revision(repo, revision)
                if match["kind"] == "tree":
                    path = unquote(match["path"] or "").strip("/")
                    recursive = _flag(query, "recursive")
                    self._send_json(self._tree(repo, path, recursive=recursive))
                elif match["path"]:
                    raise _HttpError(HTTPStatus.NOT_FOUND, "Not Found")
                else:
                    blobs = _flag(query, "blobs")
                    self._send_json(self._model_info(repo, blobs=blobs))
            else:
                raise _HttpError(HTTPStatus.NOT_FOUND, "Not Found")
        except _HttpError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away mid-answer, e.g. an interrupted download

    @staticmethod
    def _check_revision(repo: _Repo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise _HttpError(
                HTTPStatus.NOT_FOUND,
                f"Invalid rev id: {revision}",
                code="RevisionNotFound",
            )

    # -- endpoints ---------------------------------------------------------------------

    @staticmethod
    def _model_info(repo: _Repo, *, blobs: bool) -> dict[str, Any]:
        siblings: list[dict[str, Any]] = []
        for file in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": file.path}
            if blobs:
                sibling.update(size=file.size, blobId=file.blob_id)
                if file.lfs_sha256 is not None:
                    sibling["lfs"] = {
                        "sha256": file.lfs_sha256,
                        "size": file.size,
                        "pointerSize": file.lfs_pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.sha,
            "private": repo.token is not None,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }

    @staticmethod
    def _tree(repo: _Repo, path: str, *, recursive: bool) -> list[dict[str, Any]]:
        folders = repo.folders()
        if path and path not in folders:
            raise _HttpError(
                HTTPStatus.NOT_FOUND,
                f"Entry not found: {path}",
                code="EntryNotFound",
                commit=repo.sha,
            )
        prefix = f"{path}/" if path else ""

        def listed(candidate: str) -> bool:
            if not candidate.startswith(prefix):
                return False
            return recursive or "/" not in candidate[len(prefix) :]

        entries: list[dict[str, Any]] = [
            {
                "type": "directory",
                "oid": _sha1(f"{repo.sha}:{folder}".encode()),
                "size": 0,
                "path": folder,
            }
            for folder in sorted(folders)
            if listed(folder)
        ]
        for file in repo.files.values():
            if not listed(file.path):
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "oid": file.blob_id,
                "size": file.size,
                "path": file.path,
            }
            if file.lfs_sha256 is not None:
                entry["lfs"] = {
                    "oid": file.lfs_sha256,
                    "size": file.size,
                    "pointerSize": file.lfs_pointer_size,
                }
            entries.append(entry)
        return entries

    def _serve_resolve(self, repo: _Repo, filename: str) -> None:
        file = repo.files.get(filename)
        if file is None:
            raise _HttpError(
                HTTPStatus.NOT_FOUND,
                f"Entry not found: {filename}",
                code="EntryNotFound",
                commit=repo.sha,
            )
        if file.lfs_sha256 is None:
            etag = f'"{file.blob_id}"'
            self._send_file(file, {"X-Repo-Commit": repo.sha, "ETag": etag})
            return
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", f"{self.server.hub.cdn_url}/lfs/{file.lfs_sha256}")
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{file.blob_id}"')
        self.send_header("X-Linked-Etag", f'"{file.lfs_sha256}"')
        self.send_header("X-Linked-Size", str(file.size))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve_cdn(self, raw_path: str) -> None:
        match = _CDN_RE.match(raw_path)
        file = self.server.hub._lfs_file(match["sha256"]) if match else None
        if file is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, "Not Found")
        self._send_file(file, {"ETag": f'"{file.lfs_sha256}"'})

    # -- answers -----------------------------------------------------------------------

    def _send_file(self, file: _File, headers: Mapping[str, str]) -> None:
        start, end = 0, file.size - 1
        partial = (requested := self.headers["Range"]) is not None
        if partial:
            start, end = _parse_range(requested, file.size)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{file.size}")
        self.end_headers()
        if self.command != "GET":
            return
        with file.source.open("rb") as f:
            f.seek(start)
            shutil.copyfileobj(_Limited(f, end - start + 1), self.wfile, _CHUNK)
        self.server.hub._record_download(file)

    def _send_json(self, payload: object) -> None:
        self._send_body(HTTPStatus.OK, json.dumps(payload).encode(), {})

    def _send_error(self, err: _HttpError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        if err.commit is not None:
            headers["X-Repo-Commit"] = err.commit
        body = json.dumps({"error": err.message}).encode()
        self._send_body(err.status, body, headers)

    def _send_body(self, status: HTTPStatus, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    """Whether a boolean query parameter is true (`true`, `True` or `1`)."""
    return query.get(name, ["false"])[0].lower() in ("true", "1")


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """The first and last byte asked by a single-range `Range` header."""
    match = _RANGE_RE.match(header.strip())
    if match is None or not (match[1] or match[2]):
        raise _HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "Bad range")
    if match[1]:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    else:  # a suffix: the last N bytes
        start, end = max(size - int(match[2]), 0), size - 1
    if start > end:
        raise _HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "Bad range")
    return start, end


class _Limited:
    """A reader of at most `remaining` bytes of a binary file."""

    def __init__(self, f: BinaryIO, remaining: int) -> None:
        self._f = f
        self._remaining = remaining

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        size = self._remaining if size < 0 else min(size, self._remaining)
        data = self._f.read(size)
        self._remaining -= len(data)
        return data
