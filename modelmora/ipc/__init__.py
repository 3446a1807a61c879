"""IPC shared by the supervisor and the workers: stdlib + msgspec only, synchronous, sans-IO."""

from .control import FrameDecoder, ProtocolError, encode_frame, recv_message, send_message
from .messages import PROTOCOL_VERSION, Error, Hello, Infer, Load, Loaded, Message, Result, Shutdown, Span, Tensor, Text
from .ring import PayloadTooLarge, RingFull, ShmRing

__all__ = (
    "PROTOCOL_VERSION",
    "Error",
    "FrameDecoder",
    "Hello",
    "Infer",
    "Load",
    "Loaded",
    "Message",
    "PayloadTooLarge",
    "ProtocolError",
    "Result",
    "RingFull",
    "ShmRing",
    "Shutdown",
    "Span",
    "Tensor",
    "Text",
    "encode_frame",
    "recv_message",
    "send_message",
)
