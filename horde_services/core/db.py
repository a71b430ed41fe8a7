"""Storage: SQLAlchemy's asyncio engine over SQLite (WAL) by default, PostgreSQL by URL.

All tables live in one metadata so one Alembic history covers every service; each service only
touches its own tables. `open_database` upgrades the schema to head before returning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from horde_services.core.errors import ConfigError
from horde_services.core.server import HealthCheck

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

# --- validator -------------------------------------------------------------------------------

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_uuid", sa.String(36), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, index=True),
    sa.Column("client", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.Integer, nullable=False, index=True),
    sa.Column("result", sa.LargeBinary, nullable=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=True),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("updated_ns", sa.BigInteger, nullable=False),
    # ListJobs for one client: newest first.
    sa.Index("ix_jobs_client_seq", "client", "seq"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("event", sa.LargeBinary, nullable=False),
)

job_outputs = sa.Table(
    "job_outputs",
    metadata,
    sa.Column("job_uuid", sa.String(36), primary_key=True),
    sa.Column("path", sa.String(1024), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# --- validator: synthetic rounds, scores and penalties -------------------------------------------

synthetic_rounds = sa.Table(
    "synthetic_rounds",
    metadata,
    sa.Column("round", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("started_ns", sa.BigInteger, nullable=False, index=True),
    sa.Column("finished_ns", sa.BigInteger, nullable=False),
    sa.Column("miners", sa.Integer, nullable=False),
    sa.Column("executors", sa.Integer, nullable=False),
)

synthetic_results = sa.Table(
    "synthetic_results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("round", sa.BigInteger, nullable=False, index=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("executor_id", sa.String(200), nullable=False),
    sa.Column("executor_class", sa.String(100), nullable=False),
    sa.Column("challenge_id", sa.String(64), nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("executor_duration_s", sa.Float, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False, index=True),
)

penalties = sa.Table(
    "penalties",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("amount", sa.Float, nullable=False),
    sa.Column("reason", sa.String(1000), nullable=False),
    sa.Column("evidence", sa.LargeBinary, nullable=True),
    sa.Column("created_ns", sa.BigInteger, nullable=False, index=True),
)

weight_settings = sa.Table(
    "weight_settings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("reference", sa.String(200), nullable=False),
    sa.Column("weights_json", sa.Text, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
)

# --- validator and miner: signed lifecycle receipts ---------------------------------------------

lifecycle_receipts = sa.Table(
    "lifecycle_receipts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("kind", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("miner_signature", sa.LargeBinary, nullable=False),
    sa.Column("validator_signature", sa.LargeBinary, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("job_uuid", "kind", name="uq_lifecycle_receipts_job_kind"),
)

# --- gateway: stream receipts and samples ------------------------------------------------------

stream_receipts = sa.Table(
    "stream_receipts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_uuid", sa.String(36), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("receipt_json", sa.Text, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("job_uuid", "seq", name="uq_stream_receipts_job_seq"),
)

samples = sa.Table(
    "samples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("sample", sa.LargeBinary, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
)

# --- validator: spot checks on the trusted miner (horde_services/validator/spotcheck.py) -----

# Samples pulled from gateways (verified on arrival), each checked at most once.
spot_samples = sa.Table(
    "spot_samples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("gateway", sa.String(200), nullable=False),
    sa.Column("job_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("image", sa.String(500), nullable=False),
    sa.Column("image_digest", sa.String(100), nullable=False, index=True),
    sa.Column("sample", sa.LargeBinary, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False, index=True),
    sa.Column("check_id", sa.Integer, nullable=True, index=True),
    sa.UniqueConstraint("gateway", "job_uuid", "seq", name="uq_spot_samples_gateway_job_seq"),
)

# Where the validator is in each gateway's ListSamples.
spot_cursors = sa.Table(
    "spot_cursors",
    metadata,
    sa.Column("gateway", sa.String(200), primary_key=True),
    sa.Column("cursor", sa.String(100), nullable=False),
    sa.Column("updated_ns", sa.BigInteger, nullable=False),
)

# One trusted instance: a batch of streaming pairs, or one organic job re-run.
spot_checks = sa.Table(
    "spot_checks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("image", sa.String(500), nullable=False),
    sa.Column("image_digest", sa.String(100), nullable=False),
    sa.Column("trusted_miner", sa.String(200), nullable=False),
    sa.Column("trusted_job_uuid", sa.String(36), nullable=False),
    sa.Column("pairs", sa.Integer, nullable=False),
    sa.Column("mismatches", sa.Integer, nullable=False),
    sa.Column("error", sa.String(1000), nullable=False),
    sa.Column("started_ns", sa.BigInteger, nullable=False, index=True),
    sa.Column("finished_ns", sa.BigInteger, nullable=False),
)

# One verdict per checked pair (or organic job).
spot_verdicts = sa.Table(
    "spot_verdicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("check_id", sa.Integer, nullable=False, index=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("job_uuid", sa.String(36), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("comparator", sa.String(100), nullable=False),
    sa.Column("detail", sa.String(1000), nullable=False),
    sa.Column("evidence_id", sa.Integer, nullable=True),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
)

# Evidence of a mismatch, in the JSON form `horde evidence verify` checks offline.
spot_evidence = sa.Table(
    "spot_evidence",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("job_uuid", sa.String(36), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("record_json", sa.Text, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False, index=True),
)

# Weight cuts for a period: a miner's score is multiplied by the smallest active factor.
miner_sanctions = sa.Table(
    "miner_sanctions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("miner_hotkey", sa.String(200), nullable=False, index=True),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("factor", sa.Float, nullable=False),
    sa.Column("reason", sa.String(1000), nullable=False),
    sa.Column("evidence_id", sa.Integer, nullable=True),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("until_ns", sa.BigInteger, nullable=False, index=True),
)

MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers proceed while a writer commits; busy_timeout rides out short lock waits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# The drivers Horde ships with, by the URL's scheme: bare sqlite:// and postgresql:// mean them.
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
SUPPORTED_URLS = "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
# Failures at start-up that restarting cannot mend: SQLite result codes and PostgreSQL SQLSTATEs
# or their classes (28 authorization refused, 3D no such database, 42501 no privilege).
_SQLITE_PERMANENT = {
    "SQLITE_NOTADB",
    "SQLITE_CORRUPT",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PERM",
    "SQLITE_AUTH",
}
_SQLITE_DAMAGED = {"SQLITE_NOTADB", "SQLITE_CORRUPT"}
_PG_PERMANENT = ("28", "3D", "42501")


class DatabaseUnavailable(OSError):
    """The database could not be opened at start-up for a reason that may pass (a server not up
    yet, a lock held): `horde ... serve` says so in one line and exits 1, so systemd retries."""


def async_url(url: str) -> URL:
    """`url` with the async driver Horde uses; ConfigError for a URL Horde has no driver for."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"invalid setting 'database_url': not a database URL: {SUPPORTED_URLS}"
        ) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigError(
            f"invalid setting 'database_url': unsupported database URL "
            f"{parsed.render_as_string(hide_password=True)}: {SUPPORTED_URLS}"
        )
    return parsed.set(drivername=driver)


