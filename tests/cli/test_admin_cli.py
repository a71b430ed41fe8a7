"""`horde validator round|weights|spotcheck|evidence export` and `horde evidence verify` as an
operator runs them: real subprocesses, against a real `horde dev up` network (real Docker) or a
listener that accepts the connection and never answers (to interrupt a call in flight)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from devnet import dev_network
from docker_images import ensure_images

from horde_services.core.identity import Identity, create_key_file

BIN = Path(sys.executable).parent
SYNTHETIC = "horde/synthetic:latest"
EVIDENCE_KIND = "horde.spotcheck-evidence.v1"

# Every admin command, as `horde` sub-command words and the name its messages go by.
ADMIN_COMMANDS = [
    (["validator", "round"], "horde validator round"),
    (["validator", "weights"], "horde validator weights"),
    (["validator", "spotcheck"], "horde validator spotcheck"),
    (["validator", "evidence", "export"], "horde validator evidence export"),
]


def horde(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "horde"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    ensure_images([SYNTHETIC])
    with dev_network(tmp_path_factory.mktemp("devnet")) as state:
        yield state


@contextlib.contextmanager
def silent_validator(tmp_path: Path) -> Iterator[tuple[socket.socket, list[str]]]:
    """A TCP listener that accepts connections and never answers, and the client arguments
    that point a command at it (with a fresh admin key)."""
    key = tmp_path / "admin.json"
    create_key_file(key, "ed25519")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        yield (
            listener,
            [
                "--validator",
                f"127.0.0.1:{port}",
                "--validator-identity",
                "sr25519:" + "11" * 32,
                "--key",
                str(key),
            ],
        )


def nobody_called(listener: socket.socket) -> bool:
    listener.settimeout(0)
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, TimeoutError):
        return True
    conn.close()
    return False


# --- 1. Ctrl-C -------------------------------------------------------------------------------


@pytest.mark.parametrize(("words", "prog"), ADMIN_COMMANDS, ids=[p for _, p in ADMIN_COMMANDS])
def test_ctrl_c_during_a_call_is_one_line_and_130(
    tmp_path: Path, words: list[str], prog: str
) -> None:
    with silent_validator(tmp_path) as (listener, target):
        proc = subprocess.Popen(
            [str(BIN / "horde"), *words, *target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()  # the call is in flight, waiting for an answer
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert err == f"{prog}: interrupted\n"
    assert out == ""


# --- 2. output closed early ------------------------------------------------------------------


def closed_stdout_run(argv: list[str]) -> tuple[int, str]:
    """Run `horde ARGV` with its stdout a pipe whose reading end is already closed (what
    `| head -1` leaves once head has gone); the exit status and stderr."""
    proc = subprocess.Popen(
        [str(BIN / "horde"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize(
    "argv",
    [
        ["validator", "weights"],
        ["validator", "weights", "--json"],
        ["validator", "round", "--json"],
        ["validator", "round"],
        ["validator", "evidence", "export", "--json"],
    ],
    ids=lambda v: "-".join(v),
)
def test_output_closed_early_exits_quietly_with_141(dev: Path, argv: list[str]) -> None:
    status, err = closed_stdout_run([*argv, "--dev", str(dev)])
    assert status == 141, err
    assert err == ""


def test_verify_output_closed_early_exits_quietly_with_141(tmp_path: Path) -> None:
    records = tmp_path / "evidence.jsonl"
    records.write_text("{}\n" * 2000)  # each an invalid record, each a line on stdout
    status, err = closed_stdout_run(["evidence", "verify", str(records)])
    assert status == 141, err
    assert err == ""


# --- 3. --out checked before the call -------------------------------------------------------


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "under-a-file"])
def test_export_out_that_cannot_be_written_is_a_usage_error_before_any_call(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("x")
    out_path, why = {
        "missing-dir": (
            tmp_path / "nonexistent" / "x.jsonl",
            f"no such directory: {tmp_path / 'nonexistent'}",
        ),
        "a-directory": (tmp_path, "is a directory"),
        "under-a-file": (tmp_path / "file" / "x.jsonl", f"not a directory: {tmp_path / 'file'}"),
    }[where]
    with silent_validator(tmp_path) as (listener, target):
        out = horde("validator", "evidence", "export", *target, "--out", str(out_path))
        assert nobody_called(listener)
    assert out.returncode == 2
    assert out.stderr == f"horde validator evidence export: --out {out_path}: {why}\n"


# --- 4. text into a pipe is whole ------------------------------------------------------------


def test_round_and_weights_text_into_a_pipe_is_whole_and_unwrapped(dev: Path) -> None:
    miner = json.loads((dev / "endpoints.json").read_text())["services"]["miner"]["identity"]
    rnd = horde("validator", "round", "--dev", str(dev), "--set-weights")
    assert rnd.returncode == 0, rnd.stderr
    assert miner in rnd.stdout  # not sr25519:1c79…
    assert "…" not in rnd.stdout and "..." not in rnd.stdout
    executors = json.loads(horde("validator", "round", "--dev", str(dev), "--json").stdout)
    for m in executors["miners"]:
        for e in m["executors"]:
            assert e["executor_id"] in rnd.stdout
    weights = json.loads(horde("validator", "weights", "--dev", str(dev), "--json").stdout)
    text = horde("validator", "weights", "--dev", str(dev))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert weights["last_weights_reference"]
    assert lines[0].endswith(f"last weights set: {weights['last_weights_reference']}")
    for m in weights["miners"]:
        assert len(m["reason"]) > 80  # long enough that 80 columns would have wrapped it
        assert f"    {m['reason']}" in lines


# --- 5. evidence verify on nothing -----------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n", "[]", '{"evidence": []}'])
def test_verify_with_no_records_says_so(tmp_path: Path, content: str) -> None:
    path = tmp_path / "evidence.jsonl"
    path.write_text(content)
    out = horde("evidence", "verify", str(path))
    assert out.returncode == 1
    assert out.stderr == f"horde evidence verify: no evidence records in {path}\n"
    as_json = horde("evidence", "verify", "--json", str(path))
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"records": [], "valid": 0}


def test_verify_names_the_kind_and_version_a_record_has(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    path.write_text(json.dumps({"kind": EVIDENCE_KIND, "version": 2}) + "\n")
    out = horde("evidence", "verify", str(path))
    assert out.returncode == 1
    assert out.stdout == (
        f"record 1: invalid: not a {EVIDENCE_KIND} record (version 1): its kind is "
        f"'{EVIDENCE_KIND}', version 2\n"
    )


# --- 6. --miner in any spelling ---------------------------------------------------------------


def seed_evidence(state: Path, miner: Identity, marker: str) -> None:
    """A stored evidence row as the validator keeps it (keyed by the canonical identity); the
    export returns its record_json as is, so the record need not verify."""
    record = {"miner_hotkey": str(miner), "job_uuid": str(uuid.uuid4()), "seq": 1, "m": marker}
    with contextlib.closing(sqlite3.connect(state / "validator.db", timeout=30)) as db, db:
        db.execute(
            "INSERT INTO spot_evidence (miner_hotkey, job_uuid, seq, record_json, created_ns) "
            "VALUES (?, ?, ?, ?, ?)",
            (str(miner), record["job_uuid"], 1, json.dumps(record), time.time_ns()),
        )


def exported_markers(dev: Path, *extra: str) -> list[str]:
    out = horde("validator", "evidence", "export", "--dev", str(dev), "--json", *extra)
    assert out.returncode == 0, out.stderr
    return sorted(r["m"] for r in json.loads(out.stdout)["evidence"])


def test_export_miner_accepts_every_spelling_the_cli_prints(dev: Path, tmp_path: Path) -> None:
    sr = Identity("sr25519", os.urandom(32))
    ed = Identity("ed25519", os.urandom(32))
    other = Identity("sr25519", os.urandom(32))
    for ident, marker in ((sr, "sr"), (ed, "ed"), (other, "other")):
        seed_evidence(dev, ident, marker)
    hexkey = sr.public_key.hex()
    for spelling in (
        str(sr),
        sr.ss58,
        f" {sr.ss58} ",
        f"sr25519:{hexkey.upper()}",
        f"SR25519:{hexkey.upper()}",
    ):
        assert exported_markers(dev, "--miner", spelling) == ["sr"], spelling
    # An SS58 address does not say the scheme: an ed25519 hotkey's records come too.
    assert exported_markers(dev, "--miner", ed.ss58) == ["ed"]
    assert exported_markers(dev, "--miner", f"ed25519:{ed.public_key.hex().upper()}") == ["ed"]
    assert exported_markers(dev) == ["ed", "other", "sr"]
    out_file = tmp_path / "sr.jsonl"
    written = horde(
        "validator", "evidence", "export", "--dev", str(dev), "--miner", sr.ss58,
        "--out", str(out_file),
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert [json.loads(x)["m"] for x in out_file.read_text().splitlines()] == ["sr"]


@pytest.mark.parametrize(
    "miner",
    [
        "nonsense",
        "5Ci3A9ETwAZndbLw1vUBqoJTVcn2m81Fsyee9BS9b75j2FfU",  # a checksum digit off
        "sr25519:" + "ab" * 31,
        "rsa:" + "ab" * 32,
        "ab" * 32,  # a bare key: which scheme?
    ],
)
def test_export_unparseable_miner_is_a_usage_error_before_any_call(
    tmp_path: Path, miner: str
) -> None:
    with silent_validator(tmp_path) as (listener, target):
        out = horde("validator", "evidence", "export", *target, "--miner", miner)
        assert nobody_called(listener)
    assert out.returncode == 2
    assert out.stderr.startswith(f"horde validator evidence export: --miner {miner!r}: ")
    assert len(out.stderr.splitlines()) == 1


# --- 7. argparse names the command, not a variable --------------------------------------------


@pytest.mark.parametrize("words", [["validator", "evidence"], ["evidence"]])
def test_a_missing_subcommand_is_called_command(words: list[str]) -> None:
    out = horde(*words)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].endswith(
        "error: the following arguments are required: COMMAND"
    )
    assert "action" not in out.stderr
