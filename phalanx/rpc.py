"""The one place where gRPC channels and servers are built, so both ends agree on limits.

Options, each set once here:
- message size: the same send and receive limit on channels and servers; chunks carry at most
  1 MiB (codec.CHUNK_BYTES), so MAX_MESSAGE_BYTES leaves room for headers.
- reconnect backoff: channels retry a lost peer from 0.5 s up to 5 s (jittered), not gRPC's 120 s.
- keepalive: both ends ping an idle connection so a dead peer or a silent network partition is
  noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, and the server allows pings that often.
  `grpc.http2.ping_timeout_ms` gets the same timeout: it bounds every ping, including those sent
  while a stream is moving data, which would otherwise wait 60 s for an answer.
- interceptors: OpenTelemetry's first (outermost), passed explicitly with our tracer provider.
- health and reflection: every server answers grpc.health.v1 and server reflection, so
  orchestrators and grpcurl can probe it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from phalanx.codec import CHUNK_BYTES
from phalanx.telemetry import Telemetry

MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
SHUTDOWN_GRACE_SECONDS = 5.0
RECONNECT_FIRST_MS = 500
RECONNECT_MAX_MS = 5_000

_COMMON_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # Ping even when no call is in flight, so idle links to trainers are checked too.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

_CHANNEL_OPTIONS = _COMMON_OPTIONS + [
    # Reconnect soon after a peer comes back (gRPC adds jitter); the default backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_FIRST_MS),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_FIRST_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
]

_SERVER_OPTIONS = _COMMON_OPTIONS + [
    # Accept the clients' keepalive pings at the rate they send them.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    # A restarted process must fail to bind rather than share a port with a stale one.
    ("grpc.so_reuseport", 0),
]


def create_channel(target: str, telemetry: Telemetry) -> grpc.aio.Channel:
    """An insecure channel to `target` (host:port) with tracing; create it inside a coroutine."""
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=telemetry.client_interceptors())


class Server:
    """A grpc.aio server with health and reflection, bound to one address."""

    def __init__(self, telemetry: Telemetry, service_names: Sequence[str]) -> None:
        self.grpc_server = grpc.aio.server(interceptors=telemetry.server_interceptors(), options=_SERVER_OPTIONS)
        self._service_names = tuple(service_names)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.grpc_server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        self.port = 0

    async def start(self, address: str) -> int:
        """Bind `address` (port 0 picks a free one), start serving, and return the bound port."""
        self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.grpc_server.start()
        await self._set_serving(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def drain(self) -> None:
        """Report NOT_SERVING on every service while still answering calls."""
        await self._set_serving(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Report NOT_SERVING, then stop, giving in-flight calls `grace` seconds."""
        await self.drain()
        await self.grpc_server.stop(grace)

    async def _set_serving(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self._health.set(name, status)
