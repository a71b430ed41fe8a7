"""Fixtures for the streaming execution tests (the harness is in streaming_exec_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from docker_images import ensure_images
from streaming_exec_support import (
    IMAGES,
    Keys,
    Network,
    job_objects,
    make_keys,
    wait_for,
)


@pytest.fixture(scope="session")
def horde_images() -> list[str]:
    """Horde's images, demo-llm included, built with deploy/images/build.sh when missing."""
    ensure_images(IMAGES)
    return IMAGES


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
async def docker(horde_images: list[str]) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def bare_net(
    tmp_path: Path, session_keys: Keys, docker: aiodocker.Docker
) -> AsyncIterator[Network]:
    """Keys and a network object; the test starts the services (`await net.start(...)`)."""
    net = Network(tmp_path / "net", session_keys, docker)
    try:
        yield net
    finally:
        await net.close()
        left: list[str] = []

        async def gone() -> bool:
            nonlocal left
            left = await job_objects(docker, net.jobs)
            return not left

        try:
            try:
                await wait_for(gone, 30.0, "the jobs' containers to be removed", interval=0.2)
            except AssertionError:
                raise AssertionError(f"objects left behind: {left}") from None
        finally:
            await net.shutdown()


@pytest.fixture
async def net(bare_net: Network) -> Network:
    await bare_net.start()
    return bare_net
