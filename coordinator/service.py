"""The CoordinatorService servicer: admission checks, then the registry does the work.

With TLS, a site is who its certificate says: the name in the request may only repeat it, and
the address it registers must be one its certificate was issued for. Without TLS (loopback, or
--insecure), the request's name is taken after the same checks on its form. A federation for one
run admits only sites with that run's labels and adapter layout; one serving many runs admits
any, and each run finds out from the sites' answers whether they can serve it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from coordinator.ranks import lora_rank, with_rank
from coordinator.registry import RegistrationRefused, Registry
from phalanx.codec import AdapterError, check_layout, parse_manifest
from phalanx.identity import AddressError, check_address, check_site_name, is_loopback, printable
from phalanx.pki import ROLE_SITE
from phalanx.rpc import require_peer
from phalanx.v1 import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from coordinator.run import Admission

log = logging.getLogger(__name__)

MAX_LABELS = 10_000
MIN_TRAINER_PORT = 1024


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        registry: Registry,
        *,
        admission: Admission | None,
        heartbeat_interval: float,
        run_state: Callable[[], int],
        secure: bool,
        insecure_remote: bool = False,
    ) -> None:
        """`secure`: identities come from client certificates. `insecure_remote`: without TLS,
        accept trainer addresses off this machine (--insecure); otherwise only loopback ones."""
        self._registry = registry
        self._admission = admission
        self._heartbeat_interval = heartbeat_interval
        self._run_state = run_state
        self._secure = secure
        self._insecure_remote = insecure_remote

    async def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        name = await self._site_name(request.name, context)
        await self._check_address(name, request.address, context)
        allowlist = self._registry.allowlist
        if allowlist is not None and not allowlist.allows(name):
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, name, f"site {name} is not in the coordinator's --allow-sites")
        admission = self._admission
        if len(request.label_names) > MAX_LABELS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_LABELS} label names")
        if admission is not None and tuple(request.label_names) != admission.label_names:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                name,
                f"label sets differ: trainer has {printable(list(request.label_names))}, run has {list(admission.label_names)}",
            )
        try:
            layout = parse_manifest(request.adapter_layout)
            rank = lora_rank(layout)
            if admission is not None and admission.mixed_ranks:
                check_layout(layout, with_rank(admission.layout, rank))
            elif admission is not None:
                check_layout(layout, admission.layout)
        except AdapterError as exc:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                name,
                f"adapter layout differs (model or LoRA settings?): {printable(exc, 200)}",
            )
        try:
            entry = await self._registry.register(
                name=name,
                address=request.address,
                partition=request.partition,
                num_train_examples=request.num_train_examples,
                num_test_examples=request.num_test_examples,
                lora_rank=rank,
                capabilities=request.capabilities,
            )
        except RegistrationRefused as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return coordinator_pb2.RegisterResponse(
            trainer_id=entry.trainer_id,
            run_id=admission.run_id if admission is not None else "",
            heartbeat_interval_seconds=self._heartbeat_interval,
            last_round=admission.last_round if admission is not None else 0,
        )

    @staticmethod
    async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, site: str, reason: str) -> None:
        """Refuse a registration, and say so in the coordinator's log: otherwise it would just wait on."""
        log.warning("refused the registration of site %s: %s", site, reason)
        await context.abort(code, reason)

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        name = (await require_peer(context, ROLE_SITE)).name if self._secure else None
        if not self._registry.heartbeat(request.trainer_id, name):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown trainer id {printable(request.trainer_id)}; register again"
            )
        return coordinator_pb2.HeartbeatResponse(state=self._run_state())

    async def _site_name(self, claimed: str, context: grpc.aio.ServicerContext) -> str:
        """The registering site's name: its certificate's, or with no TLS the one it claims, once checked."""
        if self._secure:
            name = (await require_peer(context, ROLE_SITE)).name
            if claimed and claimed != name:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the certificate is site {printable(name)}'s; it cannot register as {printable(claimed)}",
                )
            return name
        try:
            return check_site_name(claimed)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad site name: {exc}")

    async def _check_address(self, name: str, address: str, context: grpc.aio.ServicerContext) -> None:
        """The address must be host:port, and a host the coordinator may dial for this site."""
        try:
            host, port = check_address(address)
        except AddressError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if port < MIN_TRAINER_PORT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"trainer port {port} is refused: ports below {MIN_TRAINER_PORT} belong to system services",
            )
        if self._secure:
            hosts = (await require_peer(context, ROLE_SITE)).hosts
            if host.lower() not in {h.lower() for h in hosts}:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"site {name}'s certificate is not valid for host {printable(host)} (it names {sorted(hosts)[:8]})",
                )
        elif not self._insecure_remote and not is_loopback(host):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"plaintext coordinator: only loopback trainer addresses are accepted, got {printable(host)}",
            )
