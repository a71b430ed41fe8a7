"""The reason `horde validator weights` shows for a score, from a real SQLite database: penalty
amounts read as the amounts they are (a zero-amount penalty is not "-0.000")."""

from __future__ import annotations

from pathlib import Path

from horde_services.core.chain import LocalRoster, Neuron, write_roster
from horde_services.core.config import SyntheticSettings
from horde_services.core.db import open_database
from horde_services.core.identity import HotkeySigner
from horde_services.validator.scoring import Scorer, add_penalty
from horde_services.validator.synthetic import SyntheticStore


async def test_penalty_amounts_in_the_reason(tmp_path: Path) -> None:
    free, fined, clean = (HotkeySigner.generate().identity for _ in range(3))
    roster = write_roster(
        tmp_path / "roster.toml",
        [Neuron(uid=n, hotkey=m.ss58) for n, m in enumerate((free, fined, clean), start=1)],
    )
    engine = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'validator.db'}")
    try:
        store = SyntheticStore(engine)
        # spotcheck.penalty_amount is 0 by default: a mismatch is counted, at no cost.
        await add_penalty(store, str(free), "spotcheck_mismatch", 0.0, "spot check 1")
        await add_penalty(store, str(fined), "spotcheck_mismatch", 1.25, "spot check 2")
        await add_penalty(store, str(fined), "spotcheck_mismatch", 0.0, "spot check 3")
        scores = await Scorer(store, LocalRoster(roster), SyntheticSettings()).scores()
        reasons = {s.miner: s.reason for s in scores.miners}
        assert reasons[str(free)].endswith("; penalties 0 (1)"), reasons[str(free)]
        assert reasons[str(fined)].endswith("; penalties -1.250 (2)"), reasons[str(fined)]
        assert str(clean) not in reasons  # nothing in the window: not listed
    finally:
        await engine.dispose()
