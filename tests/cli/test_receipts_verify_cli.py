"""`horde receipts verify` on hostile and awkward input, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import nacl.signing
import pytest

from horde_services.core.receipts import sha256, sign_receipt

HORDE = str(Path(sys.executable).with_name("horde"))
JOB = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f")


def horde(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([HORDE, *args], capture_output=True, input=stdin, timeout=60)
    return subprocess.CompletedProcess(
        out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
    )


def line(key: nacl.signing.SigningKey, seq: int, job: uuid.UUID = JOB) -> str:
    digest = sha256(str(seq).encode())
    return sign_receipt(key, job, seq, 1_000 + seq, 2_000 + seq, digest, digest).to_json()


def key_hex(key: nacl.signing.SigningKey) -> str:
    return bytes(key.verify_key).hex()


def write(tmp_path: Path, data: bytes | str) -> str:
    path = tmp_path / "receipts.jsonl"
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return str(path)


def test_binary_line_is_reported_and_the_rest_checked(tmp_path: Path) -> None:
    key = nacl.signing.SigningKey.generate()
    data = (line(key, 1) + "\n").encode() + b"\xff\xfe\x00\x81garbage\n" + line(key, 2).encode()
    out = horde("receipts", "verify", write(tmp_path, data))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.splitlines() == ["line 2: invalid: not UTF-8 text"]
    assert "2 valid, 1 invalid" in out.stderr


def test_receipt_signed_by_a_fresh_key_is_invalid(tmp_path: Path) -> None:
    genuine = nacl.signing.SigningKey.generate()
    forger = nacl.signing.SigningKey.generate()
    path = write(tmp_path, f"{line(genuine, 1)}\n{line(forger, 1)}\n")
    out = horde("receipts", "verify", path)
    assert out.returncode == 1
    assert out.stdout.startswith("line 2: invalid: job_public_key")
    assert "contradicts line 1" in out.stdout
    assert "1 valid, 1 invalid" in out.stderr


def test_pinned_job_key(tmp_path: Path) -> None:
    genuine = nacl.signing.SigningKey.generate()
    forger = nacl.signing.SigningKey.generate()
    path = write(tmp_path, f"{line(forger, 1)}\n{line(genuine, 1)}\n{line(genuine, 2)}\n")
    out = horde("receipts", "verify", "--job-key", key_hex(genuine), path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"line 1: invalid: not signed by a pinned job key (job_public_key {key_hex(forger)[:16]}…)"
    ]
    assert "2 valid, 1 invalid" in out.stderr
    assert "valid = signed by a job key given with --job-key" in out.stderr
    # Pinning several keys still keeps each job to one key.
    both = horde(
        "receipts", "verify", "--job-key", key_hex(genuine), "--job-key", key_hex(forger), path
    )
    assert both.returncode == 1
    assert "not signed by a pinned job key" not in both.stdout
    assert both.stdout.count("contradicts line 1") == 2
    good = write(tmp_path, f"{line(genuine, 1)}\n{line(genuine, 2)}\n")
    assert horde("receipts", "verify", "--job-key", key_hex(genuine), good).returncode == 0


@pytest.mark.parametrize("bad", ["zz", "abcd", "00" * 33])
def test_bad_job_key_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    key = nacl.signing.SigningKey.generate()
    out = horde("receipts", "verify", "--job-key", bad, write(tmp_path, line(key, 1)))
    assert out.returncode == 2
    assert "--job-key" in out.stderr and "Traceback" not in out.stderr


def test_duplicate_receipts_are_invalid(tmp_path: Path) -> None:
    key = nacl.signing.SigningKey.generate()
    path = write(tmp_path, f"{line(key, 3)}\n{line(key, 3)}\n")
    out = horde("receipts", "verify", path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [f"line 2: invalid: duplicate of line 1: job {JOB} seq 3"]


@pytest.mark.parametrize("data", [b"", b"\n  \n\t\r\n"])
def test_no_receipts_says_so(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    out = horde("receipts", "verify", path)
    assert out.returncode == 1
    assert f"no receipts in {path}" in out.stderr


def test_reads_standard_input() -> None:
    key = nacl.signing.SigningKey.generate()
    out = horde("receipts", "verify", "-", stdin=f"{line(key, 1)}\n{line(key, 2)}\n".encode())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 valid, 0 invalid" in out.stderr
    empty = horde("receipts", "verify", "-", stdin=b"")
    assert empty.returncode == 1
    assert "no receipts in standard input" in empty.stderr


def test_prints_one_summary_per_job_and_what_valid_means(tmp_path: Path) -> None:
    key_a = nacl.signing.SigningKey.generate()
    key_b = nacl.signing.SigningKey.generate()
    other = uuid.UUID("00000000-0000-4000-8000-000000000001")
    lines = [line(key_a, seq) for seq in (1, 2, 5, 6, 9)] + [line(key_b, 0, job=other)]
    out = horde("receipts", "verify", write(tmp_path, "\n".join(lines)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""
    err = out.stderr.splitlines()
    assert err[0] == "6 valid, 0 invalid"
    assert err[1] == f"job {JOB}: 5 valid, seqs 1-9, missing 3-4, 7-8, key {key_hex(key_a)[:16]}"
    assert err[2] == f"job {other}: 1 valid, seq 0, no gaps, key {key_hex(key_b)[:16]}"
    assert err[3].startswith("valid = signed by the job key the receipt names")
    assert "same key on all of a job's receipts" in err[3]


def test_pathological_json_does_not_crash(tmp_path: Path) -> None:
    data = "[" * 100_000 + "\n" + json.dumps({"seq": 1}).replace("1", "9" * 5_000)
    out = horde("receipts", "verify", write(tmp_path, data))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert [ln.split(": ")[1] for ln in out.stdout.splitlines()] == ["invalid", "invalid"]
