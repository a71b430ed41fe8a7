"""`horde validator round|weights` against a live validator (the admin RPC, authenticated)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from synthetic_support import SynthNet, honest

from horde_services.cli.main import main
from horde_services.core.app import ServiceApp
from horde_services.core.identity import write_key_file


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() points structlog at the (captured) stderr of its test: undo that afterwards, or
    later tests would log into a closed capture file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _json(out: str) -> dict[str, Any]:
    """The CLI's JSON document (in-process services may log around it on the same stdout)."""
    doc: dict[str, Any] = json.loads(out[out.index("{\n") : out.rindex("\n}") + 2])
    return doc


async def _horde(argv: list[str]) -> int:
    # The CLI runs its own event loop: give it a thread.
    return await asyncio.to_thread(main, argv)


def _admin_target(synth: SynthNet, validator: ServiceApp) -> list[str]:
    """The options that reach this validator as its admin."""
    key = synth.root / "admin.json"
    write_key_file(key, synth.admin)
    return [
        "--validator",
        f"127.0.0.1:{validator.port}",
        "--validator-identity",
        str(synth.validator_signer.identity),
        "--key",
        str(key),
    ]


async def test_round_and_weights_commands(
    synth: SynthNet, capsys: pytest.CaptureFixture[str]
) -> None:
    miner = await synth.add_miner([honest()])
    validator = await synth.start_validator()
    target = _admin_target(synth, validator)
    assert await _horde(["validator", "round", *target, "--set-weights", "--json"]) == 0
    doc = _json(capsys.readouterr().out)
    [m] = [m for m in doc["miners"] if m["miner"] == miner.identity]
    assert [e["passed"] for e in m["executors"]] == [True]
    assert m["executors"][0]["executor_class"] == "cpu-small"
    assert doc["weights_reference"].startswith("local-")

    assert await _horde(["validator", "weights", *target, "--json"]) == 0
    weights = _json(capsys.readouterr().out)
    assert weights["last_weights_reference"] == doc["weights_reference"]
    [w] = weights["miners"]
    assert w["ss58"] == miner.signer.identity.ss58
    assert w["weight"] == pytest.approx(1.0)
    assert "1 passed" in w["reason"]

    assert await _horde(["validator", "weights", *target]) == 0
    assert miner.signer.identity.ss58 in capsys.readouterr().out


async def test_set_weights_that_cannot_be_set_exits_1(
    synth: SynthNet, capsys: pytest.CaptureFixture[str]
) -> None:
    """No miner: the round runs, weights cannot be set; a script asking for them learns it."""
    validator = await synth.start_validator()
    target = _admin_target(synth, validator)
    assert await _horde(["validator", "round", *target, "--set-weights", "--json"]) == 1
    doc = _json(capsys.readouterr().out)
    assert doc["weights_reference"] == "" and doc["weights_error"]
    assert await _horde(["validator", "round", *target, "--json"]) == 0  # none asked for


async def test_a_non_admin_key_is_refused(
    synth: SynthNet, capsys: pytest.CaptureFixture[str]
) -> None:
    validator = await synth.start_validator()
    key = synth.root / "client.json"
    write_key_file(key, synth.client)
    code = await _horde(
        [
            "validator",
            "weights",
            "--validator",
            f"127.0.0.1:{validator.port}",
            "--validator-identity",
            str(synth.validator_signer.identity),
            "--key",
            str(key),
        ]
    )
    assert code == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_usage_error_without_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validator", "round"]) == 2
    assert "--dev DIR" in capsys.readouterr().err


async def test_spotcheck_exits_1_when_a_gateway_cannot_be_pulled(
    synth: SynthNet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing to check, but a gateway did not answer: that is worth an alert (exit 1)."""
    from horde_services.core.config import TrustedMiner
    from horde_services.core.identity import Ed25519Signer

    gone, trusted = Ed25519Signer.generate(), Ed25519Signer.generate()
    validator = await synth.start_validator(
        gateways={str(gone.identity): "127.0.0.1:1"},
        trusted_miner=TrustedMiner(identity=str(trusted.identity), address="127.0.0.1:1"),
    )
    target = _admin_target(synth, validator)
    assert await _horde(["validator", "spotcheck", *target, "--json"]) == 1
    doc = _json(capsys.readouterr().out)
    assert doc["checks"] == [] and not doc["error"]
    [problem] = doc["pull_errors"]
    assert problem.startswith("gateway 127.0.0.1:1: UNAVAILABLE"), problem


async def test_admin_commands_exit_2_when_the_validator_cannot_be_reached(
    synth: SynthNet, capsys: pytest.CaptureFixture[str]
) -> None:
    """As documented (and as `horde job` does): a connection problem is exit 2, not 1."""
    validator = await synth.start_validator()
    target = _admin_target(synth, validator)
    address = f"127.0.0.1:{validator.port}"
    await validator.stop(0)
    assert await _horde(["validator", "weights", *target]) == 2
    assert f"horde validator weights: cannot reach the validator at {address}" in (
        capsys.readouterr().err
    )
