"""Fixtures for the spot-check tests (the Docker harness is in spotcheck_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from docker_images import ensure_images
from spotcheck_support import IMAGES, SpotNet


@pytest.fixture(scope="session")
def horde_images() -> list[str]:
    ensure_images(IMAGES)
    return IMAGES


@pytest.fixture
async def docker(horde_images: list[str]) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def spotnet(tmp_path: Path, docker: aiodocker.Docker) -> AsyncIterator[SpotNet]:
    net = SpotNet(tmp_path / "net")
    try:
        yield net
    finally:
        await net.stop()
