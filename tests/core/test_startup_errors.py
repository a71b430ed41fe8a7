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


def config(
    tmp_path: Path,
    service: str,
    extra: str = "",
    *,
    kind: str | None = None,
    state_dir: Path | None = None,
) -> Path:
    """A config for `service` that starts as it is (listen on a free port, a local roster);
    `kind` gives it a key of that kind instead of the one it needs."""
    kind = kind or ("hotkey" if service in ("validator", "miner") else "ed25519")
    key = tmp_path / f"{service}-{kind}.json"
    if not key.exists():
        create_key_file(key, kind)  # type: ignore[arg-type]
    roster = tmp_path / "roster.toml"
    roster.touch()
    text = f'key_file = "{key}"\nstate_dir = "{state_dir or tmp_path / "state"}"\n'
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
    line = one_line(out)
    assert line.startswith("horde validator: "), line
    assert f"cannot serve metrics on 127.0.0.1:{busy_port}" in line
    # Which setting to change: the config's metrics_port, or the command line's --metrics-port.
    assert "'metrics_port'" in line and "--metrics-port" in line, line


def test_an_unknown_default_executor_class_stops_the_validator(tmp_path: Path) -> None:
    cfg = config(tmp_path, "validator", 'default_executor_class = "cpu-smal"\n')
    out = horde("validator", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        f"horde validator: configuration error: {cfg}: invalid setting 'default_executor_class' "
        "(env HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS): 'cpu-smal' is not one of the "
        "executor classes in synthetic.classes (cpu-large, cpu-small)"
    )


# -------------------------------------------------------------------------------- settings


def test_an_unknown_setting_suggests_the_known_one_it_resembles(tmp_path: Path) -> None:
    cfg = config(tmp_path, "validator", "drain_timout_s = 5\n")
    out = horde("validator", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    # No variable as unknown as the key (HORDE_VALIDATOR_DRAIN_TIMOUT_S), but the key it resembles.
    assert one_line(out) == (
        f"horde validator: configuration error: {cfg}: invalid setting 'drain_timout_s': "
        "unknown setting (did you mean 'drain_timeout_s'?)"
    )


def test_an_unknown_environment_variable_suggests_the_known_one(tmp_path: Path) -> None:
    cfg = config(tmp_path, "miner")
    out = subprocess.run(
        [HORDE, "miner", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HORDE_MINER_DRAIN_TIMOUT_S": "5"},
    )
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        "horde miner: configuration error: invalid setting 'drain_timout_s' "
        "(from env HORDE_MINER_DRAIN_TIMOUT_S): unknown setting "
        "(did you mean 'drain_timeout_s', env HORDE_MINER_DRAIN_TIMEOUT_S?)"
    )


# ------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("service", "kind", "need", "new"),
    [
        ("validator", "ed25519", "a validator needs a hotkey", "--kind hotkey"),
        ("miner", "ed25519", "a miner needs a hotkey", "--kind hotkey"),
        ("executor", "hotkey", "an executor needs an ed25519 key", "--kind ed25519"),
        ("gateway", "hotkey", "a gateway needs an ed25519 key", "--kind ed25519"),
    ],
)
def test_a_key_of_the_wrong_kind_is_a_configuration_error(
    tmp_path: Path, service: str, kind: str, need: str, new: str
) -> None:
    """Peers refuse every call a key of the wrong kind signs (an executor whose miner gets its
    hotkey retried PERMISSION_DENIED for ever): the service must not start with one."""
    cfg = (
        executor_config(tmp_path, kind=kind)
        if service == "executor"
        else config(tmp_path, service, kind=kind)
    )
    key = tmp_path / f"{service}-{kind}.json"
    out = horde(service, "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    what = "a hotkey" if kind == "hotkey" else "an ed25519 key"
    assert one_line(out) == (
        f"horde {service}: configuration error: invalid setting 'key_file': {key} is {what} "
        f"file; {need} (make one with `horde keys new {new} --out FILE`)"
    )


@pytest.mark.parametrize("service", ["executor", "gateway"])
def test_a_wallet_hotkey_is_refused_where_an_ed25519_key_is_needed(
    tmp_path: Path, service: str
) -> None:
    wallet = 'wallet_name = "w"\nwallet_hotkey = "h"\n'
    cfg = (
        executor_config(tmp_path, wallet)
        if service == "executor"
        else config(tmp_path, service, wallet)
    )
    # Only the wallet: no key_file.
    cfg.write_text("\n".join(x for x in cfg.read_text().splitlines() if "key_file" not in x))
    out = horde(service, "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith(
        f"horde {service}: configuration error: invalid setting 'wallet_name/wallet_hotkey': "
        "a btcli wallet's hotkey is a hotkey; "
    ), line
    assert "needs an ed25519 key" in line


# ------------------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("given", ["key_file", "cert_file"])
@pytest.mark.parametrize("service", ["validator", "gateway"])
def test_half_configured_tls_is_a_configuration_error(
    tmp_path: Path, service: str, given: str
) -> None:
    """A key without a certificate used to start a plaintext listener, without a word."""
    pem = tmp_path / "tls.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\n")
    cfg = config(tmp_path, service, f'[tls]\n{given} = "{pem}"\n')
    out = horde(service, "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    missing = "cert_file" if given == "key_file" else "key_file"
    line = one_line(out)
    assert line.startswith(f"horde {service}: configuration error: {cfg}: invalid setting 'tls'")
    assert line.endswith(
        f"TLS needs both cert_file and key_file ({given} is set, {missing} is not)"
    ), line


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
        f"horde {service}: configuration error: invalid setting 'state_dir': "
        f"database {database}: file is not a database"
    ), line


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_state_dir_that_is_a_file_is_not_a_directory(tmp_path: Path, service: str) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    out = horde(service, "serve", "--config", str(config(tmp_path, service)))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith(f"horde {service}: configuration error: invalid setting 'state_dir': ")
    assert f"{state} is not a directory" in line, line
    assert "File exists" not in line


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_database_file_that_cannot_be_opened_names_the_state_dir(
    tmp_path: Path, service: str
) -> None:
    database = tmp_path / "state" / f"{service}.db"
    database.mkdir(parents=True)  # SQLite cannot open a directory (as root too)
    out = horde(service, "serve", "--config", str(config(tmp_path, service)))
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        f"horde {service}: configuration error: invalid setting 'state_dir': "
        f"database {database}: unable to open database file"
    )


def test_a_database_url_that_cannot_be_opened_names_database_url(tmp_path: Path) -> None:
    database = tmp_path / "elsewhere" / "gateway.db"
    database.mkdir(parents=True)
    cfg = config(tmp_path, "gateway", f'database_url = "sqlite:///{database}"\n')
    out = horde("gateway", "serve", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert one_line(out) == (
        "horde gateway: configuration error: invalid setting 'database_url': "
        f"database {database}: unable to open database file"
    )


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
    assert line.startswith(
        f"horde validator: configuration error: invalid setting 'state_dir': database {database}: "
    ), line
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


def executor_config(
    tmp_path: Path, extra: str = "", work_dir: Path | None = None, kind: str | None = None
) -> Path:
    miner = create_key_file(tmp_path / "miner.json", "hotkey")
    return config(
        tmp_path,
        "executor",
        f'miner_address = "127.0.0.1:9"\nminer_identity = "{miner.identity}"\n'
        f'work_dir = "{work_dir or tmp_path / "work"}"\n' + extra,
        kind=kind,
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
