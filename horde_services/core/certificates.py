"""Job certificates: the miner binds a streaming job's fresh Ed25519 key to its hotkey.

The miner signs `"horde.job-certificate.v1\\0" || payload` where payload is the deterministic
serialization of a JobCertificatePayload; verifiers check the exact payload bytes they received,
so no re-serialization can change what was signed.
"""

from __future__ import annotations

import time

from horde.v1 import receipts_pb2

from horde_services.core.identity import Identity, Signer

DOMAIN = b"horde.job-certificate.v1\x00"


class CertificateError(ValueError):
    """A certificate is malformed, not signed by the expected miner, or not valid now."""


def sign_certificate(
    payload: receipts_pb2.JobCertificatePayload, miner: Signer
) -> receipts_pb2.JobCertificate:
    if payload.miner_hotkey != str(miner.identity):
        raise CertificateError("payload.miner_hotkey must be the signing miner's identity")
    raw = payload.SerializeToString(deterministic=True)
    return receipts_pb2.JobCertificate(payload=raw, miner_signature=miner.sign(DOMAIN + raw))


def parse_certificate(cert: receipts_pb2.JobCertificate) -> receipts_pb2.JobCertificatePayload:
    payload = receipts_pb2.JobCertificatePayload()
    try:
        payload.ParseFromString(cert.payload)
    except Exception as exc:
        raise CertificateError(f"malformed certificate payload: {exc}") from None
    return payload


def verify_certificate(
    cert: receipts_pb2.JobCertificate,
    *,
    miner: str | None = None,
    job_uuid: str | None = None,
    now_ns: int | None = None,
) -> receipts_pb2.JobCertificatePayload:
    """Check the signature under the miner named in the payload (and that it is `miner` when
    given), the job, the key length and the validity window; return the payload."""
    payload = parse_certificate(cert)
    if miner is not None and payload.miner_hotkey != miner:
        raise CertificateError(
            f"certificate is signed for miner {payload.miner_hotkey}, expected {miner}"
        )
    try:
        identity = Identity.parse(payload.miner_hotkey)
    except ValueError as exc:
        raise CertificateError(f"certificate names a malformed miner identity: {exc}") from None
    if not identity.verify(DOMAIN + cert.payload, cert.miner_signature):
        raise CertificateError("certificate signature does not verify under the miner's hotkey")
    if job_uuid is not None and payload.job_uuid != job_uuid:
        raise CertificateError(f"certificate is for job {payload.job_uuid}, not {job_uuid}")
    if len(payload.job_public_key) != 32:
        raise CertificateError("certificate job_public_key must be 32 bytes")
    now = time.time_ns() if now_ns is None else now_ns
    if not payload.not_before_ns <= now <= payload.not_after_ns:
        raise CertificateError("certificate is outside its validity window")
    return payload
