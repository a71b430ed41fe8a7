"""After a validator restart no job is left in flight: each ends as horde_failed with a reason."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc

from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import ValidatorSettings, load_settings
from horde_services.core.db import open_database
from horde_services.core.identity import Ed25519Signer, HotkeySigner
from horde_services.core.proto_util import event, result
from horde_services.core.server import open_channel
from horde_services.validator.app import start_validator
from horde_services.validator.store import JobStore


def _validator_settings(tmp_path: Path) -> tuple[HotkeySigner, Ed25519Signer, ValidatorSettings]:
    """A validator's key, an enrolled client's key, and its settings (state in tmp_path)."""
    validator, client = HotkeySigner.generate(), Ed25519Signer.generate()
    roster = tmp_path / "roster.toml"
    write_roster(roster, [Neuron(uid=0, hotkey=validator.identity.ss58, validator_permit=True)])
    settings = load_settings(
        ValidatorSettings, state_dir=tmp_path, roster_file=roster, clients=[str(client.identity)]
    )
    return validator, client, settings


@contextlib.asynccontextmanager
async def _serving(
    settings: ValidatorSettings, validator: HotkeySigner, client: Ed25519Signer
) -> AsyncIterator[validator_pb2_grpc.ValidatorServiceStub]:
    """The validator started on `settings`, and a stub for `client` to call it."""
    app = await start_validator(settings, validator)
    try:
        async with open_channel(
            f"127.0.0.1:{app.port}", signer=client, callee=str(validator.identity)
        ) as channel:
            yield validator_pb2_grpc.ValidatorServiceStub(channel)
    finally:
        await app.stop(0)


async def test_jobs_in_flight_end_as_horde_failed_after_restart(tmp_path: Path) -> None:
    validator, client, settings = _validator_settings(tmp_path)
    # A job the previous validator process left running.
    engine = await open_database(settings.database("validator"))
    store = JobStore(engine)
    job = str(uuid.uuid4())
    await store.create(job, str(client.identity), "organic", job_pb2.JobSpec(image="horde/base"))
    await store.add_event(event(job, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION))
    await engine.dispose()

    async with _serving(settings, validator, client) as stub:
        got = await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job), timeout=10)
        watched = [m async for m in stub.WatchJob(validator_pb2.WatchJobRequest(job_uuid=job))]
    assert got.job.state == common_pb2.JOB_STATE_HORDE_FAILED
    assert got.job.result.reason == common_pb2.FAILURE_REASON_VALIDATOR_RESTARTED
    assert "restarted" in got.job.result.detail
    assert watched[-1].result.state == common_pb2.JOB_STATE_HORDE_FAILED


async def test_outputs_past_their_retention_are_said_to_be_gone(tmp_path: Path) -> None:
    """A finished job whose inline output files were pruned: DownloadOutputs says so, rather
    than answering with no files as if the job had made none."""
    validator, client, settings = _validator_settings(tmp_path)
    engine = await open_database(settings.database("validator"))
    store = JobStore(engine)
    pruned, none_made = str(uuid.uuid4()), str(uuid.uuid4())
    for job in (pruned, none_made):
        await store.create(job, str(client.identity), "organic", job_pb2.JobSpec(image="x"))
    res = result(pruned, common_pb2.JOB_STATE_COMPLETED, common_pb2.FAILURE_REASON_UNSPECIFIED)
    res.outputs.add(path="a.txt", size_bytes=3)
    await store.put_outputs(pruned, [("a.txt", b"abc")])
    await store.finish(res)
    await store.finish(
        result(none_made, common_pb2.JOB_STATE_COMPLETED, common_pb2.FAILURE_REASON_UNSPECIFIED)
    )
    assert await store.prune_outputs(time.time_ns() + 1) == 1
    await engine.dispose()

    async with _serving(settings, validator, client) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            async for _ in stub.DownloadOutputs(
                validator_pb2.DownloadOutputsRequest(job_uuid=pruned)
            ):
                pass
        request = validator_pb2.DownloadOutputsRequest(job_uuid=none_made)
        made = [m async for m in stub.DownloadOutputs(request)]
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no longer kept" in (gone.value.details() or "")
    assert made == []
