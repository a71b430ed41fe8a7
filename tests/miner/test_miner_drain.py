"""The miner's drain on shutdown, without Docker: a real miner (gRPC on port 0, SQLite), an
executor link and a validator's RunJob driven by hand, so the test decides when the job ends.

On stop the miner takes no new job (its manifest lists every executor as draining, a RunJob is
refused as busy), health says NOT_SERVING, and the job in flight may still finish and its result
and receipts reach the validator, for up to `drain_timeout_s`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    job_pb2,
    manifest_pb2,
    miner_pb2,
    miner_pb2_grpc,
    receipts_pb2,
)

from horde_services.core import lifecycle
from horde_services.core.app import ServiceApp
from horde_services.core.chain import write_roster
from horde_services.core.config import MinerSettings, load_settings
from horde_services.core.identity import Ed25519Signer, Signer, create_key_file
from horde_services.core.metrics import REGISTRY
from horde_services.core.proto_util import result
from horde_services.core.server import open_channel
from horde_services.miner.app import start_miner
from horde_services.miner.pool import AllBusy, ExecutorConn, ExecutorPool, MinerDraining

pytestmark = pytest.mark.timeout(60)

CLASS = "cpu-small"
WAIT_S = 15.0


@dataclass
class Miner:
    app: ServiceApp
    signer: Signer
    validator: Signer
    executor: Signer
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stopped: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stub(self) -> miner_pb2_grpc.MinerServiceStub:
        channel = open_channel(
            self.address, signer=self.validator, callee=str(self.signer.identity)
        )
        self.channels.append(channel)
        return miner_pb2_grpc.MinerServiceStub(channel)

    async def health(self) -> int:
        async with open_channel(self.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        return int(reply.status)

    async def draining(self) -> bool:
        resp = await self.stub().GetManifest(miner_pb2.GetManifestRequest(), timeout=5)
        executors = resp.manifest.executors
        return bool(executors) and all(e.draining for e in executors)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the miner as a signal does (drain first, then the servers)."""
        self.stopped = True
        await self.app.stop(grace_s)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        if not self.stopped:
            await self.stop(0)


