"""A TCP proxy on loopback that injects network faults between a gRPC client and server.

Bytes flow through unchanged until a fault is set; faults apply per direction ("up": client to
server, "down": server to client) and to connections already open:
- `partition()`: black-hole both directions (connections stay open, nothing arrives), as a
  pulled cable or a dropped route does; `heal()` forwards again.
- `delay_seconds`: hold every read this long before forwarding it.
- `throttle(direction, bytes_per_second)`: forward at most that rate.
- `truncate_after(direction, nbytes)`: forward that many more bytes, then reset the connections.
"""

from __future__ import annotations

import asyncio
import contextlib

READ_BYTES = 16 * 1024


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target
        self.delay_seconds = 0.0
        self.forwarded = {"up": 0, "down": 0}
        self._open = asyncio.Event()
        self._open.set()
        self._rate: dict[str, float] = {}
        self._budget: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self.address

    def partition(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def throttle(self, direction: str, bytes_per_second: float) -> None:
        self._rate[direction] = bytes_per_second

    def truncate_after(self, direction: str, nbytes: int) -> None:
        self._budget[direction] = nbytes

    def reset(self) -> None:
        """Clear every fault."""
        self.delay_seconds = 0.0
        self._rate.clear()
        self._budget.clear()
        self.heal()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._connections:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        self._connections |= {client_writer, server_writer}
        for task in (
            asyncio.create_task(self._pipe("up", client_reader, server_writer, client_writer)),
            asyncio.create_task(self._pipe("down", server_reader, client_writer, server_writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(READ_BYTES):
                if self.delay_seconds:
                    await asyncio.sleep(self.delay_seconds)
                await self._open.wait()
                budget = self._budget.get(direction)
                if budget is not None:
                    data = data[:budget]
                    self._budget[direction] = budget - len(data)
                if rate := self._rate.get(direction):
                    await asyncio.sleep(len(data) / rate)
                await self._open.wait()
                writer.write(data)
                await writer.drain()
                self.forwarded[direction] += len(data)
                if budget is not None and self._budget[direction] == 0:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, other):
                with contextlib.suppress(Exception):
                    w.transport.abort()
