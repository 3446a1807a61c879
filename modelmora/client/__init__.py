"""The Python client of ModelMora's gRPC API: `AsyncClient` (asyncio) and `Client` (blocking), with
the same methods: `embed` (a float32 numpy array), `generate` and `generate_stream`, `caption`,
`generate_image` and `generate_image_stream`, `infer_stream` (many `StreamRequest`s over one
stream, a `StreamAnswer` each); the registry: `models`, `model`, `update_settings`, `delete_model`;
the runtime: `status`, `load`, `unload`; async jobs: `submit`, `wait`, `watch`, `job`, `cancel`,
`job_result`.

Every failure raises a `ClientError` (a subclass per gRPC status). UNAVAILABLE is retried as
`RetryPolicy` says (`modelmora.client.retry` lists which calls are idempotent).

Importing this package loads grpclib, betterproto2, numpy and the generated messages, never the
server or torch.
"""

from grpclib.const import Status

from ._requests import ImageInput, PriorityName, ReturnMode
from .aio import DEFAULT_TARGET, AsyncClient
from .blocking import Client
from .errors import (
    CallCancelledError,
    ClientError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .jobs import FINAL_STATUSES, Job, JobMethods
from .results import (
    DeletedModel,
    GeneratedImage,
    ImageResult,
    ModelInfo,
    ModelSettings,
    ModelState,
    ModelVersion,
    Progress,
    ServerStatus,
    TextResult,
    Timing,
    Token,
)
from .retry import RetryPolicy
from .stream import StreamAnswer, StreamMethods, StreamRequest

__all__ = (
    "FINAL_STATUSES",
    "Job",
    "JobMethods",
    "DEFAULT_TARGET",
    "AsyncClient",
    "CallCancelledError",
    "Client",
    "ClientError",
    "DeadlineExceededError",
    "DeletedModel",
    "GeneratedImage",
    "ImageInput",
    "ImageResult",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelSettings",
    "ModelState",
    "ModelVersion",
    "NotFoundError",
    "PermissionDeniedError",
    "PriorityName",
    "Progress",
    "ReturnMode",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerStatus",
    "Status",
    "StreamAnswer",
    "StreamMethods",
    "StreamRequest",
    "TextResult",
    "Timing",
    "Token",
    "UnauthenticatedError",
    "UnavailableError",
)
