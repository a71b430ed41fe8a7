"""Fixtures for the spot-check tests (the Docker harness is in spotcheck_support.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from spotcheck_support import IMAGES, REPO_ROOT, SpotNet


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not found"
    probe = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"Docker daemon not reachable: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def horde_images() -> list[str]:
    problem = _docker_problem()
    if problem is not None:
        if os.environ.get("HORDE_REQUIRE_DOCKER") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    have = subprocess.run(
        ["docker", "image", "inspect", *IMAGES], capture_output=True, timeout=30, check=False
    )
    if have.returncode != 0:
        script = REPO_ROOT / "deploy" / "images" / "build.sh"
        build = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=1800, check=False
        )
        if build.returncode != 0:
            pytest.fail(f"{script} failed:\n{build.stdout}\n{build.stderr}")
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
