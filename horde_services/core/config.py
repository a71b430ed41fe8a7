"""Configuration: one pydantic-settings class per service, each with its own env prefix.

Sources, strongest first: explicit overrides, environment variables (HORDE_<SERVICE>_..., nested
with "__"), the TOML file given with --config, then defaults. Unknown keys are errors so that a
typo in a unit file stops the service instead of being ignored.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from horde_services.core.errors import ConfigError


class TLSSettings(BaseModel):
    """TLS for a listener (cert_file and key_file), and for the channels a service opens to its
    peers (TLS when ca_file is set)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    # CA bundle that verifies peers: the servers this service dials (their channels then speak
    # TLS) and, with require_client_cert, the client certificates its listener demands.
    ca_file: Path | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @model_validator(mode="after")
    def _pair(self) -> TLSSettings:
        # One without the other would leave the listener plaintext (no cert_file) or unable to
        # load (no key_file): neither is what an operator who set one of them meant.
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            raise ValueError(
                f"TLS needs both cert_file and key_file ({given} is set, {missing} is not)"
            )
        return self


class AuthSettings(BaseModel):
    """RPC authentication windows."""

    model_config = ConfigDict(extra="forbid")

    # A signed call is accepted when its timestamp is within this many seconds of our clock.
    max_clock_skew_s: float = Field(default=30.0, gt=0, le=600)


class ServiceSettings(BaseSettings):
    """Fields every service shares."""

    env_prefix: ClassVar[str] = "HORDE_"
    config_file: ClassVar[Path | None] = None

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")

    # host:port to listen on; port 0 picks a free port (tests, `horde dev up`).
    listen: str = "127.0.0.1:0"
    # This service's key file (`horde keys new`); hotkeys for validator and miner.
    key_file: Path | None = None
    # Alternative to key_file for validator and miner: a btcli wallet's hotkey.
    wallet_name: str | None = None
    wallet_hotkey: str | None = None
    wallet_path: Path = Path("~/.bittensor/wallets")
    # Where the service keeps its state.
    state_dir: Path = Path("./state")
    # SQLAlchemy URL; empty means SQLite (WAL) in state_dir.
    database_url: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Port for Prometheus metrics on 127.0.0.1 (0 or unset: disabled).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Local roster (the embedded chain adapter); ignored when `chain` is "bittensor".
    roster_file: Path | None = None
    chain: Literal["local", "bittensor"] = "local"
    chain_network: str = "finney"
    netuid: int = Field(default=12, ge=0)
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)

    def database(self, name: str) -> str:
        """The service's database URL: database_url, else SQLite file NAME.db in state_dir. The
        string says which setting gave it (`.setting`), for open_database's messages."""
        if self.database_url:
            return DatabaseURL(self.database_url, "database_url")
        return DatabaseURL(
            f"sqlite+aiosqlite:///{(self.state_dir / f'{name}.db').resolve()}", "state_dir"
        )


class DatabaseURL(str):
    """A database URL that knows the setting it comes from (`database_url`, or `state_dir` for
    the default SQLite file), so a database that cannot be opened is blamed on that setting."""

    setting: str

    def __new__(cls, url: str, setting: str) -> DatabaseURL:
        self = super().__new__(cls, url)
        self.setting = setting
        return self


class SyntheticClass(BaseModel):
    """Difficulty, deadline and pay of one executor class (see horde_services/validator/synthetic.py
    for how the defaults were calibrated)."""

    model_config = ConfigDict(extra="forbid")

    # Candidate secrets per challenge (the executor scans up to this many sha256 hashes).
    range_size: int = Field(gt=0, le=2**40)
    # Digests (hidden secrets) per challenge.
    digests: int = Field(default=8, gt=0, le=64)
    # Seconds from sending the challenge to a correct answer, by the validator's clock.
    deadline_s: float = Field(gt=0, le=3600)
    # Score for one passed executor of this class per round.
    weight: float = Field(default=1.0, ge=0)


def _default_classes() -> dict[str, SyntheticClass]:
    return {
        "cpu-small": SyntheticClass(range_size=2_000_000, digests=8, deadline_s=20.0, weight=1.0),
        "cpu-large": SyntheticClass(range_size=8_000_000, digests=8, deadline_s=20.0, weight=4.0),
    }


