"""Fixtures for the synthetic tests (the harness itself is in synthetic_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from synthetic_support import SynthNet


@pytest.fixture
async def synth(tmp_path: Path) -> AsyncIterator[SynthNet]:
    net = SynthNet(tmp_path / "net")
    try:
        yield net
    finally:
        await net.close()
