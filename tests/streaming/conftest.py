"""Fixtures for the gateway tests: the fake validator and job proxy harness (the database
fixtures, `engine` and `new_database_url`, come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from streaming_support import Harness, start_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """Fake validator and job proxy (real gRPC, real keys); tests start gateways on it."""
    h = await start_harness(tmp_path)
    try:
        yield h
    finally:
        await h.close()
