"""A real `horde dev up` network for tests that drive the CLI against it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def dev_network(state: Path) -> Iterator[Path]:
    """Run `horde dev up --state-dir STATE` (its log beside STATE) until the block ends; yields
    STATE once endpoints.json is written."""
    log_path = state.parent / f"{state.name}-dev.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "horde"), "dev", "up", "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert proc.stdout is not None
            # dev up prints one line on stdout once endpoints.json is written (or exits).
            assert "dev network up" in proc.stdout.readline(), log_path.read_text()
            assert (state / "endpoints.json").exists()
            yield state
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
