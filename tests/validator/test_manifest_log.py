"""A miner whose manifest cannot be had is logged once until it answers again (a job waiting for
executors asks about twice a second: the validator logged each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from horde_services.core.chain import LocalRoster, write_roster
from horde_services.core.identity import HotkeySigner
from horde_services.validator import miners
from horde_services.validator.miners import MinerDirectory, MinerRef


async def test_an_unreachable_miner_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def info(self, event: str, **fields: Any) -> None:
            lines.append((event, fields))

        def __getattr__(self, _level: str) -> Any:
            return lambda *args, **kwargs: None

    monkeypatch.setattr(miners, "log", Log())
    roster = LocalRoster(write_roster(tmp_path / "roster.toml", []))
    directory = MinerDirectory(HotkeySigner.generate(), roster, {})
    gone = MinerRef(str(HotkeySigner.generate().identity), "127.0.0.1:1")  # nobody there
    try:
        for _ in range(5):
            manifest, error = await directory.manifest_or_error(gone)
            assert manifest is None and error.startswith("UNAVAILABLE: ")
    finally:
        await directory.close()
    assert [event for event, _ in lines] == ["manifest_unavailable"]
    assert lines[0][1]["miner"] == gone.identity