def describe(url: str) -> str:
    """The database for messages: a SQLite file's path, else the URL without its password
    (ConfigError for a URL Horde has no driver for)."""
    async_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return f"database {parsed.database}"
    return f"database {parsed.render_as_string(hide_password=True)}"


def create_engine(url: str) -> AsyncEngine:
    """An engine for `url`. A SQLite file's directory is made when missing, mode 0700 (the
    service's state is its own, with or without systemd's UMask); an existing one keeps its
    mode."""
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        path = target.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_async_engine(target)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(target, pool_pre_ping=True)


async def upgrade(url: str) -> None:
    """Run Alembic migrations to head (in a thread: Alembic's env drives its own loop)."""
    await asyncio.to_thread(command.upgrade, _alembic_config(url), "head")


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _open_error(where: str, exc: BaseException) -> Exception:
    """One line for a database that cannot be opened: ConfigError where restarting cannot mend
    it, DatabaseUnavailable where it may."""
    if isinstance(exc, CommandError):  # e.g. a schema revision this version does not know
        return ConfigError(f"{where}: {exc} (a database of a newer Horde?)")
    if isinstance(exc, sa.exc.DBAPIError):
        orig = exc.orig
        reason = _first_line(orig)
        sqlite_code = getattr(orig, "sqlite_errorname", None)
        pg_code = str(getattr(orig, "pgcode", None) or "")
        if sqlite_code in _SQLITE_DAMAGED:
            reason += " (damaged, or not SQLite: restore it from a backup, or move it aside)"
        if sqlite_code in _SQLITE_PERMANENT or pg_code.startswith(_PG_PERMANENT):
            return ConfigError(f"{where}: {reason}")
        return DatabaseUnavailable(f"{where}: {reason}")
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return DatabaseUnavailable(f"{where}: {_first_line(exc)}")
    assert isinstance(exc, OSError)
    if isinstance(exc, FileExistsError) and exc.filename is not None:
        # A file where the SQLite file's directory should be (mkdir's "File exists").
        return ConfigError(f"{where}: {exc.filename} is not a directory")
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:  # a SQLite file's directory that cannot be made
        return ConfigError(f"{where}: {exc.filename}: {reason}")
    return DatabaseUnavailable(f"{where}: {reason}")


