"""A validator stopping (SIGTERM: ServiceApp.stop runs the same drain) refuses new jobs, lets
the organic jobs in flight finish for `drain_timeout_s`, and ends the rest with a result their
clients see before the server stops (it used to drop their calls, and end the jobs
validator_restarted only at its next start)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import common_pb2 as S
from horde.v1 import validator_pb2
from organic_support import (
    BASE_IMAGE,
    Network,
    assert_result,
    python_job,
    spec_for,
    wait_for,
    wait_job_container_running,
    wait_no_job_objects,
)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _restart_validator(net: Network, drain_timeout_s: float) -> None:
    assert net.validator is not None
    await net.validator.stop(0)
    await net.start_validator(drain_timeout_s=drain_timeout_s)


async def _wait_not_serving(net: Network) -> None:
    assert net.validator is not None
    channel = net.channel(
        f"127.0.0.1:{net.validator.port}", net.keys.signers["client"], net.validator.identity
    )
    health = health_pb2_grpc.HealthStub(channel)

    async def not_serving() -> bool:
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=3)
        return resp.status == NOT_SERVING

    await wait_for(not_serving, 10, "the validator's health to go NOT_SERVING")


async def test_a_stopping_validator_lets_the_job_in_flight_finish(net: Network) -> None:
    await _restart_validator(net, drain_timeout_s=60)
    assert net.validator is not None
    job = net.start_job(python_job("import time; time.sleep(4); print('finished')"))
    job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
    stopping = asyncio.create_task(net.validator.stop(5))
    await _wait_not_serving(net)

    # A job submitted now is refused, with the reason and a status a client retries on.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await net.run_job(spec_for(BASE_IMAGE, ["true"]), within=20)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (refused.value.details() or "")
    assert not stopping.done()

    run = await job.finished(within=30)
    assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
    assert run.result.stdout.data == b"finished\n"
    await asyncio.wait_for(stopping, 20)

    # Stored as it ended: the next start finds nothing in flight to fail.
    await net.start_validator()
    record = (await net.client().GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
    assert record.state == S.JOB_STATE_COMPLETED, record


async def test_a_job_outlasting_the_validator_drain_ends_with_a_result(net: Network) -> None:
    await _restart_validator(net, drain_timeout_s=1)
    assert net.validator is not None
    job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120))
    job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
    await wait_job_container_running(net.docker, job_uuid)

    stopping = asyncio.create_task(net.validator.stop(5))
    # The client's own call gets the result: not a broken stream.
    run = await job.finished(within=20)
    res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_VALIDATOR_RESTARTED)
    assert "shut down while the job was in flight" in res.detail, res.detail
    assert res.miner_hotkey == ""  # the validator's doing: counted against no miner
    await asyncio.wait_for(stopping, 20)
    # Its miner saw the call end and stopped the job.
    await wait_no_job_objects(net.docker, [job_uuid], within=30)

    await net.start_validator()
    record = (await net.client().GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
    assert record.state == S.JOB_STATE_HORDE_FAILED
    assert record.result.detail == res.detail  # as stored at the stop, not rewritten at start
