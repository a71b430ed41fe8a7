"""`horde SERVICE serve` that cannot start, run as real processes: each says why in one line,
and exits 2 when restarting cannot mend it (the units' RestartPreventExitStatus=2), 1 when it may
(systemd tries again)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_support import one_line

from horde_services.core.identity import create_key_file

HORDE = str(Path(sys.executable).with_name("horde"))
# Services that keep a database (the executor has none).
WITH_DATABASE = ["validator", "miner", "gateway"]


def horde(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HORDE, *args], capture_output=True, text=True, timeout=60)


def config(tmp_path: Path, service: str, extra: str = "") -> Path:
    """A config for `service` that starts as it is (listen on a free port, a local roster)."""
    kind = "hotkey" if service in ("validator", "miner") else "ed25519"
    key = tmp_path / f"{service}.json"
    if not key.exists():
        create_key_file(key, kind)
    roster = tmp_path / "roster.toml"
    roster.touch()
    text = f'key_file = "{key}"\nstate_dir = "{tmp_path / "state"}"\n'
    if service in ("validator", "miner"):
        text += f'roster_file = "{roster}"\n'
    if "listen" not in extra:
        text += 'listen = "127.0.0.1:0"\n'
    path = tmp_path / f"{service}.toml"
    path.write_text(text + extra)
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------- ports


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_busy_listen_port_is_a_configuration_error(
    tmp_path: Path, busy_port: int, service: str
) -> None:
    out = horde(
        service,
        "serve",
        "--config",
        str(config(tmp_path, service, f'listen = "127.0.0.1:{busy_port}"\n')),
    )
    assert out.returncode == 2, out.stderr
    line = one_line(out)  # and not gRPC core's own "E... add_port.cc" line before ours
    assert line == (
        f"horde {service}: configuration error: invalid setting 'listen': "
        f"cannot listen on 127.0.0.1:{busy_port}: the address is in use"
    )


def test_an_address_not_on_this_machine_is_a_configuration_error(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never a local address.
    out = horde(
        "validator",
        "serve",
        "--config",
        str(config(tmp_path, "validator", 'listen = "192.0.2.1:0"\n')),
    )
    assert out.returncode == 2, out.stderr
    assert one_line(out).endswith(
        "cannot listen on 192.0.2.1:0: the address is not one of this machine's"
    )


def test_a_busy_metrics_port_is_a_configuration_error(tmp_path: Path, busy_port: int) -> None:
    cfg = config(tmp_path, "validator")
    out = horde("validator", "serve", "--config", str(cfg), "--metrics-port", str(busy_port))
    assert out.returncode == 2, out.stderr
    assert one_line(out).startswith(
        f"horde validator: cannot serve metrics on 127.0.0.1:{busy_port}"
    )


def test_an_unknown_default_executor_class_stops_the_validator(tmp_path: Path) -> None:
    cfg = config(tmp_path, "validator", 'default_executor_class = "cpu-smal"\n')
    out = horde("validator", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        f"horde validator: configuration error: {cfg}: invalid setting 'default_executor_class' "
        "(env HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS): Value error, 'cpu-smal' is not one of the "
        "executor classes in synthetic.classes (cpu-large, cpu-small)"
    )


@pytest.mark.parametrize("service", ["validator", "miner", "executor", "gateway"])
@pytest.mark.parametrize("port", ["70000", "-1"])
def test_metrics_port_out_of_range_is_a_usage_error(
    tmp_path: Path, service: str, port: str
) -> None:
    out = horde(service, "serve", "--config", str(tmp_path / "unread.toml"), "--metrics-port", port)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"horde {service} serve: error: argument --metrics-port: " in out.stderr
    assert "--metrics-port must be 0 to 65535" in out.stderr


# --------------------------------------------------------------------------------- databases


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_damaged_database_is_one_line_naming_it(tmp_path: Path, service: str) -> None:
    database = tmp_path / "state" / f"{service}.db"
    database.parent.mkdir()
    database.write_bytes(bytes(range(256)) * 32)  # not SQLite
    out = horde(service, "serve", "--config", str(config(tmp_path, service)))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith(
        f"horde {service}: configuration error: database {database}: file is not a database"
    ), line


def test_a_schema_from_a_newer_horde_is_one_line(tmp_path: Path) -> None:
    database = tmp_path / "state" / "validator.db"
    database.parent.mkdir()
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('f00dfeedbeef')")
    conn.close()
    out = horde("validator", "serve", "--config", str(config(tmp_path, "validator")))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith(f"horde validator: configuration error: database {database}: "), line
    assert "f00dfeedbeef" in line


@pytest.mark.parametrize(
    "url",
    [
        "mysql://horde:s3cret@db.example/horde",
        "postgresql+psycopg2://horde:s3cret@db.example/horde",
        "oracle://horde:s3cret@db.example/horde",
    ],
)
def test_an_unsupported_database_url_is_one_line(tmp_path: Path, url: str) -> None:
    cfg = config(tmp_path, "validator", f'database_url = "{url}"\n')
    out = horde("validator", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith("horde validator: configuration error: invalid setting 'database_url'")
    assert "unsupported database URL" in line
    assert "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://" in line
    assert "s3cret" not in line and "horde:***@db.example" in line


def test_a_database_server_that_does_not_answer_is_one_line_and_retried(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://horde:s3cret@127.0.0.1:{port}/horde"
    cfg = config(tmp_path, "validator", f'database_url = "{url}"\n')
    out = horde("validator", "serve", "--config", str(cfg))
    assert out.returncode == 1, out.stderr  # the server may come up: systemd restarts the unit
    line = one_line(out)
    assert line.startswith(
        f"horde validator: database postgresql://horde:***@127.0.0.1:{port}/horde: "
    ), line
    assert "s3cret" not in out.stderr


# -------------------------------------------------------------------------------- executor


def executor_config(tmp_path: Path, extra: str = "", work_dir: Path | None = None) -> Path:
    miner = create_key_file(tmp_path / "miner.json", "hotkey")
    return config(
        tmp_path,
        "executor",
        f'miner_address = "127.0.0.1:9"\nminer_identity = "{miner.identity}"\n'
        f'work_dir = "{work_dir or tmp_path / "work"}"\n' + extra,
    )


def test_an_executor_work_dir_that_cannot_hold_jobs_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("x")
    cfg = executor_config(tmp_path, work_dir=tmp_path / "afile" / "work")
    out = horde("executor", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert one_line(out).startswith(
        f"horde executor: configuration error: invalid setting 'work_dir': "
        f"{tmp_path / 'afile' / 'work'}: Not a directory"
    )


def test_a_busy_job_proxy_port_is_a_configuration_error(tmp_path: Path, busy_port: int) -> None:
    cfg = executor_config(tmp_path, f'proxy_listen = "127.0.0.1:{busy_port}"\n')
    out = horde("executor", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        "horde executor: configuration error: invalid setting 'proxy_listen': the job proxy "
        f"cannot listen on 127.0.0.1:{busy_port}: the address is in use"
    )


def test_more_cpus_than_the_host_has_is_a_configuration_error(tmp_path: Path) -> None:
    out = horde(
        "executor", "serve", "--config", str(executor_config(tmp_path, "cpu_limit = 999\n"))
    )
    assert out.returncode == 2, out.stderr
    assert "invalid setting 'cpu_limit': 999 CPUs, this host has" in one_line(out)


def test_an_unreachable_docker_engine_is_one_line_and_retried(tmp_path: Path) -> None:
    out = subprocess.run(
        [HORDE, "executor", "serve", "--config", str(executor_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"},
    )
    assert out.returncode == 1, out.stderr  # the engine may come up: systemd tries again
    line = one_line(out)
    assert line.startswith("horde executor: cannot use the Docker engine: "), line
    assert "Unclosed" not in out.stderr


@pytest.mark.parametrize(
    ("service", "extra", "fragment"),
    [
        ("executor", "memory_limit_mb = 4\n", "'memory_limit_mb'"),
        ("executor", "pids_limit = 1\n", "'pids_limit'"),
        (
            "miner",
            "heartbeat_interval_s = 20\nexecutor_timeout_s = 5\n",
            "executor_timeout_s (5) must be at least twice heartbeat_interval_s (20)",
        ),
    ],
    ids=["tiny_memory", "one_pid", "timeout_under_heartbeats"],
)
def test_limits_that_cannot_work_stop_the_service(
    tmp_path: Path, service: str, extra: str, fragment: str
) -> None:
    cfg = (
        executor_config(tmp_path, extra)
        if service == "executor"
        else config(tmp_path, service, extra)
    )
    out = horde(service, "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert fragment in one_line(out)
