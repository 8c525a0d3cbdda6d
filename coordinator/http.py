"""Status over HTTP for tools and people (`--http HOST:PORT`): JSON, and its OpenAPI description.

aiohttp serves it on the coordinator's own event loop. The credential rule is the admin API's
(`coordinator.admin.AdminAccess`): with TLS, HTTPS where the client presents an admin
certificate from the federation's CA (401 without one, 403 for another role); without TLS, only
a loopback-only coordinator answers.

    GET /status               the federation: address, sites registered and live, runs by state
    GET /runs                 every run: id, state (pending, running, completed, failed, stopped), ...
    GET /runs/{id}            one run, with its configuration
    GET /runs/{id}/metrics    the run's rows (its metrics.jsonl)
    GET /sites                the registered sites and their liveness
    GET /openapi.json         this API's OpenAPI 3.1 description
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator.admin import AdminAccess
from coordinator.serving import RunNotFound, ServingCoordinator
from coordinator.store import RUN_STATES
from phalanx.identity import Identity, identity_of, printable
from phalanx.pki import ROLE_ADMIN
from phalanx.rpc import TlsCredentials

MAX_RUN_ID_CHARS = 64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def server_context(tls: TlsCredentials) -> ssl.SSLContext:
    """HTTPS with this coordinator's certificate; client certificates from the federation's CA are asked
    for but optional, so that a request without one gets a 401 that says why."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as folder:  # ssl reads a certificate chain only from files
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(tls.cert)
        key.touch(mode=0o600)
        key.write_bytes(tls.key)
        context.load_cert_chain(cert, key)
    context.load_verify_locations(cadata=tls.ca.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_identity(request: web.Request) -> Identity | None:
    """The identity in the client's verified certificate, or None without one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return identity_of(ssl.DER_cert_to_PEM_cert(der).encode()) if der else None


def admin_only(access: AdminAccess) -> Middleware:
    """The admin API's rule over HTTP: with TLS an admin certificate (401 without one, 403 for another
    role); without TLS, answers only where the coordinator listens on loopback alone (403 otherwise)."""

    @web.middleware
    async def authorise(request: web.Request, handler: Handler) -> web.StreamResponse:
        if access.tls:
            identity = peer_identity(request)
            if identity is None:
                return error(401, "a client certificate with the admin role from the federation's CA is required")
            if identity.role != ROLE_ADMIN:
                return error(
                    403, f"only an admin may read this; the certificate is {identity.role or 'no role'} {printable(identity.name)}"
                )
        elif not access.open:
            return error(403, "this coordinator listens off loopback without TLS: its status needs an admin certificate")
        return await handler(request)

    return authorise


async def start_site(runner: web.AppRunner, address: str, tls: TlsCredentials | None) -> str:
    """Set up `runner` and serve it on `address` (port 0: a free one), over HTTPS with `tls`; return the base URL."""
    host, port = address.rsplit(":", 1)
    await runner.setup()
    context = server_context(tls) if tls is not None else None
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"{'https' if context else 'http'}://{host}:{bound}"


class StatusServer:
    def __init__(self, coordinator: ServingCoordinator, access: AdminAccess, tls: TlsCredentials | None) -> None:
        self._coordinator = coordinator
        self._tls = tls
        self.app = web.Application(middlewares=[admin_only(access)])
        self.app.add_routes(
            [
                web.get("/status", self.status),
                web.get("/runs", self.runs),
                web.get("/runs/{run_id}", self.run),
                web.get("/runs/{run_id}/metrics", self.metrics),
                web.get("/sites", self.sites),
                web.get("/openapi.json", self.openapi),
            ]
        )
        self._runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    async def start(self, address: str) -> str:
        """Serve on `address` (port 0: a free one); return the base URL."""
        self.url = await start_site(self._runner, address, self._tls)
        return self.url

    async def close(self) -> None:
        await self._runner.cleanup()

    async def status(self, request: web.Request) -> web.Response:
        runs = await self._coordinator.list()
        registry = self._coordinator.federation.registry
        by_state = Counter(r.state for r in runs)
        return web.json_response(
            {
                "address": self._coordinator.federation.address,
                "pid": os.getpid(),
                "started": self._coordinator.started,
                "sites_registered": len(registry.all()),
                "sites_live": len(registry.live()),
                "runs": {state: by_state.get(state, 0) for state in RUN_STATES},
            }
        )

    async def runs(self, request: web.Request) -> web.Response:
        return web.json_response([r.to_json() for r in await self._coordinator.list()])

    async def run(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        if isinstance(record, web.Response):
            return record
        hosted = self._coordinator.hosted.get(record.id)
        refused = sorted(hosted.refused.values()) if hosted is not None else []
        return web.json_response({**record.to_json(), "config": record.config, "refusals": refused})

    async def metrics(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        if isinstance(record, web.Response):
            return record
        return web.json_response(await asyncio.to_thread(self._coordinator.store.rows, record.id))

    async def sites(self, request: web.Request) -> web.Response:
        return web.json_response(self._coordinator.sites())

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def _record(self, request: web.Request) -> Any:
        run_id = request.match_info["run_id"]
        if len(run_id) > MAX_RUN_ID_CHARS:
            return error(404, "no such run")
        try:
            return await self._coordinator.get(run_id)
        except RunNotFound:
            return error(404, f"no run {printable(run_id)}")


_RUN = {
    "type": "object",
    "required": ["id", "state", "rounds", "completed_rounds", "created"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": list(RUN_STATES)},
        "reason": {"type": "string", "description": "why the run failed or stopped, or ended before its last round"},
        "rounds": {"type": "integer"},
        "completed_rounds": {"type": "integer", "description": "the latest round whose checkpoint is stored"},
        "created": {"type": "number", "description": "Unix time"},
        "started": {"type": ["number", "null"]},
        "finished": {"type": ["number", "null"]},
        "out": {"type": "string", "description": "the run's output folder on the coordinator"},
    },
}
_ERRORS = {
    "401": {"description": "no client certificate (TLS)"},
    "403": {"description": "the certificate is not an admin's, or no credential can be given"},
}


def _get(summary: str, schema: dict[str, Any], *, run: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}, **_ERRORS},
    }
    if run:
        operation["parameters"] = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        operation["responses"]["404"] = {"description": "no such run"}
    return {"get": operation}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Phalanx coordinator status", "version": "1"},
    "paths": {
        "/status": _get(
            "The federation and its runs by state",
            {
                "type": "object",
                "properties": {
                    "address": {"type": "string"},
                    "pid": {"type": "integer"},
                    "started": {"type": "number"},
                    "sites_registered": {"type": "integer"},
                    "sites_live": {"type": "integer"},
                    "runs": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            },
        ),
        "/runs": _get("Every run, oldest first", {"type": "array", "items": _RUN}),
        "/runs/{run_id}": _get(
            "One run with its configuration (TOML) and the refusals of sites that cannot serve it",
            {
                "allOf": [
                    _RUN,
                    {"properties": {"config": {"type": "string"}, "refusals": {"type": "array", "items": {"type": "string"}}}},
                ]
            },
            run=True,
        ),
        "/runs/{run_id}/metrics": _get(
            "The run's rows, one per round (the lines of its metrics.jsonl)",
            {"type": "array", "items": {"type": "object", "required": ["round", "status"]}},
            run=True,
        ),
        "/sites": _get(
            "The registered sites",
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "address": {"type": "string"},
                        "partition": {"type": "integer"},
                        "num_train_examples": {"type": "integer"},
                        "num_test_examples": {"type": "integer"},
                        "live": {"type": "boolean"},
                        "seconds_since_heard": {"type": "number"},
                    },
                },
            },
        ),
        "/openapi.json": {"get": {"summary": "This description", "responses": {"200": {"description": "OK"}}}},
    },
}
