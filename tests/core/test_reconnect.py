"""A peer that went away and came back is dialled again within seconds (gRPC's own backoff grows
to two minutes, longer than a validator waits to route a job to a miner that restarted)."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from horde_services.core.server import open_channel

pytestmark = pytest.mark.timeout(90)


async def _health_server(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


async def _check(channel: grpc.aio.Channel) -> bool:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_a_peer_back_after_an_outage_is_reached_within_seconds() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = await _health_server(port)
    async with open_channel(f"127.0.0.1:{port}") as channel:
        assert await _check(channel)
        await server.stop(None)
        # Down for 25 s, called twice a second meanwhile: gRPC's default backoff (1 s, x1.6, up
        # to 120 s) would by now wait around 10 s between attempts.
        down_until = time.monotonic() + 25
        while time.monotonic() < down_until:
            assert not await _check(channel)
            await asyncio.sleep(0.5)  # the outage's length, not a synchronisation
        server = await _health_server(port)
        try:
            back = time.monotonic()
            while not await _check(channel):
                assert time.monotonic() - back < 10, "never reconnected"
                await asyncio.sleep(0.1)
            took = time.monotonic() - back
        finally:
            await server.stop(None)
    # Our ceiling is 2 s plus gRPC's 20% jitter.
    assert took < 3.5, f"reconnected only after {took:.1f} s"
