"""One service process per state directory (horde_services/core/statelock.py), with real processes:
a lock held by another process is refused, saying whose pid; the kernel frees it when the holder
exits, kill -9 included; services sharing a directory each hold their own lock file. And, as
`horde SERVICE serve`: a second validator on a live one's state dir (and an executor on a held
work_dir) exits 2 in one line before it touches anything there."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from process_support import one_line

from horde_services.core.errors import ConfigError
from horde_services.core.identity import create_key_file
from horde_services.core.statelock import lock_dir

HORDE = str(Path(sys.executable).with_name("horde"))

pytestmark = pytest.mark.timeout(120)

HOLDER = """
import sys
from pathlib import Path
from horde_services.core.statelock import lock_dir
lock = lock_dir(Path(sys.argv[1]), sys.argv[2], setting=sys.argv[3])
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


Hold = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def hold() -> Iterator[Hold]:
    """Start a process that holds DIR/<service>.lock: ``hold(dir, service, setting)``."""
    procs: list[subprocess.Popen[str]] = []

    def start(directory: Path, service: str, setting: str = "state_dir") -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(directory), service, setting],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"  # blocks until the lock is held
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_a_lock_held_by_another_process_is_refused_with_its_pid(tmp_path: Path, hold: Hold) -> None:
    state = tmp_path / "state"
    holder = hold(state, "validator")
    with pytest.raises(ConfigError) as refused:
        lock_dir(state, "validator")
    assert str(refused.value) == (
        f"state_dir {state.resolve()} is in use by another validator (pid {holder.pid})"
    )
    # The holder exits (its stdin closed): the directory is free, and says who holds it now.
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    lock = lock_dir(state, "validator")
    try:
        assert (state / "validator.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_kill_9_of_the_holder_frees_the_directory(tmp_path: Path, hold: Hold) -> None:
    work = tmp_path / "work"
    holder = hold(work, "executor", "work_dir")
    with pytest.raises(ConfigError, match=rf"^work_dir {work} is in use by another executor "):
        lock_dir(work, "executor", setting="work_dir")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    # The stale file (with the dead holder's pid) does not block a restart.
    assert (work / "executor.lock").read_text() == f"{holder.pid}\n"
    lock_dir(work, "executor", setting="work_dir").release()


def test_services_sharing_a_directory_hold_their_own_locks(tmp_path: Path) -> None:
    """`horde dev up` runs every service in one process on one state dir: their locks are
    different files. Locking one file twice is refused, also in the same process."""
    state = tmp_path / "state"
    validator = lock_dir(state, "validator")
    executor = lock_dir(state, "executor", setting="work_dir")
    try:
        with pytest.raises(ConfigError, match=rf"\(pid {os.getpid()}\)$"):
            lock_dir(state, "validator")
        validator.release()
        validator.release()  # idempotent
        assert not validator.held
        lock_dir(state, "validator").release()
    finally:
        validator.release()
        executor.release()


def test_a_directory_that_cannot_hold_the_lock_file_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError) as refused:
        lock_dir(tmp_path / "afile" / "state", "validator")
    assert str(refused.value).startswith(
        f"invalid setting 'state_dir': {tmp_path / 'afile' / 'state'}: "
    )


# -------------------------------------------------------------------- `horde SERVICE serve`


@pytest.fixture
async def live_validator(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """`horde validator serve` on tmp_path/state, started (its service_started line seen)."""
    key = tmp_path / "validator.json"
    create_key_file(key, "hotkey")
    roster = tmp_path / "roster.toml"
    roster.touch()
    cfg = tmp_path / "validator.toml"
    cfg.write_text(
        f'key_file = "{key}"\nstate_dir = "{tmp_path / "state"}"\nroster_file = "{roster}"\n'
        'listen = "127.0.0.1:0"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        "validator",
        "serve",
        "--config",
        str(cfg),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        seen: list[bytes] = []
        async with asyncio.timeout(60):
            while True:
                line = await proc.stderr.readline()
                assert line, f"the validator exited: {b''.join(seen).decode()}"
                seen.append(line)
                if json.loads(line).get("event") == "service_started":
                    break
        yield proc, cfg
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await proc.communicate()


async def test_a_second_validator_on_a_live_ones_state_dir_exits_2_and_leaves_it_alone(
    tmp_path: Path, live_validator: tuple[asyncio.subprocess.Process, Path]
) -> None:
    first, cfg = live_validator
    state = tmp_path / "state"
    # A queued job's spooled input: a second validator's recover() would remove the spool.
    spooled = state / "spool" / "0d9f3a52-7c8e-4a43-9c3c-2b0b8f6c3e11" / "input.bin"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"input")
    second = await asyncio.to_thread(
        subprocess.run,
        [HORDE, "validator", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stderr
    assert one_line(second) == (
        f"horde validator: configuration error: state_dir {state} is in use by another "
        f"validator (pid {first.pid})"
    )
    assert spooled.read_bytes() == b"input"
    assert first.returncode is None  # the first one still runs


async def test_an_executor_on_a_held_work_dir_exits_2_before_it_sweeps(
    tmp_path: Path,
    hold: Hold,
) -> None:
    """The lock is taken before Docker is asked anything (so this needs no engine): the running
    executor's containers and job directories are never swept by a second one."""
    work = tmp_path / "work"
    leftover = work / "job-0d9f3a52-abcd1234"
    leftover.mkdir(parents=True)
    holder = hold(work, "executor", "work_dir")
    key = tmp_path / "executor.json"
    create_key_file(key, "ed25519")
    miner = create_key_file(tmp_path / "miner.json", "hotkey")
    cfg = tmp_path / "executor.toml"
    cfg.write_text(
        f'key_file = "{key}"\nstate_dir = "{tmp_path / "state"}"\nwork_dir = "{work}"\n'
        f'miner_address = "127.0.0.1:9"\nminer_identity = "{miner.identity}"\n'
        'listen = "127.0.0.1:0"\n'
    )
    out = await asyncio.to_thread(
        subprocess.run,
        [HORDE, "executor", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        # No engine here: had it got that far, it would exit 1 saying so.
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"},
    )
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        f"horde executor: configuration error: work_dir {work} is in use by another executor "
        f"(pid {holder.pid})"
    )
    assert leftover.is_dir()


async def test_a_miner_on_a_held_state_dir_is_refused_before_its_database(
    tmp_path: Path, hold: Hold
) -> None:
    """A second miner would share the live one's database; it is refused before it opens it,
    and a miner that stops gives its directory back. (Gateways may share a database and a
    state dir on purpose: tests/streaming/test_store.py runs two on one.)"""
    from horde_services.core.chain import write_roster
    from horde_services.core.config import MinerSettings
    from horde_services.miner.app import start_miner

    key = create_key_file(tmp_path / "miner.json", "hotkey")
    state = tmp_path / "state"
    roster = write_roster(tmp_path / "roster.toml", [])
    settings = MinerSettings(key_file=tmp_path / "miner.json", state_dir=state, roster_file=roster)
    holder = hold(state, "miner")
    with pytest.raises(ConfigError) as refused:
        await start_miner(settings, key)
    assert str(refused.value) == (
        f"state_dir {state.resolve()} is in use by another miner (pid {holder.pid})"
    )
    assert not (state / "miner.db").exists()  # nothing opened
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    # Free now: it starts, holds the lock while it runs, and gives it back when it stops.
    app = await start_miner(settings, key)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another miner \(pid {os.getpid()}\)$"):
            lock_dir(state, "miner")
    finally:
        await app.stop(0)
    lock_dir(state, "miner").release()
