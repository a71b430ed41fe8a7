"""The miner's drain on shutdown, without Docker: a real miner (gRPC on port 0, SQLite), an
executor link and a validator's RunJob driven by hand (tests/miner/miner_admin_support.py), so
the test decides when the job ends.

On stop the miner takes no new job (its manifest lists every executor as draining, a RunJob is
refused as busy), health says NOT_SERVING, and the job in flight may still finish and its result
and receipts reach the validator, for up to `drain_timeout_s`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import (
    common_pb2,
    job_pb2,
    manifest_pb2,
    miner_pb2,
    receipts_pb2,
    synthetic_pb2,
)
from miner_admin_support import CPU_ONLY, WAIT_S, FakeExecutor, MinerNet, ValidatorJob, make_net

from horde_services.core import lifecycle
from horde_services.core.chain import LocalRoster
from horde_services.core.identity import Ed25519Signer
from horde_services.core.metrics import REGISTRY
from horde_services.core.server import open_channel
from horde_services.miner.pool import AllBusy, ExecutorConn, ExecutorPool, MinerDraining
from horde_services.validator.jobs import JobManager, LiveJob
from horde_services.validator.miners import MinerDirectory

pytestmark = pytest.mark.timeout(60)

CLASS = "cpu-small"


@pytest.fixture
async def net(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MinerNet]:
    net = await make_net(
        tmp_path,
        executors=1,
        executor_timeout_s=10.0,
        shutdown_grace_s=1.0,
        drain_timeout_s=getattr(request, "param", 30.0),
    )
    await net.start()
    try:
        yield net
    finally:
        await net.stop()


def executor(net: MinerNet) -> FakeExecutor:
    return FakeExecutor(net, net.executors[0], CLASS, CPU_ONLY)


async def health(address: str) -> int:
    async with open_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def executors_gauge(executor_class: str, state: str) -> float:
    labels = {"executor_class": executor_class, "state": state}
    return REGISTRY.get_sample_value("horde_miner_executors", labels) or 0.0


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the predicate until it holds; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_job_in_flight_finishes_and_reports_while_the_miner_drains(net: MinerNet) -> None:
    stub = net.miner_stub(net.validator)

    async def draining() -> bool:
        resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=5)
        executors = resp.manifest.executors
        return bool(executors) and all(e.draining for e in executors)

    async with executor(net) as linked:
        job = ValidatorJob(net, CLASS)
        await job.started()
        assert (await linked.next_job()).job_uuid == job.job_uuid
        address = net.address
        assert await health(address) == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(net.stop_app())
        await until(draining, "the manifest to list the executors as draining")
        assert await health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=5)
        assert [(e.busy, e.draining) for e in resp.manifest.executors] == [(True, True)]
        assert executors_gauge(CLASS, "draining") == 1

        # No new job while draining: refused as busy, so a validator tries another miner.
        refused = await ValidatorJob(net, CLASS).result()
        assert (refused.state, refused.reason, refused.stage) == (
            common_pb2.JOB_STATE_REJECTED,
            common_pb2.FAILURE_REASON_BUSY,
            common_pb2.STAGE_RESERVATION,
        )
        assert "shutting down" in refused.detail, refused.detail
        assert not stopping.done(), "the miner stopped with a job in flight"

        # The job ends: its result and its finished receipt still reach the validator.
        linked.finish(job.job_uuid, common_pb2.JOB_STATE_COMPLETED, detail="done")
        done = await job.result()
        assert done.state == common_pb2.JOB_STATE_COMPLETED
        assert done.miner_hotkey == net.identity
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
        assert linked.cancels.empty()  # the job ended on its own: nothing to stop


async def test_a_synthetic_round_in_flight_is_relayed_before_the_miner_stops(
    net: MinerNet,
) -> None:
    stub = net.miner_stub(net.validator)
    async with executor(net) as linked:
        challenge = synthetic_pb2.SyntheticChallenge(
            challenge_id="drain-round-1",
            digests=[b"\0" * 32],
            deadline_ns=time.time_ns() + 30 * 10**9,
        )
        call = stub.RunSyntheticRound(
            miner_pb2.RunSyntheticRoundRequest(
                round=1,
                challenges=[
                    miner_pb2.ExecutorChallenge(executor_id=linked.executor_id, challenge=challenge)
                ],
            )
        )
        read = asyncio.ensure_future(call.read())
        assert (await linked.next_challenge()).challenge_id == "drain-round-1"
        stopping = asyncio.create_task(net.stop_app())
        await until(
            lambda: health_is(net.address, health_pb2.HealthCheckResponse.NOT_SERVING),
            "the miner to start draining",
        )
        assert not stopping.done(), "the miner stopped with a synthetic round in flight"
        linked.answer("drain-round-1")
        async with asyncio.timeout(WAIT_S):
            resp = await read
        assert (resp.executor_id, resp.answer.challenge_id, list(resp.answer.secrets)) == (
            linked.executor_id,
            "drain-round-1",
            [7],
        )
        async with asyncio.timeout(WAIT_S):
            await stopping


async def health_is(address: str, status: int) -> bool:
    return await health(address) == status


async def test_a_validator_says_the_busy_executors_are_shutting_down(
    net: MinerNet, tmp_path: Path
) -> None:
    """A job for a class whose only executors are draining is refused as busy, and the reason
    says they are shutting down (not just "stayed busy")."""
    directory = MinerDirectory(
        net.validator, LocalRoster(net.settings.roster_file), {net.identity: net.address}
    )
    manager = JobManager(net.validator, None, directory, tmp_path, 1)  # type: ignore[arg-type]
    spec = job_pb2.JobSpec(image="horde/base:latest", command=["true"], executor_class=CLASS)
    spec.timeouts.reservation_s = 1
    async with executor(net) as linked:
        job = ValidatorJob(net, CLASS)
        await job.started()
        await linked.next_job()
        busy = await manager._route(LiveJob("busy-job", spec, "client", None))
        assert busy.reason == common_pb2.FAILURE_REASON_BUSY
        assert "shutting down" not in busy.detail, busy.detail
        stopping = asyncio.create_task(net.stop_app())

        async def draining() -> bool:
            return (await directory.candidates(CLASS)).draining == 1

        await until(draining, "the validator to see the executor draining")
        found = await directory.candidates(CLASS)
        assert (found.free, found.any_of_class, found.unreachable) == ([], True, 0)
        refused = await manager._route(LiveJob("drain-job", spec, "client", None))
        assert (refused.state, refused.reason) == (
            common_pb2.JOB_STATE_REJECTED,
            common_pb2.FAILURE_REASON_BUSY,
        )
        assert refused.detail == (
            f"every executor of class {CLASS!r} stayed busy for 1s (1 of them shutting down: "
            "their miner takes no new job)"
        )
        linked.finish(job.job_uuid, common_pb2.JOB_STATE_COMPLETED, detail="done")
        assert (await job.result()).state == common_pb2.JOB_STATE_COMPLETED
        async with asyncio.timeout(WAIT_S):
            await stopping
    await directory.close()


@pytest.mark.parametrize("net", [0.5], indirect=True)
async def test_a_job_outlasting_the_drain_ends_when_the_miner_stops(net: MinerNet) -> None:
    async with executor(net) as linked:
        job = ValidatorJob(net, CLASS)
        await job.started()
        await linked.next_job()
        began = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await net.stop_app(1.0)
        took = time.monotonic() - began
        assert 0.5 <= took < 10, took
        # The job stream ends without a result: the validator reports miner_unreachable.
        with pytest.raises(grpc.aio.AioRpcError):
            await job.result()
        job.cancel()  # its request writer too (left to the loop's end, it could hang there)


async def test_a_miner_without_jobs_stops_at_once(net: MinerNet) -> None:
    async with executor(net):
        began = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await net.stop_app(0)
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
