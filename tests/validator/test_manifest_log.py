"""A miner whose manifest cannot be had is logged once until it answers again (a job waiting for
executors asks about twice a second: the validator logged each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from log_support import record_log

from horde_services.core.chain import LocalRoster, write_roster
from horde_services.core.identity import HotkeySigner
from horde_services.validator import miners
from horde_services.validator.miners import MinerDirectory, MinerRef


async def test_an_unreachable_miner_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = record_log(monkeypatch, miners, ("info",))
    roster = LocalRoster(write_roster(tmp_path / "roster.toml", []))
    directory = MinerDirectory(HotkeySigner.generate(), roster, {})
    gone = MinerRef(str(HotkeySigner.generate().identity), "127.0.0.1:1")  # nobody there
    try:
        for _ in range(5):
            manifest, error = await directory.manifest_or_error(gone)
            assert manifest is None and error.startswith("UNAVAILABLE: ")
    finally:
        await directory.close()
    assert [event for _, event, _ in lines] == ["manifest_unavailable"]
    assert lines[0][2]["miner"] == gone.identity
