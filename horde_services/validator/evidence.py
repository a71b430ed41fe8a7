"""Evidence of a spot-check mismatch, checkable offline from signatures alone.

A record (JSON; `horde validator evidence export` writes them, `horde evidence verify`
checks them)::

    {"version": 1, "kind": "horde.spotcheck-evidence.v1",
     "miner_hotkey": ..., "validator_hotkey": ..., "job_uuid": ..., "seq": N,
     "image": ..., "image_digest": ...,
     "certificate": {"payload": b64, "miner_signature": b64},   the miner's JobCertificate
     "receipt": {...},                                         DESIGN.md's receipt JSON form
     "request": b64, "claimed_output": b64, "trusted_output": b64,
     "comparator": "sha256", "detail": "...", "created_ns": N,
     "trusted": {"miner_hotkey", "job_uuid", "certificate", "receipt"}}

`verify_record` holds iff: the certificate verifies under the miner hotkey it names (and that is
the record's miner), for the record's job, and was valid when the receipt was made; the receipt
verifies under the certified job key, for that job; sha256(request) == receipt.input_sha256;
sha256(claimed_output) == receipt.output_sha256; and the comparator says claimed and trusted
outputs differ; and the `trusted` part (the trusted instance's own certificate and receipt)
verifies the same way over the same request and the trusted output, for the same image digest,
in a job the same validator started. Without it `trusted_output` would be any bytes one cares to
write. Whom to believe as a trusted instance is the verifier's call: `Verified.trusted_miner`
names it (`horde evidence verify --trusted-miner` pins it). Any altered field breaks one of these
and the reason names it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from horde.v1 import gateway_pb2, receipts_pb2

from horde_services.core.certificates import CertificateError, parse_certificate, verify_certificate
from horde_services.core.receipts import ReceiptError, StreamReceipt
from horde_services.validator.comparators import from_name

KIND = "horde.spotcheck-evidence.v1"
VERSION = 1


class EvidenceError(ValueError):
    """The evidence does not prove what it claims; the message says which part fails."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(doc: Mapping[str, Any], key: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise EvidenceError(f"{key}: missing or not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"{key}: not valid base64") from None


def cert_to_json(cert: receipts_pb2.JobCertificate) -> dict[str, str]:
    return {"payload": _b64(cert.payload), "miner_signature": _b64(cert.miner_signature)}


def cert_from_json(doc: Any, where: str) -> receipts_pb2.JobCertificate:
    if not isinstance(doc, Mapping):
        raise EvidenceError(f"{where}: missing or not an object")
    return receipts_pb2.JobCertificate(
        payload=_unb64(doc, "payload"), miner_signature=_unb64(doc, "miner_signature")
    )


def build_record(
    sample: gateway_pb2.Sample,
    *,
    validator_hotkey: str,
    trusted_output: bytes,
    comparator: str,
    detail: str,
    created_ns: int,
    trusted_certificate: receipts_pb2.JobCertificate,
    trusted_receipt: receipts_pb2.StreamReceipt,
) -> dict[str, Any]:
    payload = parse_certificate(sample.certificate)
    receipt = StreamReceipt.from_proto(sample.receipt)
    record: dict[str, Any] = {
        "version": VERSION,
        "kind": KIND,
        "miner_hotkey": payload.miner_hotkey,
        "validator_hotkey": validator_hotkey,
        "job_uuid": sample.job_uuid,
        "seq": receipt.seq,
        "image": sample.image,
        "image_digest": sample.image_digest,
        "certificate": cert_to_json(sample.certificate),
        "receipt": receipt.to_json_dict(),
        "request": _b64(sample.request),
        "claimed_output": _b64(sample.response),
        "trusted_output": _b64(trusted_output),
        "comparator": comparator,
        "detail": detail,
        "created_ns": created_ns,
    }
    tpayload = parse_certificate(trusted_certificate)
    record["trusted"] = {
        "miner_hotkey": tpayload.miner_hotkey,
        "job_uuid": tpayload.job_uuid,
        "certificate": cert_to_json(trusted_certificate),
        "receipt": StreamReceipt.from_proto(trusted_receipt).to_json_dict(),
    }
    return record


@dataclass(frozen=True)
class Verified:
    miner_hotkey: str
    job_uuid: str
    seq: int
    image_digest: str
    comparator: str
    detail: str
    trusted_miner: str  # the trusted instance whose signed output the claim is compared with


