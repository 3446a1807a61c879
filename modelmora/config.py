"""Settings: embedded defaults, a TOML file, then MODELMORA_* environment overrides.

This is the only module that reads the environment for configuration. Resolution order
(later wins): defaults < config file < environment. The file is `--config PATH`, else
`MODELMORA_CONFIG`, else `$MODELMORA_HOME/config.toml` when it exists. Top-level keys are
overridden by `MODELMORA_<KEY>`, nested ones by `MODELMORA_<SECTION>__<KEY>`. Unknown keys
are an error naming the key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = ("ConfigError", "ModelSettings", "S3Settings", "Settings", "TaskDefaults", "default_home", "load_settings")


class ConfigError(Exception):
    """The configuration file or environment holds an unknown key or a bad value."""


KEEP_ALIVE_PATTERN = r"^(-1|0|\d+(\.\d+)?(ms|s|m|h)?)$"


class TaskDefaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-task-type request timeout defaults, in seconds."""

    txt2embed: float = 30.0
    img2embed: float = 30.0
    img2txt: float = 120.0
    txt2txt: float = 300.0
    txt2img: float = 600.0


class S3Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The S3 (or MinIO, SeaweedFS...) bucket of the `s3` result store. Empty credentials: the
    standard AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance roles)."""

    bucket: str = ""
    prefix: str = "modelmora/results/"
    endpoint_url: str = ""
    """Empty: AWS; else e.g. "http://127.0.0.1:9000" for MinIO."""
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = ""
    addressing_style: Literal["auto", "path", "virtual"] = "path"
    delete_expired: bool = True
    """Delete expired results under the prefix (lists and deletes; needs s3:ListBucket and
    s3:DeleteObject). Turn off when a bucket lifecycle rule does it."""


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Per-model overrides kept in the registry; None means "the server's default"."""

    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    queue_limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    device: Annotated[str, msgspec.Meta(pattern=r"^(auto|cpu|cuda|cuda:\d+)$")] | None = None
    """"auto" (cuda when a GPU is usable, else cpu), "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    pinned: bool | None = None
    """Never evicted to make room for another model (still unloaded on request)."""
    preload: bool | None = None
    """Loaded when the server starts."""
    keep_alive: Annotated[str, msgspec.Meta(pattern=KEEP_ALIVE_PATTERN)] | None = None
    """Idle time before the worker is stopped: "10m", "30s", "0" (right after use), "-1" (never)."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Every server setting, with its unit in its name."""

    home: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    registry_url: str = ""
    """Empty: SQLite file `$MODELMORA_HOME/registry.sqlite3`."""
    max_body_bytes: int = 32 * 1024 * 1024
    max_texts_per_request: int = 2048
    max_text_chars: int = 100_000
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image (decoded base64, or fetched from a URL)."""
    max_image_pixels: int = 4096 * 4096
    """Largest decoded image, width x height (checked before the pixels are decoded)."""
    max_images_per_request: int = 64
    max_request_pixels: int = 64 * 2**20
    """All images of one request together (decoded RGB: 3 bytes per pixel, held until it is answered);
    keep it >= max_image_pixels."""
    max_decoded_pixels_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 4 * 64 * 2**20
    """All requests' decoded images together, server-wide (3 bytes per pixel: 768 MiB by default); a
    request waits within its deadline for room (then 503 image_budget_exhausted); keep it >=
    max_request_pixels (a larger request is refused with 413)."""
    url_fetch_timeout_s: float = 10.0
    """Time limit for fetching one image URL (connect, redirects and body together)."""
    allow_private_urls: bool = False
    """Allow image URLs that resolve to loopback, private, link-local or reserved addresses."""
    result_store: Literal["filesystem", "s3", "inline"] = "filesystem"
    """Where large results (images) go: files under home served at signed URLs, S3, or inline base64."""
    result_ttl_s: float = 3600.0
    """How long a result URL stays valid; stored files are swept after it expires."""
    result_secret: str = ""
    """HMAC key for signed result URLs; empty: generated once and kept in home (replicas: set it)."""
    public_url: str = ""
    """Base URL clients reach this server at, for result URLs; empty: taken from each request."""
    s3: S3Settings = S3Settings()
    queue_limit: int = 1024
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    """An idle worker waits this long for a fuller batch (0: dispatch at once)."""
    inference_streams: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    """Batches a worker may run at once, each on its own thread (embedding pipelines; the others run
    one batch at a time); a further batch starts only when a full one waits. A batch running alone
    gets all torch_threads, one beside others torch_threads / streams. 0: 2 on a GPU (one batch
    tokenizes while another runs on the GPU), 1 on a CPU."""
    priority_aging_ms: float = 5000.0
    """A waiting request moves up one priority class every this many ms (0: no ageing)."""
    memory_budget_mb: float = 0.0
    """MiB for all workers and the zygote (PSS). 0: 75% of the machine's RAM; negative: unlimited."""
    vram_budget_mb: float = 0.0
    """MiB of GPU memory for all GPU workers (torch's reserved pools, as the workers report them after
    load and after each batch); admission evicts LRU GPU models to fit. 0: not limited."""
    admission_factor: float = 1.5
    """An unmeasured model is estimated as worker base + weights x this factor."""
    worker_base_mb: float = 0.0
    """Memory of an empty worker for estimates; 0: learned from the first measured worker (400 until then)."""
    keep_alive: Annotated[str, msgspec.Meta(pattern=KEEP_ALIVE_PATTERN)] = "30m"
    """Default idle time before a worker is stopped (per model: the `keep_alive` setting)."""
    load_retry_base_s: float = 1.0
    load_retry_cap_s: float = 60.0
    load_retry_attempts: int = 5
    """Consecutive failed loads after which a model stays failed until an explicit load."""
    unload_grace_s: float = 30.0
    """An explicit unload drains queued requests for at most this long, then fails the rest."""
    memory_poll_ms: float = 5000.0
    """How often workers' PSS is re-measured (also measured right after each load)."""
    request_ring_mb: int = 16
    response_ring_mb: int = 16
    torch_threads: int = 0
    """0: one thread per core (os.cpu_count())."""
    worker_start_timeout_s: float = 300.0
    worker_stop_grace_s: float = 5.0
    zygote: bool = True
    """Fork workers from a zygote that imported `zygote_preload` once (false: spawn each worker)."""
    zygote_preload: tuple[str, ...] = ("numpy", "torch", "transformers", "sentence_transformers")
    """Modules the zygote imports (a spawned worker imports them first); env: comma-separated."""
    shutdown_grace_s: float = 10.0
    timeout_s: TaskDefaults = TaskDefaults()
    pipelines: dict[str, str] = {}
    """Task type -> "module:Class" overriding the built-in worker pipeline (custom pipelines)."""
    log_level: str = "info"
    log_format: str = "console"

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()

    @property
    def effective_memory_budget_mb(self) -> float:
        """The worker budget in MiB; -1 for unlimited."""
        if self.memory_budget_mb > 0:
            return self.memory_budget_mb
        if self.memory_budget_mb < 0:
            return -1.0
        import psutil

        return float(psutil.virtual_memory().total) / 2**20 * 0.75

    @property
    def effective_torch_threads(self) -> int:
        return self.torch_threads if self.torch_threads > 0 else (os.cpu_count() or 1)


