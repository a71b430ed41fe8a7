"""The real path: a real executor runs the challenge in the horde/synthetic image under the
sandbox, through a real miner, for a validator round."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from horde.v1 import validator_admin_pb2
from synthetic_support import WAIT_S, SynthNet

from services.core.config import ExecutorSettings, SyntheticClass, load_settings
from services.core.identity import Ed25519Signer
from services.executor.app import start_executor

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "images" / "build.sh"
IMAGE = "horde/synthetic:latest"


@pytest.fixture(scope="module")
def synthetic_image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not found")
    if subprocess.run(["docker", "version"], capture_output=True, check=False).returncode:
        pytest.skip("Docker daemon not reachable")
    have = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False)
    if have.returncode != 0:
        build = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
        )
        if build.returncode != 0:
            pytest.fail(f"{BUILD_SCRIPT} failed:\n{build.stdout}\n{build.stderr}")
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
