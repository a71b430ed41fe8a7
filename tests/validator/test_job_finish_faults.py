"""A job whose result the validator's database refuses (a full disk) still ends for everyone:
its followers (SubmitJob, WatchJob) get the result, GetJob and ListJobs say how it ended (not
'running' until a restart), the write is retried and then logged as job_result_not_stored, the
job leaves the manager and its spool, its task ends without an exception, and the result is
written once the database takes writes again.

Real services on 127.0.0.1: a validator and a miner (real gRPC, signatures, SQLite), and an
executor link driven by the test (it reports what the test says, when the test says), so every
step waits on a message, never on a pause. The harness is shared with test_miner_attribution.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
import structlog
from horde.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    job_pb2,
    manifest_pb2,
    miner_pb2,
    validator_admin_pb2_grpc,
    validator_pb2,
    validator_pb2_grpc,
)

from horde_services.core.app import ServiceApp
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    MinerSettings,
    SyntheticSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.db import open_database
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Signer
from horde_services.core.proto_util import event, result
from horde_services.core.server import open_channel
from horde_services.miner.app import start_miner
from horde_services.validator import jobs
from horde_services.validator.app import start_validator
from horde_services.validator.jobs import JobManager, LiveJob
from horde_services.validator.store import JobStore

S = common_pb2
WAIT_S = 20.0
IMAGE = "horde/base:latest"
CLASS = "cpu-small"  # the validator's default class


def disk_full() -> sa.exc.OperationalError:
    """What SQLAlchemy raises when SQLite finds the disk full."""
    return sa.exc.OperationalError(
        "UPDATE jobs SET state=?, result=? WHERE jobs.job_uuid = ?",
        None,
        sqlite3.OperationalError("database or disk is full"),
    )


def job_spec(**timeouts: int) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(
        image=IMAGE, command=["true"], output=job_pb2.OutputSpec(stream=job_pb2.StreamOutput())
    )
    for name, value in {"reservation_s": 5, **timeouts}.items():
        setattr(spec.timeouts, name, value)
    return spec


async def waited(what: str, awaitable: Any) -> Any:
    try:
        async with asyncio.timeout(WAIT_S):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT_S:.0f}s waiting for {what}") from None


class FakeExecutor:
    """One executor's link to the miner (real gRPC, signed): it offers the class and reports on
    its jobs only what the test tells it to."""

    def __init__(self, key: Ed25519Signer, miner_address: str, miner_identity: str) -> None:
        self.key = key
        self._address = miner_address
        self._miner = miner_identity
        self._outbox: asyncio.Queue[executor_pb2.ConnectRequest] = asyncio.Queue()
        self.accepted = asyncio.Event()
        self.jobs: asyncio.Queue[miner_pb2.RunJobStart] = asyncio.Queue()
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> FakeExecutor:
        self._task = asyncio.create_task(self._run())
        await waited("the miner to accept the executor", self.accepted.wait())
        return self

    async def stop(self) -> None:
        """Close the link (the miner loses this executor and its job)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def next_job(self) -> miner_pb2.RunJobStart:
        start: miner_pb2.RunJobStart = await waited("a job at the executor", self.jobs.get())
        return start

    async def next_cancel(self) -> str:
        job_uuid: str = await waited("a cancel at the executor", self.cancels.get())
        return job_uuid

    def report(self, job_uuid: str, state: S.JobState.ValueType) -> None:
        self._outbox.put_nowait(
            executor_pb2.ConnectRequest(event=event(job_uuid, state, S.STAGE_EXECUTION, "test"))
        )

    def finish(self, job_uuid: str, state: S.JobState.ValueType, **kw: Any) -> None:
        self._outbox.put_nowait(executor_pb2.ConnectRequest(result=result(job_uuid, state, **kw)))

    async def _run(self) -> None:
        self._outbox.put_nowait(
            executor_pb2.ConnectRequest(
                manifest=manifest_pb2.ExecutorManifest(
                    executor_class=CLASS,
                    executor_identity=str(self.key.identity),
                    version="test",
                    cached_images=[IMAGE],
                )
            )
        )

        async def requests() -> AsyncIterator[executor_pb2.ConnectRequest]:
            while True:
                yield await self._outbox.get()

        async with open_channel(self._address, signer=self.key, callee=self._miner) as channel:
            call = executor_pb2_grpc.ExecutorLinkServiceStub(channel).Connect(requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "accepted":
                        self.accepted.set()
                    elif kind == "run_job":
                        self.jobs.put_nowait(msg.run_job)
                    elif kind == "cancel":
                        self.cancels.put_nowait(msg.cancel.job_uuid)
            except grpc.aio.AioRpcError:
                return  # the miner went away
            finally:
                call.cancel()


class Follower:
    """A SubmitJob or WatchJob stream read in the background."""

    def __init__(
        self,
        call: Any,
        more: asyncio.Queue[validator_pb2.SubmitJobRequest | None] | None = None,
    ) -> None:
        self.call = call
        self._more = more
        self.events: list[job_pb2.JobEvent] = []
        self.result: job_pb2.JobResult | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        try:
            async for msg in self.call:
                kind = msg.WhichOneof("payload")
                if kind == "event":
                    self.events.append(msg.event)
                elif kind == "result":
                    self.result = msg.result
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def until(self, check: Callable[[], bool], what: str) -> None:
        async def seen() -> None:
            while not check() and not self.task.done():
                self._changed.clear()
                await self._changed.wait()

        await waited(what, seen())
        if self.error is not None:
            raise self.error
        assert check(), f"the stream ended before {what}"

    def cancel(self) -> None:
        """Send a cancel on the SubmitJob stream."""
        assert self._more is not None
        self._more.put_nowait(validator_pb2.SubmitJobRequest(cancel=True))

    async def job_uuid(self) -> str:
        await self.until(lambda: bool(self.events), "the accepted event")
        return self.events[0].job_uuid

    async def state(self, state: S.JobState.ValueType) -> None:
        await self.until(
            lambda: any(e.state == state for e in self.events), f"a {S.JobState.Name(state)} event"
        )

    async def finished(self) -> job_pb2.JobResult:
        await self.until(lambda: self.result is not None, "the job's result")
        await waited("the stream to end after the result", self.task)
        assert self.result is not None
        return self.result


@dataclass
class Net:
    """Validator, miner and executor links on 127.0.0.1; the JobManager's jobs as submitted."""

    root: Path
    validator_signer: HotkeySigner = field(default_factory=HotkeySigner.generate)
    miner_signer: HotkeySigner = field(default_factory=HotkeySigner.generate)
    client: Ed25519Signer = field(default_factory=Ed25519Signer.generate)
    admin: Ed25519Signer = field(default_factory=Ed25519Signer.generate)
    executor_keys: list[Ed25519Signer] = field(
        default_factory=lambda: [Ed25519Signer.generate() for _ in range(2)]
    )
    validator: ServiceApp | None = None
    miner: ServiceApp | None = None
    settings: ValidatorSettings | None = None
    executors: list[FakeExecutor] = field(default_factory=list)
    submitted: list[LiveJob] = field(default_factory=list)
    manager: JobManager | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    _followers: list[Follower] = field(default_factory=list)
    _requests: list[asyncio.Queue[validator_pb2.SubmitJobRequest | None]] = field(
        default_factory=list
    )

    @property
    def miner_identity(self) -> str:
        return str(self.miner_signer.identity)

    async def start(self, executors: int = 1) -> Net:
        common: dict[str, Any] = {"state_dir": self.root, "shutdown_grace_s": 0.5}
        roster = self.root / "roster.toml"
        validator_neuron = Neuron(
            uid=0,
            hotkey=self.validator_signer.identity.ss58,
            stake=10_000.0,
            validator_permit=True,
        )
        write_roster(roster, [validator_neuron])
        self.miner = await start_miner(
            load_settings(
                MinerSettings,
                roster_file=roster,
                executors=[str(k.identity) for k in self.executor_keys],
                heartbeat_interval_s=1.0,
                executor_timeout_s=30.0,
                drain_timeout_s=0,
                **common,
            ),
            self.miner_signer,
        )
        self.miner.start_background()
        address = f"127.0.0.1:{self.miner.port}"
        write_roster(
            roster,
            [
                validator_neuron,
                Neuron(uid=1, hotkey=self.miner_signer.identity.ss58, endpoint=address),
            ],
        )
        for _ in range(executors):
            await self.add_executor()
        self.settings = load_settings(
            ValidatorSettings,
            roster_file=roster,
            clients=[str(self.client.identity)],
            admins=[str(self.admin.identity)],
            allowed_images=[IMAGE],
            streaming_whitelist=[],
            synthetic=SyntheticSettings(enabled=False),
            **common,
        )
        self.validator = await start_validator(self.settings, self.validator_signer)
        self.validator.start_background()
        return self

    async def add_executor(self) -> FakeExecutor:
        """Link the next executor key to the miner."""
        assert self.miner is not None
        key = self.executor_keys[len(self.executors)]
        address = f"127.0.0.1:{self.miner.port}"
        executor = await FakeExecutor(key, address, self.miner_identity).start()
        self.executors.append(executor)
        return executor

    def _channel(self, signer: Signer) -> grpc.aio.Channel:
        assert self.validator is not None
        channel = open_channel(
            f"127.0.0.1:{self.validator.port}",
            signer=signer,
            callee=str(self.validator_signer.identity),
        )
        self._channels.append(channel)
        return channel

    def client_stub(self) -> validator_pb2_grpc.ValidatorServiceStub:
        return validator_pb2_grpc.ValidatorServiceStub(self._channel(self.client))

    def admin_stub(self) -> validator_admin_pb2_grpc.ValidatorAdminServiceStub:
        return validator_admin_pb2_grpc.ValidatorAdminServiceStub(self._channel(self.admin))

    def submit(self, spec: job_pb2.JobSpec) -> Follower:
        """SubmitJob, its request stream held open (so `cancel` can send a cancel)."""
        more: asyncio.Queue[validator_pb2.SubmitJobRequest | None] = asyncio.Queue()
        self._requests.append(more)

        async def requests() -> AsyncIterator[validator_pb2.SubmitJobRequest]:
            yield validator_pb2.SubmitJobRequest(spec=spec)
            while (msg := await more.get()) is not None:
                yield msg

        follower = Follower(self.client_stub().SubmitJob(requests()), more)
        self._followers.append(follower)
        return follower

    def watch(self, job_uuid: str) -> Follower:
        follower = Follower(
            self.client_stub().WatchJob(validator_pb2.WatchJobRequest(job_uuid=job_uuid))
        )
        self._followers.append(follower)
        return follower

    async def get_job(self, job_uuid: str) -> job_pb2.JobRecord:
        resp: validator_pb2.GetJobResponse = await self.client_stub().GetJob(
            validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=WAIT_S
        )
        return resp.job

    async def stored(self, job_uuid: str) -> job_pb2.JobRecord | None:
        """The job's row as the database holds it (read apart from the validator)."""
        assert self.settings is not None
        engine = await open_database(self.settings.database("validator"))
        try:
            return await JobStore(engine).get(job_uuid)
        finally:
            await engine.dispose()

    def live_job(self, job_uuid: str) -> LiveJob:
        return next(j for j in self.submitted if j.job_uuid == job_uuid)

    async def job_ended(self, job_uuid: str) -> LiveJob:
        """Wait for the job's task in the validator to end; it must end without an exception
        (an exception there is 'Task exception was never retrieved' at shutdown)."""
        job = self.live_job(job_uuid)
        assert job.task is not None
        await waited("the job's task to end", asyncio.shield(job.task))
        assert job.task.exception() is None
        return job

    async def close(self) -> None:
        for more in self._requests:
            more.put_nowait(None)
        for follower in self._followers:
            follower.call.cancel()
            await asyncio.gather(follower.task, return_exceptions=True)
        for channel in self._channels:
            await channel.close()
        if self.validator is not None:
            await self.validator.stop(0)
        for executor in self.executors:
            await executor.stop()
        if self.miner is not None:
            await self.miner.stop(0)


@contextlib.asynccontextmanager
async def running_net(root: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Net]:
    """A validator, a miner and one executor link; the jobs the validator's JobManager takes
    are in `net.submitted` (to see their tasks end)."""
    net = Net(root)
    submit = JobManager.submit

    async def recording_submit(self: JobManager, *args: Any, **kwargs: Any) -> LiveJob:
        job = await submit(self, *args, **kwargs)
        net.manager = self
        net.submitted.append(job)
        return job

    monkeypatch.setattr(JobManager, "submit", recording_submit)
    try:
        yield await net.start()
    finally:
        await net.close()


@pytest.fixture
async def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Net]:
    async with running_net(tmp_path, monkeypatch) as net:
        yield net


