"""The gRPC front end (grpclib over the betterproto2 messages in `modelmora._proto`): thin servicers
over `modelmora.service`, errors mapped once (`errors`), health and reflection. asyncio only."""

from .calls import CallContext, Calls, call_trace, single
from .decode import PARAMETERS, decode_call, parameters_name
from .encode import event_message, infer_response, model_message, model_status, server_status, task_type
from .errors import error_message, internal_error, proto_field, send_error
from .gate import current_permit, guarded
from .health import MODEL_PREFIX, WATCH_INTERVAL_S, HealthServicer
from .inference import InferenceServicer
from .jobs import WATCH_POLL_S, JobServicer, job_message, job_request, stored_response
from .models import ManagementServicer, RegistryServicer
from .server import GrpcListener, LimitedCodec, descriptors
from .wire import (
    CoalescingProtocol,
    CoalescingTransport,
    TraceEncoder,
    corked,
    infer_response_bytes,
    infer_stream_answer_bytes,
)

__all__ = (
    "MODEL_PREFIX",
    "PARAMETERS",
    "WATCH_INTERVAL_S",
    "WATCH_POLL_S",
    "CallContext",
    "Calls",
    "CoalescingProtocol",
    "CoalescingTransport",
    "GrpcListener",
    "HealthServicer",
    "InferenceServicer",
    "JobServicer",
    "LimitedCodec",
    "ManagementServicer",
    "RegistryServicer",
    "TraceEncoder",
    "call_trace",
    "corked",
    "current_permit",
    "decode_call",
    "descriptors",
    "error_message",
    "event_message",
    "infer_response",
    "infer_response_bytes",
    "infer_stream_answer_bytes",
    "internal_error",
    "job_message",
    "job_request",
    "model_message",
    "model_status",
    "parameters_name",
    "proto_field",
    "guarded",
    "send_error",
    "single",
    "server_status",
    "stored_response",
    "task_type",
)
