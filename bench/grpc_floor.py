"""The floor under a round: the same calls in bare grpc.aio, with nothing of Phalanx in them.

`round_overhead` compares each case with this reference, measured in the same run on the same
machine. N bare servers (one port each, as N echo trainers have) run in a child process; this
process opens one channel to each and, per round, makes on every channel the calls a round
makes, with the same messages in number and size: a bidirectional call that sends a header and
the adapter's chunks and receives a header and the chunks back, then a client-streaming call that
sends a header and the chunks and receives a short reply. Requests and replies are plain bytes:
no protobuf, no codec, no checks, no aggregation, no interceptors, no telemetry.

With `--tls`, the same calls run over mutual TLS as Phalanx makes them: a throwaway CA, each
server requiring the client's certificate, the client checking each server's site identity.
That is the floor of an mTLS round: what gRPC's TLS itself costs for these messages.

    python -m bench.grpc_floor --trainers 8 --params 74883   # print the floor of one case
    python -m bench.grpc_floor --trainers 8 --unary          # one unary echo per trainer instead
    python -m bench.grpc_floor --trainers 8 --tls            # the same over mutual TLS
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import DEFAULT_PARAMS
from phalanx.codec import CHUNK_BYTES, layout_of, manifest_of
from phalanx.pki import COORDINATOR_NAME, provision, site_san
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


FLOOR_SITE = "floor"
"""The one site certificate every floor server presents."""


def _read(certs: Path, name: str) -> tuple[bytes, bytes, bytes]:
    """The CA certificate, and `name`'s certificate and key, from a provisioned folder."""
    return tuple((certs / f).read_bytes() for f in ("ca.pem", f"{name}.pem", f"{name}.key"))  # type: ignore[return-value]


def _port(server: grpc.aio.Server, certs: Path | None) -> int:
    if certs is None:
        return server.add_insecure_port("127.0.0.1:0")
    ca, cert, key = _read(certs, FLOOR_SITE)
    return server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    )


def _channel(port: str, certs: Path | None) -> grpc.aio.Channel:
    if certs is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    ca, cert, key = _read(certs, COORDINATOR_NAME)
    options = [*OPTIONS, ("grpc.ssl_target_name_override", site_san(FLOOR_SITE))]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca, key, cert), options=options)


async def serve(count: int, certs: Path | None) -> None:
    """`count` servers on ephemeral loopback ports (mTLS with `certs`); print the ports, serve until stdin closes."""
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
        servers.append((server, _port(server, certs)))
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


async def measure(
    trainers: int, params: int, rounds: int, warmup: int = 2, unary: bool = False, tls: bool = False
) -> list[float]:
    """Seconds of each round after `warmup`: every channel's two calls, all channels at once.

    With `unary`, a round is one unary call per channel that sends the adapter's bytes and gets
    them back: the least that any round moving the adapter both ways over gRPC could cost. With
    `tls`, every channel is mutual TLS.
    """
    with tempfile.TemporaryDirectory(prefix="phalanx-floor-") as tmp:
        certs = None
        if tls:
            certs = Path(tmp) / "pki"
            provision(certs, [FLOOR_SITE], ["127.0.0.1"])
        return await _measure(trainers, params, rounds, warmup, unary, certs)


async def _measure(
    trainers: int, params: int, rounds: int, warmup: int, unary: bool, certs: Path | None
) -> list[float]:
    one_round = _one_unary_call if unary else _one_round
    serve_tls = ["--certs", str(certs)] if certs else []
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(trainers), *serve_tls],
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
        channels = [_channel(port, certs) for port in ports]
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
    parser.add_argument("--tls", action="store_true", help="the same calls over mutual TLS")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.unary and sum(len(m) for m in messages_of(args.params)) > MAX_MESSAGE_BYTES:
        parser.error(f"--unary sends the adapter in one message: --params must fit in {MAX_MESSAGE_BYTES} bytes")
    if args.serve:
        asyncio.run(serve(args.serve, args.certs))
        return
    seconds = asyncio.run(measure(args.trainers, args.params, args.rounds, unary=args.unary, tls=args.tls))
    calls = "one unary echo per trainer" if args.unary else f"{len(messages_of(args.params)) - 1}-chunk round"
    print(
        f"N={args.trainers} P={args.params:,}, {calls}: bare grpc.aio{' over mTLS' if args.tls else ''} median "
        f"{1e3 * statistics.median(seconds):.1f} ms over {len(seconds)} rounds"
    )


if __name__ == "__main__":
    main()
