"""A miner's refusal reaches the caller with the miner's own status and words, never as gRPC's
generic "INTERNAL: Internal error from Core" (what grpc.aio reports when the caller's first write
races the refusal: seen on executor links, whose miner now accepts a link with its initial
metadata before the executor writes). Real miner (gRPC on port 0, SQLite), real signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from horde.v1 import common_pb2, job_pb2
from miner_admin_support import MinerNet, make_net

from horde_services.core.chain import LocalRoster
from horde_services.core.identity import create_key_file
from horde_services.validator.jobs import JobManager, LiveJob
from horde_services.validator.miners import MinerDirectory

pytestmark = pytest.mark.timeout(60)
ATTEMPTS = 20  # the race, when there was one, showed in about one attempt in ten


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[MinerNet]:
    net = await make_net(tmp_path, executors=1)
    await net.start()
    try:
        yield net
    finally:
        await net.stop()


async def test_a_validator_the_miner_does_not_serve_reads_the_miners_reason(
    net: MinerNet, tmp_path: Path
) -> None:
    stranger = create_key_file(tmp_path / "other-validator.json", "hotkey")
    spec = job_pb2.JobSpec(image="horde/base:latest", command=["true"], executor_class="c")
    for attempt in range(ATTEMPTS):
        # A fresh channel each time, as a validator's first call to a miner makes one.
        directory = MinerDirectory(
            stranger, LocalRoster(net.settings.roster_file), {net.identity: net.address}
        )
        manager = JobManager(stranger, None, directory, tmp_path, 1)  # type: ignore[arg-type]
        (miner,) = await directory.miners()
        try:
            res = await manager._attempt(LiveJob(f"job-{attempt}", spec, "client", None), miner)
        finally:
            await directory.close()
        assert res is not None
        assert res.state == common_pb2.JOB_STATE_HORDE_FAILED
        assert "INTERNAL" not in res.detail, (attempt, res.detail)
        assert "PERMISSION_DENIED" in res.detail, (attempt, res.detail)
