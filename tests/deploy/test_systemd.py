"""The systemd units and example configs under deploy/: verified, and each ExecStart loads."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    ExecutorSettings,
    MinerSettings,
    ServiceSettings,
    ValidatorSettings,
)
from horde_services.core.identity import create_key_file

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
CONFIGS = ROOT / "deploy" / "config"
HORDE = str(Path(sys.executable).with_name("horde"))
SERVICES = ["validator", "miner", "executor", "gateway"]


def unit_value(text: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", text, flags=re.MULTILINE)


@pytest.mark.parametrize("service", SERVICES)
def test_unit_is_hardened(service: str) -> None:
    text = (UNITS / f"horde-{service}.service").read_text()
    for key, value in [
        ("User", "horde"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),  # a configuration error: restarting cannot mend it
    ]:
        assert unit_value(text, key) == [value], f"{key} in horde-{service}.service"
    assert f"/var/lib/horde/{service}" in unit_value(text, "ReadWritePaths")
    if service == "executor":
        assert unit_value(text, "SupplementaryGroups") == ["docker"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's systemd package"
    units = []
    for service in SERVICES:
        text = (UNITS / f"horde-{service}.service").read_text()
        # Point ExecStart at this checkout's virtualenv so verify can check the binary exists.
        text = text.replace("/opt/horde/.venv/bin/horde", HORDE)
        path = tmp_path / f"horde-{service}.service"
        path.write_text(text)
        units.append(str(path))
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if "horde-" in line and "docker.service" not in line
    ]
    assert out.returncode == 0 or not problems, out.stdout + out.stderr
    assert not problems, problems


def _install(tmp_path: Path) -> dict[str, Path]:
    """Lay out /etc/horde and /var/lib/horde under tmp_path, with keys and a roster."""
    etc = tmp_path / "etc" / "horde"
    var = tmp_path / "var" / "lib" / "horde"
    (etc / "keys").mkdir(parents=True)
    signers = {
        "validator": create_key_file(etc / "keys" / "validator.json", "hotkey"),
        "miner": create_key_file(etc / "keys" / "miner.json", "hotkey"),
        "executor": create_key_file(etc / "keys" / "executor.json", "ed25519"),
        "gateway": create_key_file(etc / "keys" / "gateway.json", "ed25519"),
    }
    write_roster(
        etc / "roster.toml",
        [
            Neuron(uid=0, hotkey=signers["validator"].identity.ss58, validator_permit=True),
            Neuron(uid=1, hotkey=signers["miner"].identity.ss58, endpoint="127.0.0.1:7200"),
        ],
    )
    configs = {}
    for service in SERVICES:
        text = (CONFIGS / f"{service}.toml").read_text()
        text = text.replace("/etc/horde", str(etc)).replace("/var/lib/horde", str(var))
        text = re.sub(
            r'^(listen|proxy_listen) = ".*"$', r'\1 = "127.0.0.1:0"', text, flags=re.MULTILINE
        )
        text = text.replace(
            "sr25519:" + "0" * 64,
            str(signers["miner" if service == "executor" else "validator"].identity),
        )
        (var / service).mkdir(parents=True, exist_ok=True)
        path = etc / f"{service}.toml"
        path.write_text(text)
        configs[service] = path
    return configs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("service", SERVICES)
def test_exec_start_loads_the_example_config(tmp_path: Path, service: str) -> None:
    configs = _install(tmp_path)
    text = (UNITS / f"horde-{service}.service").read_text()
    (exec_start,) = unit_value(text, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/horde/.venv/bin/horde"
    assert argv[-1] == f"/etc/horde/{service}.toml"
    argv[0], argv[-1] = HORDE, str(configs[service])
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "service_started" in line:
            break
    started = any("service_started" in line for line in seen)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert started, "".join(seen) + rest
    assert proc.returncode == 0, "".join(seen) + rest


@pytest.mark.parametrize(
    ("service", "settings"),
    [("executor", ExecutorSettings), ("miner", MinerSettings), ("validator", ValidatorSettings)],
)
def test_unit_outlasts_its_drain(service: str, settings: type[ServiceSettings]) -> None:
    """systemd's stop timeout leaves the example executor, miner or validator time to drain its
    jobs and shut down, or it would SIGKILL it mid-drain (an executor leaving the job's
    containers behind, a miner or validator losing the results of jobs that finish meanwhile)."""
    text = (UNITS / f"horde-{service}.service").read_text()
    (stop_timeout,) = unit_value(text, "TimeoutStopSec")
    config = tomllib.loads((CONFIGS / f"{service}.toml").read_text())
    defaults = settings.model_fields
    drain = config.get("drain_timeout_s", defaults["drain_timeout_s"].default)
    grace = config.get("shutdown_grace_s", defaults["shutdown_grace_s"].default)
    assert float(stop_timeout) > drain + grace
