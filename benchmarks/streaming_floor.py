"""What the streaming design costs at the least, measured beside the streaming benchmark.

Every request through Horde crosses one gRPC round trip (client <-> gateway: the client API is a
gRPC stream), one framed-TCP round trip (gateway <-> job proxy), one Ed25519 signature (the job
proxy) and two verifications (gateway and client, DESIGN.md: "the gateway and client reject a
receipt..."), on top of what the direct path does. This module measures each of those alone, on
this machine, with nothing else in the way:

    python -m benchmarks.streaming_floor grpc     a grpc.aio echo server (prints its port)
    python -m benchmarks.streaming_floor framed   a framed-TCP echo server (prints its port)

`floor()` runs a ping-pong client against each (1 KiB, its own process as the server, both on
uvloop; with 1 and with 16 streams at once), times pynacl signing and verification, and returns
the figures: round trip p50 (1 stream) and the CPU both ends spend per round trip.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import nacl.signing

from horde_services.core.loop import run as run_loop

PAYLOAD = 1024
ROUND_TRIPS = 2000
STREAMS = (1, 16)  # concurrent streams (CPU per round trip falls as messages batch)
WARMUP = 200
_METHOD = "/horde.bench.Echo/Stream"


def _ident(data: bytes) -> bytes:
    return data


async def _grpc_server() -> None:
    async def echo(requests: Any, context: grpc.aio.ServicerContext) -> None:
        async for msg in requests:
            await context.write(msg)

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(echo, _ident, _ident)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("horde.bench.Echo", {"Stream": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _framed_server() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                writer.write(head + await reader.readexactly(int.from_bytes(head, "big")))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def process_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Rounds = Callable[[int, int, int], Awaitable[list[float]]]  # port, round trips, streams


async def _ping_pong(kind: str, rounds: Rounds) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.streaming_floor", kind, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            port = int(await proc.stdout.readline())
        await rounds(port, WARMUP, 1)
        out: dict[str, float] = {}
        for streams in STREAMS:
            server0, client0 = process_cpu_s(proc.pid), time.process_time()
            rtts = await rounds(port, ROUND_TRIPS, streams)
            cpu = process_cpu_s(proc.pid) - server0 + time.process_time() - client0
            out[f"cpu_us_per_round_trip_{streams}"] = round(cpu / ROUND_TRIPS * 1e6, 1)
            if streams == 1:
                out["rtt_p50_ms"] = round(statistics.median(rtts) * 1000, 3)
    finally:
        proc.terminate()
        await proc.wait()
    return out


async def _grpc_rounds(port: int, n: int, streams: int) -> list[float]:
    body = os.urandom(PAYLOAD)
    out: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # shared, as sessions

        async def one() -> None:
            call = channel.stream_stream(_METHOD, request_serializer=_ident)()
            for _ in range(n // streams):
                t0 = time.perf_counter()
                await call.write(body)
                await call.read()
                out.append(time.perf_counter() - t0)
            await call.done_writing()

        await asyncio.gather(*(one() for _ in range(streams)))
    return out


async def _framed_rounds(port: int, n: int, streams: int) -> list[float]:
    frame = PAYLOAD.to_bytes(4, "big") + os.urandom(PAYLOAD)
    out: list[float] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n // streams):
            t0 = time.perf_counter()
            writer.write(frame)
            await reader.readexactly(4 + PAYLOAD)
            out.append(time.perf_counter() - t0)
        writer.close()

    await asyncio.gather(*(one() for _ in range(streams)))
    return out


def _crypto_us() -> dict[str, float]:
    key = nacl.signing.SigningKey.generate()
    blob = os.urandom(128)  # a receipt blob's size
    signature = key.sign(blob).signature
    verify_key = key.verify_key
    n = 2000
    return {
        "ed25519_sign_us": round(timeit.timeit(lambda: key.sign(blob), number=n) / n * 1e6, 1),
        "ed25519_verify_us": round(
            timeit.timeit(lambda: verify_key.verify(blob, signature), number=n) / n * 1e6, 1
        ),
    }


async def floor() -> dict[str, float]:
    """The figures, prefixed by what they measure."""
    figures: dict[str, float] = {}
    for name, value in (await _ping_pong("grpc", _grpc_rounds)).items():
        figures[f"grpc_{name}"] = value
    for name, value in (await _ping_pong("framed", _framed_rounds)).items():
        figures[f"framed_tcp_{name}"] = value
    figures.update(_crypto_us())
    return figures


def main() -> None:
    run_loop(_grpc_server() if sys.argv[1] == "grpc" else _framed_server())


if __name__ == "__main__":
    main()
