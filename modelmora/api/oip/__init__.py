"""The Open Inference Protocol (KServe v2, also spoken by Triton's clients): its REST form under
`/v2` (`rest`) and its gRPC service `inference.GRPCInferenceService` (`grpc`, imported by the gRPC
listener only), thin adapters over `modelmora.service` sharing their tensors (`tensors`) and their
model endpoints (`models`)."""

from .rest import HEADER_LENGTH, PREFIX, create_oip_app, error_response

__all__ = ("HEADER_LENGTH", "PREFIX", "create_oip_app", "error_response")
