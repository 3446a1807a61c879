"""Installing and uninstalling models: task detection, layout checks, checksums, the registry.

Sources (`sources.py`): a local directory, an HTTP(S) archive or file, a Hugging Face repo, or a
catalog id. Files land in `$MODELMORA_HOME/models/<id>/<version>/` through a temporary directory
and a rename, so a failed install leaves nothing half-written; the user's directory is never
modified.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from ..config import ModelSettings, S3Settings
from ..errors import ChecksumMismatch, InvalidInput, ModelNotFound, RegistryError
from ..tasks import TaskType
from .cache import DownloadCache
from .catalog import ModelCatalog, merge_metadata
from .checksums import hash_files
from .layout import architecture_task, check_layout, find_model_dir
from .metadata import ModelMetadata, check_metadata, parse_metadata
from .sources import (
    InstallPlan,
    Progress,
    SourceLimits,
    copy_tree,
    download_hf,
    fetch_http,
    fetch_s3_source,
    list_files,
    parse_source,
    source_url,
)
from .store import ModelRecord, ModelStore, VersionRecord
from .versions import SEMVER_RE, check_version

__all__ = ("MODEL_ID_RE", "TASKS", "detect_task", "install", "uninstall")

TASKS = tuple(str(t) for t in TaskType)
"""The task types a model can be installed for."""
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def detect_task(files: list[str], root: Path | None = None) -> str | None:
    """Guess the task from a model's files: sentence-transformers and diffusers layouts by name,
    else the `architectures` of `config.json` (read under `root` when given)."""
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "modules.json" in names or "sentence_bert_config.json" in names:
        return "txt2embed"
    if "model_index.json" in names:
        return "txt2img"
    if root is not None and "config.json" in files:
        try:
            config = json.loads((root / "config.json").read_text())
        except (OSError, ValueError):
            return None
        found = architecture_task(config) if isinstance(config, dict) else None
        return found[1] if found else None
    return None


def _subfolder_hint(root: Path, source: str, plan: InstallPlan, task: str | None) -> str:
    """ "; found modules.json in sub/: install ./dir/sub", or "" when no subfolder holds the model."""
    found = find_model_dir(root, task)
    if found is None:
        return ""
    sub, marker, found_task = found
    what = f"; found {marker} ({found_task}) in {sub}/"
    if plan.kind == "local":
        return f"{what}: install {source.rstrip('/')}/{sub}"
    return f"{what} of the repo: a subfolder of a repo cannot be installed (download it and install that folder)"


def _task_and_layout(root: Path, source: str, plan: InstallPlan, task: str | None, check: bool) -> str:
    """The task of the model at `root` (given, else detected), after checking that its files are
    laid out as that task's loader expects.

    Raises:
        InvalidInput: no files; the task cannot be detected; the layout does not fit the task.
    """
    files = list_files(root)
    if not files:
        raise InvalidInput(f"source {source!r} holds no files", field="source")
    rel = [p.relative_to(root).as_posix() for p in files]
    resolved = task or detect_task(rel, root)
    if resolved is None:
        raise InvalidInput(
            f"cannot tell the task of {source!r} from its files; pass --task ({', '.join(TASKS)})"
            + _subfolder_hint(root, source, plan, None),
            field="task",
        )
    if check:
        problem = check_layout(root, resolved)
        if problem is not None:
            raise InvalidInput(
                f"{source!r} is not laid out as a model for {resolved}: {problem}"
                + _subfolder_hint(root, source, plan, resolved),
                field="source",
            )
    return resolved


def _check_expected(found: dict[str, str], expected: dict[str, str], what: str) -> None:
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            raise ChecksumMismatch(f"{what}: the pinned file {name} is not in the source", file=name)
        if name not in expected:
            raise ChecksumMismatch(f"{what}: the source has {name}, which is not pinned", file=name)
        if found[name] != expected[name]:
            raise ChecksumMismatch(
                f"{what}: checksum mismatch in {name}: SHA-256 {found[name][:12]}... differs from the pinned"
                f" {expected[name][:12]}...",
                file=name,
            )


def install(
    store: ModelStore,
    home: Path,
    source: str,
    *,
    model_id: str | None = None,
    task: str | None = None,
    version: str | None = None,
    force: bool = False,
    activate: bool = False,
    metadata: ModelMetadata | dict[str, Any] | None = None,
    progress: Progress | None = None,
    hf_progress: bool = True,
    check_files: bool = True,
    expect_files: dict[str, str] | None = None,
    catalog: ModelCatalog | None = None,
    revision: str | None = None,
    limits: SourceLimits | None = None,
    s3: S3Settings | None = None,
) -> ModelRecord:
    """Register a model from `source`, copying its files under `home/models`.

    With `check_files` (the default) the files must be laid out as the task's loader expects
    (`layout.check_layout`): a local directory is checked before it is copied, a Hugging Face
    repo after the download and before it is registered. Tests whose workers run stand-in
    pipelines turn it off.

    Args:
        activate: the new version becomes the active one (refused when the active one is pinned);
            a model's first version is always active.
        metadata: the model's metadata (`ModelMetadata`, or decoded JSON validated here); None: a
            new model gets none beyond its source URL, an existing one keeps its own.
        expect_files: the files the version must have and their SHA-256 (a lock file's pins):
            any difference refuses the install before anything is registered.
        catalog: known models: `source` may be a catalog id (`all-MiniLM-L6-v2`); a new model of
            the catalog takes its task, id, revision, metadata (`metadata` over it) and settings.
        revision: the revision wanted (a lock file's pin): a Hugging Face commit, or the SHA-256 of
            an HTTP source's file (served from the download cache when it holds it).
        progress: called with (bytes done, bytes total) while the files are copied or downloaded.
        hf_progress: report a Hugging Face download to `progress` too.
        limits: download and archive limits (default: `SourceLimits()`).
        s3: endpoint, region and credentials of `s3://` sources (the `[s3]` settings).

    Raises:
        InvalidInput: bad id, version, task, metadata or source; the task cannot be detected; the
            files are not laid out as the task expects (the message names what is missing, and a
            subfolder that holds the model when there is one).
        RegistryError: the id is taken by another source, this version exists (no `force`), or
            `activate` on a model whose active version is pinned.
        ChecksumMismatch: with `expect_files`, a file differs, is missing or is not expected.
    """
    entry = catalog.find(source) if catalog is not None else None
    if entry is not None:
        name, _, after = source.partition("@")
        if "/" not in name:  # a catalog id: ID@1.2.0 names the version, ID@other a revision of its repo
            if after and SEMVER_RE.match(after) and version is None:
                version, after = after, ""
            pinned = after or entry.revision
            source = entry.source + (f"@{pinned}" if pinned else "")
        elif not after and entry.revision:
            source = f"{source}@{entry.revision}"
    plan = parse_source(source)
    if plan.kind == "hf" and revision:
        plan = InstallPlan("hf", plan.location, revision)
    if plan.kind == "local" and not Path(plan.location).is_dir():
        raise InvalidInput(f"source directory {plan.location} does not exist or is not a directory", field="source")
    mid = model_id or (entry.model_id if entry is not None and plan.kind == "hf" else plan.default_id)
    if not MODEL_ID_RE.match(mid):
        raise InvalidInput(f"model id {mid!r} must match {MODEL_ID_RE.pattern}", field="id")
    ver = check_version(version or "1.0.0")
    if task is not None and task not in TASKS:
        raise InvalidInput(f"task {task!r} is not one of {', '.join(TASKS)}", field="task")
    canonical = plan.canonical

    existing = store.get(mid)
    meta: ModelMetadata | None = None
    if existing is not None:
        if existing.source != canonical:
            raise RegistryError(
                f"model id {mid!r} is already used by {existing.source}; cannot also give it to {canonical}"
                " (choose another id with --id)"
            )
        if existing.version_record(ver) is not None and not force:
            raise RegistryError(f"model {mid!r} version {ver} is already installed (use --force to reinstall)")
        if task is not None and task != existing.task:
            raise RegistryError(f"model {mid!r} is registered with task {existing.task}, not {task}")
        if activate and existing.active_pinned and existing.active_version != ver:
            raise RegistryError(
                f"model {mid!r} is pinned to version {existing.active_version}: activate {ver} explicitly"
                f" (mm activate {mid} {ver}) or install it without activating"
            )
        if metadata is not None:
            meta = parse_metadata(metadata, task or existing.task)
    else:
        if entry is not None:
            task = task or str(entry.task)
            meta = parse_metadata(merge_metadata(entry.metadata, metadata), task)
        else:
            meta = parse_metadata(metadata, task)
        if meta.source_url is None:
            meta = msgspec.structs.replace(meta, source_url=source_url(plan))

    known_task = task or (existing.task if existing else None)
    resolved_task = ""
    if plan.kind == "local":  # checked before anything is copied
        resolved_task = _task_and_layout(Path(plan.location), source, plan, known_task, check_files)
        if meta is not None:
            check_metadata(meta, resolved_task)
    models_dir = home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=models_dir))
    try:
        fetched = ""
        if plan.kind == "local":
            copy_tree(Path(plan.location), staging, progress)
        else:
            cache, limits = DownloadCache.under(home), limits or SourceLimits()
            if plan.kind == "hf":
                fetched = download_hf(plan, staging, cache, limits, progress=progress if hf_progress else None)
            elif plan.kind == "s3":
                fetched = fetch_s3_source(plan, staging, cache, limits, s3 or S3Settings(), progress=progress)
                if revision and fetched != revision:
                    raise ChecksumMismatch(
                        f"{plan.location} now holds content {fetched[:12]}..., not the pinned {revision[:12]}...",
                        file=plan.location.rsplit("/", 1)[-1],
                    )
            else:
                fetched = fetch_http(plan, staging, cache, limits, expect_sha256=revision, progress=progress)
            resolved_task = _task_and_layout(staging, source, plan, known_task, check_files)
            if meta is not None:
                check_metadata(meta, resolved_task)
        files = list_files(staging)
        rel = [p.relative_to(staging).as_posix() for p in files]
        checksums = hash_files(staging, rel)
        if expect_files is not None:
            _check_expected(checksums, expect_files, f"model {mid!r} version {ver} from {source}")
        size = sum(p.stat().st_size for p in files)
        final = models_dir / mid / ver
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    record = VersionRecord(ver, str(final), fetched, checksums, size, time.time())
    try:
        rec = store.add_version(mid, resolved_task, canonical, record, replace=force, metadata=meta, activate=activate)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    if existing is None and entry is not None and entry.settings != ModelSettings():
        rec = store.update_settings(mid, msgspec.to_builtins(entry.settings)) or rec
    return rec


def uninstall(store: ModelStore, home: Path, model_id: str, version: str | None = None) -> ModelRecord:
    """Remove a model (or one of its versions) from the registry, and its copied files (never the
    original source).

    Returns:
        The model as it was before (all versions removed), or as it is now (one version removed).

    Raises:
        ModelNotFound: no such model or version.
        RegistryError: `version` is the active one while others remain (activate another first).
    """
    models_dir = (home / "models").resolve()
    if version is None:
        rec = store.remove(model_id)
        if rec is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        gone = rec.versions
    else:
        current = store.get(model_id)
        if current is None:
            raise ModelNotFound(f"model {model_id!r} is not installed")
        vrec = current.version_record(version)
        if vrec is None:
            raise ModelNotFound(f"model {model_id!r} has no version {version!r}", field="version")
        if len(current.versions) == 1:
            return uninstall(store, home, model_id)
        if version == current.active_version:
            others = ", ".join(v.version for v in current.versions if v.version != version)
            raise RegistryError(
                f"version {version} of model {model_id!r} is the active one: activate another ({others}) first"
            )
        after = store.remove_version(model_id, version)
        if after is None:  # activated or removed meanwhile by another process
            raise RegistryError(f"version {version} of model {model_id!r} changed while it was being removed")
        rec, gone = after, [vrec]
    for v in gone:
        p = Path(v.path).resolve()
        if models_dir in p.parents:  # only our own copies
            shutil.rmtree(p, ignore_errors=True)
    mdir = models_dir / model_id
    if mdir.is_dir() and not any(mdir.iterdir()):
        mdir.rmdir()
    return rec
