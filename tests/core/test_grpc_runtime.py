"""gRPC's runtime options (horde_services/__init__.py) are in place before grpc loads, in every
entry point, and an operator's own GRPC_EXPERIMENTS wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import horde_services

# Records GRPC_EXPERIMENTS as it was when `grpc` was first imported, then imports the module.
PROBE = """
import importlib, os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print("[" + (seen[0] if seen else "<grpc never imported>") + "]")
"""


def _probe(module: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1].removeprefix("[").removesuffix("]")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}


@pytest.mark.parametrize(
    "module",
    [
        "horde_services.cli.main",
        "horde_services.validator.app",
        "horde_services.miner.app",
        "horde_services.executor.app",
        "horde_services.streaming_gateway.app",
        "benchmarks.streaming_floor",
    ],
)
def test_options_are_set_before_grpc_loads(module: str) -> None:
    assert _probe(module, _clean_env()) == horde_services.GRPC_EXPERIMENTS


def test_an_operators_value_wins() -> None:
    env = _clean_env()
    env["GRPC_EXPERIMENTS"] = ""
    assert _probe("horde_services.cli.main", env) == ""
    env["GRPC_EXPERIMENTS"] = "-event_engine_client"
    assert _probe("horde_services.streaming_gateway.app", env) == "-event_engine_client"
