"""Stream receipts, exactly as DESIGN.md defines them.

The signed blob is 128 bytes: a 24-byte domain tag, the job UUID's 16 bytes, then seq (u64),
timestamp_from_ns and timestamp_to_ns (i64, big-endian) and the two sha256 digests. The signature is
Ed25519 under the job's key. Everything here is pure and deterministic so that gateways, clients and
third parties verifying evidence offline all agree byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import nacl.exceptions
import nacl.signing
from horde.v1 import receipts_pb2

DOMAIN = b"horde.stream-receipt.v1\x00"
BLOB_LEN = 128
VERSION = 1
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

assert len(DOMAIN) == 24


class ReceiptError(ValueError):
    """A receipt is malformed or does not verify; the message says which part and why."""


@dataclass(frozen=True)
class StreamReceipt:
    """One signed receipt: what a job proxy returns with every response."""

    job_uuid: uuid.UUID
    seq: int
    timestamp_from_ns: int
    timestamp_to_ns: int
    input_sha256: bytes
    output_sha256: bytes
    job_public_key: bytes
    signature: bytes
    version: int = VERSION

    def blob(self) -> bytes:
        return signed_blob(
            self.job_uuid,
            self.seq,
            self.timestamp_from_ns,
            self.timestamp_to_ns,
            self.input_sha256,
            self.output_sha256,
        )

    def verify(self) -> None:
        """Raise ReceiptError unless the receipt is well formed and its signature verifies."""
        if self.version != VERSION:
            raise ReceiptError(f"unsupported version {self.version}")
        if len(self.job_public_key) != 32:
            raise ReceiptError("job_public_key must be 32 bytes")
        if len(self.signature) != 64:
            raise ReceiptError("signature must be 64 bytes")
        blob = self.blob()
        try:
            nacl.signing.VerifyKey(self.job_public_key).verify(blob, self.signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise ReceiptError("signature does not verify under job_public_key") from exc

    def is_valid(self) -> bool:
        try:
            self.verify()
        except ReceiptError:
            return False
        return True

    # --- JSON form (export, `horde receipts verify`, logs) ---------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "job_uuid": str(self.job_uuid),
            "seq": self.seq,
            "timestamp_from_ns": self.timestamp_from_ns,
            "timestamp_to_ns": self.timestamp_to_ns,
            "input_sha256": self.input_sha256.hex(),
            "output_sha256": self.output_sha256.hex(),
            "job_public_key": self.job_public_key.hex(),
            "signature": self.signature.hex(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), separators=(",", ":"))

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> StreamReceipt:
        if not isinstance(data, Mapping):
            raise ReceiptError("receipt must be a JSON object")
        missing = [k for k in _JSON_FIELDS if k not in data]
        if missing:
            raise ReceiptError(f"missing field(s): {', '.join(missing)}")
        extra = sorted(set(data) - set(_JSON_FIELDS))
        if extra:
            raise ReceiptError(f"unknown field(s): {', '.join(extra)}")
        try:
            job_uuid = uuid.UUID(_str(data, "job_uuid"))
        except ValueError as exc:
            raise ReceiptError("job_uuid is not a UUID") from exc
        return cls(
            version=_int(data, "version", 0, 2**32 - 1),
            job_uuid=job_uuid,
            seq=_int(data, "seq", 0, 2**64 - 1),
            timestamp_from_ns=_int(data, "timestamp_from_ns", -(2**63), 2**63 - 1),
            timestamp_to_ns=_int(data, "timestamp_to_ns", -(2**63), 2**63 - 1),
            input_sha256=_hex(data, "input_sha256", 32),
            output_sha256=_hex(data, "output_sha256", 32),
            job_public_key=_hex(data, "job_public_key", 32),
            signature=_hex(data, "signature", 64),
        )

    @classmethod
    def from_json(cls, text: str) -> StreamReceipt:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReceiptError(f"not JSON: {exc.msg}") from exc
        return cls.from_json_dict(data)

    # --- protobuf form ----------------------------------------------------------------------

    def to_proto(self) -> receipts_pb2.StreamReceipt:
        return receipts_pb2.StreamReceipt(
            version=self.version,
            job_uuid=self.job_uuid.bytes,
            seq=self.seq,
            timestamp_from_ns=self.timestamp_from_ns,
            timestamp_to_ns=self.timestamp_to_ns,
            input_sha256=self.input_sha256,
            output_sha256=self.output_sha256,
            job_public_key=self.job_public_key,
            signature=self.signature,
        )

    @classmethod
    def from_proto(cls, msg: receipts_pb2.StreamReceipt) -> StreamReceipt:
        if len(msg.job_uuid) != 16:
            raise ReceiptError("job_uuid must be 16 bytes")
        for name, size in (("input_sha256", 32), ("output_sha256", 32)):
            if len(getattr(msg, name)) != size:
                raise ReceiptError(f"{name} must be {size} bytes")
        return cls(
            version=msg.version,
            job_uuid=uuid.UUID(bytes=msg.job_uuid),
            seq=msg.seq,
            timestamp_from_ns=msg.timestamp_from_ns,
            timestamp_to_ns=msg.timestamp_to_ns,
            input_sha256=msg.input_sha256,
            output_sha256=msg.output_sha256,
            job_public_key=msg.job_public_key,
            signature=msg.signature,
        )


_JSON_FIELDS = (
    "version",
    "job_uuid",
    "seq",
    "timestamp_from_ns",
    "timestamp_to_ns",
    "input_sha256",
    "output_sha256",
    "job_public_key",
    "signature",
)


def signed_blob(
    job_uuid: uuid.UUID,
    seq: int,
    timestamp_from_ns: int,
    timestamp_to_ns: int,
    input_sha256: bytes,
    output_sha256: bytes,
) -> bytes:
    """The exact 128 bytes a receipt signature covers."""
    if len(input_sha256) != 32 or len(output_sha256) != 32:
        raise ReceiptError("digests must be 32 bytes")
    try:
        numbers = _U64.pack(seq) + _I64.pack(timestamp_from_ns) + _I64.pack(timestamp_to_ns)
    except struct.error as exc:
        raise ReceiptError(f"number out of range: {exc}") from exc
    blob = DOMAIN + job_uuid.bytes + numbers + input_sha256 + output_sha256
    assert len(blob) == BLOB_LEN
    return blob


def sign_receipt(
    signing_key: nacl.signing.SigningKey,
    job_uuid: uuid.UUID,
    seq: int,
    timestamp_from_ns: int,
    timestamp_to_ns: int,
    input_sha256: bytes,
    output_sha256: bytes,
) -> StreamReceipt:
    blob = signed_blob(
        job_uuid, seq, timestamp_from_ns, timestamp_to_ns, input_sha256, output_sha256
    )
    return StreamReceipt(
        job_uuid=job_uuid,
        seq=seq,
        timestamp_from_ns=timestamp_from_ns,
        timestamp_to_ns=timestamp_to_ns,
        input_sha256=input_sha256,
        output_sha256=output_sha256,
        job_public_key=bytes(signing_key.verify_key),
        signature=signing_key.sign(blob).signature,
    )


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ReceiptError(f"{key} must be a string")
    return value


def _int(data: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReceiptError(f"{key} must be an integer")
    if not lo <= value <= hi:
        raise ReceiptError(f"{key} out of range")
    return value


def _hex(data: Mapping[str, Any], key: str, size: int) -> bytes:
    text = _str(data, key)
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ReceiptError(f"{key} is not hex") from exc
    if len(raw) != size:
        raise ReceiptError(f"{key} must be {size} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class ReceiptCheck:
    """Result of checking one line of a receipts file.

    ``receipt`` is set exactly when the line is valid (``error`` is None).
    """

    line: int
    receipt: StreamReceipt | None
    error: str | None


def verify_lines(
    lines: Iterable[str | bytes], *, pinned_keys: Collection[bytes] | None = None
) -> list[ReceiptCheck]:
    """Check receipts in JSON form, one a line (blank lines skipped); line numbers start at 1.

    A line is valid when it is UTF-8 JSON of a well-formed receipt whose signature verifies under
    the job_public_key it carries, and, across the lines given:

    - every receipt of one job carries the same job_public_key: the key of that job's first valid
      receipt; a receipt naming another key is invalid and the reason names that first line;
    - no (job, seq) appears twice: a repeat is invalid and the reason names the first line;
    - when ``pinned_keys`` is given, the key is one of them (say, the key in the job certificate).
    """
    pinned = None if pinned_keys is None else frozenset(bytes(k) for k in pinned_keys)
    job_keys: dict[uuid.UUID, tuple[bytes, int]] = {}
    seen: dict[tuple[uuid.UUID, int], int] = {}
    checks: list[ReceiptCheck] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                checks.append(ReceiptCheck(number, None, "not UTF-8 text"))
                continue
        else:
            text = raw
        if not text.strip():
            continue
        try:
            receipt = StreamReceipt.from_json(text)
            receipt.verify()
        except ReceiptError as exc:
            checks.append(ReceiptCheck(number, None, str(exc)))
            continue
        except RecursionError:  # json.loads on very deeply nested arrays or objects
            checks.append(ReceiptCheck(number, None, "not JSON: nested too deeply"))
            continue
        except ValueError as exc:  # json.loads on an integer beyond Python's digit limit
            checks.append(ReceiptCheck(number, None, f"not JSON: {str(exc).split(';')[0]}"))
            continue
        error = _consistency_error(receipt, pinned, job_keys, seen)
        if error is not None:
            checks.append(ReceiptCheck(number, None, error))
            continue
        job_keys.setdefault(receipt.job_uuid, (receipt.job_public_key, number))
        seen[(receipt.job_uuid, receipt.seq)] = number
        checks.append(ReceiptCheck(number, receipt, None))
    return checks


def _consistency_error(
    receipt: StreamReceipt,
    pinned: frozenset[bytes] | None,
    job_keys: Mapping[uuid.UUID, tuple[bytes, int]],
    seen: Mapping[tuple[uuid.UUID, int], int],
) -> str | None:
    key = receipt.job_public_key
    if pinned is not None and key not in pinned:
        return f"not signed by a pinned job key (job_public_key {key.hex()[:16]}…)"
    first = job_keys.get(receipt.job_uuid)
    if first is not None and first[0] != key:
        return (
            f"job_public_key {key.hex()[:16]}… contradicts line {first[1]}'s key "
            f"{first[0].hex()[:16]}… for job {receipt.job_uuid}"
        )
    earlier = seen.get((receipt.job_uuid, receipt.seq))
    if earlier is not None:
        return f"duplicate of line {earlier}: job {receipt.job_uuid} seq {receipt.seq}"
    return None


@dataclass(frozen=True)
class JobSummary:
    """The valid receipts of one job in a checked file."""

    job_uuid: uuid.UUID
    job_public_key: bytes
    valid: int
    first_seq: int
    last_seq: int
    gaps: tuple[tuple[int, int], ...]  # inclusive ranges of seqs missing between first and last

    def describe(self, max_gaps: int = 8) -> str:
        """One line: job, count, seq range and gaps, and the key's first 16 hex digits."""
        if self.first_seq == self.last_seq:
            seqs = f"seq {self.first_seq}"
        else:
            seqs = f"seqs {self.first_seq}-{self.last_seq}"
        if self.gaps:
            parts = [str(a) if a == b else f"{a}-{b}" for a, b in self.gaps[:max_gaps]]
            if len(self.gaps) > max_gaps:
                parts.append(f"and {len(self.gaps) - max_gaps} more gaps")
            gaps = "missing " + ", ".join(parts)
        else:
            gaps = "no gaps"
        return (
            f"job {self.job_uuid}: {self.valid} valid, {seqs}, {gaps}, "
            f"key {self.job_public_key.hex()[:16]}"
        )


def summarize_jobs(checks: Iterable[ReceiptCheck]) -> list[JobSummary]:
    """One summary per job with valid receipts, in the order jobs first appear."""
    seqs: dict[uuid.UUID, list[int]] = {}
    keys: dict[uuid.UUID, bytes] = {}
    for check in checks:
        if check.receipt is None:
            continue
        seqs.setdefault(check.receipt.job_uuid, []).append(check.receipt.seq)
        keys.setdefault(check.receipt.job_uuid, check.receipt.job_public_key)
    summaries = []
    for job, numbers in seqs.items():
        ordered = sorted(set(numbers))
        gaps = tuple((a + 1, b - 1) for a, b in pairwise(ordered) if b - a > 1)
        summaries.append(JobSummary(job, keys[job], len(numbers), ordered[0], ordered[-1], gaps))
    return summaries
