"""Every example in docs/ runs: shell and Python blocks against a real local network, TOML blocks
load as the named service's settings. `text` blocks are transcripts (root-only install steps)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from devnet import dev_network as start_dev_network
from horde.v1 import common_pb2

from horde_services.core.config import (
    ExecutorSettings,
    GatewaySettings,
    MinerSettings,
    ServiceSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.proto_util import reason_name, state_name

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SETTINGS: dict[str, type[ServiceSettings]] = {
    "validator": ValidatorSettings,
    "miner": MinerSettings,
    "executor": ExecutorSettings,
    "gateway": GatewaySettings,
}


def blocks() -> list[tuple[str, str, str, str]]:
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        for n, match in enumerate(BLOCK.finditer(doc.read_text())):
            lang, info, body = match.group(1), match.group(2).strip(), match.group(3)
            out.append((f"{doc.name}#{n}-{lang}", lang, info, body))
    return out


ALL = blocks()
RUNNABLE = [b for b in ALL if b[1] in ("sh", "python")]
CONFIGS = [b for b in ALL if b[1] == "toml"]


def test_every_block_is_runnable_config_or_transcript() -> None:
    assert RUNNABLE and CONFIGS
    unknown = [name for name, lang, _, _ in ALL if lang not in ("sh", "python", "toml", "text")]
    assert unknown == []


@pytest.fixture(scope="module")
def dev_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with start_dev_network(tmp_path_factory.mktemp("devnet")) as state:
        yield state


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "lang", "info", "body"), RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_example_runs(
    name: str, lang: str, info: str, body: str, dev_network: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DEV": str(dev_network),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if lang == "sh":
        argv = ["bash", "-euo", "pipefail", "-c", body]
    else:
        argv = [sys.executable, "-c", body]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize(("name", "lang", "info", "body"), CONFIGS, ids=[b[0] for b in CONFIGS])
def test_config_example_loads(name: str, lang: str, info: str, body: str, tmp_path: Path) -> None:
    assert info in SETTINGS, f"{name}: a toml block names its service (```toml validator)"
    path = tmp_path / "example.toml"
    path.write_text(body)
    settings = load_settings(SETTINGS[info], path)
    assert settings.model_fields_set, f"{name} set nothing"


def test_protocol_doc_names_every_state_and_reason() -> None:
    text = (DOCS / "protocol.md").read_text()
    for value in common_pb2.JobState.values():
        if value != common_pb2.JOB_STATE_UNSPECIFIED:
            assert f"`{state_name(value)}`" in text
    for value in common_pb2.FailureReason.values():
        if value != common_pb2.FAILURE_REASON_UNSPECIFIED:
            assert f"`{reason_name(value)}`" in text
