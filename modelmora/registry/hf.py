"""What the registry asks the Hugging Face Hub (or a mirror), through `huggingface_hub`:

* the commit a revision resolves to and the files of that commit, with their sizes and the
  SHA-256 of those stored in LFS (`repo_files`), filtered by patterns (`filter_files`);
* the URL and headers of one file (`file_request`): the download itself goes through the
  download cache (`sources.download_hf`, `fetch.py`), which resumes and reuses;
* one exception, `HubError`, for the many ways a request can fail, whose `kind` tells the
  caller what to tell the user.

The endpoint defaults to `huggingface_hub`'s own: `HF_ENDPOINT` as it was when
`huggingface_hub` was first imported, else `https://huggingface.co`. With
`token=None`, the token saved by `hf auth login` or set in `HF_TOKEN` is sent, as
everywhere in `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Literal, NamedTuple, get_args

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils._paths import filter_repo_objects

__all__ = (
    "HubError",
    "HubErrorKind",
    "RepoFile",
    "file_request",
    "filter_files",
    "repo_files",
)

HubErrorKind = Literal["not_found", "unauthorized", "network", "revision_not_found"]
"""Why a Hub operation failed.

* `not_found`: no such repo (or file), or a malformed repo id. The Hub answers the
  same for a private or gated repo when no valid token is sent; the message says so.
* `unauthorized`: the token was rejected, or it gives no access to a gated or
  disabled repo.
* `revision_not_found`: the repo exists, the branch, tag or commit does not.
* `network`: the Hub could not be reached or misbehaved: connection refused,
  timeout, HTTP 5xx, offline mode, an endpoint that is not a Hub.
"""

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """A Hub operation failed; `str(error)` is a one-line message fit for users.

    Attributes:
        kind: The class of failure, see `HubErrorKind`.
        repo_id: The repo the operation was about.
        revision: The revision asked for, None for the default branch.
    """

    def __init__(
        self,
        kind: HubErrorKind,
        message: str,
        *,
        repo_id: str,
        revision: str | None = None,
    ) -> None:
        if kind not in get_args(HubErrorKind):
            raise ValueError(f"unknown HubError kind {kind!r}")
        super().__init__(message)
        self.kind: HubErrorKind = kind
        self.repo_id = repo_id
        self.revision = revision


class RepoFile(NamedTuple):
    """A file of a repo at one commit."""

    path: str
    size: int
    sha256: str | None
    """The content's SHA-256, for files stored in LFS (the Hub lists it); None for the others."""


def repo_files(
    repo_id: str, *, revision: str | None = None, endpoint: str | None = None, token: str | None = None
) -> tuple[str, list[RepoFile]]:
    """The commit `revision` resolves to, and every file of that commit, in one request.

    Raises:
        HubError: The repo or revision does not exist or is not accessible, or the Hub could not
            be reached.
    """
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, revision, endpoint):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    if info.sha is None or not _COMMIT_RE.fullmatch(info.sha):
        raise HubError(
            "network",
            f"the Hub at {_endpoint(endpoint)} gave no commit sha for {_repo_at(repo_id, revision)}",
            repo_id=repo_id,
            revision=revision,
        )
    files = [RepoFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
    return info.sha, sorted(files)


def filter_files(
    files: list[RepoFile], *, allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None
) -> list[RepoFile]:
    """The files that pass the patterns: `fnmatch` patterns on the repo path (`"*.json"` also
    matches `"1_Pooling/x.json"`); none allowed means all."""
    return list(
        filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, key=lambda f: f.path)
    )


def file_request(
    repo_id: str, path: str, commit: str, *, endpoint: str | None = None, token: str | None = None
) -> tuple[str, dict[str, str]]:
    """The URL of a file of a repo at a commit, and the headers to send (the token, which an HTTP
    client drops when the Hub redirects to its CDN)."""
    return hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint), build_hf_headers(token=token)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str | None) -> Iterator[None]:
    """Re-raise `huggingface_hub` and HTTP client errors as `HubError`."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        error = _translate(exc, repo_id, revision, endpoint)
        if error is None:
            raise
        raise error from exc


def _translate(exc: BaseException, repo_id: str, revision: str | None, endpoint: str | None) -> HubError | None:
    """Map an error from `huggingface_hub` to a `HubError`; None for other errors."""
    if isinstance(exc, LocalEntryNotFoundError):
        # Raised when a request failed and nothing usable was on disk: the request's
        # error, when there is one, says more.
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, LocalEntryNotFoundError):
            translated = _translate(cause, repo_id, revision, endpoint)
            if translated is not None:
                return translated
    found = _classify(exc, repo_id, revision, _endpoint(endpoint))
    if found is None:
        return None
    kind, message = found
    return HubError(kind, message, repo_id=repo_id, revision=revision)


def _classify(exc: BaseException, repo_id: str, revision: str | None, hub: str) -> tuple[HubErrorKind, str] | None:
    """The kind and message of the `HubError` for `exc`, or None if it is not one."""
    repo = _repo_at(repo_id, revision)
    # Order matters: the specific HTTP errors subclass HfHubHTTPError, which itself
    # subclasses httpx2.HTTPError; GatedRepoError subclasses RepositoryNotFoundError.
    if isinstance(exc, RevisionNotFoundError):
        what = "the default branch" if revision is None else f"revision {revision!r}"
        return "revision_not_found", f"{what} not found in {repo_id!r}"
    if isinstance(exc, GatedRepoError):
        return "unauthorized", (
            f"{repo_id!r} is gated: accept its conditions on the Hub, and use a token of an account that did"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return "not_found", (f"model repo {repo_id!r} not found on {hub} (a private or gated repo needs a valid token)")
    if isinstance(exc, RemoteEntryNotFoundError):
        return "not_found", f"a file of {repo} is missing: {exc.response.url}"
    if isinstance(exc, DisabledRepoError):
        return "unauthorized", f"access to {repo_id!r} is disabled on the Hub"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        if status in (401, 403):
            return "unauthorized", (f"the Hub refused access to {repo} (HTTP {status}): check the token")
        return "network", f"the Hub at {hub} failed on {repo} (HTTP {status})"
    if isinstance(exc, OfflineModeIsEnabled):
        return "network", f"cannot fetch {repo}: offline mode is on (HF_HUB_OFFLINE)"
    if isinstance(exc, (httpx2.HTTPError, httpx2.InvalidURL)):
        return "network", (f"cannot reach the Hub at {hub}: {type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, FileMetadataError):
        return "network", f"{hub} does not answer like a Hub: {_first_line(exc)}"
    if isinstance(exc, LocalEntryNotFoundError):
        return "network", f"cannot fetch {repo} from {hub}: {_first_line(exc)}"
    if isinstance(exc, HFValidationError):
        return "not_found", f"invalid repo id {repo_id!r}: {_first_line(exc)}"
    return None


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or constants.ENDPOINT).rstrip("/")


def _repo_at(repo_id: str, revision: str | None) -> str:
    return repr(repo_id) if revision is None else f"{repo_id!r} at {revision!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
