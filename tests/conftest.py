"""Fixtures every test directory may use: fresh databases, SQLite and a real PostgreSQL server
started once for the session (Debian's postgresql package; .ci/run installs it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core.db import open_database


def _pg_bin() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries not found: install Debian's postgresql package "
        "(.ci/run does this)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL cluster on 127.0.0.1 for this test session; yields a base URL."""
    pg = _pg_bin()
    data = Path(tempfile.mkdtemp(prefix="horde-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [*as_user, str(pg / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "horde"],
        check=True,
        capture_output=True,
    )
    log = data / "server.log"
    subprocess.run(
        [
            *as_user,
            str(pg / "pg_ctl"),
            "-D",
            str(data / "db"),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+asyncpg://horde@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_user, str(pg / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"],
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)


_counter = iter(range(10**6))


async def database_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of `kind` ("sqlite" or "postgresql")."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'horde.db'}"
    base = request.getfixturevalue("postgres_server")
    name = f"horde_test_{os.getpid()}_{next(_counter)}"
    admin = await asyncio.to_thread(
        subprocess.run,
        ["psql", base.replace("+asyncpg", "") + "/postgres", "-c", f"CREATE DATABASE {name}"],
        capture_output=True,
        text=True,
    )
    assert admin.returncode == 0, admin.stderr
    return f"{base}/{name}"


@pytest.fixture
def new_database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], Awaitable[str]]:
    """`database_url` as a fixture: test modules cannot import this conftest by name when
    another test directory's conftest was imported first (tests/streaming_exec)."""

    async def make(kind: str) -> str:
        return await database_url(kind, request, tmp_path)

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = await open_database(await database_url(request.param, request, tmp_path))
    try:
        yield eng
    finally:
        await eng.dispose()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "settings(**kw): more settings for a test's service (where its fixture says)"
    )
