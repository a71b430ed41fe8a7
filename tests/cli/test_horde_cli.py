"""The `horde` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from horde_services.core.identity import Ed25519Signer, load_key_file

HORDE = str(Path(sys.executable).with_name("horde"))
VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "stream-receipt-v1.json").read_text()
)


def horde(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HORDE, *args], capture_output=True, text=True, timeout=timeout)


def test_version() -> None:
    out = horde("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("horde ")


def test_receipts_verify_accepts_independent_valid_receipts(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(v["receipt"]) + "\n" for v in VECTORS["valid"]))
    out = horde("receipts", "verify", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(VECTORS['valid'])} valid, 0 invalid" in out.stderr


def test_receipts_verify_names_each_bad_line(tmp_path: Path) -> None:
    lines = [json.dumps(VECTORS["valid"][0]["receipt"])]
    lines += [json.dumps(v["receipt"]) for v in VECTORS["invalid"]]
    lines.append("{not json")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = horde("receipts", "verify", str(path))
    assert out.returncode == 1
    bad = out.stdout.strip().splitlines()
    assert len(bad) == len(VECTORS["invalid"]) + 1
    assert bad[0].startswith("line 2: invalid: signature does not verify")
    assert bad[-1].startswith(f"line {len(lines)}: invalid: not JSON")


def test_receipts_verify_missing_file(tmp_path: Path) -> None:
    out = horde("receipts", "verify", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2
    assert "nope.jsonl" in out.stderr


@pytest.mark.parametrize(("kind", "prefix"), [("ed25519", "ed25519:"), ("hotkey", "sr25519:")])
def test_keys_new_writes_a_private_key_file(tmp_path: Path, kind: str, prefix: str) -> None:
    path = tmp_path / "k.json"
    out = horde("keys", "new", "--kind", kind, "--out", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(prefix)
    assert path.stat().st_mode & 0o777 == 0o600
    assert str(load_key_file(path).identity) == out.stdout.split()[0]
    again = horde("keys", "new", "--kind", kind, "--out", str(path))
    assert again.returncode == 2  # a usage problem: --force replaces it
    assert "refusing to overwrite" in again.stderr


def test_keys_new_options_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    out = horde("keys", "new", "--key-type", "sr25519", "--out", str(tmp_path / "k.json"))
    assert out.returncode == 2 and "--key-type applies to --kind hotkey" in out.stderr
    assert not (tmp_path / "k.json").exists()
    ed = horde(
        "keys",
        "new",
        "--kind",
        "hotkey",
        "--key-type",
        "ed25519",
        "--out",
        str(tmp_path / "h.json"),
    )
    assert ed.returncode == 0, ed.stderr
    assert ed.stdout.startswith("ed25519:")
    assert 'roster: key_type = "ed25519"' in ed.stdout  # the roster cannot tell from the ss58


@pytest.mark.parametrize("service", ["validator", "miner", "executor", "gateway"])
def test_serve_with_a_bad_config_stops_with_one_clear_message(tmp_path: Path, service: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('listen = "127.0.0.1:notaport"\n')
    out = horde(service, "serve", "--config", str(config))
    assert out.returncode == 2
    assert "invalid setting 'listen'" in out.stderr
    assert out.stderr.count("\n") == 1  # one line, no traceback


def test_serve_without_a_key_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "nokey.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    out = horde("gateway", "serve", "--config", str(config))
    assert out.returncode == 2
    assert "key_file" in out.stderr


def test_gateway_serve_runs_until_sigterm(tmp_path: Path) -> None:
    key = tmp_path / "gw.json"
    assert horde("keys", "new", "--out", str(key)).returncode == 0
    config = tmp_path / "gw.toml"
    config.write_text(f'key_file = "{key}"\nstate_dir = "{tmp_path}"\nlisten = "127.0.0.1:0"\n')
    proc = subprocess.Popen(
        [HORDE, "gateway", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "service_started" in line:
            break
    assert any("service_started" in line for line in lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "shutdown_complete" in rest


def test_job_run_without_target_explains_what_to_give() -> None:
    out = horde("job", "run", "horde/base:latest", "--", "true")
    assert out.returncode == 2
    assert "--dev DIR" in out.stderr


def _gateway_config(tmp_path: Path, extra: str = "") -> Path:
    key = tmp_path / "gw.json"
    if not key.exists():
        assert horde("keys", "new", "--out", str(key)).returncode == 0
    config = tmp_path / "gw.toml"
    config.write_text(f'key_file = "{key}"\nstate_dir = "{tmp_path}"\n{extra}')
    return config


def test_a_malformed_roster_stops_the_service_at_start(tmp_path: Path) -> None:
    roster = tmp_path / "roster.toml"
    roster.write_text('[[neuron]]\nuid = "x"\nhotkey = "5F"\n')
    key = tmp_path / "v.json"
    assert horde("keys", "new", "--kind", "hotkey", "--out", str(key)).returncode == 0
    config = tmp_path / "v.toml"
    config.write_text(
        f'key_file = "{key}"\nstate_dir = "{tmp_path}"\nroster_file = "{roster}"\n'
        'listen = "127.0.0.1:0"\n'
    )
    out = horde("validator", "serve", "--config", str(config))
    assert out.returncode == 2, out.stderr
    assert f"invalid setting 'roster_file': {roster}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = horde(
            "gateway",
            "serve",
            "--config",
            str(_gateway_config(tmp_path, f'listen = "127.0.0.1:{port}"\n')),
        )
        assert out.returncode == 2, out.stderr  # a configuration error: systemd does not retry
        assert f"cannot listen on 127.0.0.1:{port}: the address is in use" in out.stderr
        assert "Traceback" not in out.stderr
        config = _gateway_config(tmp_path, 'listen = "127.0.0.1:0"\n')
        out = horde("gateway", "serve", "--config", str(config), "--metrics-port", str(port))
        assert out.returncode == 2, out.stderr
        assert f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr
        assert "Traceback" not in out.stderr


def test_tls_settings_that_cannot_work_are_configuration_errors(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    config = _gateway_config(tmp_path, f'listen = "127.0.0.1:0"\n[tls]\ncert_file = "{cert}"\n')
    out = horde("gateway", "serve", "--config", str(config))
    assert out.returncode == 2, out.stderr
    assert "TLS needs both cert_file and key_file" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_local_chain_keeps_weights_in_the_state_dir(tmp_path: Path) -> None:
    from horde_services.core.chain import LocalRoster
    from horde_services.core.config import ValidatorSettings, load_settings
    from horde_services.core.runtime import open_chain

    roster = tmp_path / "etc" / "roster.toml"
    roster.parent.mkdir()
    roster.write_text("")
    settings = load_settings(
        ValidatorSettings, state_dir=tmp_path / "state", roster_file=roster, key_file="k.json"
    )
    chain = open_chain(settings)
    assert isinstance(chain, LocalRoster)
    assert chain.ledger_path == tmp_path / "state" / "weights.jsonl"


@pytest.mark.parametrize("address", ["", "miner.example", "127.0.0.1:0", "host:99999"])
def test_an_executor_needs_the_miner_s_host_and_port(tmp_path: Path, address: str) -> None:
    key = tmp_path / "ex.json"
    assert horde("keys", "new", "--out", str(key)).returncode == 0
    config = tmp_path / "ex.toml"
    config.write_text(
        f'key_file = "{key}"\nstate_dir = "{tmp_path}"\nwork_dir = "{tmp_path / "work"}"\n'
        f'miner_identity = "ed25519:{"11" * 32}"\n'
        + (f'miner_address = "{address}"\n' if address else "")
    )
    out = horde("executor", "serve", "--config", str(config))
    assert out.returncode == 2, out.stderr
    assert "invalid setting 'miner_address'" in out.stderr and "host:port is required" in out.stderr


def test_a_result_without_a_stage_reads_without_one() -> None:
    from horde_services.cli.client import _why

    assert _why({"reason": "validator_restarted", "stage": "", "detail": "x"}) == (
        "validator_restarted: x"
    )
    assert _why({"reason": "timeout", "stage": "execution", "detail": "y"}) == (
        "timeout in execution: y"
    )


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback() -> None:
    """A real SIGINT, raised just as the console script starts importing the CLI's modules."""
    script = """
import builtins, os, signal, sys
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "horde_services.cli.main":
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
sys.argv = ["horde", "--version"]
from horde_services.cli.entry import main
sys.exit(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "")
    # ... and it is the entry point the installed `horde` script runs.
    assert "from horde_services.cli.entry import main" in Path(HORDE).read_text()


def test_a_clients_warnings_are_plain_lines_not_json(tmp_path: Path) -> None:
    """The CLI's own warnings (here: a key file others can read) are a line for a person, also
    when stderr is a file or a pipe, where services write JSON lines."""
    key = tmp_path / "client.json"
    out = horde("keys", "new", "--out", str(key))
    assert out.returncode == 0, out.stderr
    key.chmod(0o644)
    identity = str(Ed25519Signer.generate().identity)
    done = horde("miner", "jobs", "--miner", "127.0.0.1:1", "--miner-identity", identity,
                 "--key", str(key))  # fmt: skip
    assert done.returncode == 2, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "permissive_mode" in line]
    assert not warning.lstrip().startswith("{"), warning
    assert "[warning" in warning and str(key) in warning, warning
