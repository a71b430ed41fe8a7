"""What the gateway (and a client) checks before trusting a streaming job: its certificate, the
client's clock, and every receipt. Pure functions and small classes: no I/O, so the same checks
run in the gateway, in `horde stream` and in tests.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from horde.v1 import receipts_pb2

from horde_services.core.auth import timestamp_hint
from horde_services.core.certificates import CertificateError, verify_certificate
from horde_services.core.receipts import ReceiptError, StreamReceipt

__all__ = [
    "BadReceipt",
    "CertificateError",
    "ClockSkew",
    "ReceiptChecker",
    "check_certificate",
    "check_client_clock",
]


class BadReceipt(Exception):
    """A receipt failed a check; `reason` is what the client and the validator are told."""

    def __init__(self, reason: str, receipt: receipts_pb2.StreamReceipt | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.receipt = receipt


class ClockSkew(Exception):
    """A peer's clock is further from ours than the allowed skew."""


def check_client_clock(client_ns: int, now_ns: int, skew_ns: int, who: str = "client") -> None:
    """Raise ClockSkew when `client_ns` is more than `skew_ns` away from `now_ns`."""
    off = client_ns - now_ns
    if abs(off) > skew_ns:
        direction = "ahead of" if off > 0 else "behind"
        raise ClockSkew(
            f"{who} clock is {abs(off) / 1e9:.3f} s {direction} the gateway's "
            f"(allowed skew {skew_ns / 1e9:g} s){timestamp_hint(client_ns, now_ns)}"
        )


def check_certificate(
    cert: receipts_pb2.JobCertificate,
    *,
    job_uuid: str,
    validator_identity: str | None,
    endpoint: str | None = None,
    now_ns: int | None = None,
) -> receipts_pb2.JobCertificatePayload:
    """Verify a job certificate before anything is sent to the job: signed by the miner it names,
    for this job, issued for our validator, reached at the endpoint we were given, valid now."""
    payload = verify_certificate(cert, job_uuid=job_uuid, now_ns=now_ns)
    if validator_identity and payload.validator_hotkey != validator_identity:
        raise CertificateError(
            f"certificate was issued for validator {payload.validator_hotkey or '(none)'}, "
            f"not {validator_identity}"
        )
    if endpoint and payload.endpoint and payload.endpoint != endpoint:
        raise CertificateError(
            f"certificate names endpoint {payload.endpoint}, but the job is served at {endpoint}"
        )
    return payload


@dataclass
class ReceiptChecker:
    """Checks the receipts of one job, in order.

    `sent_ns` is our clock when the request left, `received_ns` when the last byte of the response
    arrived; the proxy's timestamps must fall inside [sent - skew, received + skew] and must not
    run backwards from one receipt to the next.
    """

    job_uuid: uuid.UUID
    job_public_key: bytes
    skew_ns: int
    _last_from_ns: int | None = None

    @classmethod
    def for_certificate(
        cls, payload: receipts_pb2.JobCertificatePayload, skew_s: float
    ) -> ReceiptChecker:
        return cls(uuid.UUID(payload.job_uuid), bytes(payload.job_public_key), int(skew_s * 1e9))

    def check(
        self,
        msg: receipts_pb2.StreamReceipt | None,
        *,
        seq: int,
        input_sha256: bytes,
        output_sha256: bytes,
        sent_ns: int,
        received_ns: int,
    ) -> StreamReceipt:
        prefix = f"receipt {seq}"
        if msg is None:
            raise BadReceipt(f"{prefix}: missing from the last response frame")
        try:
            receipt = StreamReceipt.from_proto(msg)
            if receipt.job_public_key != self.job_public_key:
                raise BadReceipt(f"{prefix}: signed by a key other than the certified job key", msg)
            receipt.verify()
        except ReceiptError as exc:
            raise BadReceipt(f"{prefix}: {exc}", msg) from None
        if receipt.job_uuid != self.job_uuid:
            raise BadReceipt(f"{prefix}: for job {receipt.job_uuid}, not {self.job_uuid}", msg)
        if receipt.seq != seq:
            raise BadReceipt(f"{prefix}: carries seq {receipt.seq}", msg)
        if receipt.input_sha256 != input_sha256:
            raise BadReceipt(f"{prefix}: input hash does not match the request sent", msg)
        if receipt.output_sha256 != output_sha256:
            raise BadReceipt(f"{prefix}: output hash does not match the response received", msg)
        lo, hi = sent_ns - self.skew_ns, received_ns + self.skew_ns
        for name, value in (
            ("timestamp_from_ns", receipt.timestamp_from_ns),
            ("timestamp_to_ns", receipt.timestamp_to_ns),
        ):
            if value < lo:
                raise BadReceipt(
                    f"{prefix}: {name} is {(sent_ns - value) / 1e9:.3f} s before the request "
                    f"was sent (allowed skew {self.skew_ns / 1e9:g} s)",
                    msg,
                )
            if value > hi:
                raise BadReceipt(
                    f"{prefix}: {name} is {(value - received_ns) / 1e9:.3f} s after the response "
                    f"was received (allowed skew {self.skew_ns / 1e9:g} s)",
                    msg,
                )
        if receipt.timestamp_to_ns < receipt.timestamp_from_ns:
            raise BadReceipt(f"{prefix}: finished before it started", msg)
        if self._last_from_ns is not None and receipt.timestamp_from_ns < self._last_from_ns:
            raise BadReceipt(f"{prefix}: timestamps run backwards from the previous receipt", msg)
        self._last_from_ns = receipt.timestamp_from_ns
        return receipt
