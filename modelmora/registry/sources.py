"""Where a model's files come from, and fetching them into a staging folder.

A source is a local directory (`/...`, `./...`, `../...`, `~...`, `file://...`), an HTTP(S)
URL of an archive (tar, tar.gz/bz2/xz, zip: unpacked safely, `archive.py`) or of a single file,
or a Hugging Face repo `org/name[@revision]`. HTTP, S3 and Hugging Face downloads go through the
download cache (`cache.py`, `fetch.py`), which resumes a download cut short; Hugging Face downloads
fetch only the files the task's loader needs. A downloaded model file is a hard link to its cached
blob (`cache.place`), stored once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from ..config import S3Settings, Settings
from ..errors import InvalidInput, ModelNotFound, SourceError
from .archive import ArchiveLimits, is_archive, safe_member_path, unpack
from .cache import DownloadCache, place
from .fetch import fetch_url

__all__ = (
    "HF_REPO_RE",
    "InstallPlan",
    "Progress",
    "SourceLimits",
    "copy_tree",
    "download_hf",
    "fetch_http",
    "fetch_s3_source",
    "list_files",
    "parse_source",
    "source_url",
)

HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while files are copied or downloaded."""

# Files a task's loader needs from a Hugging Face repo: configs, tokenizer, safetensors.
_HF_ALLOW = ["*.json", "*.jinja", "*.txt", "*.model", "*.safetensors", "*/*.json", "*/*.txt", "*/*.safetensors"]
_HF_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.bin", "*.pt"]
_HF_IGNORE_WITH_BIN = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite"]
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip")


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """Limits on what a source may bring (the `max_download_bytes`, `max_unpacked_bytes` and
    `max_archive_members` settings)."""

    max_download_bytes: int = 64 * 2**30
    max_unpacked_bytes: int = 256 * 2**30
    max_archive_members: int = 100_000
    timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SourceLimits:
        return cls(settings.max_download_bytes, settings.max_unpacked_bytes, settings.max_archive_members)


@dataclass(frozen=True, slots=True)
class InstallPlan:
    """A parsed source."""

    kind: str  # "local" | "hf" | "http" | "s3"
    location: str  # resolved directory, repo id, or URL
    revision: str | None = None

    @property
    def default_id(self) -> str:
        """The model id when none is given: the folder's, the repo's or the file's name."""
        if self.kind in ("http", "s3"):
            path = self.location.rstrip("/") if self.kind == "s3" else unquote(urlsplit(self.location).path)
            name = PurePosixPath(path).name
            for suffix in _ARCHIVE_SUFFIXES:
                if name.lower().endswith(suffix):
                    return name[: -len(suffix)]
            return name.rsplit(".", 1)[0] if "." in name else name
        return Path(self.location).name if self.kind == "local" else self.location.rsplit("/", 1)[-1]

    @property
    def canonical(self) -> str:
        """The source as the registry records it."""
        if self.kind == "local":
            return f"file://{self.location}"
        return self.location.rstrip("/") if self.kind == "s3" else self.location


def parse_source(source: str) -> InstallPlan:
    """Classify a source string.

    Raises:
        InvalidInput: neither a local path, an http(s) or s3 URL, nor an `org/name` repo id.
    """
    if source.startswith(("/", "./", "../", "~", "file://")) or source in (".", ".."):
        path = source.removeprefix("file://")
        return InstallPlan("local", str(Path(path).expanduser().resolve()))
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        if not parts.hostname or not PurePosixPath(unquote(parts.path)).name:
            raise InvalidInput(f"source {source!r}: the URL must name a file (an archive or a model file)")
        return InstallPlan("http", source)
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key.strip("/"):
            raise InvalidInput(f"source {source!r}: an s3:// source is s3://bucket/prefix or s3://bucket/key")
        return InstallPlan("s3", source)
    repo, _, revision = source.partition("@")
    if not HF_REPO_RE.match(repo):
        raise InvalidInput(
            f"source {source!r} is neither a local path (start it with / ./ ../ ~ or file://), an http(s) URL,"
            " an s3://bucket/prefix, a Hugging Face repo id 'org/name[@revision]' nor a catalog id"
            " (mm catalog lists them)",
            field="source",
        )
    return InstallPlan("hf", repo, revision or None)


def source_url(plan: InstallPlan) -> str | None:
    """The URL people can open for a source (a Hugging Face model page); None for a local directory."""
    if plan.kind == "hf":
        return f"https://huggingface.co/{plan.location}"
    if plan.kind in ("http", "s3"):
        return plan.location
    return None


def list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts)


def copy_tree(src: Path, dst: Path, progress: Progress | None) -> None:
    files = list_files(src)
    total = sum(p.stat().st_size for p in files)
    done = 0
    if progress:
        progress(0, total)
    for p in files:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with p.open("rb") as fin, target.open("wb") as fout:
            while chunk := fin.read(4 << 20):
                fout.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)


