"""Helpers for tests that run Horde's processes."""

from __future__ import annotations

import subprocess


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr that is not a JSON log line; fails if there are more."""
    lines = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    return lines[0]