def _signed_pair(
    cert_doc: Any, receipt_doc: Any, where: str, miner: str | None, job_uuid: str | None
) -> tuple[receipts_pb2.JobCertificatePayload, StreamReceipt]:
    cert = cert_from_json(cert_doc, f"{where}certificate")
    try:
        receipt = StreamReceipt.from_json_dict(receipt_doc)
    except ReceiptError as exc:
        raise EvidenceError(f"{where}receipt: {exc}") from None
    try:
        # Valid when the receipt was made (the evidence is checked long after).
        payload = verify_certificate(
            cert, miner=miner, job_uuid=job_uuid, now_ns=receipt.timestamp_from_ns
        )
    except CertificateError as exc:
        raise EvidenceError(f"{where}certificate: {exc}") from None
    try:
        receipt.verify()
    except ReceiptError as exc:
        raise EvidenceError(f"{where}receipt: {exc}") from None
    if receipt.job_public_key != payload.job_public_key:
        raise EvidenceError(f"{where}receipt: signed by a key the certificate does not certify")
    if str(receipt.job_uuid) != payload.job_uuid:
        raise EvidenceError(f"{where}receipt: for job {receipt.job_uuid}, not {payload.job_uuid}")
    return payload, receipt


def verify_record(doc: Any) -> Verified:
    """Check one evidence record offline; raise EvidenceError with the reason when it fails."""
    if not isinstance(doc, Mapping):
        raise EvidenceError("the record is not a JSON object")
    if doc.get("kind") != KIND or doc.get("version") != VERSION:
        raise EvidenceError(
            f"not a {KIND} record (version {VERSION}): its kind is {doc.get('kind')!r:.80}, "
            f"version {doc.get('version')!r:.20}"
        )
    miner = doc.get("miner_hotkey")
    job_uuid = doc.get("job_uuid")
    if not isinstance(miner, str) or not isinstance(job_uuid, str):
        raise EvidenceError("miner_hotkey and job_uuid must be strings")
    payload, receipt = _signed_pair(doc.get("certificate"), doc.get("receipt"), "", miner, job_uuid)
    if doc.get("seq") != receipt.seq:
        raise EvidenceError(f"seq {doc.get('seq')!r} is not the receipt's {receipt.seq}")
    if doc.get("image_digest") != payload.image_digest:
        raise EvidenceError("image_digest is not the one the certificate names")
    validator = doc.get("validator_hotkey")
    if validator != payload.validator_hotkey:
        raise EvidenceError("validator_hotkey is not the one the certificate names")
    request = _unb64(doc, "request")
    claimed = _unb64(doc, "claimed_output")
    trusted = _unb64(doc, "trusted_output")
    if hashlib.sha256(request).digest() != receipt.input_sha256:
        raise EvidenceError("request: its sha256 is not the receipt's input_sha256")
    if hashlib.sha256(claimed).digest() != receipt.output_sha256:
        raise EvidenceError("claimed_output: its sha256 is not the receipt's output_sha256")
    name = doc.get("comparator")
    if not isinstance(name, str):
        raise EvidenceError("comparator: missing")
    try:
        comparator = from_name(name)
    except ValueError as exc:
        raise EvidenceError(f"comparator: {exc}") from None
    verdict = comparator.compare(claimed, trusted)
    if verdict.matched:
        raise EvidenceError(
            f"claimed_output and trusted_output agree under {name}: no mismatch is shown"
        )
    extra = doc.get("trusted")
    if extra is None:
        raise EvidenceError(
            "trusted: missing: the trusted instance's certificate and receipt must vouch for "
            "trusted_output"
        )
    if not isinstance(extra, Mapping):
        raise EvidenceError("trusted: not an object")
    tminer = extra.get("miner_hotkey")
    tjob = extra.get("job_uuid")
    if not isinstance(tminer, str) or not isinstance(tjob, str):
        raise EvidenceError("trusted: miner_hotkey and job_uuid must be strings")
    if tminer == miner:
        raise EvidenceError("trusted: the accused miner cannot be its own trusted instance")
    tpayload, treceipt = _signed_pair(
        extra.get("certificate"), extra.get("receipt"), "trusted.", tminer, tjob
    )
    if tpayload.image_digest != payload.image_digest:
        raise EvidenceError("trusted: the trusted instance ran another image digest")
    if tpayload.validator_hotkey != payload.validator_hotkey:
        raise EvidenceError("trusted.certificate: issued for another validator than the record's")
    if treceipt.input_sha256 != receipt.input_sha256:
        raise EvidenceError("trusted.receipt: signed for another request")
    if hashlib.sha256(trusted).digest() != treceipt.output_sha256:
        raise EvidenceError("trusted_output: its sha256 is not the trusted receipt's")
    return Verified(
        miner, job_uuid, receipt.seq, payload.image_digest, name, verdict.detail, tminer
    )


def load_records(text: str) -> list[Any]:
    """Records from a file: one JSON document ({"evidence": [...]}, a list, or one record), or
    JSON lines (one record a line)."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        out = []
        for number, line in enumerate(stripped.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvidenceError(f"line {number}: not JSON: {exc.msg}") from None
        return out
    if isinstance(doc, Mapping) and "evidence" in doc and isinstance(doc["evidence"], list):
        return list(doc["evidence"])
    if isinstance(doc, list):
        return doc
    return [doc]
