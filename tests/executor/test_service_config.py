"""The streaming service container's configuration (what Docker is asked to create)."""

from __future__ import annotations

from pathlib import Path

from horde_services.executor.sandbox import SandboxLimits
from horde_services.executor.streaming import EXTRA_PATH, ServiceSpec, build_service_config


def test_horde_variables_win_over_the_jobs_own(tmp_path: Path) -> None:
    """HORDE_PORT is the port the proxy dials: a job's env cannot move it (the service would
    listen elsewhere and the job wait out its start-up limit); the validator refuses such specs
    too, this holds for any that get here."""
    config = build_service_config(
        "job-1",
        "sha256:" + "ab" * 32,
        {"HORDE_PORT": "9999", "HORDE_EXTRA_DIR": "/elsewhere", "MODE": "fast"},
        [],
        tmp_path,
        ServiceSpec(port=8123),
        SandboxLimits(),
        "instance-1",
    )
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env == {"HORDE_PORT": "8123", "HORDE_EXTRA_DIR": EXTRA_PATH, "MODE": "fast"}
