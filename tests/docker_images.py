"""Docker for the tests that run real containers: a missing engine fails them, never skips them
(they are the sandbox's proof, and .ci/run starts an engine), and Horde's images are built with
deploy/images/build.sh when some are missing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "deploy" / "images" / "build.sh"


def docker_problem() -> str | None:
    """None when the Docker CLI and engine answer, else why not."""
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


def ensure_images(images: Sequence[str]) -> None:
    """Fail the test when Docker is unusable; build the images when any of them is missing."""
    problem = docker_problem()
    if problem is not None:
        pytest.fail(f"{problem} (these tests run real containers; .ci/run starts an engine)")
    have = subprocess.run(
        ["docker", "image", "inspect", *images], capture_output=True, timeout=30, check=False
    )
    if have.returncode != 0:
        build = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
        )
        if build.returncode != 0:
            pytest.fail(f"{BUILD_SCRIPT} failed:\n{build.stdout}\n{build.stderr}")