class SyntheticSettings(BaseModel):
    """Synthetic rounds and weights."""

    model_config = ConfigDict(extra="forbid")

    # Run rounds in the background (the admin RPC can always run one).
    enabled: bool = True
    # Seconds between rounds, each drawn uniformly from interval_s +- jitter_s.
    interval_s: float = Field(default=600.0, gt=0)
    jitter_s: float = Field(default=60.0, ge=0)
    # Seconds between weight settings; scores cover the last epoch.
    epoch_s: float = Field(default=3600.0, gt=0)
    # Extra seconds a miner's stream may stay open past the longest class deadline.
    grace_s: float = Field(default=2.0, ge=0)
    # Score per completed organic job in the epoch, and per failed one (the miner's fault).
    organic_completed_weight: float = Field(default=0.1, ge=0)
    organic_failed_weight: float = Field(default=0.1, ge=0)
    classes: dict[str, SyntheticClass] = Field(default_factory=_default_classes)

    @model_validator(mode="after")
    def _jitter_within_interval(self) -> SyntheticSettings:
        if self.jitter_s >= self.interval_s:
            raise ValueError(
                f"jitter_s ({self.jitter_s:g}) must be less than interval_s ({self.interval_s:g})"
            )
        return self


class TrustedMiner(BaseModel):
    """The validator operator's own, unregistered miner that replays spot checks."""

    model_config = ConfigDict(extra="forbid")

    # Identity string of the trusted miner's hotkey ("sr25519:<hex>" or "ed25519:<hex>").
    identity: str
    # host:port of its MinerService.
    address: str
    # Executor class to ask for (empty: the class the checked job ran on).
    executor_class: str = ""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return dial_address(value)


class ComparatorSettings(BaseModel):
    """How a replayed output is compared with the miner's
    (horde_services/validator/comparators.py)."""

    model_config = ConfigDict(extra="forbid")

    # "sha256": byte-exact; "numeric": numbers within a tolerance, everything else exact.
    kind: Literal["sha256", "numeric"] = "sha256"
    rel_tol: float = Field(default=1e-6, ge=0)
    abs_tol: float = Field(default=1e-9, ge=0)


class SpotCheckSettings(BaseModel):
    """Checking streaming responses (and optionally organic jobs) on the trusted miner."""

    model_config = ConfigDict(extra="forbid")

    # Run the pull-and-check loop in the background (the admin RPC can always run a check).
    enabled: bool = True
    # Seconds between looks at the gateways' samples.
    interval_s: float = Field(default=60.0, gt=0)
    # A batch (unchecked pairs of one image digest) is checked once it has this many pairs...
    batch_size: int = Field(default=50, gt=0)
    # ... or once its oldest pair is this old.
    max_age_s: float = Field(default=3600.0, gt=0)
    # Most pairs replayed on one trusted instance.
    max_pairs: int = Field(default=500, gt=0)
    # Time limit of a trusted instance (it is torn down as soon as the replay is done).
    instance_time_limit_s: int = Field(default=600, gt=0)
    # How long the trusted instance may take to become ready (pull, start-up).
    startup_timeout_s: float = Field(default=300.0, gt=0)
    # A proven mismatch multiplies the miner's score by weight_factor (0: zeroes it) for
    # penalty_period_s, and adds penalty_amount to its penalties.
    weight_factor: float = Field(default=0.0, ge=0, le=1)
    penalty_period_s: float = Field(default=86400.0, gt=0)
    penalty_amount: float = Field(default=0.0, ge=0)
    # Comparator by image reference or image digest ("sha256:<hex>"); sha256 for the rest.
    comparators: dict[str, ComparatorSettings] = {}
    # Share of completed organic jobs re-run on the trusted miner (outputs compared by sha256).
    organic_share: float = Field(default=0.0, ge=0, le=1)
    # Penalty added for an organic output mismatch (organic jobs need not be deterministic).
    organic_penalty_amount: float = Field(default=0.0, ge=0)


class ValidatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HORDE_VALIDATOR_")

    # Identities allowed to call ValidatorAdminService (`horde validator round|weights`).
    admins: list[str] = []
    synthetic: SyntheticSettings = SyntheticSettings()

    # Images clients may run (organic); exact references.
    allowed_images: list[str] = ["horde/base:latest", "horde/demo-job:latest"]
    # Images gateways may start as streaming jobs: "ref" (any build of it) or
    # "ref@sha256:<image id>" (only the image whose id, `docker image inspect -f {{.Id}}`, is that).
    streaming_whitelist: list[str] = []
    # Client and gateway Ed25519 identities allowed to call ("ed25519:<hex>").
    clients: list[str] = []
    # Miners to use besides the roster's (identity string -> host:port), e.g. the trusted miner.
    miners: dict[str, str] = {}
    # Class of jobs that name none: one of synthetic.classes (the classes this validator scores,
    # so the ones miners are paid to offer).
    default_executor_class: str = "cpu-small"
    # Largest total size of /output returned inline.
    max_inline_output_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Largest total size of inline inputs a client may send.
    max_inline_input_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Longest stage time limit (spec.timeouts.*) an organic job may ask for: a job asking more is
    # refused, so no client holds an executor for days.
    max_stage_timeout_s: int = Field(default=86400, gt=0)
    min_miner_stake: float = 0.0
    # On SIGTERM, how long the organic jobs in flight may go on to finish (new jobs and streaming
    # sessions are refused UNAVAILABLE meanwhile); then every job still live, streaming sessions
    # too, ends horde_failed (validator_restarted), counted against no miner. Keep the unit's
    # TimeoutStopSec above this plus shutdown_grace_s. 0 stops them at once.
    drain_timeout_s: float = Field(default=20.0, ge=0)
    # Disk space (MiB) an inline-input upload must leave free under state_dir (where inputs are
    # spooled, beside the database): one that would not is refused UNAVAILABLE.
    spool_min_free_mb: int = Field(default=1024, ge=0)
    # How long a finished job's inline output files are kept for DownloadOutputs (they are in
    # the database: it grows with them); its record, result and events stay. Pruned hourly.
    output_retention_days: float = Field(default=7.0, gt=0)
    # Gateways whose samples this validator checks (identity string -> host:port).
    gateways: dict[str, str] = {}
    # The trusted miner spot checks run on (unregistered, not in `miners`); none: no checks.
    trusted_miner: TrustedMiner | None = None
    spotcheck: SpotCheckSettings = SpotCheckSettings()

    @field_validator("miners", "gateways")
    @classmethod
    def _addresses(cls, value: dict[str, str]) -> dict[str, str]:
        for identity, address in value.items():
            try:
                dial_address(address)
            except ValueError as exc:
                raise ValueError(f"{identity}: {exc}") from None
        return value

    @field_validator("default_executor_class")
    @classmethod
    def _known_class(cls, value: str, info: ValidationInfo) -> str:
        # A class outside the table would route every job that names none to executors this
        # validator does not score, which miners have no reason to offer.
        synthetic = info.data.get("synthetic")
        if synthetic is None:  # invalid itself, and reported as such
            return value
        if value not in synthetic.classes:
            known = ", ".join(sorted(synthetic.classes)) or "none"
            raise ValueError(
                f"{value!r} is not one of the executor classes in synthetic.classes ({known})"
            )
        return value


class MinerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HORDE_MINER_")

    # Executor Ed25519 identities allowed to dial in ("ed25519:<hex>").
    executors: list[str] = []
    # Validators allowed to call besides those with a permit on the chain (identity strings).
    validators: list[str] = []
    # Identities allowed to inspect the miner (`horde miner executors|jobs`) besides its own key.
    admins: list[str] = []
    min_validator_stake: float = 0.0
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    # An executor silent for this long is considered lost: at least two heartbeats' time, or
    # executors would be dropped between heartbeats (and their jobs lost).
    executor_timeout_s: float = Field(default=15.0, gt=0)
    # On SIGTERM, how long the jobs the miner relays may go on to finish and report (the miner
    # takes no new job meanwhile: its manifest lists every executor as draining, so validators
    # route elsewhere); a job still running then ends horde_failed (miner_unreachable). Keep the
    # unit's TimeoutStopSec above this plus shutdown_grace_s. 0 stops at once.
    drain_timeout_s: float = Field(default=20.0, ge=0)

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> MinerSettings:
        if self.executor_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"executor_timeout_s ({self.executor_timeout_s:g}) must be at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s:g})"
            )
        return self


class ExecutorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HORDE_EXECUTOR_")

    # host:port of the miner's ExecutorLinkService to dial.
    miner_address: str = "127.0.0.1:0"
    # Identity string of the miner's hotkey (the executor checks whom it dials).
    miner_identity: str = ""
    # Executor class; empty means derived from the hardware probe.
    executor_class: str = ""
    allowed_images: list[str] = ["horde/base:latest", "horde/demo-job:latest"]
    # host:port of the job proxy of streaming jobs (a port of its own, not gRPC: see
    # docs/protocol.md); port 0 picks a free port. Gateways must be able to reach it.
    proxy_listen: str = "127.0.0.1:0"
    # Host gateways dial for the job proxy (with proxy_listen's port).
    proxy_advertise_host: str = "127.0.0.1"

    @field_validator("proxy_listen")
    @classmethod
    def _proxy_listen(cls, value: str) -> str:
        return _host_port(value)

    # The job proxy refuses a request whose client timestamp is further than this from its clock.
    proxy_clock_skew_s: float = Field(default=2.0, gt=0, le=600)
    # Test-only: shifts the job proxy's clock (request checks and receipt timestamps), in ns.
    proxy_clock_offset_ns: int = 0
    # Largest request body the job proxy forwards to a streaming job.
    streaming_max_request_mb: int = Field(default=64, gt=0)
    # Largest total size of the extra data files one streaming job may receive.
    extra_data_limit_mb: int = Field(default=1024, gt=0)
    # Docker refuses less than 6 MiB of memory; a job needs its init and its command at least.
    memory_limit_mb: int = Field(default=1024, ge=6)
    cpu_limit: float = Field(default=1.0, gt=0)  # at most the host's CPUs (checked at start)
    pids_limit: int = Field(default=256, ge=4)
    output_limit_mb: int = Field(default=64, gt=0)
    work_dir: Path = Path("./state/executor-work")
    # Let organic jobs' URL inputs (and their redirects) be downloaded from, and output uploads go
    # to, addresses that are not public: loopback, private networks, link-local (cloud metadata),
    # CGNAT. Off by default, as a client could otherwise reach services on the miner's host and
    # network (SSRF).
    job_urls_allow_private: bool = False
    # On SIGTERM, how long the job the executor runs may go on to finish on its own (the miner
    # routes no new job to a draining executor); a job still running then is stopped and ends
    # horde_failed (executor_lost). Keep the unit's TimeoutStopSec above this plus
    # shutdown_grace_s. 0 stops the job at once.
    drain_timeout_s: float = Field(default=20.0, ge=0)
    # Run job commands (organic jobs, streaming services) under the engine's init, docker-init,
    # as PID 1: it reaps orphaned processes and passes signals on. Turn off only for an engine
    # without it (jobs then fail to start with an executor error naming docker-init).
    job_init: bool = True


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HORDE_GATEWAY_")

    validator_address: str = "127.0.0.1:0"  # port 0: no validator (sessions are refused)
    validator_identity: str = ""

    @field_validator("validator_address")
    @classmethod
    def _validator_address(cls, value: str) -> str:
        return _host_port(value)

    # Client identities allowed to open sessions.
    clients: list[str] = []
    # Allowed clock difference between client, gateway and job proxy, in seconds.
    receipt_skew_s: float = Field(default=2.0, gt=0)
    # Share of request/response pairs stored in full for spot checks.
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    # Session time limit when the client gives none, and the most a client may ask for.
    session_time_limit_s: int = Field(default=3600, gt=0)
    max_session_time_limit_s: int = Field(default=86400, gt=0)
    # How long a job may take to become ready (image pull, service start-up).
    startup_timeout_s: float = Field(default=600.0, gt=0)
    # Serve only jobs whose certificate names a miner registered on the chain (checked when a
    # chain is configured: roster_file, or chain = "bittensor").
    require_registered_miner: bool = True


S = TypeVar("S", bound=ServiceSettings)


def _address(value: str, lowest_port: int) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise ValueError(f"{value!r} must be host:port with a port between {lowest_port} and 65535")
    return value


def _host_port(value: str) -> str:
    """An address to listen on: host:port, port 0 picking a free one."""
    return _address(value, 0)


def dial_address(value: str) -> str:
    """An address to dial: host:port with a port from 1 to 65535."""
    return _address(value, 1)


