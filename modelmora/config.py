"""Settings: embedded defaults, a TOML file, then MODELMORA_* environment overrides.

This module and `config_load` (reading the file and the environment, explaining bad values)
are the only ones that read the environment for configuration. Resolution order
(later wins): defaults < config file < environment. The file is `--config PATH`, else
`MODELMORA_CONFIG`, else `$MODELMORA_HOME/config.toml` when it exists. Top-level keys are
overridden by `MODELMORA_<KEY>`, nested ones by `MODELMORA_<SECTION>__<KEY>`. Unknown keys
are an error naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .config_load import ConfigError, config_file, default_home, env_overrides, explain, merge, read_file

__all__ = (
    "DEFAULT_GRPC_PORT",
    "AuthSettings",
    "ConfigError",
    "ModelSettings",
    "S3Settings",
    "Settings",
    "TaskDefaults",
    "TlsSettings",
    "default_home",
    "load_settings",
)


DEFAULT_GRPC_PORT = 50051
"""The gRPC port when `grpc_port` is not set (on asyncio)."""

KEEP_ALIVE_PATTERN = r"^(-1|0|\d+(\.\d+)?(ms|s|m|h)?)$"
ORIGIN_PATTERN = r"^(\*|https?://[^/\s]+)$"

PATTERN_WORDS: dict[str, str] = {
    KEEP_ALIVE_PATTERN: "a duration like '30s', '10m', '1.5h', '0' (right after use) or '-1' (never)",
    r"^(auto|cpu|cuda|cuda:\d+)$": "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ORIGIN_PATTERN: "an origin like 'https://app.example.com' or 'http://localhost:3000' (no path), or '*'",
}
"""What each pattern of a string setting means, in words, for error messages."""

Count = Annotated[int, msgspec.Meta(ge=1)]
"""A count or size that must be at least 1."""
Positive = Annotated[float, msgspec.Meta(gt=0)]
"""A duration, rate or factor that must be above 0."""
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class TaskDefaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-task-type request timeouts in seconds, overriding the task table's defaults
    (`modelmora.tasks.TaskInfo.timeout_s`); None: the task table's default."""

    txt2embed: Positive | None = None
    img2embed: Positive | None = None
    img2txt: Positive | None = None
    txt2txt: Positive | None = None
    txt2img: Positive | None = None


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


class AuthSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Token authentication (`modelmora.security`): on when `tokens_file` is set or `tokens` holds a
    token. Each token is `NAME SCOPE[,SCOPE...] TOKEN` (scopes: infer, read, admin); the token may be
    given as `sha256:<hex digest>` instead of in clear."""

    tokens_file: str = ""
    """A file of tokens, one a line, `#` comments; re-read when it changes (and on SIGHUP). Setting it
    turns authentication on even while the file holds no token (then every protected call is refused)."""
    tokens: tuple[str, ...] = ()
    """Tokens given inline, in the file's line format. Env (MODELMORA_AUTH__TOKENS): separated by ';'."""
    rate_limit_per_s: NonNegative = 0.0
    """Requests per second each token may send (a token bucket per token); 0: no limit."""
    rate_limit_burst: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Requests a token may send at once above its rate; 0: max(1, rate_limit_per_s)."""
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Requests of one token running at once (an open stream counts until it ends); 0: no limit."""
    metrics_open: bool = False
    """Serve `/metrics` without a token (else it needs the `read` scope)."""

    def __repr__(self) -> str:
        """The settings without the inline tokens (their count only)."""
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["tokens"] = f"<{len(self.tokens)} hidden>"
        return "AuthSettings(" + ", ".join(f"{k}={v if k == 'tokens' else repr(v)}" for k, v in fields.items()) + ")"

    __str__ = __repr__

    @property
    def enabled(self) -> bool:
        """Authentication is on."""
        return bool(self.tokens_file or self.tokens)


class TlsSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """TLS for REST (HTTPS, HTTP/2 by ALPN) and gRPC: on when `cert_file` and `key_file` are set. The
    files are re-read when they change (and on SIGHUP): new connections get the new certificate."""

    cert_file: str = ""
    """PEM certificate chain (the server's certificate first)."""
    key_file: str = ""
    """PEM private key (unencrypted)."""
    client_ca_file: str = ""
    """PEM CA certificates: when set, clients must present a certificate signed by one (mutual TLS)."""
    handshake_timeout_s: Positive = 10.0
    """A TLS handshake must end within this time (the connection is closed otherwise)."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.key_file)


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
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    """TCP port (0: a free one)."""
    grpc_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """gRPC port on the same host (`mm serve --grpc-port`); 0: no gRPC. Unset: 50051 on asyncio, none
    on trio (grpclib runs only on asyncio: an explicit port on trio refuses to start)."""
    grpc_max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**31 - 1)] = 64 * 1024 * 1024
    """Largest gRPC message received (a request, or one InferStream message); one larger is refused
    with RESOURCE_EXHAUSTED. 64 MiB: a raw RGB image of max_image_pixels fits. Images inside a message
    still answer to max_image_bytes / max_image_pixels (INVALID_ARGUMENT)."""
    backend: Literal["asyncio", "trio"] = "asyncio"
    """The AnyIO event loop (`mm serve --backend`). trio runs the backend-neutral server (REST, SQLite
    registry, filesystem or inline results); an adapter that needs asyncio (the s3 result store)
    refuses to start on it."""
    max_connections: Count = 1000
    """Open client connections at most; a connection beyond it is answered 503 (`too_many_connections`)
    and closed. Lowered at start to fit the process's file descriptor limit."""
    keep_alive_timeout_s: Positive = 5.0
    """An idle keep-alive connection is closed after this long (one whose client closed its side is
    closed at once, whatever this is)."""
    database_url: str = ""
    """Where async jobs are kept: empty, SQLite `$MODELMORA_HOME/jobs.sqlite3`; `postgresql://user:pass@host/db`,
    PostgreSQL (asyncio backend only; several servers may share it). The registry stays in `registry_url`."""
    redis_url: str = ""
    """Servers sharing a PostgreSQL `database_url` pass queued jobs to each other through Redis Streams
    (`redis://host:6379/0`; asyncio backend only); empty: each polls the database."""
    database_connect_attempts: Count = 5
    """Connections tried at start before a database that does not answer stops the server."""
    database_connect_retry_s: Positive = 1.0
    """The wait after the first failed connection; doubled after each later one."""
    registry_url: str = ""
    """Empty: SQLite file `$MODELMORA_HOME/registry.sqlite3`; `sqlite:///PATH`, another SQLite file;
    `postgresql://user:pass@host/db`, PostgreSQL, which several servers share (it may be the
    database_url's database)."""
    max_download_bytes: Count = 64 * 2**30
    """Largest file a model source may download (an archive, a model file)."""
    max_unpacked_bytes: Count = 256 * 2**30
    """Largest total a model archive may unpack to (counted while unpacking, whatever it claims)."""
    max_archive_members: Count = 100_000
    """Most files and folders a model archive may hold."""
    catalog_file: str = ""
    """A model catalog (TOML, the format of the shipped one) whose entries add to and override the
    shipped catalog's: `mm install` takes task, id, metadata and settings from it."""
    max_body_bytes: Count = 32 * 1024 * 1024
    body_read_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    """A request body must arrive whole within this many seconds of the request's start; else 408
    (`request_timeout`) and the connection is closed."""
    cors_origins: tuple[Annotated[str, msgspec.Meta(pattern=ORIGIN_PATTERN)], ...] = ()
    """Web origins whose pages may call this server (CORS: preflight answered, Access-Control-* headers
    on their responses); "*": any origin; empty: CORS off. Env: comma-separated."""
    max_texts_per_request: Count = 2048
    max_text_chars: Count = 100_000
    max_image_bytes: Count = 20 * 1024 * 1024
    """Largest encoded image (decoded base64, or fetched from a URL)."""
    max_image_pixels: Count = 4096 * 4096
    """Largest decoded image, width x height (checked before the pixels are decoded)."""
    max_images_per_request: Count = 64
    max_request_pixels: Count = 64 * 2**20
    """All images of one request together (decoded RGB: 3 bytes per pixel, held until it is answered);
    keep it >= max_image_pixels."""
    max_decoded_pixels_in_flight: Count = 4 * 64 * 2**20
    """All requests' decoded images together, server-wide (3 bytes per pixel: 768 MiB by default); a
    request waits within its deadline for room (then 503 image_budget_exhausted); keep it >=
    max_request_pixels (a larger request is refused with 413)."""
    url_fetch_timeout_s: Positive = 10.0
    """Time limit for fetching one image URL (connect, redirects and body together)."""
    allow_private_urls: bool = False
    """Allow image URLs that resolve to loopback, private, link-local or reserved addresses."""
    result_store: Literal["filesystem", "s3", "inline"] = "filesystem"
    """Where large results (images) go: files under home served at signed URLs, S3, or inline base64."""
    result_ttl_s: Positive = 3600.0
    """How long a result URL stays valid; stored files are swept after it expires."""
    job_ttl_s: Positive = 86400.0
    """Async jobs and their results are kept this long after they finish (a job still queued this
    long after it was submitted becomes `expired`); then swept."""
    job_max_attempts: Count = 3
    """Runs of an async job at most: a transient failure (worker crash, load failure, memory or queue
    short) is retried with capped exponential backoff until this many runs were started."""
    job_retry_base_s: Positive = 1.0
    """Backoff before an async job's second run; doubled for each later one, up to `job_retry_max_s`."""
    job_retry_max_s: Positive = 60.0
    job_concurrency: Count = 64
    """Async jobs in flight at once (each is one request in its model's queue)."""
    job_lease_s: Annotated[float, msgspec.Meta(ge=1)] = 30.0
    """A running job is leased to its server this long, renewed every third of it; a job whose lease
    expired (its server died) runs again on any server sharing the store."""
    job_warm_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    """Servers sharing a job store (PostgreSQL): a server takes a queued job of a model it does not
    hold loaded only once the job was submitted this long ago (a server holding it warm takes it
    first); 0: any server takes any job at once."""
    job_sweep_interval_s: Positive = 60.0
    """How often jobs past `job_ttl_s` are expired or deleted."""
    callback_secret: str = ""
    """HMAC key of async jobs' callbacks (`X-ModelMora-Signature`); empty: callbacks are refused."""
    callback_max_attempts: Count = 5
    """Deliveries of one callback at most (a non-2xx answer or no answer is retried)."""
    callback_retry_base_s: Positive = 1.0
    """Backoff before a callback's second delivery; doubled for each later one (at most 5 minutes)."""
    callback_timeout_s: Positive = 10.0
    """One callback delivery's time limit (connect, send, answer)."""
    result_secret: str = ""
    """HMAC key for signed result URLs; empty: generated once and kept in home (replicas: set it)."""
    public_url: str = ""
    """Base URL clients reach this server at, for result URLs; empty: the address the request's connection
    arrived at (scheme, IP and port of this server; never the client's Host header)."""
    s3: S3Settings = S3Settings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    queue_limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 0.0
    """An idle worker waits this long for a fuller batch (0: dispatch at once)."""
    inference_streams: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    """Batches a worker may run at once, each on its own thread (embedding pipelines; the others run
    one batch at a time); a further batch starts only when a full one waits. A batch running alone
    gets all torch_threads, one beside others torch_threads / streams. 0: 2 on a GPU (one batch
    tokenizes while another runs on the GPU), 1 on a CPU."""
    priority_aging_ms: NonNegative = 5000.0
    """A waiting request moves up one priority class every this many ms (0: no ageing)."""
    memory_budget_mb: float = 0.0
    """MiB for all workers and the zygote (PSS). 0: 75% of the machine's RAM; negative: unlimited."""
    vram_budget_mb: NonNegative = 0.0
    """MiB of GPU memory for all GPU workers (torch's reserved pools, as the workers report them after
    load and after each batch); admission evicts LRU GPU models to fit. 0: not limited."""
    admission_factor: Positive = 1.5
    """An unmeasured model is estimated as worker base + weights x this factor."""
    worker_base_mb: NonNegative = 0.0
    """Memory of an empty worker for estimates; 0: learned from the first measured worker (400 until then)."""
    keep_alive: Annotated[str, msgspec.Meta(pattern=KEEP_ALIVE_PATTERN)] = "30m"
    """Default idle time before a worker is stopped (per model: the `keep_alive` setting)."""
    load_retry_base_s: NonNegative = 1.0
    load_retry_cap_s: NonNegative = 60.0
    load_retry_attempts: Count = 5
    """Consecutive failed loads after which a model stays failed until an explicit load."""
    unload_grace_s: NonNegative = 30.0
    """An explicit unload drains queued requests for at most this long, then fails the rest."""
    memory_poll_ms: Positive = 5000.0
    """How often workers' PSS is re-measured (also measured right after each load)."""
    request_ring_mb: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 16
    response_ring_mb: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 16
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0: one thread per core (os.cpu_count())."""
    worker_start_timeout_s: Positive = 300.0
    worker_stop_grace_s: NonNegative = 5.0
    worker_stall_s: NonNegative = 30.0
    """A worker that sends no message at all (no result, no heartbeat) for this long is stalled:
    it is killed, its batches fail with 503 worker_crashed, and the next request restarts it.
    Workers send a heartbeat every stall/4 s (at most every 5 s); 0 disables the watchdog."""
    zygote: bool = True
    """Fork workers from a zygote that imported `zygote_preload` once (false: spawn each worker)."""
    zygote_preload: tuple[str, ...] = ("numpy", "torch", "transformers", "sentence_transformers")
    """Modules the zygote imports (a spawned worker imports them first); env: comma-separated."""
    shutdown_grace_s: NonNegative = 10.0
    timeout_s: TaskDefaults = TaskDefaults()
    pipelines: dict[str, str] = {}
    """Task type -> "module:Class" overriding the built-in worker pipeline (custom pipelines)."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"
    """"json": every line the server and its workers write is one JSON object; "console": key=value
    text; "auto": JSON unless stderr is a terminal."""
    otlp_endpoint: str = ""
    """Export one span per request over OTLP/HTTP to this URL (e.g. "http://collector:4318/v1/traces");
    empty: no export. Needs `opentelemetry-sdk` and `opentelemetry-exporter-otlp-proto-http` installed."""
    slow_request_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """A request answered after more than this share of its timeout is logged as a `slow_request`
    warning (0: never)."""

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()

    def effective_grpc_port(self, backend: str) -> int:
        """The gRPC port to serve on `backend` (0: none): `grpc_port`, else 50051 on asyncio."""
        if self.grpc_port is not None:
            return self.grpc_port
        return DEFAULT_GRPC_PORT if backend == "asyncio" else 0

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


