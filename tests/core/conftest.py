"""A real authenticated gRPC server for the core tests.

`MinerTestServicer` implements just enough of `horde.v1.MinerService` to exercise the middleware:
it echoes the authenticated caller back (so tests see what reached the servicer), raises Horde
errors and plain exceptions on request, and can hold a server-streaming RPC open until the test
releases it. `start_server` builds it through `create_server` exactly as the services do.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import sqlalchemy.exc
from horde.v1 import manifest_pb2, miner_pb2, miner_pb2_grpc

from horde_services.core.auth import AllowPolicy, Authenticator, StaticPolicy
from horde_services.core.config import TLSSettings
from horde_services.core.errors import NotFound
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Signer
from horde_services.core.server import (
    RunningServer,
    ServiceRegistration,
    create_server,
    current_caller,
    open_channel,
)

SERVICE = "horde.v1.MinerService"


def sqlite_error(*, full: bool) -> sqlite3.Error:
    """A genuine SQLite error: a full database (SQLITE_FULL), or a statement in error."""
    db = sqlite3.connect(":memory:")
    try:
        if full:
            db.execute("PRAGMA max_page_count = 2")
            db.execute("CREATE TABLE t (x BLOB)")
            db.execute("INSERT INTO t VALUES (zeroblob(100000))")
        else:
            db.execute("SELEC 1")
    except sqlite3.Error as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("SQLite did not refuse")


class MinerTestServicer(miner_pb2_grpc.MinerServiceServicer):  # type: ignore[misc]
    # Round numbers that make RunSyntheticRound misbehave.
    ROUND_NOT_FOUND = 404
    ROUND_CRASH_MID_STREAM = 500

    def __init__(self) -> None:
        # When set, RunSyntheticRound waits for it between its two responses.
        self.gate: asyncio.Event | None = None
        self.stream_waiting = asyncio.Event()
        # How the last RunSyntheticRound ended: "completed" or "cancelled".
        self.stream_outcome: str | None = None
        self.stream_done = asyncio.Event()

    async def GetManifest(
        self, request: miner_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.GetManifestResponse:
        return miner_pb2.GetManifestResponse(
            manifest=manifest_pb2.MinerManifest(
                miner_hotkey=str(current_caller()), timestamp_ns=time.time_ns()
            )
        )

    async def ListReceipts(
        self, request: miner_pb2.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.ListReceiptsResponse:
        if request.cursor == "missing":
            raise NotFound("no such cursor")
        if request.cursor == "boom":
            raise RuntimeError("secret internal detail: db password is hunter2")
        if request.cursor in ("disk-full", "sql-bug"):
            raise sqlalchemy.exc.OperationalError(
                "INSERT INTO secret_table VALUES (?)",
                ("hunter2",),
                sqlite_error(full=request.cursor == "disk-full"),
            )
        return miner_pb2.ListReceiptsResponse(next_cursor=str(current_caller()))

    async def RunSyntheticRound(
        self, request: miner_pb2.RunSyntheticRoundRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[miner_pb2.RunSyntheticRoundResponse]:
        self.stream_outcome = None
        self.stream_done.clear()
        try:
            if request.round == self.ROUND_NOT_FOUND:
                raise NotFound(f"no round {request.round}")
            yield miner_pb2.RunSyntheticRoundResponse(executor_id=f"first:{current_caller()}")
            if request.round == self.ROUND_CRASH_MID_STREAM:
                raise RuntimeError("secret internal detail mid-stream")
            if self.gate is not None:
                self.stream_waiting.set()
                await self.gate.wait()
            yield miner_pb2.RunSyntheticRoundResponse(executor_id=f"second:{current_caller()}")
            self.stream_outcome = "completed"
        except asyncio.CancelledError:
            self.stream_outcome = "cancelled"
            raise
        finally:
            self.stream_done.set()


class Clock:
    """The server's clock: real time plus an offset the test can change."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


@dataclass
class Served:
    running: RunningServer
    servicer: MinerTestServicer
    signer: Signer  # the server's own identity (the callee)
    clock: Clock
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def callee(self) -> str:
        return str(self.signer.identity)

    def channel(
        self,
        signer: Signer | None = None,
        *,
        callee: str | None = None,
        tls: TLSSettings | None = None,
        server_name: str | None = None,
    ) -> grpc.aio.Channel:
        """A channel (closed at teardown); signed for this server when `signer` is given."""
        ch = open_channel(
            self.address,
            signer=signer,
            callee=callee or (self.callee if signer is not None else None),
            tls=tls,
            server_name=server_name,
        )
        self.channels.append(ch)
        return ch

    def stub(self, signer: Signer | None = None, **kw: Any) -> miner_pb2_grpc.MinerServiceStub:
        return miner_pb2_grpc.MinerServiceStub(self.channel(signer, **kw))


@dataclass
class Callers:
    hotkey: HotkeySigner  # an sr25519 Bittensor hotkey, allowed
    ed25519: Ed25519Signer  # an Ed25519 client key, allowed
    stranger: Ed25519Signer  # validly signed but not allowed


@pytest.fixture(scope="session")
def callers() -> Callers:
    return Callers(
        hotkey=HotkeySigner.generate("sr25519"),
        ed25519=Ed25519Signer.generate(),
        stranger=Ed25519Signer.generate(),
    )


StartServer = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start_server(callers: Callers) -> AsyncIterator[StartServer]:
    """Start test servers (stopped at teardown): `await start_server(tls=..., policy=...)`."""
    started: list[Served] = []

    async def _start(
        *, tls: TLSSettings | None = None, policy: AllowPolicy | None = None
    ) -> Served:
        signer = HotkeySigner.generate("sr25519")
        clock = Clock()
        servicer = MinerTestServicer()
        allow = policy or StaticPolicy(
            {str(callers.hotkey.identity), str(callers.ed25519.identity)}, "an enrolled caller"
        )
        running = await create_server(
            "127.0.0.1:0",
            [
                ServiceRegistration(
                    SERVICE, miner_pb2_grpc.add_MinerServiceServicer_to_server, servicer
                )
            ],
            authenticator=Authenticator(signer.identity, allow, clock_ns=clock),
            service_label="test",
            tls=tls,
        )
        served = Served(running=running, servicer=servicer, signer=signer, clock=clock)
        started.append(served)
        return served

    yield _start
    for served in started:
        for ch in served.channels:
            await ch.close()
        await served.running.server.stop(None)


@pytest.fixture
async def served(start_server: StartServer) -> Served:
    """One plaintext test server allowing `callers.hotkey` and `callers.ed25519`."""
    return await start_server()
