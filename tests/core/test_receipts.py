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

from services.core.receipts import (
    BLOB_LEN,
    ReceiptError,
    StreamReceipt,
    sha256,
    sign_receipt,
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
