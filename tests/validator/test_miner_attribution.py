"""A job that fails on a miner is that miner's, whoever wrote its result: when the miner goes
away mid-job (miner_unreachable), or holds the job past the validator's overall deadline, or
does not confirm a cancel, the result the validator makes names the miner, as the miner's own
results do (executor_lost). Scoring then counts such horde_failed jobs against the miner
(`horde validator weights`). A miner that could not be reached before it took the job is not
blamed for it.

Real validator and miner (gRPC, signatures, SQLite), executor links driven by the test; the
harness is test_job_finish_faults.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from horde.v1 import (
    common_pb2,
    job_pb2,
    miner_pb2,
    miner_pb2_grpc,
    receipts_pb2,
    validator_admin_pb2,
)
from test_job_finish_faults import Net, S, job_spec, running_net, waited

from horde_services.core.chain import LocalRoster, write_roster
from horde_services.core.config import SyntheticSettings
from horde_services.core.db import jobs as jobs_table
from horde_services.core.db import open_database
from horde_services.core.identity import HotkeySigner
from horde_services.validator import jobs
from horde_services.validator.jobs import JobManager, LiveJob
from horde_services.validator.miners import MinerDirectory

FAILED_WEIGHT = SyntheticSettings().organic_failed_weight


@pytest.fixture
async def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Net]:
    """A validator, a miner and one executor link (test_job_finish_faults.py's)."""
    async with running_net(tmp_path, monkeypatch) as net:
        yield net


async def miner_columns(net: Net) -> dict[str, str | None]:
    """job uuid -> the miner_hotkey column scoring reads."""
    assert net.settings is not None
    engine = await open_database(net.settings.database("validator"))
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(jobs_table.c.job_uuid, jobs_table.c.miner_hotkey))
            return {r.job_uuid: r.miner_hotkey for r in rows}
    finally:
        await engine.dispose()


async def weights(net: Net) -> dict[str, validator_admin_pb2.MinerWeight]:
    """`horde validator weights`: the admin's GetWeights, by miner."""
    resp = await net.admin_stub().GetWeights(validator_admin_pb2.GetWeightsRequest(), timeout=20)
    return {m.miner_hotkey: m for m in resp.miners}


async def test_a_miner_that_goes_away_mid_job_is_counted_like_a_lost_executor(net: Net) -> None:
    # One job ends executor_lost: the miner's own result, naming the miner.
    lost = net.submit(job_spec())
    lost_uuid = await lost.job_uuid()
    executor = net.executors[0]
    assert (await executor.next_job()).job_uuid == lost_uuid
    executor.report(lost_uuid, S.JOB_STATE_RUNNING)
    await lost.state(S.JOB_STATE_RUNNING)
    await executor.stop()
    lost_res = await lost.finished()
    assert lost_res.reason == S.FAILURE_REASON_EXECUTOR_LOST, lost_res
    assert lost_res.miner_hotkey == net.miner_identity

    # The next runs on another executor, and the miner goes away mid-job.
    other = await net.add_executor()
    gone = net.submit(job_spec())
    gone_uuid = await gone.job_uuid()
    assert (await other.next_job()).job_uuid == gone_uuid
    other.report(gone_uuid, S.JOB_STATE_RUNNING)
    await gone.state(S.JOB_STATE_RUNNING)
    assert net.miner is not None
    await net.miner.stop(0)
    net.miner = None
    res = await gone.finished()
    assert (res.state, res.reason, res.stage) == (
        S.JOB_STATE_HORDE_FAILED,
        S.FAILURE_REASON_MINER_UNREACHABLE,
        S.STAGE_EXECUTION,
    ), res
    assert res.miner_hotkey == net.miner_identity  # the client's JSON: "miner": <hotkey>
    await net.job_ended(gone_uuid)
    record = await net.get_job(gone_uuid)
    assert record.result.miner_hotkey == net.miner_identity

    # Both rows name the miner, and its organic score counts both failures.
    columns = await miner_columns(net)
    assert columns[lost_uuid] == columns[gone_uuid] == net.miner_identity
    scored = (await weights(net))[net.miner_identity]
    assert scored.organic_score == pytest.approx(-2 * FAILED_WEIGHT)
    assert "0 completed, 2 horde_failed" in scored.reason, scored.reason


