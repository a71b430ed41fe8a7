"""`horde dev up`, run as real processes: one network per state dir (a second is refused and
leaves the first alone), and the local chain's weights ledger names the validator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from devnet import dev_network

HORDE = str(Path(sys.executable).with_name("horde"))

pytestmark = pytest.mark.timeout(240)


def horde(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HORDE, *args], capture_output=True, text=True, timeout=120)


def test_a_second_dev_up_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    kept = ["endpoints.json", "roster.toml"]
    with dev_network(state):
        first = json.loads((state / "endpoints.json").read_text())["pid"]
        before = {
            name: ((state / name).read_bytes(), (state / name).stat().st_mtime_ns) for name in kept
        }
        second = subprocess.Popen(
            [HORDE, "dev", "up", "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = second.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            second.send_signal(signal.SIGINT)
            second.communicate(timeout=60)
            pytest.fail("a second `horde dev up` ran on the state dir of a running one")
        assert second.returncode == 2, err
        assert "dev network up" not in out
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if not line.startswith("{")] == [
            f"horde dev up: another `horde dev up` (pid {first}) is running with state dir "
            f"{state.resolve()}"
        ]
        # The first network's files are as they were, and it still serves.
        after = {
            name: ((state / name).read_bytes(), (state / name).stat().st_mtime_ns) for name in kept
        }
        assert after == before
        listed = horde("job", "list", "--dev", str(state), "--json")
        assert listed.returncode == 0, listed.stderr
    # Once it has stopped, the state dir is free again: the lock file stays, held by no one.
    assert (state / "dev.lock").exists()
    with dev_network(state):
        assert json.loads((state / "endpoints.json").read_text())["pid"] != first


def test_the_weights_ledger_names_the_validator(tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    with dev_network(state):
        validator = json.loads((state / "endpoints.json").read_text())["services"]["validator"]
        out = horde("validator", "round", "--dev", str(state), "--set-weights", "--json")
        assert out.returncode == 0, out.stderr
        reference = json.loads(out.stdout)["weights_reference"]
        assert reference.startswith("local-"), out.stdout
    [entry] = [
        json.loads(line) for line in (state / "weights.jsonl").read_text().splitlines() if line
    ]
    assert entry["id"] == reference
    assert entry["validator"] == validator["identity"]
