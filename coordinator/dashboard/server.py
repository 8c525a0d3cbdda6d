"""The live dashboard (`--dashboard HOST:PORT`): a page and its JSON, served by aiohttp on the coordinator's event loop.

    GET /                       the page
    GET /static/{name}          its script and style sheet (shipped in this package: no CDN)
    GET /api/runs               every run's record, oldest first
    GET /api/runs/{id}          {"run": its record, "progress": its live progress snapshot, or null}
    GET /api/runs/{id}/rows     its rows (the lines of its metrics.jsonl)
    GET /api/sites              {"now": Unix time, "sites": the registered sites}
    GET /api/events?run=ID      server-sent events (`coordinator.dashboard.events`)

Who may read it (`dashboard_access`): on a loopback address, anyone on this machine, over plain
HTTP (the page shows a run's figures and its sites, never a model); elsewhere, HTTPS with an admin
certificate from the federation's CA, as the status API asks (`coordinator.http.admin_only`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

from aiohttp import web

from coordinator.admin import AdminAccess
from coordinator.dashboard.events import EventStream, json_text
from coordinator.dashboard.sources import RunSource
from coordinator.http import MAX_RUN_ID_CHARS, admin_only, error, start_site
from phalanx.identity import check_address, is_loopback, printable
from phalanx.rpc import TlsCredentials

log = logging.getLogger(__name__)

CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
MAX_STREAMS = 32
"""Event streams open at once; more are refused with 503."""
SHUTDOWN_SECONDS = 5.0
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def dashboard_access(tls: TlsCredentials | None, address: str) -> tuple[AdminAccess, TlsCredentials | None]:
    """Who may read a dashboard on `address` (HOST:PORT), and the credentials it serves with."""
    if is_loopback(check_address(address, listening=True)[0]):
        return AdminAccess(tls=False, loopback_only=True), None
    return AdminAccess(tls=tls is not None, loopback_only=False), tls


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The page's files from this package, by name: their bytes and content type."""
    folder = resources.files(__package__).joinpath("static")
    assets = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if suffix in CONTENT_TYPES:
            assets[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    return assets


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(HEADERS)


class Dashboard:
    def __init__(self, source: RunSource, access: AdminAccess, tls: TlsCredentials | None) -> None:
        self._source = source
        self._access = access
        self._tls = tls
        self._assets: dict[str, tuple[bytes, str]] = {}
        self._streams: set[EventStream] = set()
        self.app = web.Application(middlewares=[admin_only(access)])
        self.app.on_response_prepare.append(_secure)
        self.app.add_routes(
            [
                web.get("/", self.page),
                web.get("/static/{name}", self.static),
                web.get("/api/runs", self.runs),
                web.get("/api/runs/{run_id}", self.run),
                web.get("/api/runs/{run_id}/rows", self.rows),
                web.get("/api/sites", self.sites),
                web.get("/api/events", self.events),
            ]
        )
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        self.url = ""

    async def start(self, address: str) -> str:
        """Serve on `address` (port 0: a free one); return the base URL."""
        self._assets = await asyncio.to_thread(load_assets)
        self.url = await start_site(self._runner, address, self._tls)
        if not self._access.tls and not self._access.open:
            log.warning("the dashboard refuses every request: off loopback it needs TLS and an admin certificate")
        return self.url

    async def close(self) -> None:
        for stream in list(self._streams):
            stream.end()
        await self._runner.cleanup()

    async def page(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            return error(404, "no such file")
        return self._asset(name)

    async def runs(self, request: web.Request) -> web.Response:
        return _json(await self._source.runs())

    async def run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        record = await self._record(run_id)
        if isinstance(record, web.Response):
            return record
        progress = self._source.progress(run_id)
        return _json({"run": record, "progress": progress.snapshot() if progress is not None else None})

    async def rows(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        record = await self._record(run_id)
        if isinstance(record, web.Response):
            return record
        return _json(await self._source.rows(run_id))

    async def sites(self, request: web.Request) -> web.Response:
        return _json({"now": round(time.time(), 3), "sites": self._source.sites()})

    async def events(self, request: web.Request) -> web.StreamResponse:
        run_id = request.query.get("run", "")
        if run_id:
            record = await self._record(run_id)
            if isinstance(record, web.Response):
                return record
        if len(self._streams) >= MAX_STREAMS:
            return error(503, f"{MAX_STREAMS} event streams are open already")
        stream = EventStream(self._source, run_id)
        self._streams.add(stream)
        try:
            return await stream.serve(request)
        finally:
            self._streams.discard(stream)

    def _asset(self, name: str) -> web.Response:
        body, content_type = self._assets[name]
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    async def _record(self, run_id: str) -> dict[str, Any] | web.Response:
        """The run's record, or the 404 to answer."""
        if len(run_id) > MAX_RUN_ID_CHARS:
            return error(404, "no such run")
        record = await self._source.run(run_id)
        return record if record is not None else error(404, f"no run {printable(run_id)}")


def _json(data: Any) -> web.Response:
    return web.json_response(data, dumps=json_text)