def download_hf(
    plan: InstallPlan,
    dest: Path,
    cache: DownloadCache,
    limits: SourceLimits,
    *,
    progress: Progress | None = None,
    endpoint: str | None = None,
) -> str:
    """Fetch the files the task's loader needs from a Hugging Face repo at one commit; the commit.

    Each file goes through the download cache (`fetch.fetch_url`): a file stored in LFS is known by
    its SHA-256 (reused from the cache when there, checked when downloaded), and a download cut
    short resumes with `Range` (at once, else on the next install) instead of starting over. Each
    file in `dest` is a hard link to its blob where the file system allows (`cache.place`).
    `endpoint`: the Hub's URL (None: `HF_ENDPOINT`, else huggingface.co).

    Raises:
        ModelNotFound: no such repo, revision or file.
        SourceError: the Hub cannot be reached, refuses, or a download stays cut short.
        ChecksumMismatch, PayloadTooLarge: see `fetch.fetch_url`.
    """
    from .hf import HubError, file_request, filter_files, repo_files  # huggingface_hub is slow to import

    try:
        commit, every = repo_files(plan.location, revision=plan.revision, endpoint=endpoint)
    except HubError as exc:
        if exc.kind in ("not_found", "revision_not_found"):
            raise ModelNotFound(str(exc), field="source") from exc
        raise SourceError(str(exc), field="source") from exc
    has_st = any(f.path.endswith(".safetensors") for f in every)
    files = filter_files(
        every,
        allow_patterns=_HF_ALLOW + ([] if has_st else ["*.bin", "*/*.bin"]),
        ignore_patterns=_HF_IGNORE if has_st else _HF_IGNORE_WITH_BIN,
    )
    total, done = sum(f.size for f in files), 0
    for f in files:
        url, headers = file_request(plan.location, f.path, commit, endpoint=endpoint)

        def step(got: int, _size: int, before: int = done) -> None:
            if progress:
                progress(before + got, max(total, before + got))

        blob, _ = fetch_url(
            url,
            cache,
            max_bytes=limits.max_download_bytes,
            timeout_s=limits.timeout_s,
            expect_sha256=f.sha256,
            progress=step,
            headers=headers,
        )
        place(blob, dest / safe_member_path(f.path, f"the file {f.path} of {plan.location}"))
        done += f.size
        if progress:  # a file taken from the cache reported nothing
            progress(done, total)
    return commit


def fetch_http(
    plan: InstallPlan,
    dest: Path,
    cache: DownloadCache,
    limits: SourceLimits,
    *,
    expect_sha256: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Download (or take from the cache) the file at `plan`'s URL into `dest`: an archive is
    unpacked safely, any other file is placed under its name. Returns its SHA-256 (the version's
    revision).

    Raises:
        InvalidInput: the archive would write outside `dest`, holds links outside it, devices...
        PayloadTooLarge: over a limit.
        SourceError, ModelNotFound, ChecksumMismatch: see `fetch.fetch_url`.
    """
    blob, digest = fetch_url(
        plan.location,
        cache,
        max_bytes=limits.max_download_bytes,
        timeout_s=limits.timeout_s,
        expect_sha256=expect_sha256,
        progress=progress,
    )
    if is_archive(blob):
        archive_limits = ArchiveLimits(limits.max_archive_members, limits.max_unpacked_bytes)
        unpack(blob, dest, archive_limits, what=f"the archive at {plan.location}")
    else:
        place(blob, dest / PurePosixPath(unquote(urlsplit(plan.location).path)).name)
    return digest


def fetch_s3_source(
    plan: InstallPlan,
    dest: Path,
    cache: DownloadCache,
    limits: SourceLimits,
    s3: S3Settings,
    *,
    progress: Progress | None = None,
) -> str:
    """Download (or take from the cache) an `s3://` source into `dest`: the objects under a prefix
    at their paths below it; one object is unpacked when it is an archive, else placed under its
    name. Returns the revision: the SHA-256 of a single object, else of the list of files and their
    SHA-256.

    Raises:
        see `s3source.fetch_s3` and `archive.unpack`.
    """
    from .s3source import fetch_s3  # botocore is slow to import

    fetched = fetch_s3(
        plan.location,
        s3,
        cache,
        max_bytes=limits.max_download_bytes,
        max_objects=limits.max_archive_members,
        progress=progress,
    )
    if len(fetched) == 1 and not plan.location.endswith("/") and is_archive(fetched[0][1]):
        archive_limits = ArchiveLimits(limits.max_archive_members, limits.max_unpacked_bytes)
        unpack(fetched[0][1], dest, archive_limits, what=f"the archive at {plan.location}")
        return fetched[0][1].name
    for rel, blob in fetched:
        place(blob, dest / rel)
    if len(fetched) == 1 and not plan.location.endswith("/"):
        return fetched[0][1].name
    listing = "".join(f"{rel}\t{blob.name}\n" for rel, blob in sorted(fetched))
    return hashlib.sha256(listing.encode()).hexdigest()
