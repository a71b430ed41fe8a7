"""load_settings: TOML, environment overrides and one ConfigError that names the field."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from horde_services.core.config import (
    GatewaySettings,
    MinerSettings,
    TLSSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HORDE_* variables from the developer's shell leak into these tests."""
    for key in list(os.environ):
        if key.startswith("HORDE_"):
            monkeypatch.delenv(key)
    yield


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    s = load_settings(MinerSettings)
    assert s.listen == "127.0.0.1:0"
    assert s.tls == TLSSettings()
    assert not s.tls.enabled
    assert s.auth.max_clock_skew_s == 30.0


def test_toml_is_loaded_including_nested_tables(tmp_path: Path) -> None:
    cert, key = write(tmp_path / "c.pem", "x"), write(tmp_path / "k.pem", "x")
    cfg = write(
        tmp_path / "miner.toml",
        f"""
listen = "0.0.0.0:7001"
netuid = 3
executors = ["ed25519:{"ab" * 32}"]
heartbeat_interval_s = 2.5

[tls]
cert_file = "{cert}"
key_file = "{key}"

[auth]
max_clock_skew_s = 10
""",
    )
    s = load_settings(MinerSettings, cfg)
    assert s.listen == "0.0.0.0:7001"
    assert s.netuid == 3
    assert s.executors == ["ed25519:" + "ab" * 32]
    assert s.heartbeat_interval_s == 2.5
    assert s.tls.cert_file == cert and s.tls.key_file == key and s.tls.enabled
    assert s.auth.max_clock_skew_s == 10


def test_env_overrides_toml_and_overrides_override_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path / "v.toml",
        'listen = "127.0.0.1:7000"\nnetuid = 3\n[auth]\nmax_clock_skew_s = 10\n'
        "[synthetic]\ninterval_s = 100\n",
    )
    monkeypatch.setenv("HORDE_VALIDATOR_NETUID", "4")
    monkeypatch.setenv("HORDE_VALIDATOR_AUTH__MAX_CLOCK_SKEW_S", "20")
    monkeypatch.setenv("HORDE_VALIDATOR_ADMINS", '["ed25519:' + "cd" * 32 + '"]')
    # Another service's variables are not ours.
    monkeypatch.setenv("HORDE_MINER_NETUID", "99")
    s = load_settings(ValidatorSettings, cfg)
    assert s.listen == "127.0.0.1:7000"  # from the file
    assert s.netuid == 4  # env wins
    assert s.auth.max_clock_skew_s == 20  # nested env wins
    assert s.synthetic.interval_s == 100  # the rest of the nested table survives
    assert s.admins == ["ed25519:" + "cd" * 32]

    s = load_settings(ValidatorSettings, cfg, netuid=5)
    assert s.netuid == 5


def test_bad_toml_value_names_field_and_env_var(tmp_path: Path) -> None:
    cfg = write(tmp_path / "m.toml", "netuid = -1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, cfg)
    msg = str(info.value)
    assert msg.startswith(f"{cfg}: ")
    assert "invalid setting 'netuid' (env HORDE_MINER_NETUID)" in msg
    assert "greater than or equal to 0" in msg


def test_bad_env_value_names_field_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HORDE_GATEWAY_SAMPLE_RATE", "lots")
    with pytest.raises(ConfigError, match=r"^invalid setting 'sample_rate' \(from env "
                       r"HORDE_GATEWAY_SAMPLE_RATE\)"):  # fmt: skip
        load_settings(GatewaySettings)


def test_a_list_from_the_environment_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HORDE_VALIDATOR_CLIENTS", "ed25519:abc")
    with pytest.raises(ConfigError) as err:
        load_settings(ValidatorSettings)
    assert str(err.value) == (
        "invalid setting 'clients' (env HORDE_VALIDATOR_CLIENTS): a list or table value must be "
        'JSON, e.g. HORDE_VALIDATOR_CLIENTS=\'["first", "second"]\''
    )
    monkeypatch.setenv("HORDE_VALIDATOR_CLIENTS", '["ed25519:abc"]')
    assert load_settings(ValidatorSettings).clients == ["ed25519:abc"]


def test_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, write(tmp_path / "m.toml", 'listen = "nohost"\n'))
    assert "invalid setting 'listen' (env HORDE_MINER_LISTEN)" in str(info.value)
    assert "host:port" in str(info.value)


