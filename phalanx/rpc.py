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
- health and reflection: every server answers grpc.health.v1 and server reflection (v1 and
  v1alpha), so orchestrators and grpcurl can probe it.
- TLS: with `TlsCredentials`, servers require and verify a client certificate from the
  federation's CA (mutual TLS) and channels present their own; `require_peer` reads the verified
  identity at the top of a handler. Without credentials, traffic is plaintext, which
  `check_plaintext` allows only on loopback unless the user opted in with --insecure.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from phalanx import reflection
from phalanx.codec import CHUNK_BYTES
from phalanx.identity import AddressError, Identity, check_address, identity_of, is_loopback, printable
from phalanx.streams import discard_rest
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


PROVISION_HINT = (
    "provision certificates with `python -m phalanx.pki --out certs --sites SITE,... --hosts HOST,...` "
    "and pass --ca certs/ca.pem --cert certs/NAME.pem --key certs/NAME.key"
)


class TlsError(ValueError):
    """Certificates that cannot be used, or plaintext where it is not allowed."""


@dataclass(frozen=True)
class TlsCredentials:
    """The federation's CA certificate and this process's own certificate and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path) -> TlsCredentials:
        try:
            return cls(ca.read_bytes(), cert.read_bytes(), key.read_bytes())
        except OSError as exc:
            raise TlsError(f"cannot read a TLS file: {exc}") from exc

    @property
    def identity(self) -> Identity:
        """Who this process is to its peers: the name and role in its own certificate."""
        return identity_of(self.cert)


def check_plaintext(address: str, tls: TlsCredentials | None, insecure: bool, *, listening: bool) -> None:
    """Refuse plaintext on (`listening`) or to a non-loopback `address` unless the user passed --insecure."""
    if tls is not None or insecure:
        return
    host, _ = check_address(address, listening=listening)
    if not is_loopback(host):
        what = "listen on" if listening else "connect to"
        raise TlsError(f"refusing to {what} {address} without TLS: {PROVISION_HINT}, or pass --insecure for plaintext")


def check_port_free(address: str) -> None:
    """Raise AddressError if nothing could listen on `address` now (the port is taken, or the host is
    not this machine's), so a command can say so before it spends minutes loading. Port 0 always passes."""
    host, port = check_address(address, listening=True)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressError(f"cannot listen on {printable(address)}: {exc.strerror}") from None
    family, kind, protocol, _, where = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a port in TIME_WAIT is free
        try:
            probe.bind(where)
        except OSError as exc:
            raise AddressError(f"cannot listen on {printable(address)}: {exc.strerror}") from None


def create_channel(
    target: str, telemetry: Telemetry, tls: TlsCredentials | None = None, *, server_name: str = ""
) -> grpc.aio.Channel:
    """A channel to `target` (host:port) with tracing; create it inside a coroutine.

    With `tls` the channel verifies the server's certificate against the CA and presents its own;
    `server_name` replaces the target's host as the name the server's certificate must hold.
    """
    interceptors = telemetry.client_interceptors()
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=interceptors)
    options = _CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


async def require_peer(
    context: grpc.aio.ServicerContext, role: str, requests: AsyncIterable[Any] | None = None
) -> Identity:
    """The caller's verified identity; abort the call unless its certificate has `role`.

    UNAUTHENTICATED without a verified certificate, PERMISSION_DENIED for another role. Call it
    first in a handler: nothing of a refused request is used. For a request stream, pass it as
    `requests`: what the caller is still sending is dropped first, so it sees the status that
    names the refusal rather than an internal error.
    """
    certs = context.auth_context().get("x509_pem_cert")
    if certs:
        identity = identity_of(certs[0])
        if identity.role == role:
            return identity
        code = grpc.StatusCode.PERMISSION_DENIED
        message = f"only the {role} may call this; the caller's certificate is {identity.role or 'no role'} {printable(identity.name)}"
    else:
        code, message = grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the federation's CA is required"
    if requests is not None:
        await discard_rest(requests)
    await context.abort(code, message)


class Server:
    """A grpc.aio server with health and reflection, bound to one address."""

    def __init__(self, telemetry: Telemetry, service_names: Sequence[str], tls: TlsCredentials | None = None) -> None:
        self.grpc_server = grpc.aio.server(interceptors=telemetry.server_interceptors(), options=_SERVER_OPTIONS)
        self._service_names = tuple(service_names)
        self._tls = tls
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.grpc_server)
        reflection.enable(self.grpc_server, (*self._service_names, health.SERVICE_NAME))
        self.port = 0

    async def start(self, address: str) -> int:
        """Bind `address` (port 0 picks a free one), start serving, and return the bound port.

        With TLS, every client must present a certificate from the federation's CA.
        """
        if self._tls is None:
            self.port = self.grpc_server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(self._tls.key, self._tls.cert)], root_certificates=self._tls.ca, require_client_auth=True
            )
            self.port = self.grpc_server.add_secure_port(address, credentials)
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
