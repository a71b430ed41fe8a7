"""Organic jobs end to end: SubmitJob through validator, miner and executor to Docker and back."""

from __future__ import annotations

import pytest
from horde.v1 import common_pb2 as S
from horde.v1 import job_pb2
from organic_support import DEMO_IMAGE, Network, make_tar, sha256, spec_for

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("x", [1])
async def test_smoke(net: Network, x: int) -> None:
    tar = make_tar({"a.txt": b"hello world\n", "sub/b.txt": b"horde\n"})
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                inline_archive=job_pb2.InlineArchive(
                    format=job_pb2.ARCHIVE_FORMAT_TAR, size_bytes=len(tar), sha256=sha256(tar)
                )
            )
        ],
    )
    run = await net.run_job(spec, {0: tar})
    print(run.describe(), [S.JobState.Name(s) for s in run.states], run.files())
    assert run.result.state == S.JOB_STATE_COMPLETED
