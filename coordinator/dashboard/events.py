"""Server-sent events for one open page: the selected run as it happens, the runs and the sites.

Each event's data is one line of JSON:

    runs      every run's record, oldest first: on connect, then when it changes
    sites     {"now": Unix time, "sites": [...]}: on connect, then when a site comes, goes or is heard from
    run       the selected run's record: on connect, then when it changes
    rows      the selected run's rows so far: on connect (and again should they be cut back)
    row       {"index": i, "row": {...}}: each new row of the selected run
    progress  the selected run's progress snapshot (null when it is not executing here): on connect,
              then on change, at most 1 / MIN_INTERVAL_SECONDS times a second

A comment keeps an idle stream open. The stream ends when the client goes away or the dashboard closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from coordinator.dashboard.sources import RunSource
from coordinator.progress import RunProgress

MIN_INTERVAL_SECONDS = 0.25
"""Changes that come faster are sent together."""
TICK_SECONDS = 1.0
"""How often the runs, the sites and the run's record are looked at for changes."""
KEEPALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 2000
"""How long a browser waits before it connects again after a dropped stream."""


def json_text(value: Any) -> str:
    """`value` as JSON on one line, with NaN and infinities as null (browsers refuse them)."""
    return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class EventStream:
    def __init__(self, source: RunSource, run_id: str) -> None:
        """`run_id`: the selected run, or "" for only the runs and the sites."""
        self._source = source
        self._run_id = run_id
        self._wake = asyncio.Event()
        self._ended = False
        self._progress: RunProgress | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._due = {"tick": True, "rows": bool(run_id), "progress": bool(run_id)}
        self._rows_sent: int | None = None
        self._sent: dict[str, str] = {}  # runs, sites and run: the last data sent
        self._response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        self._written = time.monotonic()

    def end(self) -> None:
        """End the stream soon (the dashboard is closing)."""
        self._ended = True
        self._wake.set()

    async def serve(self, request: web.Request) -> web.StreamResponse:
        await self._response.prepare(request)
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            await self._write(f"retry: {RETRY_MILLISECONDS}\n\n")
            while not self._ended and request.transport is not None and not request.transport.is_closing():
                if self._due["tick"] or loop.time() >= next_tick:
                    await self._tick()
                    next_tick = loop.time() + TICK_SECONDS
                await self._push()
                if time.monotonic() - self._written >= KEEPALIVE_SECONDS:
                    await self._write(": keep-alive\n\n")
                await asyncio.sleep(MIN_INTERVAL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - loop.time()))
                self._wake.clear()
        except ConnectionError:  # the client went away while an event was written
            pass
        finally:
            self._follow(None)
        return self._response

    async def _tick(self) -> None:
        """Follow the run's progress if it started executing, and send what changed of the runs, sites and run."""
        self._due["tick"] = False
        if self._run_id and (progress := self._source.progress(self._run_id)) is not None:
            self._follow(progress)
        await self._send_changed("runs", await self._source.runs())
        sites = self._source.sites()
        if json_text(sites) != self._sent.get("sites"):
            self._sent["sites"] = json_text(sites)
            await self._send("sites", {"now": round(time.time(), 3), "sites": sites})
        if self._run_id:
            await self._send_changed("run", await self._source.run(self._run_id))

    async def _push(self) -> None:
        """Send the run's new rows and its progress, if they changed."""
        if self._due["rows"]:
            self._due["rows"] = False
            rows = await self._source.rows(self._run_id)
            if self._rows_sent is None or len(rows) < self._rows_sent:
                await self._send("rows", rows)
            else:
                for index in range(self._rows_sent, len(rows)):
                    await self._send("row", {"index": index, "row": rows[index]})
            self._rows_sent = len(rows)
        if self._due["progress"]:
            self._due["progress"] = False
            await self._send("progress", self._progress.snapshot() if self._progress is not None else None)

    def _follow(self, progress: RunProgress | None) -> None:
        """Listen to `progress` (None: to nothing); a served run gets its progress when it starts executing."""
        if progress is self._progress:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._progress = progress
        if progress is not None:
            self._unsubscribe = progress.subscribe(self._on_event)
            self._due.update(rows=True, progress=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        self._due["progress"] = True
        if event["kind"] == "round":
            self._due["rows"] = True
        elif event["kind"] == "finished":
            self._due["tick"] = True  # the run's state changes with it
        self._wake.set()

    async def _send_changed(self, kind: str, data: Any) -> None:
        text = json_text(data)
        if text != self._sent.get(kind):
            self._sent[kind] = text
            await self._write(f"event: {kind}\ndata: {text}\n\n")

    async def _send(self, kind: str, data: Any) -> None:
        await self._write(f"event: {kind}\ndata: {json_text(data)}\n\n")

    async def _write(self, text: str) -> None:
        await self._response.write(text.encode())
        self._written = time.monotonic()
