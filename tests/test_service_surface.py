"""What orchestrators and grpcurl see on both servers: health per service, reflection, message limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from phalanx.rpc import MAX_MESSAGE_BYTES
from phalanx.v1 import coordinator_pb2
from tests.harness import start_coordinator, start_echo_site, stop_sites


@pytest.mark.parametrize("server", ["coordinator", "trainer"])
async def test_health_and_reflection_answer_on_both_servers(tmp_path: Path, server: str) -> None:
    coordinator = await start_coordinator(tmp_path)
    site = await start_echo_site(coordinator.address, 0)
    address, service = {
        "coordinator": (coordinator.address, "phalanx.v1.CoordinatorService"),
        "trainer": (site.node.address, "phalanx.v1.TrainerService"),
    }[server]

    def probe() -> tuple[list[str], list[str], set[int]]:
        """A plain blocking client, as grpcurl or an orchestrator would be (in a thread: the servers share this loop)."""
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status for name in ("", service)}
            return list(ProtoReflectionDescriptorDatabase(channel).get_services()), reflect_v1(channel), statuses

    try:
        services, services_v1, statuses = await asyncio.wait_for(asyncio.to_thread(probe), timeout=30)
    finally:
        await stop_sites([site])
        await coordinator.close()
    expected = {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
    assert expected <= set(services) and expected <= set(services_v1)
    assert statuses == {health_pb2.HealthCheckResponse.SERVING}


def reflect_v1(channel: grpc.Channel) -> list[str]:
    """List the services through reflection v1, as grpcurl asks first; and describe v1 itself."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    listed, described = list(call(iter(requests), timeout=5))
    assert described.WhichOneof("message_response") == "file_descriptor_response", described
    return [s.name for s in listed.list_services_response.service]


async def test_messages_over_the_shared_size_limit_are_refused(tmp_path: Path) -> None:
    coordinator = await start_coordinator(tmp_path)
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            register = channel.unary_unary(
                "/phalanx.v1.CoordinatorService/Register",
                request_serializer=coordinator_pb2.RegisterRequest.SerializeToString,
                response_deserializer=coordinator_pb2.RegisterResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await register(coordinator_pb2.RegisterRequest(name="x" * (MAX_MESSAGE_BYTES + 1)), timeout=5)
    finally:
        await coordinator.close()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