def default_home() -> Path:
    """`$MODELMORA_HOME`, else `$XDG_DATA_HOME/modelmora`, else `~/.local/share/modelmora`."""
    env = os.environ.get("MODELMORA_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "modelmora"


_SECTIONS: dict[str, object] = {"timeout_s": TaskDefaults, "pipelines": dict, "s3": S3Settings}
_LIST_KEYS = {"zygote_preload"}
"""Top-level keys whose environment value is a comma-separated list."""
_SKIP_ENV = {"MODELMORA_CONFIG", "MODELMORA_TEST_PG_DSN", "MODELMORA_TEST_REDIS_URL", "MODELMORA_REQUIRE_SERVICES"}


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = set(Settings.__struct_fields__)
    for key, value in environ.items():
        if not key.startswith("MODELMORA_") or key in _SKIP_ENV or key.startswith("MODELMORA_TEST_"):
            continue
        name = key.removeprefix("MODELMORA_").lower()
        if "__" in name:
            section, sub = name.split("__", 1)
            if section not in _SECTIONS:
                raise ConfigError(f"unknown configuration section in environment variable {key}")
            out.setdefault(section, {})[sub] = value
        elif name in _LIST_KEYS:
            out[name] = [item.strip() for item in value.split(",") if item.strip()]
        elif name in fields:
            out[name] = value
        else:
            raise ConfigError(f"unknown configuration key in environment variable {key}")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_settings(
    config_path: str | Path | None = None,
    *,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the Settings; `overrides` (e.g. from CLI flags) win over everything.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type.
    """
    env = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    path: Path | None = None
    if config_path is not None:
        path = Path(config_path)
    elif env.get("MODELMORA_CONFIG"):
        path = Path(env["MODELMORA_CONFIG"])
    else:
        home = Path(env["MODELMORA_HOME"]).expanduser() if env.get("MODELMORA_HOME") else default_home()
        candidate = home / "config.toml"
        path = candidate if candidate.is_file() else None
    if path is not None:
        try:
            data = tomllib.loads(path.expanduser().read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    data = _merge(data, _env_overrides(env))
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
