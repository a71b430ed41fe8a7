"""The real path: a real executor runs the challenge in the horde/synthetic image under the
sandbox, through a real miner, for a validator round."""

from __future__ import annotations

import asyncio

import pytest
from docker_images import ensure_images
from horde.v1 import validator_admin_pb2
from synthetic_support import WAIT_S, SynthNet

from horde_services.core.config import ExecutorSettings, SyntheticClass, load_settings
from horde_services.core.identity import Ed25519Signer
from horde_services.executor.app import start_executor

IMAGE = "horde/synthetic:latest"


@pytest.fixture(scope="module")
def synthetic_image() -> str:
    ensure_images([IMAGE])
    return IMAGE


async def test_real_executor_solves_in_the_synthetic_image(
    synth: SynthNet, synthetic_image: str
) -> None:
    klass = SyntheticClass(range_size=200_000, digests=8, deadline_s=30.0, weight=1.0)
    key = Ed25519Signer.generate()
    miner = await synth.add_miner([], enrol=(str(key.identity),))
    executor, agent = await start_executor(
        load_settings(
            ExecutorSettings,
            miner_address=miner.address,
            miner_identity=miner.identity,
            executor_class="cpu-small",
            state_dir=synth.root / "executor",
            work_dir=synth.root / "executor" / "work",
        ),
        key,
    )
    executor.start_background()
    try:
        async with asyncio.timeout(WAIT_S):
            await agent.connected.wait()
        await synth.start_validator(classes={"cpu-small": klass})
        stub, close = synth.admin_stub()
        try:
            resp = await stub.RunRound(validator_admin_pb2.RunRoundRequest(), timeout=120)
        finally:
            await close()  # type: ignore[misc]
    finally:
        await executor.stop(0)
    [result] = [m for m in resp.miners if m.miner_hotkey == miner.identity]
    [verdict] = result.verdicts
    assert verdict.executor_id == agent.executor_id
    assert verdict.passed, verdict.reason
    # The executor timed the container run; the validator's clock includes the links.
    assert 0 < verdict.executor_duration_s <= verdict.duration_s < klass.deadline_s
