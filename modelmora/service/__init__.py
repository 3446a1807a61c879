"""The protocol-neutral inference core that every front end calls."""

from ..scheduler import ModelStatus, Priority
from .admin import ModelAdmin, RegisterCall
from .call import InferCall
from .core import REGISTRY_SYNC_S, InferenceService
from .inputs import (
    CaptionParameters,
    EmbeddingParameters,
    GenerationParameters,
    ImageData,
    ImageGenerationParameters,
    ImageInput,
    TextInput,
    convert,
    split_validation,
)
from .operations import Operation, OperationError, Operations
from .outputs import Embeddings, GeneratedImage, Images, InferResult, Output, StreamEvent, Texts, Timing
from .status import (
    HealthModel,
    HealthModels,
    ServerStatus,
    SharedMemoryStatus,
    SupervisorStatus,
    shared_memory_status,
)
from .stream import InferStream
from .tasks import ADAPTERS, ReturnMode, TaskAdapter

__all__ = (
    "ADAPTERS",
    "REGISTRY_SYNC_S",
    "CaptionParameters",
    "EmbeddingParameters",
    "Embeddings",
    "GeneratedImage",
    "GenerationParameters",
    "HealthModel",
    "HealthModels",
    "ImageData",
    "ImageGenerationParameters",
    "ImageInput",
    "Images",
    "ModelAdmin",
    "Operation",
    "OperationError",
    "Operations",
    "ModelStatus",
    "InferCall",
    "InferResult",
    "InferStream",
    "InferenceService",
    "Output",
    "Priority",
    "RegisterCall",
    "ReturnMode",
    "ServerStatus",
    "SharedMemoryStatus",
    "StreamEvent",
    "SupervisorStatus",
    "TaskAdapter",
    "TextInput",
    "Texts",
    "Timing",
    "convert",
    "shared_memory_status",
    "split_validation",
)
