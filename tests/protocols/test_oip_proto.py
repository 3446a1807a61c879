"""Our `inference` .proto is wire-compatible with the published protocol: every message, field,
number, type, label, oneof and method we declare is as in tritonclient's descriptor (Triton's
grpc_service.proto, a superset of KServe's grpc_predict_v2.proto)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2

OURS = "inference/grpc_predict_v2.proto"


def _ours() -> descriptor_pb2.FileDescriptorProto:
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files("modelmora._proto").joinpath("descriptors.binpb").read_bytes()
    )
    return next(f for f in files.file if f.name == OURS)


def _theirs() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(service_pb2.DESCRIPTOR.serialized_pb)


def _message(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    return {
        "fields": {
            f.name: (
                f.number,
                f.type,
                f.label,
                f.type_name,
                m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
            )
            for f in m.field
        },
        "nested": {n.name: _message(n) for n in m.nested_type},
        "map_entry": m.options.map_entry,
    }


def test_package_and_service() -> None:
    ours, theirs = _ours(), _theirs()
    assert ours.package == theirs.package == "inference"
    assert [s.name for s in ours.service] == ["GRPCInferenceService"]
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert len(ours.service[0].method) == 10
    for method in ours.service[0].method:
        theirs_m = their_methods[method.name]
        assert (method.input_type, method.output_type) == (theirs_m.input_type, theirs_m.output_type)
        assert (method.client_streaming, method.server_streaming) == (
            theirs_m.client_streaming,
            theirs_m.server_streaming,
        )


def test_every_message_matches_field_for_field() -> None:
    theirs = {m.name: _message(m) for m in _theirs().message_type}
    ours = _ours().message_type
    assert len(ours) == 22
    for message in ours:
        assert _message(message) == theirs[message.name], message.name
