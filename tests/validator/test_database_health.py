"""A validator whose database goes away says so in its health (NOT_SERVING), with a real
PostgreSQL server refusing it, and SERVING again once it is back; a drain keeps NOT_SERVING
whatever the database does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import validator_pb2, validator_pb2_grpc
from sqlalchemy.engine import make_url

from horde_services.core import db
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import ValidatorSettings, load_settings
from horde_services.core.identity import Ed25519Signer, HotkeySigner
from horde_services.core.server import create_server, open_channel
from horde_services.validator.app import start_validator

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Cable:
    """A TCP forwarder between the validator and the PostgreSQL server that the test can cut
    (the server gone: connections dropped, new ones refused) and mend (on the same port)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def connect(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self._writers -= {writer, up_writer}


async def _statuses(watch: AsyncIterator[health_pb2.HealthCheckResponse]) -> AsyncIterator[int]:
    async for reply in watch:
        yield reply.status


async def _next(statuses: AsyncIterator[int], want: int, what: str) -> None:
    async with asyncio.timeout(30):
        async for status in statuses:
            if status == want:
                return
    raise AssertionError(f"the health stream ended before {what}")


async def test_health_follows_the_database_and_calls_say_unavailable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    new_database_url: Callable[[str], Awaitable[str]],
) -> None:
    monkeypatch.setattr(db, "PROBE_INTERVAL_S", 0.2)
    direct = make_url(await new_database_url("postgresql"))
    assert direct.port is not None
    cable = Cable(direct.port)
    await cable.connect()
    url = direct.set(port=cable.port).render_as_string(hide_password=False)
    validator, client = HotkeySigner.generate(), Ed25519Signer.generate()
    roster = write_roster(
        tmp_path / "roster.toml",
        [Neuron(uid=0, hotkey=validator.identity.ss58, validator_permit=True)],
    )
    settings = load_settings(
        ValidatorSettings,
        state_dir=tmp_path,
        roster_file=roster,
        clients=[str(client.identity)],
        database_url=url,
        synthetic={"enabled": False},
    )
    app = await start_validator(settings, validator)
    app.start_background()
    try:
        async with open_channel(
            f"127.0.0.1:{app.port}", signer=client, callee=str(validator.identity)
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = _statuses(health.Watch(health_pb2.HealthCheckRequest()))
            await _next(statuses, SERVING, "SERVING at start")

            # The database server is gone: the pooled connections dropped, new ones refused.
            await cable.cut()
            await _next(statuses, NOT_SERVING, "NOT_SERVING with the database gone")
            jobs = validator_pb2_grpc.ValidatorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await jobs.ListJobs(validator_pb2.ListJobsRequest(), timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot use its database" in (refused.value.details() or "")

            await cable.connect()  # back, on the same port
            await _next(statuses, SERVING, "SERVING with the database back")
            listed = await jobs.ListJobs(validator_pb2.ListJobsRequest(), timeout=20)
            assert list(listed.jobs) == []
    finally:
        await app.stop(0)
        await cable.cut()


async def test_a_reason_cleared_never_hides_another() -> None:
    """The database back during a drain leaves the server NOT_SERVING: SERVING needs every
    reason cleared."""
    server = await create_server("127.0.0.1:0", [], authenticator=None, service_label="t")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return int(reply.status)

            assert await status() == SERVING
            await server.set_serving(False, "database")
            assert await status() == NOT_SERVING
            await server.set_serving(False)  # a drain begins
            await server.set_serving(True, "database")
            assert await status() == NOT_SERVING
            assert server.down == {"stopping"}
    finally:
        await server.stop(0)
