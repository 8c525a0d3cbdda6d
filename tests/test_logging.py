"""`--log-level DEBUG` shows our debug lines, not grpc's asyncio internals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import logging

    import grpc

    from phalanx.cli import configure_logging

    configure_logging("DEBUG", "test")
    log = logging.getLogger("coordinator.test")


    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        log.debug("echoing %d bytes", len(request))
        return request


    async def main() -> None:
        server = grpc.aio.server()
        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(3):
                assert await channel.unary_unary("/test.Echo/Echo")(b"ping") == b"ping"
        await server.stop(None)


    asyncio.run(main())
    """
)


def test_debug_level_logs_ours_but_not_grpcs_running_loop_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sum("test DEBUG coordinator.test: echoing 4 bytes" in line for line in lines) == 3
    assert not [
        line for line in lines if "Loaded running loop" in line or (" grpc." in line and " DEBUG " in line)
    ]