@pytest.mark.parametrize(
    ("cls", "toml", "field", "fragment"),
    [
        (
            ValidatorSettings,
            '[trusted_miner]\nidentity = "sr25519:00"\naddress = "nohost"\n',
            "trusted_miner.address",
            "'nohost' must be host:port",
        ),
        (
            ValidatorSettings,
            '[miners]\n"sr25519:ab" = "127.0.0.1:0"\n',
            "miners",
            "sr25519:ab: '127.0.0.1:0' must be host:port with a port between 1 and 65535",
        ),
        (ValidatorSettings, '[gateways]\n"ed25519:ab" = "gw"\n', "gateways", "'gw' must be"),
        (GatewaySettings, 'validator_address = "validator"\n', "validator_address", "host:port"),
        (
            ValidatorSettings,
            "[synthetic]\ninterval_s = 60\njitter_s = 90\n",
            "synthetic",
            "jitter_s (90) must be less than interval_s (60)",
        ),
    ],
    ids=["trusted_miner", "miners", "gateways", "gateway_validator", "jitter"],
)
def test_addresses_to_dial_and_round_timing_are_checked(
    tmp_path: Path, cls: type, toml: str, field: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(cls, write(tmp_path / "c.toml", toml))
    assert f"invalid setting '{field}'" in str(info.value), str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    cfg = write(tmp_path / "m.toml", 'netuid = -1\nlog_level = "loud"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, cfg)
    assert "'netuid'" in str(info.value) and "'log_level'" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "unknown", "meant"),
    [
        # No variable for it (HORDE_VALIDATOR_LISTN would be as unknown), but the setting it
        # resembles; in a table too.
        ('listn = "127.0.0.1:1"\n', "listn", "listen"),
        ("[tls]\nca_fiel = 'x'\n", "tls.ca_fiel", "tls.ca_file"),
        ("drain_timout_s = 1\n", "drain_timout_s", "drain_timeout_s"),
        ("[synthetic]\nintervl_s = 60\n", "synthetic.intervl_s", "synthetic.interval_s"),
        (  # a table of tables: the suggestion keeps the table's key
            "[synthetic.classes.gpu]\nrange_size = 5\ndeadline_s = 1\nwieght = 2\n",
            "synthetic.classes.gpu.wieght",
            "synthetic.classes.gpu.weight",
        ),
        (  # an optional table
            '[trusted_miner]\nidentity = "x"\naddress = "h:1"\nexecutor_clas = "c"\n',
            "trusted_miner.executor_clas",
            "trusted_miner.executor_class",
        ),
    ],
)
def test_an_unknown_key_suggests_the_known_one_it_resembles(
    tmp_path: Path, toml: str, unknown: str, meant: str
) -> None:
    cfg = write(tmp_path / "v.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_settings(ValidatorSettings, cfg)
    assert str(info.value) == (
        f"{cfg}: invalid setting '{unknown}': unknown setting (did you mean '{meant}'?)"
    )


def test_an_unknown_key_like_no_known_one_suggests_nothing(tmp_path: Path) -> None:
    cfg = write(tmp_path / "v.toml", "colour = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(ValidatorSettings, cfg)
    assert str(info.value) == f"{cfg}: invalid setting 'colour': unknown setting"


def test_a_validator_s_own_message_has_no_pydantic_prefix(tmp_path: Path) -> None:
    cfg = write(tmp_path / "v.toml", "[synthetic]\ninterval_s = 10\njitter_s = 10\n")
    with pytest.raises(ConfigError) as info:
        load_settings(ValidatorSettings, cfg)
    assert str(info.value) == (
        f"{cfg}: invalid setting 'synthetic' (env HORDE_VALIDATOR_SYNTHETIC): "
        "jitter_s (10) must be less than interval_s (10)"
    )


@pytest.mark.parametrize("given", ["cert_file", "key_file"])
def test_tls_needs_both_cert_file_and_key_file(tmp_path: Path, given: str) -> None:
    pem = write(tmp_path / "x.pem", "x")
    cfg = write(tmp_path / "g.toml", f'[tls]\n{given} = "{pem}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(GatewaySettings, cfg)
    missing = "key_file" if given == "cert_file" else "cert_file"
    assert str(info.value) == (
        f"{cfg}: invalid setting 'tls' (env HORDE_GATEWAY_TLS): TLS needs both cert_file and "
        f"key_file ({given} is set, {missing} is not)"
    )
    # A CA alone (TLS to the peers this service dials, a plaintext listener) is fine.
    ca = load_settings(GatewaySettings, write(tmp_path / "ca.toml", f'[tls]\nca_file = "{pem}"\n'))
    assert not ca.tls.enabled and ca.tls.ca_file == pem


def test_the_database_says_which_setting_gave_it(tmp_path: Path) -> None:
    s = load_settings(MinerSettings, state_dir=tmp_path)
    assert getattr(s.database("miner"), "setting", None) == "state_dir"
    s = load_settings(MinerSettings, database_url="postgresql://h/db")
    assert getattr(s.database("miner"), "setting", None) == "database_url"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(MinerSettings, missing)


def test_malformed_toml(tmp_path: Path) -> None:
    cfg = write(tmp_path / "m.toml", "listen = \n[[[\n")
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, cfg)
    assert str(info.value).startswith(f"{cfg}: ")


def test_nested_tls_with_missing_cert_file(tmp_path: Path) -> None:
    key = write(tmp_path / "k.pem", "x")
    cfg = write(
        tmp_path / "m.toml",
        f'[tls]\ncert_file = "{tmp_path / "missing.pem"}"\nkey_file = "{key}"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, cfg)
    msg = str(info.value)
    assert "invalid setting 'tls.cert_file' (env HORDE_MINER_TLS__CERT_FILE)" in msg
    assert f"file not found: {tmp_path / 'missing.pem'}" in msg


def test_loading_one_file_does_not_leak_into_the_next_load(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "netuid = 7\n")
    assert load_settings(MinerSettings, a).netuid == 7
    assert load_settings(MinerSettings).netuid == 12
    assert MinerSettings.config_file is None


def test_database_url_defaults_to_sqlite_in_state_dir(tmp_path: Path) -> None:
    s = load_settings(MinerSettings, state_dir=tmp_path)
    assert s.database("miner") == f"sqlite+aiosqlite:///{(tmp_path / 'miner.db').resolve()}"
    s = load_settings(MinerSettings, database_url="postgresql://h/db")
    assert s.database("miner") == "postgresql://h/db"


def test_unknown_env_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in an EnvironmentFile must stop the service, like one in the TOML file."""
    monkeypatch.setenv("HORDE_MINER_LISTN", "0.0.0.0:1")
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings)
    assert str(info.value) == (
        "invalid setting 'listn' (from env HORDE_MINER_LISTN): unknown setting "
        "(did you mean 'listen', env HORDE_MINER_LISTEN?)"
    )


def test_unknown_nested_env_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HORDE_MINER_TLS__CA_FIEL", "/x")
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings)
    assert str(info.value) == (
        "invalid setting 'tls.ca_fiel' (from env HORDE_MINER_TLS__CA_FIEL): unknown setting "
        "(did you mean 'tls.ca_file', env HORDE_MINER_TLS__CA_FILE?)"
    )


def test_a_bad_value_names_the_source_that_gave_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment's value wins over the file's, so a bad one there is blamed on the
    variable, not the file; one from the file names the file (and the variable that would
    override it)."""
    cfg = write(tmp_path / "m.toml", 'log_level = "info"\nnetuid = -1\n')
    monkeypatch.setenv("HORDE_MINER_LOG_LEVEL", "bogus")
    with pytest.raises(ConfigError) as info:
        load_settings(MinerSettings, cfg)
    problems = sorted(str(info.value).split("; "), key=lambda p: "netuid" not in p)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{cfg}: invalid setting 'netuid' (env HORDE_MINER_NETUID): ")
    assert problems[1].startswith("invalid setting 'log_level' (from env HORDE_MINER_LOG_LEVEL): ")


def test_env_for_dict_entries_and_other_services_is_not_flagged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HORDE_VALIDATOR_SYNTHETIC__CLASSES", '{"gpu": {"range_size": 5, '
                       '"deadline_s": 1}}')  # fmt: skip
    monkeypatch.setenv("HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS", "gpu")
    monkeypatch.setenv("HORDE_EXECUTOR_NOT_A_VALIDATOR_SETTING", "1")
    monkeypatch.setenv("HORDE_BIN", "/usr/bin/horde")
    s = load_settings(ValidatorSettings)
    assert s.synthetic.classes["gpu"].range_size == 5


def test_the_default_executor_class_must_be_one_the_validator_scores(tmp_path: Path) -> None:
    # A typo would send every job that names no class to a class no miner offers.
    cfg = write(tmp_path / "v.toml", 'default_executor_class = "cpu-smal"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(ValidatorSettings, cfg)
    assert str(info.value) == (
        f"{cfg}: invalid setting 'default_executor_class' (env "
        "HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS): 'cpu-smal' is not one of the "
        "executor classes in synthetic.classes (cpu-large, cpu-small)"
    )
    # A class table without the default class (here: GPUs only) needs a default of its own.
    gpu_only = "[synthetic.classes.gpu-h100]\nrange_size = 5\ndeadline_s = 1\n"
    with pytest.raises(ConfigError, match=r"'cpu-small' is not one of the executor classes in "
                       r"synthetic.classes \(gpu-h100\)"):  # fmt: skip
        load_settings(ValidatorSettings, write(tmp_path / "gpu.toml", gpu_only))
    s = load_settings(
        ValidatorSettings,
        write(tmp_path / "ok.toml", 'default_executor_class = "gpu-h100"\n' + gpu_only),
    )
    assert s.default_executor_class == "gpu-h100"
    assert load_settings(ValidatorSettings).default_executor_class == "cpu-small"


def test_an_unknown_default_executor_class_from_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS", "")
    with pytest.raises(ConfigError, match=r"invalid setting 'default_executor_class' .*'' is not "
                       r"one of the executor classes"):  # fmt: skip
        load_settings(ValidatorSettings)
    monkeypatch.setenv("HORDE_VALIDATOR_DEFAULT_EXECUTOR_CLASS", "cpu-large")
    assert load_settings(ValidatorSettings).default_executor_class == "cpu-large"