async def test_a_job_held_past_the_deadline_or_a_cancel_names_its_miner(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "DEADLINE_SLACK_S", 0.0)
    monkeypatch.setattr(jobs, "CANCEL_WAIT_S", 0.2)
    executor = net.executors[0]
    # Every stage limit at 1 s: the overall deadline is 5 s, and the executor never ends it.
    late = net.submit(
        job_spec(
            reservation_s=1,
            image_pull_s=1,
            volume_download_s=1,
            execution_s=1,
            output_upload_s=1,
        )
    )
    late_uuid = await late.job_uuid()
    assert (await executor.next_job()).job_uuid == late_uuid
    executor.report(late_uuid, S.JOB_STATE_RUNNING)
    res = await late.finished()
    assert (res.state, res.reason) == (
        S.JOB_STATE_HORDE_FAILED,
        S.FAILURE_REASON_DEADLINE_MISSED,
    ), res
    assert res.miner_hotkey == net.miner_identity

    # A cancel the miner does not confirm in time: cancelled here, on that miner. (The
    # executor is free again once the miner saw the validator drop the late job.)
    cancelled = net.submit(job_spec())
    cancelled_uuid = await cancelled.job_uuid()
    assert (await executor.next_job()).job_uuid == cancelled_uuid
    executor.report(cancelled_uuid, S.JOB_STATE_RUNNING)
    await cancelled.state(S.JOB_STATE_RUNNING)
    cancelled.cancel()
    while await executor.next_cancel() != cancelled_uuid:  # the late job's cancel first
        pass
    # ...and the executor never answers it.
    res = await cancelled.finished()
    assert (res.state, res.reason) == (S.JOB_STATE_CANCELLED, S.FAILURE_REASON_CANCELLED)
    assert res.miner_hotkey == net.miner_identity

    await net.job_ended(cancelled_uuid)
    scored = (await weights(net))[net.miner_identity]
    # The missed deadline counts against the miner; a cancelled job counts for nothing.
    assert scored.organic_score == pytest.approx(-FAILED_WEIGHT)
    assert "0 completed, 1 horde_failed" in scored.reason, scored.reason


async def test_a_miner_unreachable_before_it_took_the_job_is_not_blamed(net: Net) -> None:
    assert net.miner is not None
    await net.miner.stop(0)
    net.miner = None
    job = net.submit(job_spec(reservation_s=1))
    job_uuid = await job.job_uuid()
    res = await waited("the job's result", job.finished())
    assert (res.state, res.reason, res.stage) == (
        S.JOB_STATE_HORDE_FAILED,
        S.FAILURE_REASON_MINER_UNREACHABLE,
        S.STAGE_RESERVATION,
    ), res
    assert res.miner_hotkey == ""
    await net.job_ended(job_uuid)
    assert (await miner_columns(net))[job_uuid] is None
    assert net.miner_identity not in await weights(net)


async def attempt_on(
    miner_servicer: miner_pb2_grpc.MinerServiceServicer, miner_key: HotkeySigner, tmp_path: Path
) -> job_pb2.JobResult | None:
    """One attempt of a job by a real JobManager on a stand-in miner (a real gRPC server on port
    0 serving `miner_servicer` as `miner_key`'s miner): what `_attempt` makes of its answers."""
    server = grpc.aio.server()
    miner_pb2_grpc.add_MinerServiceServicer_to_server(miner_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    validator = HotkeySigner.generate()
    roster = write_roster(tmp_path / "roster.toml", [])
    directory = MinerDirectory(
        validator, LocalRoster(roster), {str(miner_key.identity): f"127.0.0.1:{port}"}
    )
    manager = JobManager(validator, None, directory, tmp_path, 1)  # type: ignore[arg-type]
    spec = job_pb2.JobSpec(image="horde/base:latest", command=["true"], executor_class="c")
    try:
        (miner,) = await directory.miners()
        return await manager._attempt(LiveJob("job-1", spec, "client", None), miner)
    finally:
        await directory.close()
        await server.stop(None)


async def test_a_miner_cannot_put_its_result_on_another_miners_account(tmp_path: Path) -> None:
    """The result's miner is the miner whose stream it came on, whatever the result says: a
    stand-in miner (a real gRPC server on port 0) answering a failure in a rival's name."""
    rival = str(HotkeySigner.generate().identity)
    me = HotkeySigner.generate()

    class Dishonest(miner_pb2_grpc.MinerServiceServicer):  # type: ignore[misc]
        async def RunJob(self, request_iterator: Any, context: Any) -> Any:
            start = await anext(aiter(request_iterator))
            yield miner_pb2.RunJobResponse(
                result=job_pb2.JobResult(
                    job_uuid=start.start.job_uuid,
                    state=common_pb2.JOB_STATE_HORDE_FAILED,
                    reason=common_pb2.FAILURE_REASON_EXECUTOR_LOST,
                    miner_hotkey=rival,
                )
            )

    res = await attempt_on(Dishonest(), me, tmp_path)
    assert res is not None and res.reason == common_pb2.FAILURE_REASON_EXECUTOR_LOST
    assert res.miner_hotkey == str(me.identity)


async def test_a_miner_that_took_the_job_and_dropped_is_blamed_not_passed_over(
    tmp_path: Path,
) -> None:
    """A miner that answered (it took the job: here a malformed receipt, which must not crash
    the validator either) and then dropped the call UNAVAILABLE, still at reservation: the job
    ends on it, named, not quietly sent to another miner (where it could run twice)."""
    me = HotkeySigner.generate()

    class Dropping(miner_pb2_grpc.MinerServiceServicer):  # type: ignore[misc]
        async def RunJob(self, request_iterator: Any, context: Any) -> Any:
            start = await anext(aiter(request_iterator))
            assert start.start.job_uuid
            # A started receipt it could not even sign properly: taken all the same.
            yield miner_pb2.RunJobResponse(
                receipt=receipts_pb2.LifecycleReceipt(payload=b"garbage", miner_signature=b"x")
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")

    res = await attempt_on(Dropping(), me, tmp_path)
    assert res is not None, "the job was passed over to another miner"
    assert res.reason == common_pb2.FAILURE_REASON_MINER_UNREACHABLE
    assert res.miner_hotkey == str(me.identity)