async def _revision(engine: AsyncEngine) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )


async def open_database(url: str, *, setting: str | None = None) -> AsyncEngine:
    """Upgrade the schema to head and return an engine. A database that cannot be opened
    raises ConfigError (unsupported URL, damaged file, no such database, refused
    credentials: restarting cannot mend these) or DatabaseUnavailable, in one line naming it.

    A ConfigError names the setting to mend first: `setting`, else the one `url` says it comes
    from (ServiceSettings.database() gives `state_dir` for the default SQLite file, else
    `database_url`). An upgrade is logged in one line (`schema_upgraded`, from and to which
    revision); a database already at head logs nothing."""
    where = describe(url)
    setting = setting or getattr(url, "setting", None)
    engine: AsyncEngine | None = None
    try:
        engine = create_engine(url)
        before = await _revision(engine)
        await upgrade(url)
        after = await _revision(engine)
    except (CommandError, sa.exc.SQLAlchemyError, OSError) as exc:
        if engine is not None:
            await engine.dispose()
        error = _open_error(where, exc)
        if setting and isinstance(error, ConfigError):
            error = ConfigError(f"invalid setting '{setting}': {error}")
        raise error from None
    except BaseException:
        if engine is not None:
            await engine.dispose()
        raise
    if after != before:
        structlog.get_logger("horde.db").info(
            "schema_upgraded",
            database=where.removeprefix("database "),
            from_revision=before or "none (new database)",
            to_revision=after,
        )
    return engine


# How often a service with a database checks it can still reach it, and how long one check may
# take before the database counts as unreachable.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0


async def watch_database(
    engine: AsyncEngine,
    set_serving: Callable[[bool, str], Awaitable[None]],
    *,
    service: str,
) -> None:
    """Run for ever: every PROBE_INTERVAL_S, one `SELECT 1`; while it fails (a PostgreSQL server
    gone, connections refused, a check taking over PROBE_TIMEOUT_S) the service's health says
    NOT_SERVING (reason "database"), so a load balancer or an operator's probe sees it before
    the callers' UNAVAILABLE errors do; SERVING again once a check passes. Logged once each way
    (`database_unreachable`, `database_reachable_again`)."""
    health = HealthCheck(
        set_serving,
        "database",
        structlog.get_logger(f"horde.{service}"),
        lost="database_unreachable",
        back="database_reachable_again",
    )
    # A connection of its own each time (no pool): a service whose pooled connections are all
    # busy is loaded, not cut off from its database, and must not read as NOT_SERVING.
    probe = create_async_engine(engine.url, poolclass=sa.pool.NullPool)
    try:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    async with probe.connect() as conn:
                        await conn.execute(sa.text("SELECT 1"))
                problem = None
            except Exception as exc:  # whatever it is, the database did not answer
                problem = (
                    f"no answer in {PROBE_TIMEOUT_S:g}s"
                    if isinstance(exc, TimeoutError)
                    else _first_line(getattr(exc, "orig", None) or exc)
                )
            await health.report(problem)
    finally:
        await probe.dispose()
