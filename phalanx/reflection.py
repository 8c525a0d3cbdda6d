"""gRPC server reflection under both names clients ask for: `grpc.reflection.v1` and `v1alpha`.

grpcio-reflection implements only v1alpha, and clients that ask for v1 first (grpcurl, recent
Postman) would get UNIMPLEMENTED. The two protocols have the same messages with the same field
numbers, so the v1alpha servicer answers v1 calls too; its descriptor is registered under the
v1 name so that v1 itself can be described.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1}.ServerReflection"
SERVICE_NAMES = (reflection.SERVICE_NAME, V1_SERVICE_NAME)


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection for `service_names` (and for itself) as v1alpha and v1 on `server`."""
    _register_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )


def _register_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool: v1alpha's file, renamed."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1
    proto.options.Clear()
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # scalars have none (and assigning one would mark it set)
                field.type_name = field.type_name.replace(f".{V1ALPHA}.", f".{V1}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{V1ALPHA}.", f".{V1}.")
            method.output_type = method.output_type.replace(f".{V1ALPHA}.", f".{V1}.")
    pool.Add(proto)