class FakeExecutor:
    """One executor link to the miner, answering its jobs when the test says so."""

    def __init__(self, miner: Miner) -> None:
        self._miner = miner
        self._outbox: asyncio.Queue[executor_pb2.ConnectRequest] = asyncio.Queue()
        self.accepted = asyncio.Event()
        self.jobs: asyncio.Queue[miner_pb2.RunJobStart] = asyncio.Queue()
        self.cancels: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeExecutor:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(WAIT_S):
            await self.accepted.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def send(self, msg: executor_pb2.ConnectRequest) -> None:
        self._outbox.put_nowait(msg)

    async def _run(self) -> None:
        executor = self._miner.executor
        self.send(
            executor_pb2.ConnectRequest(
                manifest=manifest_pb2.ExecutorManifest(
                    executor_class=CLASS, executor_identity=str(executor.identity)
                )
            )
        )

        async def requests() -> AsyncIterator[executor_pb2.ConnectRequest]:
            while True:
                yield await self._outbox.get()

        async with open_channel(
            self._miner.address, signer=executor, callee=str(self._miner.signer.identity)
        ) as channel:
            call = executor_pb2_grpc.ExecutorLinkServiceStub(channel).Connect(requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "accepted":
                        self.accepted.set()
                    elif kind == "run_job":
                        self.jobs.put_nowait(msg.run_job)
                    elif kind == "cancel":
                        self.cancels.append(msg.cancel.reason)
            except grpc.aio.AioRpcError:
                return  # the miner went away


class ValidatorJob:
    """A validator's RunJob at the miner: countersigns the miner's receipts as they come."""

    def __init__(self, miner: Miner, job_uuid: str | None = None) -> None:
        self.job_uuid = job_uuid or str(uuid.uuid4())
        self._miner = miner
        self._outbox: asyncio.Queue[miner_pb2.RunJobRequest] = asyncio.Queue()
        spec = job_pb2.JobSpec(image="horde/base:latest", command=["true"], executor_class=CLASS)
        self._outbox.put_nowait(
            miner_pb2.RunJobRequest(start=miner_pb2.RunJobStart(job_uuid=self.job_uuid, spec=spec))
        )

        async def requests() -> AsyncIterator[miner_pb2.RunJobRequest]:
            while True:
                yield await self._outbox.get()

        self._call = miner.stub().RunJob(requests(), timeout=WAIT_S * 2)
        self.receipts: list[receipts_pb2.LifecycleReceipt] = []

    async def next(self) -> miner_pb2.RunJobResponse:
        """The miner's next message (receipts are countersigned and sent back on the way)."""
        msg = await self._call.read()
        assert msg is not grpc.aio.EOF, "the miner ended the job stream without a result"
        assert isinstance(msg, miner_pb2.RunJobResponse)
        if msg.WhichOneof("payload") == "receipt":
            signed = lifecycle.countersign(msg.receipt, self._miner.validator)
            self.receipts.append(signed)
            self._outbox.put_nowait(miner_pb2.RunJobRequest(countersigned_receipt=signed))
        return msg

    async def result(self) -> job_pb2.JobResult:
        while (msg := await self.next()).WhichOneof("payload") != "result":
            pass
        return msg.result

    def cancel(self) -> None:
        self._call.cancel()


@pytest.fixture
async def miner(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Miner]:
    drain_s = getattr(request, "param", 30.0)
    validator = create_key_file(tmp_path / "validator.json", "hotkey")
    executor = Ed25519Signer.generate()
    roster = write_roster(tmp_path / "roster.toml", [])
    settings = load_settings(
        MinerSettings,
        state_dir=tmp_path,
        roster_file=roster,
        executors=[str(executor.identity)],
        validators=[str(validator.identity)],
        heartbeat_interval_s=1.0,
        executor_timeout_s=10.0,
        shutdown_grace_s=1.0,
        drain_timeout_s=drain_s,
    )
    signer = create_key_file(tmp_path / "miner.json", "hotkey")
    app = await start_miner(settings, signer)
    app.start_background()
    handle = Miner(app, signer, validator, executor)
    try:
        yield handle
    finally:
        await handle.close()


def executors_gauge(executor_class: str, state: str) -> float:
    labels = {"executor_class": executor_class, "state": state}
    return REGISTRY.get_sample_value("horde_miner_executors", labels) or 0.0


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the predicate until it holds; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_job_in_flight_finishes_and_reports_while_the_miner_drains(miner: Miner) -> None:
    async with FakeExecutor(miner) as executor:
        job = ValidatorJob(miner)
        assert (await job.next()).WhichOneof("payload") == "receipt"  # job started
        async with asyncio.timeout(WAIT_S):
            start = await executor.jobs.get()
        assert start.job_uuid == job.job_uuid
        assert await miner.health() == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.create_task(miner.stop())
        await until(miner.draining, "the manifest to list the executors as draining")
        assert await miner.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = await miner.stub().GetManifest(miner_pb2.GetManifestRequest(), timeout=5)
        assert [(e.busy, e.draining) for e in resp.manifest.executors] == [(True, True)]
        assert executors_gauge(CLASS, "draining") == 1

        # No new job while draining: refused as busy, so a validator tries another miner.
        refused = await ValidatorJob(miner).result()
        assert (refused.state, refused.reason, refused.stage) == (
            common_pb2.JOB_STATE_REJECTED,
            common_pb2.FAILURE_REASON_BUSY,
            common_pb2.STAGE_RESERVATION,
        )
        assert "shutting down" in refused.detail, refused.detail
        assert not stopping.done(), "the miner stopped with a job in flight"

        # The job ends: its result and its finished receipt still reach the validator.
        executor.send(
            executor_pb2.ConnectRequest(
                result=result(job.job_uuid, common_pb2.JOB_STATE_COMPLETED, detail="done")
            )
        )
        done = await job.result()
        assert done.state == common_pb2.JOB_STATE_COMPLETED
        assert done.miner_hotkey == str(miner.signer.identity)
        kinds = [lifecycle.parse(r).kind for r in job.receipts]
        assert kinds == [
            receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED,
            receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED,
        ]
        # Then the drain ends and the miner stops, long before drain_timeout_s.
        began = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await stopping
        assert time.monotonic() - began < 10
        assert executor.cancels == []  # the job ended on its own: nothing to stop


@pytest.mark.parametrize("miner", [0.5], indirect=True)
async def test_a_job_outlasting_the_drain_ends_when_the_miner_stops(miner: Miner) -> None:
    async with FakeExecutor(miner) as executor:
        job = ValidatorJob(miner)
        assert (await job.next()).WhichOneof("payload") == "receipt"
        async with asyncio.timeout(WAIT_S):
            await executor.jobs.get()
        began = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await miner.stop(1.0)
        took = time.monotonic() - began
        assert 0.5 <= took < 10, took
        # The job stream ends without a result: the validator reports miner_unreachable.
        with pytest.raises(grpc.aio.AioRpcError):
            await job.result()
        job.cancel()  # its request writer too (left to the loop's end, it could hang there)


async def test_a_miner_without_jobs_stops_at_once(miner: Miner) -> None:
    async with FakeExecutor(miner):
        began = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await miner.stop(0)
        assert time.monotonic() - began < 5


def test_a_draining_pool_reserves_nothing_and_lists_every_executor_draining() -> None:
    pool = ExecutorPool()
    signer = Ed25519Signer.generate()
    conn = ExecutorConn(
        executor_id=pool.executor_id_for(signer.identity),
        identity=signer.identity,
        manifest=manifest_pb2.ExecutorManifest(executor_class="cpu-drain-test"),
    )
    pool.register(conn)
    assert [m.draining for m in pool.manifests()] == [False]
    pool.drain()
    assert [m.draining for m in pool.manifests()] == [True]
    assert executors_gauge("cpu-drain-test", "draining") == 1
    assert executors_gauge("cpu-drain-test", "idle") == 0
    with pytest.raises(MinerDraining) as refused:
        pool.reserve("cpu-drain-test", "job")
    assert isinstance(refused.value, AllBusy)  # answered as busy: validators try elsewhere
    assert not conn.busy
