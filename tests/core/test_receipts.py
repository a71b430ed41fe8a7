"""Stream receipts against the shared vectors, plus property tests of the codec."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from horde_services.core.receipts import (
    BLOB_LEN,
    ReceiptError,
    StreamReceipt,
    sha256,
    sign_receipt,
    summarize_jobs,
    verify_lines,
)

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "stream-receipt-v1.json").read_text()
)


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors_reproduce_byte_for_byte(vector: dict[str, Any]) -> None:
    key = nacl.signing.SigningKey(bytes.fromhex(vector["job_secret_seed"]))
    assert bytes(key.verify_key).hex() == vector["job_public_key"]
    expected = vector["receipt"]
    input_digest = sha256(vector["input_utf8"].encode())
    output_digest = sha256(vector["output_utf8"].encode())
    assert input_digest.hex() == expected["input_sha256"]
    assert output_digest.hex() == expected["output_sha256"]
    receipt = sign_receipt(
        key,
        uuid.UUID(expected["job_uuid"]),
        expected["seq"],
        expected["timestamp_from_ns"],
        expected["timestamp_to_ns"],
        input_digest,
        output_digest,
    )
    assert receipt.blob().hex() == vector["signed_blob"]
    assert len(receipt.blob()) == BLOB_LEN
    assert receipt.to_json_dict() == expected
    parsed = StreamReceipt.from_json_dict(expected)
    parsed.verify()
    assert StreamReceipt.from_proto(parsed.to_proto()) == parsed


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_rejected(vector: dict[str, Any]) -> None:
    receipt = StreamReceipt.from_json_dict(vector["receipt"])
    with pytest.raises(ReceiptError):
        receipt.verify()


def test_verify_lines_reports_each_bad_line() -> None:
    lines = [json.dumps(v["receipt"]) for v in VECTORS["valid"]]
    lines += [json.dumps(v["receipt"]) for v in VECTORS["invalid"]]
    lines += ["not json", json.dumps({"version": 1})]
    checks = verify_lines(lines)
    good = [c for c in checks if c.error is None]
    bad = [c for c in checks if c.error is not None]
    assert len(good) == len(VECTORS["valid"])
    assert len(bad) == len(VECTORS["invalid"]) + 2
    assert "missing field" in (bad[-1].error or "")


seeds = st.binary(min_size=32, max_size=32)
digests = st.binary(min_size=32, max_size=32)


@given(
    seed=seeds,
    job=st.uuids(),
    seq=st.integers(0, 2**64 - 1),
    t0=st.integers(-(2**63), 2**63 - 1),
    t1=st.integers(-(2**63), 2**63 - 1),
    din=digests,
    dout=digests,
)
def test_round_trip_and_any_field_change_breaks_signature(
    seed: bytes, job: uuid.UUID, seq: int, t0: int, t1: int, din: bytes, dout: bytes
) -> None:
    receipt = sign_receipt(nacl.signing.SigningKey(seed), job, seq, t0, t1, din, dout)
    again = StreamReceipt.from_json(receipt.to_json())
    assert again == receipt
    assert again.is_valid()
    flipped = bytes([dout[0] ^ 1]) + dout[1:]
    tampered = StreamReceipt.from_json_dict(
        {**receipt.to_json_dict(), "output_sha256": flipped.hex()}
    )
    assert not tampered.is_valid()
    moved = StreamReceipt.from_json_dict({**receipt.to_json_dict(), "seq": (seq + 1) % 2**64})
    assert not moved.is_valid()


@given(st.dictionaries(st.text(max_size=20), st.integers() | st.text(max_size=70), max_size=10))
def test_arbitrary_json_never_crashes(data: dict[str, Any]) -> None:
    try:
        StreamReceipt.from_json_dict(data).verify()
    except ReceiptError:
        pass


JOB = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f")


def _receipt_line(key: nacl.signing.SigningKey, seq: int, job: uuid.UUID = JOB) -> str:
    digest = sha256(str(seq).encode())
    return sign_receipt(key, job, seq, 1_000 + seq, 2_000 + seq, digest, digest).to_json()


def test_verify_lines_accepts_bytes_and_reports_non_utf8_lines() -> None:
    key = nacl.signing.SigningKey.generate()
    lines = [_receipt_line(key, 1).encode(), b"\xff\xfe\x00binary", b"  ", _receipt_line(key, 2)]
    checks = verify_lines(lines)
    assert [(c.line, c.error) for c in checks] == [(1, None), (2, "not UTF-8 text"), (4, None)]


def test_verify_lines_rejects_a_receipt_signed_by_another_key_for_the_same_job() -> None:
    genuine = nacl.signing.SigningKey.generate()
    forger = nacl.signing.SigningKey.generate()
    lines = [_receipt_line(genuine, 1), _receipt_line(forger, 2), _receipt_line(genuine, 3)]
    checks = verify_lines(lines)
    assert [c.error is None for c in checks] == [True, False, True]
    error = checks[1].error or ""
    assert "contradicts line 1" in error and str(JOB) in error
    assert bytes(forger.verify_key).hex()[:16] in error


def test_verify_lines_job_key_comes_from_first_correctly_signed_receipt() -> None:
    genuine = nacl.signing.SigningKey.generate()
    forger = nacl.signing.SigningKey.generate()
    broken = json.loads(_receipt_line(forger, 1))
    broken["signature"] = "00" * 64
    lines = [json.dumps(broken), _receipt_line(genuine, 1), _receipt_line(genuine, 2)]
    checks = verify_lines(lines)
    assert [c.error is None for c in checks] == [False, True, True]


def test_verify_lines_keys_are_per_job() -> None:
    key_a = nacl.signing.SigningKey.generate()
    key_b = nacl.signing.SigningKey.generate()
    other = uuid.UUID("00000000-0000-4000-8000-000000000001")
    checks = verify_lines([_receipt_line(key_a, 1), _receipt_line(key_b, 1, job=other)])
    assert all(c.error is None for c in checks)


def test_verify_lines_pinned_keys() -> None:
    genuine = nacl.signing.SigningKey.generate()
    forger = nacl.signing.SigningKey.generate()
    # Without a pin the forged first line would set the job's key; with one it cannot.
    lines = [_receipt_line(forger, 1), _receipt_line(genuine, 1), _receipt_line(genuine, 2)]
    checks = verify_lines(lines, pinned_keys=[bytes(genuine.verify_key)])
    assert [c.error is None for c in checks] == [False, True, True]
    assert (checks[0].error or "").startswith("not signed by a pinned job key")
    unpinned = verify_lines(lines)
    assert [c.error is None for c in unpinned] == [True, False, False]


def test_verify_lines_rejects_duplicates() -> None:
    key = nacl.signing.SigningKey.generate()
    first = _receipt_line(key, 7)
    digest = sha256(b"other")
    same_seq = sign_receipt(key, JOB, 7, 5, 6, digest, digest).to_json()
    checks = verify_lines([first, "", first, same_seq, _receipt_line(key, 8)])
    assert [(c.line, c.error) for c in checks] == [
        (1, None),
        (3, f"duplicate of line 1: job {JOB} seq 7"),
        (4, f"duplicate of line 1: job {JOB} seq 7"),
        (5, None),
    ]


def test_verify_lines_survives_pathological_json() -> None:
    lines = ["[" * 100_000, '{"seq": ' + "9" * 5_000 + "}"]
    checks = verify_lines(lines)
    assert [c.line for c in checks] == [1, 2]
    assert all((c.error or "").startswith("not JSON") for c in checks)


def test_summarize_jobs_reports_counts_ranges_gaps_and_key() -> None:
    key = nacl.signing.SigningKey.generate()
    lines = [_receipt_line(key, seq) for seq in (5, 1, 2, 9, 4)] + ["junk"]
    (summary,) = summarize_jobs(verify_lines(lines))
    assert (summary.valid, summary.first_seq, summary.last_seq) == (5, 1, 9)
    assert summary.gaps == ((3, 3), (6, 8))
    assert summary.describe() == (
        f"job {JOB}: 5 valid, seqs 1-9, missing 3, 6-8, key {bytes(key.verify_key).hex()[:16]}"
    )
    (single,) = summarize_jobs(verify_lines([_receipt_line(key, 4)]))
    assert "seq 4, no gaps" in single.describe()
    assert summarize_jobs(verify_lines(["junk"])) == []