_SECTIONS: dict[str, object] = {
    "timeout_s": TaskDefaults,
    "pipelines": dict,
    "s3": S3Settings,
    "auth": AuthSettings,
    "tls": TlsSettings,
}
_SECTION_LIST_KEYS = {("auth", "tokens"): ";"}
"""Section keys whose environment value is a list, with its separator (newlines separate too)."""
_SECRET_KEYS = {"auth.tokens"}
"""Keys whose values never appear in an error message."""
_LIST_KEYS = {"zygote_preload", "cors_origins"}
"""Top-level keys whose environment value is a comma-separated list."""
_SKIP_ENV = {"MODELMORA_CONFIG", "MODELMORA_TEST_PG_DSN", "MODELMORA_TEST_REDIS_URL", "MODELMORA_REQUIRE_SERVICES"}


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
    path = config_file(config_path, env)
    data = read_file(path) if path is not None else {}
    from_env = env_overrides(
        env,
        fields=Settings.__struct_fields__,
        sections=_SECTIONS,
        list_keys=_LIST_KEYS,
        section_list_keys=_SECTION_LIST_KEYS,
        skip=_SKIP_ENV,
    )
    data = merge(data, from_env)
    data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    for key in ("log_level", "log_format", "backend"):
        if isinstance(data.get(key), str):
            data[key] = data[key].lower()
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = explain(
            str(exc),
            data,
            from_env,
            overrides,
            path,
            root=Settings,
            secret_keys=_SECRET_KEYS,
            pattern_words=PATTERN_WORDS,
        )
        raise ConfigError(message) from None
