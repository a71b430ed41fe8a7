"""A service's state directory and database at start-up: a state_dir the service makes itself is
private (0700) without systemd's UMask, an existing one keeps its mode, an executor's work_dir is
not made private (job containers read there); a schema upgrade is logged in one line (from and to
which revision), a database already at head logs nothing. With real files, real in-process calls
and real `horde SERVICE serve` processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from alembic import command
from structlog.testing import capture_logs
from test_startup_errors import HORDE, WITH_DATABASE, config

from horde_services.core import db
from horde_services.core.statelock import lock_dir

HEAD = "0004"

pytestmark = pytest.mark.timeout(120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def serve_until_started(service: str, cfg: Path) -> list[dict[str, object]]:
    """`horde SERVICE serve` (umask 022, as a shell's) until it has started, then SIGTERM; its
    JSON log lines up to then."""
    proc = subprocess.Popen(
        [HORDE, service, "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        umask=0o022,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "service_started" in line:
                break
        else:
            pytest.fail(f"`horde {service} serve` did not start: {''.join(lines)}")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_service_makes_its_state_dir_private_and_logs_the_new_schema(
    tmp_path: Path, service: str
) -> None:
    state = tmp_path / "var" / "state"  # neither exists yet
    cfg = config(tmp_path, service, state_dir=state)
    events = serve_until_started(service, cfg)
    assert mode(state) == 0o700
    assert mode(state.parent) == 0o755  # only the state dir itself, not the dirs above it
    upgraded = [e for e in events if e.get("event") == "schema_upgraded"]
    assert len(upgraded) == 1, events
    assert upgraded[0]["database"] == str(state / f"{service}.db")
    assert upgraded[0]["from_revision"] == "none (new database)"
    assert upgraded[0]["to_revision"] == HEAD
    # Started again on a database at head: not a word about the schema.
    events = serve_until_started(service, cfg)
    assert not [e for e in events if e.get("event") == "schema_upgraded"], events


def test_an_existing_state_dir_keeps_its_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    lock = lock_dir(state, "validator")
    lock.release()
    assert mode(state) == 0o755


def test_lock_dir_makes_a_state_dir_private_but_not_a_work_dir(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state, work = tmp_path / "state", tmp_path / "work"
        lock_dir(state, "validator").release()
        lock_dir(work, "executor", setting="work_dir").release()
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert mode(work) == 0o755


async def test_a_sqlite_file_s_new_directory_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        engine = await db.open_database(f"sqlite+aiosqlite:///{tmp_path / 'state' / 'x.db'}")
    finally:
        os.umask(old)
    await engine.dispose()
    assert mode(tmp_path / "state") == 0o700


async def test_an_upgrade_from_an_older_revision_is_logged_once(tmp_path: Path) -> None:
    path = tmp_path / "validator.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(command.upgrade, db._alembic_config(url), "0003")
    with capture_logs() as logs:
        engine = await db.open_database(url)
    await engine.dispose()
    assert [e for e in logs if e["event"] == "schema_upgraded"] == [
        {
            "event": "schema_upgraded",
            "log_level": "info",
            "database": str(path),
            "from_revision": "0003",
            "to_revision": HEAD,
        }
    ]
    with capture_logs() as logs:
        engine = await db.open_database(url)
    await engine.dispose()
    assert logs == []
