"""Shared by the `horde job` tests that run against a real `horde dev up` network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from devnet import dev_network
from docker_images import ensure_images

BASE = "horde/base:latest"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A `horde dev up` network for the module's tests (its state dir)."""
    ensure_images([BASE])
    with dev_network(tmp_path_factory.mktemp("devnet")) as state:
        yield state
