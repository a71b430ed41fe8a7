"""Running the installed `horde` command from the CLI tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def horde(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "horde"), *args], capture_output=True, text=True, timeout=timeout
    )
