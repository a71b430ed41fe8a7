"""`horde miner jobs` on a terminal: at 80 columns every note is still shown, whole (it used to
vanish off the table's right edge); wide terminals keep the note in the table."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from horde_services.cli import miner_cmds

DETAIL = (
    "the job exited with status 3 after writing a long explanation of what went wrong, which "
    "runs well past eighty columns"
)


def _job(n: int, detail: str) -> dict[str, object]:
    return {
        "job_uuid": f"0d9f3a52-7c8e-4a43-9c3c-2b0b8f6c3e{n:02d}",
        "validator": "5F" + "a" * 46,
        "executor_id": "ed25519:" + "b" * 64,
        "state": "failed",
        "reason": "nonzero_exit",
        "in_flight": False,
        "started_ns": 1,
        "ended_ns": 2,
        "job_kind": "organic",
        "countersigned": True,
        "detail": detail,
    }


def _render(monkeypatch: pytest.MonkeyPatch, width: int) -> str:
    screen = io.StringIO()
    monkeypatch.setattr(
        miner_cmds,
        "console",
        lambda: Console(file=screen, width=width, force_terminal=True, color_system=None),
    )
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    jobs = [_job(n, f"{DETAIL} ({n})" if n % 2 else "") for n in range(12)]
    miner_cmds._print_jobs({"jobs": jobs, "in_flight": 0}, as_json=False)
    return screen.getvalue()


def test_at_80_columns_every_note_is_shown_whole_below_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = _render(monkeypatch, 80)
    assert max(len(line) for line in out.splitlines()) <= 80
    table, _, notes = out.partition("└")
    assert "note" in table
    # Each id stays on one line of its cell: shortened to fit, never wrapped.
    assert "5F" + "a" * 9 + "..." in table and "ed25519:bbb..." in table
    for mark in range(1, 7):  # six jobs with a note, marked [1]..[6] in the table
        assert f"[{mark}]" in table
    words = " ".join(notes.split())
    for n in (1, 3, 5, 7, 9, 11):
        assert f"{DETAIL} ({n})" in words


def test_a_wide_terminal_keeps_notes_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _render(monkeypatch, 200)
    table, _, after = out.partition("└")
    assert "[1]" not in out
    assert after.strip("─┴┘\n ") == ""  # nothing follows the table
    assert "runs well past" in table
