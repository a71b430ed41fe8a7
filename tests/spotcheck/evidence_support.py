"""A genuine evidence record made offline with real keys: a miner hotkey certifies a job key, the
job key signs a receipt over a request and a (wrong) response, the trusted instance's own
certificate and receipt cover the right response. No network, no Docker."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import nacl.signing
from horde.v1 import gateway_pb2, receipts_pb2

from horde_services.core.certificates import sign_certificate
from horde_services.core.identity import HotkeySigner, Signer
from horde_services.core.receipts import sign_receipt
from horde_services.validator.evidence import build_record

DIGEST = "sha256:" + "ab" * 32


def certified(
    miner: Signer, validator: str, job_uuid: str, key: nacl.signing.SigningKey
) -> receipts_pb2.JobCertificate:
    now = time.time_ns()
    return sign_certificate(
        receipts_pb2.JobCertificatePayload(
            job_uuid=job_uuid,
            job_public_key=bytes(key.verify_key),
            miner_hotkey=str(miner.identity),
            validator_hotkey=validator,
            image_digest=DIGEST,
            endpoint="127.0.0.1:1",
            not_before_ns=now - 5 * 10**9,
            not_after_ns=now + 600 * 10**9,
        ),
        miner,
    )


def signed_exchange(
    key: nacl.signing.SigningKey, job_uuid: str, seq: int, request: bytes, response: bytes
) -> receipts_pb2.StreamReceipt:
    now = time.time_ns()
    return sign_receipt(
        key,
        uuid.UUID(job_uuid),
        seq,
        now,
        now + 1000,
        hashlib.sha256(request).digest(),
        hashlib.sha256(response).digest(),
    ).to_proto()


def make_record(
    claimed: bytes = b"wrong answer",
    trusted: bytes = b"right answer",
    comparator: str = "sha256",
    *,
    trusted_by_the_miner: bool = False,
    trusted_for_another_validator: bool = False,
) -> dict[str, Any]:
    """A genuine evidence record; the keyword arguments make the trusted part come from the
    accused miner itself, or from a job another validator started."""
    miner = HotkeySigner.generate()
    trusted_miner = miner if trusted_by_the_miner else HotkeySigner.generate()
    validator = str(HotkeySigner.generate().identity)
    tvalidator = (
        str(HotkeySigner.generate().identity) if trusted_for_another_validator else validator
    )
    job, tjob = str(uuid.uuid4()), str(uuid.uuid4())
    key, tkey = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    request = b"what is the answer?"
    sample = gateway_pb2.Sample(
        job_uuid=job,
        image="horde/demo-llm:latest",
        image_digest=DIGEST,
        request=request,
        response=claimed,
        receipt=signed_exchange(key, job, 7, request, claimed),
        certificate=certified(miner, validator, job, key),
    )
    return build_record(
        sample,
        validator_hotkey=validator,
        trusted_output=trusted,
        comparator=comparator,
        detail="differs",
        created_ns=time.time_ns(),
        trusted_certificate=certified(trusted_miner, tvalidator, tjob, tkey),
        trusted_receipt=signed_exchange(tkey, tjob, 1, request, trusted),
    )
