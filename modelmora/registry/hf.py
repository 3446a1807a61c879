"""Fetch model repos from the Hugging Face Hub (or a mirror) into plain directories.

A thin layer over `huggingface_hub` that

* downloads a filtered snapshot into a directory of ordinary files (no symlinks into
  the Hub cache) and reports its commit, so the registry can pin what it stores;
* turns the many ways a download can fail into one exception, `HubError`, whose
  `kind` tells the caller what to tell the user;
* never leaves `huggingface_hub`'s bookkeeping folder (`.cache/huggingface`) in the
  destination, where it would pass for model files.

The endpoint defaults to `huggingface_hub`'s own: `HF_ENDPOINT` as it was when
`huggingface_hub` was first imported, else `https://huggingface.co`. With
`token=None`, the token saved by `hf auth login` or set in `HF_TOKEN` is sent, as
everywhere in `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import httpx2
from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_url, snapshot_download

# Private parts of huggingface_hub (as of 2.4), used by `_check_complete` to check
# that `snapshot_download` really fetched every file; revisit on upgrades.
from huggingface_hub._local_folder import read_download_metadata
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
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
from huggingface_hub.utils.tqdm import tqdm as _HfTqdm

__all__ = (
    "HubError",
    "HubErrorKind",
    "RepoFile",
    "download_snapshot",
    "file_request",
    "filter_files",
    "list_repo_files",
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
  timeout, HTTP 5xx, offline mode, an endpoint that is not a Hub, a download cut
  short.
"""

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_METADATA_DIR = Path(".cache") / "huggingface"


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


class _SilentTqdm(_HfTqdm):
    """`huggingface_hub`'s progress bar, always disabled: mutes one call only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]


def download_snapshot(
    repo_id: str,
    dest: Path,
    *,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> str:
    """Download the files of a model repo into `dest`; return their commit.

    The revision is resolved to a commit first, then each file of that commit that
    passes the patterns is fetched (eight at a time) to `dest` / its repo path, as a
    regular file. A file already in `dest` is kept if the Hub shows it is current
    (LFS files are compared by sha256, small files are fetched again); a file in the
    local Hub cache is copied from there. Files in `dest` that the repo does not have
    are left alone: `dest` should be empty or hold an earlier download of the repo.

    Args:
        repo_id: `namespace/name` of a model repo.
        dest: Destination directory, created if missing.
        revision: Branch, tag or commit; the repo's default branch if None.
        allow_patterns: Only fetch files matching one of these `fnmatch` patterns,
            applied to the repo path (`"*.json"` also matches `"1_Pooling/x.json"`).
        ignore_patterns: Do not fetch files matching one of these patterns.
        endpoint: Hub base URL; `huggingface_hub`'s default if None.
        token: Bearer token; the locally saved one (or `HF_TOKEN`) if None.
        progress: Show `huggingface_hub`'s progress bars (on a terminal). False
            mutes them for this call only; `HF_HUB_DISABLE_PROGRESS_BARS=1` in the
            environment mutes them always.

    Returns:
        The 40-hex commit sha the files were downloaded from.

    Raises:
        HubError: The repo or revision does not exist or is not accessible, or the
            Hub could not be reached, possibly midway: `dest` then holds only part
            of the files.
        OSError: A local file system error, e.g. disk full or permission denied.
    """
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, revision, endpoint):
        commit = api.model_info(repo_id, revision=revision).sha
        if commit is None or not _COMMIT_RE.fullmatch(commit):
            raise HubError(
                "network",
                f"the Hub at {_endpoint(endpoint)} gave no commit sha for {_repo_at(repo_id, revision)}",
                repo_id=repo_id,
                revision=revision,
            )
        dest.mkdir(parents=True, exist_ok=True)
        try:
            # Asking for the commit, not the branch, pins every file to the commit
            # resolved above even if the branch moves during the download.
            snapshot_download(
                repo_id,
                revision=commit,
                local_dir=dest,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                endpoint=endpoint,
                token=token,
                tqdm_class=None if progress else _SilentTqdm,
            )
            _check_complete(
                repo_id,
                dest,
                commit,
                revision=revision,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        finally:
            _remove_download_metadata(dest)
    return commit


def list_repo_files(
    repo_id: str,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[str]:
    """List the files of a model repo, e.g. to choose download patterns.

    Args:
        repo_id: `namespace/name` of a model repo.
        revision: Branch, tag or commit; the repo's default branch if None.
        endpoint: Hub base URL; `huggingface_hub`'s default if None.
        token: Bearer token; the locally saved one (or `HF_TOKEN`) if None.

    Returns:
        The repo paths of all files, `/`-separated and sorted; folders are implied.

    Raises:
        HubError: The repo or revision does not exist or is not accessible, or the
            Hub could not be reached.
    """
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, revision, endpoint):
        # The model info lists every file in one request, which fails at once when
        # the Hub is down (tree listings are retried with back-off for ~30 s).
        info = api.model_info(repo_id, revision=revision)
        if info.siblings is not None:
            return sorted(sibling.rfilename for sibling in info.siblings)
        return sorted(api.list_repo_files(repo_id, revision=info.sha or revision))


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
        HubError: as `download_snapshot`'s.
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
    """The files that pass the patterns, as `download_snapshot` filters them."""
    return list(
        filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, key=lambda f: f.path)
    )


def file_request(
    repo_id: str, path: str, commit: str, *, endpoint: str | None = None, token: str | None = None
) -> tuple[str, dict[str, str]]:
    """The URL of a file of a repo at a commit, and the headers to send (the token, which an HTTP
    client drops when the Hub redirects to its CDN)."""
    return hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint), build_hf_headers(token=token)


def _check_complete(
    repo_id: str,
    dest: Path,
    commit: str,
    *,
    revision: str | None,
    allow_patterns: list[str] | None,
    ignore_patterns: list[str] | None,
) -> None:
    """Fail unless this download checked every wanted file of `commit` with the Hub.

    When a request fails midway, `snapshot_download` does not raise if `dest` already
    holds the file (or anything, for the file listing): it logs a warning and keeps
    what is there, which may be stale. The metadata it writes under
    `dest/.cache/huggingface` records the commit each file was checked against, and
    the file listing it caches there tells which files were wanted. Both are removed
    after each call, so whatever is there on entry comes from a call that was killed
    and is still accurate.
    """
    try:
        tree = get_cached_repo_tree(repo_id, revision=commit, local_dir=dest)
    except CachedRepoTreeNotFoundError:
        what = "the file list"
    else:
        wanted = filter_repo_objects(
            [entry.path for entry in tree],
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
        )
        missing = [path for path in wanted if not _checked(dest, path, commit)]
        if not missing:
            return
        what = f"{len(missing)} file(s) ({', '.join(missing[:3])})"
    raise HubError(
        "network",
        f"could not download {what} of {_repo_at(repo_id, revision)}: the Hub "
        "failed during the download (see the warnings logged by huggingface_hub)",
        repo_id=repo_id,
        revision=revision,
    )


def _checked(dest: Path, path: str, commit: str) -> bool:
    """Whether `dest/path` was checked against the Hub at `commit`, and not changed."""
    metadata = read_download_metadata(dest, path)
    return metadata is not None and metadata.commit_hash == commit


def _remove_download_metadata(dest: Path) -> None:
    """Delete `dest/.cache/huggingface`, and `dest/.cache` if that leaves it empty."""
    shutil.rmtree(dest / _METADATA_DIR, ignore_errors=True)
    # `.cache` may be absent, or hold files of the repo itself.
    with contextlib.suppress(OSError):
        (dest / _METADATA_DIR.parent).rmdir()


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