_ENV_PARSE_ERROR = re.compile(r'error parsing value for field "(\w+)" from source "EnvSettings')


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build settings from overrides, env and an optional TOML file; raise ConfigError on any
    problem with one message naming the field."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    bound = type(cls.__name__, (cls,), {"config_file": config_file})
    try:
        settings = bound(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cls, config_file)) from None
    except (ValueError, OSError) as exc:
        env_value = _ENV_PARSE_ERROR.search(str(exc))
        if env_value is not None:
            # A list or table from the environment must be JSON; pydantic-settings only says
            # that it could not parse it.
            field = env_value.group(1)
            env = f"{cls.model_config.get('env_prefix', '')}{field}".upper()
            raise ConfigError(
                f"invalid setting '{field}' (env {env}): a list or table value must be JSON, "
                f'e.g. {env}=\'["first", "second"]\''
            ) from None
        # TOML syntax errors surface here (tomllib.TOMLDecodeError is a ValueError).
        raise ConfigError(f"{config_file}: {exc}") from None
    # pydantic-settings ignores environment variables that match no field; a typo there (an
    # EnvironmentFile line) must stop the service like an unknown key in the TOML file does.
    unknown = _unknown_env(cls)
    if unknown:
        raise ConfigError("; ".join(unknown))
    return settings  # type: ignore[no-any-return]


def _unknown_env(cls: type[ServiceSettings]) -> list[str]:
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    if not prefix:
        return []
    problems = []
    for key in sorted(os.environ):
        if not key.upper().startswith(prefix):
            continue
        model: type[BaseModel] = cls
        path = key[len(prefix) :].lower().split("__")
        for depth, part in enumerate(path):
            if part not in model.model_fields:
                problems.append(
                    f"invalid setting '{'.'.join(path[: depth + 1])}' (from env {key}): "
                    f"unknown setting{_did_you_mean(cls, path[: depth + 1], env=True)}"
                )
                break
            annotation = model.model_fields[part].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break  # a plain value, list or dict: pydantic checks the rest
            model = annotation
    return problems


def _table_model(annotation: Any) -> tuple[int, type[BaseModel]] | None:
    """The settings model a field holds: (number of table keys before its fields, model), e.g.
    (0, TLSSettings) for ``tls``, (1, SyntheticClass) for ``synthetic.classes``; None for a
    plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return 0, annotation
    origin = get_origin(annotation)
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if origin in (Union, types.UnionType) and len(args) == 1:  # Model | None
        return _table_model(args[0])
    if origin is dict and len(args) == 2:
        inner = _table_model(args[1])
        if inner is not None:
            return inner[0] + 1, inner[1]
    return None


def _did_you_mean(cls: type[ServiceSettings], loc: Sequence[str], *, env: bool) -> str:
    """ " (did you mean 'drain_timeout_s'?)" for an unknown setting at `loc` close to a known one
    in the same table (with its variable for one from the environment); "" when none is."""
    model: type[BaseModel] = cls
    index = 0
    while index < len(loc) - 1:
        field = model.model_fields.get(loc[index])
        found = _table_model(field.annotation) if field is not None else None
        if found is None:
            return ""
        skip, model = found
        index += 1 + skip
    if index != len(loc) - 1:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.75)
    if not close:
        return ""
    name = ".".join([*loc[:-1], close[0]])
    if not env:
        return f" (did you mean '{name}'?)"
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    variable = prefix + "__".join([*loc[:-1], close[0]]).upper()
    return f" (did you mean '{name}', env {variable}?)"


# pydantic's prefix for a ValueError raised by a validator: noise in an operator's message.
_PYDANTIC_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def _describe(exc: ValidationError, cls: type[ServiceSettings], config_file: Path | None) -> str:
    """Each problem with its field and where its value came from: the environment variable
    that set it (it wins over the file), else the config file (naming the variable that would
    override it; an unknown setting has none, and says which known one it may have meant)."""
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    environ = {key.upper() for key in os.environ}
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "(root)"
        msg = _PYDANTIC_PREFIX.sub("", err["msg"])
        env = prefix + "__".join(loc).upper()
        # The variable itself, or the one that set its whole table (as JSON).
        candidates = (env, prefix + loc[0].upper()) if loc else ()
        from_env = next((name for name in candidates if name in environ), None)
        if err["type"] == "extra_forbidden":
            msg = "unknown setting" + _did_you_mean(cls, loc, env=from_env is not None)
        if from_env is not None:
            parts.append(f"invalid setting '{field}' (from env {from_env}): {msg}")
        elif err["type"] == "extra_forbidden":
            where = f"{config_file}: " if config_file else ""
            parts.append(f"{where}invalid setting '{field}': {msg}")
        else:
            where = f"{config_file}: " if config_file else ""
            parts.append(f"{where}invalid setting '{field}' (env {env}): {msg}")
    return "; ".join(parts)
