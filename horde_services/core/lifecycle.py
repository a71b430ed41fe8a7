"""Lifecycle receipts: job started / job finished, signed by miner and validator."""

from __future__ import annotations

from horde.v1 import receipts_pb2

from horde_services.core.identity import Identity, Signer

DOMAIN = b"horde.lifecycle-receipt.v1\x00"
CERT_DOMAIN = b"horde.job-certificate.v1\x00"


def miner_sign(
    payload: receipts_pb2.LifecycleReceiptPayload, miner: Signer
) -> receipts_pb2.LifecycleReceipt:
    raw = payload.SerializeToString(deterministic=True)
    return receipts_pb2.LifecycleReceipt(payload=raw, miner_signature=miner.sign(DOMAIN + raw))


def countersign(
    receipt: receipts_pb2.LifecycleReceipt, validator: Signer
) -> receipts_pb2.LifecycleReceipt:
    out = receipts_pb2.LifecycleReceipt()
    out.CopyFrom(receipt)
    out.validator_signature = validator.sign(DOMAIN + receipt.payload)
    return out


def parse(receipt: receipts_pb2.LifecycleReceipt) -> receipts_pb2.LifecycleReceiptPayload:
    payload = receipts_pb2.LifecycleReceiptPayload()
    payload.ParseFromString(receipt.payload)
    return payload


def verify(receipt: receipts_pb2.LifecycleReceipt, *, require_validator: bool = True) -> str | None:
    """None when the signatures verify against the identities named in the payload, else why."""
    try:
        payload = parse(receipt)
        miner = Identity.parse(payload.miner_hotkey)
        validator = Identity.parse(payload.validator_hotkey)
    except Exception as exc:
        return f"malformed receipt: {exc}"
    if not miner.verify(DOMAIN + receipt.payload, receipt.miner_signature):
        return "miner signature does not verify"
    if require_validator and not validator.verify(
        DOMAIN + receipt.payload, receipt.validator_signature
    ):
        return "validator signature does not verify"
    return None
