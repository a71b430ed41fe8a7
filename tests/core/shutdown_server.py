"""A tiny Horde server for the SIGTERM tests (run as a subprocess by test_shutdown.py).

Usage: python shutdown_server.py GRACE_S [--stuck-cleanup]

Exits 130 when a second signal hurried the shutdown. With --stuck-cleanup its clean-up (on_stop)
logs "cleanup_started" and never ends, so only a third signal stops it.

Prints "READY <port> <identity>" on stdout once the signal handlers are installed, logs JSON lines
on stderr, and serves MinerService.RunSyntheticRound as one response followed by a wait that only
ends when the RPC is cancelled (so a shutdown always has an RPC in flight to drain).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import structlog
from horde.v1 import miner_pb2, miner_pb2_grpc

from horde_services.core.auth import AllowAll, Authenticator
from horde_services.core.identity import Ed25519Signer
from horde_services.core.logging import configure_logging
from horde_services.core.server import ServiceRegistration, create_server, serve_until_signal

log = structlog.get_logger("shutdown_server")


class Servicer(miner_pb2_grpc.MinerServiceServicer):  # type: ignore[misc]
    async def RunSyntheticRound(
        self, request: miner_pb2.RunSyntheticRoundRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[miner_pb2.RunSyntheticRoundResponse]:
        yield miner_pb2.RunSyntheticRoundResponse(executor_id="first")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.info("in_flight_rpc_cancelled")
            raise


async def background() -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        log.info("background_cancelled")
        raise


async def stuck_cleanup() -> None:
    log.info("cleanup_started")
    await asyncio.Event().wait()


async def cleanup() -> None:
    log.info("cleanup_done")


async def main(grace_s: float, stuck: bool) -> bool:
    configure_logging("info", json=True, stream=sys.stderr)
    me = Ed25519Signer.generate()
    running = await create_server(
        "127.0.0.1:0",
        [
            ServiceRegistration(
                "horde.v1.MinerService",
                miner_pb2_grpc.add_MinerServiceServicer_to_server,
                Servicer(),
            )
        ],
        authenticator=Authenticator(me.identity, AllowAll()),
        service_label="shutdown-test",
    )

    def ready() -> None:
        print(f"READY {running.port} {me.identity}", flush=True)

    return await serve_until_signal(
        [running],
        grace_s=grace_s,
        background=[background],
        on_ready=ready,
        on_stop=stuck_cleanup if stuck else cleanup,
    )


if __name__ == "__main__":
    hurried = asyncio.run(main(float(sys.argv[1]), "--stuck-cleanup" in sys.argv[2:]))
    sys.exit(130 if hurried else 0)