class FailingFinish:
    """JobStore.finish failing with "database or disk is full" for the first `failures` calls
    (every call while `failures` is None)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: int | None) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self._real = JobStore.finish
        outer = self

        async def finish(store: JobStore, res: job_pb2.JobResult) -> None:
            outer.calls.append(res.job_uuid)
            if outer.failures is None or len(outer.calls) <= outer.failures:
                raise disk_full()
            await outer._real(store, res)

        monkeypatch.setattr(JobStore, "finish", finish)


async def run_to_completion(net: Net) -> tuple[Follower, Follower, str]:
    """A job that the executor completes, followed by its SubmitJob and a WatchJob stream."""
    submitted = net.submit(job_spec())
    job_uuid = await submitted.job_uuid()
    executor = net.executors[0]
    assert (await executor.next_job()).job_uuid == job_uuid
    executor.report(job_uuid, S.JOB_STATE_RUNNING)
    await submitted.state(S.JOB_STATE_RUNNING)
    watcher = net.watch(job_uuid)
    await watcher.state(S.JOB_STATE_RUNNING)
    executor.finish(job_uuid, S.JOB_STATE_COMPLETED, detail="done")
    return submitted, watcher, job_uuid


async def test_a_result_the_database_refuses_still_reaches_everyone(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "FINISH_RETRY_DELAYS_S", (0.0, 0.01))
    failing = FailingFinish(monkeypatch, failures=None)
    with structlog.testing.capture_logs() as logs:
        submitted, watcher, job_uuid = await run_to_completion(net)
        # Both followers get the result (before the fix: they waited forever).
        for follower in (submitted, watcher):
            res = await follower.finished()
            assert (res.state, res.detail) == (S.JOB_STATE_COMPLETED, "done")
            assert res.miner_hotkey == net.miner_identity
        job = await net.job_ended(job_uuid)
    # The write was tried, retried, then given up on and logged as an error.
    assert failing.calls == [job_uuid] * 3
    retried = [e for e in logs if e["event"] == "job_result_store_failed"]
    assert len(retried) == 2 and all("database or disk is full" in e["error"] for e in retried)
    (lost,) = [e for e in logs if e["event"] == "job_result_not_stored"]
    assert lost["log_level"] == "error" and lost["job_uuid"] == job_uuid
    assert "database or disk is full" in lost["error"] and "OperationalError" in lost["error"]
    # The job left the manager and its spool is gone.
    assert net.manager is not None and net.manager.live(job_uuid) is None
    assert job.spool is not None and not job.spool.exists()
    # `horde job status` (GetJob), a later WatchJob and ListJobs say how it ended, while the
    # database row still says what it said before (running).
    record = await net.get_job(job_uuid)
    assert record.state == S.JOB_STATE_COMPLETED and record.result.detail == "done"
    later = await net.watch(job_uuid).finished()
    assert later.state == S.JOB_STATE_COMPLETED
    stub = net.client_stub()
    listed = await stub.ListJobs(validator_pb2.ListJobsRequest(state=S.JOB_STATE_COMPLETED))
    assert [j.job_uuid for j in listed.jobs] == [job_uuid]
    assert listed.jobs[0].state == S.JOB_STATE_COMPLETED
    running = await stub.ListJobs(validator_pb2.ListJobsRequest(state=S.JOB_STATE_RUNNING))
    assert list(running.jobs) == []
    row = await net.stored(job_uuid)
    assert row is not None and row.state == S.JOB_STATE_RUNNING

    # The disk has room again: the next job's result is stored, and so is the one held.
    failing.failures = 0
    second, _, second_uuid = await run_to_completion(net)
    assert (await second.finished()).state == S.JOB_STATE_COMPLETED
    await net.job_ended(second_uuid)
    for uuid_ in (second_uuid, job_uuid):
        row = await net.stored(uuid_)
        assert row is not None and row.state == S.JOB_STATE_COMPLETED, uuid_
        assert row.result.miner_hotkey == net.miner_identity


async def test_a_write_that_fails_at_first_is_retried(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "FINISH_RETRY_DELAYS_S", (0.0, 0.01, 0.02))
    failing = FailingFinish(monkeypatch, failures=2)
    with structlog.testing.capture_logs() as logs:
        submitted, _, job_uuid = await run_to_completion(net)
        assert (await submitted.finished()).state == S.JOB_STATE_COMPLETED
        await net.job_ended(job_uuid)
    assert failing.calls == [job_uuid] * 3
    assert [e["event"] for e in logs if e["event"].startswith("job_result_")] == [
        "job_result_store_failed",
        "job_result_store_failed",
    ]
    row = await net.stored(job_uuid)
    assert row is not None and row.state == S.JOB_STATE_COMPLETED
    assert row.result.detail == "done"


async def test_a_failure_of_the_job_is_delivered_when_nothing_can_be_stored(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that fails ends the same way: here its executor is lost, and the database refuses
    the result."""
    monkeypatch.setattr(jobs, "FINISH_RETRY_DELAYS_S", ())
    FailingFinish(monkeypatch, failures=None)
    submitted = net.submit(job_spec())
    job_uuid = await submitted.job_uuid()
    executor = net.executors[0]
    await executor.next_job()
    executor.report(job_uuid, S.JOB_STATE_RUNNING)
    await submitted.state(S.JOB_STATE_RUNNING)
    await executor.stop()
    res = await submitted.finished()
    assert (res.state, res.reason) == (S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
    await net.job_ended(job_uuid)
    assert (await net.get_job(job_uuid)).state == S.JOB_STATE_HORDE_FAILED


async def test_a_held_result_gets_a_last_try_at_shutdown(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database takes writes again, but no job ended since: the shutdown stores the held
    result (else the next start would end a job its followers saw complete as
    validator_restarted)."""
    monkeypatch.setattr(jobs, "FINISH_RETRY_DELAYS_S", ())
    failing = FailingFinish(monkeypatch, failures=None)
    submitted, _watcher, job_uuid = await run_to_completion(net)
    assert (await submitted.finished()).state == S.JOB_STATE_COMPLETED
    await net.job_ended(job_uuid)
    failing.failures = 0
    assert net.manager is not None
    await net.manager.close()
    row = await net.stored(job_uuid)
    assert row is not None and row.state == S.JOB_STATE_COMPLETED
