"""The floor under a round: the same calls in bare grpc.aio, with nothing of Phalanx in them.

`round_overhead` compares each case with this reference, measured in the same run on the same
machine. N bare servers (one port each, as N echo trainers have) run in a child process; this
process opens one channel to each and, per round, makes on every channel the calls a round
makes, with the same messages in number and size: a bidirectional call that sends a header and
the adapter's chunks and receives a header and the chunks back, then a client-streaming call that
sends a header and the chunks and receives a short reply. Requests and replies are plain bytes:
no protobuf, no codec, no checks, no aggregation, no interceptors, no telemetry.

    python -m bench.grpc_floor --trainers 8 --params 74883   # print the floor of one case
    python -m bench.grpc_floor --trainers 8 --unary          # one unary echo per trainer instead
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.common import DEFAULT_PARAMS
from phalanx.codec import CHUNK_BYTES, layout_of, manifest_of
from phalanx.rpc import MAX_MESSAGE_BYTES
from phalanx.v1 import trainer_pb2
from trainer.echo import synthetic_adapter

REPO = Path(__file__).resolve().parents[1]
SERVICE = "bench.Floor"
REPLY = bytes(40)
"""About the size of an EvaluateResponse."""
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def messages_of(params: int) -> list[bytes]:
    """Bytes as many and as large as a Train request: a header with the echo adapter's manifest, then its chunks."""
    header = trainer_pb2.TrainRequest(
        header=trainer_pb2.TrainHeader(run_id="bench", adapter=manifest_of(layout_of(synthetic_adapter(params))))
    )
    size = 4 * params
    return [header.SerializeToString()] + [bytes(min(CHUNK_BYTES, size - at)) for at in range(0, size, CHUNK_BYTES)]


async def _echo(requests, context):
    received = [message async for message in requests]
    for message in received:
        yield message


async def _swallow(requests, context) -> bytes:
    async for _ in requests:
        pass
    return REPLY


async def _return(request: bytes, context) -> bytes:
    return request


async def serve(count: int) -> None:
    """`count` servers on ephemeral loopback ports; print the ports, serve until stdin closes."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Train": grpc.stream_stream_rpc_method_handler(_echo),
            "Evaluate": grpc.stream_unary_rpc_method_handler(_swallow),
            "Echo": grpc.unary_unary_rpc_method_handler(_return),
        },
    )
    servers = []
    for _ in range(count):
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        servers.append((server, server.add_insecure_port("127.0.0.1:0")))
        await server.start()
    print(" ".join(str(port) for _, port in servers), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await asyncio.gather(*(server.stop(None) for server, _ in servers))


async def _one_round(channel: grpc.aio.Channel, messages: list[bytes]) -> None:
    async for _ in channel.stream_stream(f"/{SERVICE}/Train")(iter(messages)):
        pass
    await channel.stream_unary(f"/{SERVICE}/Evaluate")(iter(messages))


async def _one_unary_call(channel: grpc.aio.Channel, messages: list[bytes]) -> None:
    await channel.unary_unary(f"/{SERVICE}/Echo")(b"".join(messages))


async def measure(trainers: int, params: int, rounds: int, warmup: int = 2, unary: bool = False) -> list[float]:
    """Seconds of each round after `warmup`: every channel's two calls, all channels at once.

    With `unary`, a round is one unary call per channel that sends the adapter's bytes and gets
    them back: the least that any round moving the adapter both ways over gRPC could cost.
    """
    one_round = _one_unary_call if unary else _one_round
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(trainers)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        ports = (await asyncio.to_thread(child.stdout.readline)).split()
        if len(ports) != trainers:
            raise RuntimeError(f"the floor's servers did not start (exit code {child.poll()})")
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for port in ports]
        messages = messages_of(params)
        seconds: list[float] = []
        for _ in range(warmup + rounds):
            started = time.perf_counter()
            await asyncio.gather(*(one_round(channel, messages) for channel in channels))
            seconds.append(time.perf_counter() - started)
        await asyncio.gather(*(channel.close() for channel in channels))
        return seconds[warmup:]
    finally:
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", type=int, default=8)
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--unary", action="store_true", help="one unary call per trainer that echoes the adapter's bytes, not a round's calls"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.unary and sum(len(m) for m in messages_of(args.params)) > MAX_MESSAGE_BYTES:
        parser.error(f"--unary sends the adapter in one message: --params must fit in {MAX_MESSAGE_BYTES} bytes")
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    seconds = asyncio.run(measure(args.trainers, args.params, args.rounds, unary=args.unary))
    calls = "one unary echo per trainer" if args.unary else f"{len(messages_of(args.params)) - 1}-chunk round"
    print(
        f"N={args.trainers} P={args.params:,}, {calls}: bare grpc.aio median "
        f"{1e3 * statistics.median(seconds):.1f} ms over {len(seconds)} rounds"
    )


if __name__ == "__main__":
    main()
