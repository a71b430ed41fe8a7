"""Generate job-certificate-v1.json and rpc-auth-v1.json (docs/protocol.md's test vectors).

    .venv/bin/python tests/vectors/gen_vectors.py           # rewrite both files
    .venv/bin/python tests/vectors/gen_vectors.py --check   # fail if they differ

Keys, uuids and timestamps are fixed: ed25519 keys from fixed seeds, sr25519 keys the well-known
Substrate dev keys //Alice and //Bob. Ed25519 signatures are deterministic; sr25519 signatures
are randomized, so an sr25519 signature already in the file is kept when it still verifies over
the message this script means it to cover, under the key meant to sign it (any other change
signs afresh, and the files then differ: tests/core/test_certificate_vectors.py catches that).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bittensor_core as sp_core
from horde.v1 import receipts_pb2

from horde_services.core.auth import signing_message
from horde_services.core.certificates import DOMAIN as CERT_DOMAIN
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Identity

HERE = Path(__file__).resolve().parent
CERT_FILE = HERE / "job-certificate-v1.json"
RPC_FILE = HERE / "rpc-auth-v1.json"

JOB_UUID = "9b2f4c1e-0d7a-4f63-8e55-2a1c3b4d5e6f"
NOT_BEFORE_NS = 1_764_000_000_000_000_000
NOT_AFTER_NS = NOT_BEFORE_NS + 3_600_000_000_000
NOW_NS = NOT_BEFORE_NS + 60_000_000_000  # inside the window
LATE_NS = NOT_AFTER_NS + 1  # one nanosecond past it


def seed(label: str) -> bytes:
    return hashlib.sha256(f"horde test vector: {label}".encode()).digest()


ED_MINER_SEED = seed("ed25519 miner hotkey")
ED_OTHER_SEED = seed("ed25519 other key")
ED_CLIENT_SEED = seed("ed25519 client")
JOB_KEY_SEED = seed("job key")
ALICE = HotkeySigner.from_uri("//Alice")
BOB = HotkeySigner.from_uri("//Bob")
ED_MINER = HotkeySigner.from_seed(ED_MINER_SEED, "ed25519")
ED_OTHER = Ed25519Signer.from_seed(ED_OTHER_SEED)
ED_CLIENT = Ed25519Signer.from_seed(ED_CLIENT_SEED)
VALIDATOR = HotkeySigner.from_uri("//Charlie")
JOB_PUBLIC_KEY = bytes(Ed25519Signer.from_seed(JOB_KEY_SEED).identity.public_key)

SIGNERS: dict[str, Any] = {
    "//Alice": ALICE,
    "//Bob": BOB,
    "//Charlie": VALIDATOR,
    "ed25519 miner hotkey": ED_MINER,
    "ed25519 other key": ED_OTHER,
    "ed25519 client": ED_CLIENT,
}
SECRETS = {
    "//Alice": {"secret_uri": "//Alice"},
    "//Bob": {"secret_uri": "//Bob"},
    "//Charlie": {"secret_uri": "//Charlie"},
    "ed25519 miner hotkey": {"ed25519_seed": ED_MINER_SEED.hex()},
    "ed25519 other key": {"ed25519_seed": ED_OTHER_SEED.hex()},
    "ed25519 client": {"ed25519_seed": ED_CLIENT_SEED.hex()},
}
WRAP_PREFIX, WRAP_SUFFIX = b"<Bytes>", b"</Bytes>"


def key_entry(name: str) -> dict[str, Any]:
    identity: Identity = SIGNERS[name].identity
    return {
        "name": name,
        **SECRETS[name],
        "identity": str(identity),
        "public_key": identity.public_key.hex(),
        "ss58": identity.ss58,
    }


class Signatures:
    """Signs messages; reuses an sr25519 signature from the previous file when it still
    verifies over the same message under the same key (sr25519 signing is randomized)."""

    def __init__(self, previous: dict[str, str]) -> None:
        self.previous = previous

    def sign(self, vector: str, signer_name: str, message: bytes) -> bytes:
        signer = SIGNERS[signer_name]
        identity: Identity = signer.identity
        if identity.key_type == "sr25519":
            old = self.previous.get(vector)
            if old is not None and sp_core.verify(
                message, bytes.fromhex(old), identity.ss58, int(sp_core.CRYPTO_SR25519)
            ):
                return bytes.fromhex(old)
        return bytes(signer.sign(message))


def _previous(path: Path, field: str) -> dict[str, str]:
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {v["name"]: v[field] for v in doc["vectors"]}


# --------------------------------------------------------------------------------------------
# Job certificates
# --------------------------------------------------------------------------------------------


def payload_for(miner_identity: str, *, endpoint: str = "203.0.113.7:7301") -> Any:
    return receipts_pb2.JobCertificatePayload(
        job_uuid=JOB_UUID,
        job_public_key=JOB_PUBLIC_KEY,
        miner_hotkey=miner_identity,
        validator_hotkey=str(VALIDATOR.identity),
        image_digest="sha256:" + hashlib.sha256(b"horde/demo-llm:latest").hexdigest(),
        endpoint=endpoint,
        not_before_ns=NOT_BEFORE_NS,
        not_after_ns=NOT_AFTER_NS,
    )


def certificate_vectors(sigs: Signatures) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        description: str,
        *,
        miner: str,
        signer: str,
        valid: bool,
        now_ns: int = NOW_NS,
        tamper: Callable[[Any], None] | None = None,
        sign_over: Callable[[bytes], bytes] = lambda m: m,
    ) -> None:
        payload = payload_for(str(SIGNERS[miner].identity))
        raw = payload.SerializeToString(deterministic=True)
        signature = sigs.sign(name, signer, sign_over(CERT_DOMAIN + raw))
        if tamper is not None:  # changed after signing
            tamper(payload)
            raw = payload.SerializeToString(deterministic=True)
        cert = receipts_pb2.JobCertificate(payload=raw, miner_signature=signature)
        out.append(
            {
                "name": name,
                "description": description,
                "valid": valid,
                "now_ns": now_ns,
                "signer": signer,
                "payload_fields": {
                    "job_uuid": payload.job_uuid,
                    "job_public_key": payload.job_public_key.hex(),
                    "miner_hotkey": payload.miner_hotkey,
                    "validator_hotkey": payload.validator_hotkey,
                    "image_digest": payload.image_digest,
                    "endpoint": payload.endpoint,
                    "not_before_ns": payload.not_before_ns,
                    "not_after_ns": payload.not_after_ns,
                },
                "payload": raw.hex(),
                "signed_message": (CERT_DOMAIN + raw).hex(),
                "miner_signature": signature.hex(),
                "certificate": cert.SerializeToString(deterministic=True).hex(),
            }
        )

    def retarget(p: Any) -> None:
        p.endpoint = "198.51.100.9:7301"

    ed: dict[str, Any] = {"miner": "ed25519 miner hotkey", "signer": "ed25519 miner hotkey"}
    alice: dict[str, Any] = {"miner": "//Alice", "signer": "//Alice"}
    add("ed25519-valid", "an ed25519 miner hotkey signs the certificate", **ed, valid=True)
    add(
        "sr25519-valid",
        "an sr25519 miner hotkey (//Alice) signs the certificate",
        **alice,
        valid=True,
    )
    changed = "the endpoint was changed after signing"
    add("ed25519-tampered-payload", changed, **ed, valid=False, tamper=retarget)
    add("sr25519-tampered-payload", changed, **alice, valid=False, tamper=retarget)
    add(
        "ed25519-wrong-key",
        "names the ed25519 miner hotkey but was signed by another ed25519 key",
        **{**ed, "signer": "ed25519 other key"},
        valid=False,
    )
    add(
        "sr25519-wrong-key",
        "names //Alice but was signed by //Bob",
        **{**alice, "signer": "//Bob"},
        valid=False,
    )
    add(
        "sr25519-wrapped-message",
        "signed over <Bytes> || domain || payload || </Bytes> (what a browser extension signs)",
        **alice,
        valid=False,
        sign_over=lambda m: WRAP_PREFIX + m + WRAP_SUFFIX,
    )
    add(
        "sr25519-no-domain",
        'signed over the payload alone, without "horde.job-certificate.v1\\0"',
        **alice,
        valid=False,
        sign_over=lambda m: m[len(CERT_DOMAIN) :],
    )
    add(
        "ed25519-expired",
        "a good signature, checked one nanosecond after not_after_ns",
        **ed,
        valid=False,
        now_ns=LATE_NS,
    )
    return out


def certificate_document(previous: dict[str, str] | None = None) -> dict[str, Any]:
    sigs = Signatures(_previous(CERT_FILE, "miner_signature") if previous is None else previous)
    return {
        "description": (
            "Job certificates (docs/protocol.md, 'Job certificates'). A verifier parses "
            "`certificate` (a JobCertificate), then checks `miner_signature` over "
            "domain || payload under the key of payload.miner_hotkey, and not_before_ns <= now_ns "
            "<= not_after_ns. It must accept every vector with valid true and reject every other. "
            "Generated by tests/vectors/gen_vectors.py."
        ),
        "domain": CERT_DOMAIN.hex(),
        "keys": [key_entry(n) for n in ("ed25519 miner hotkey", "ed25519 other key")]
        + [key_entry(n) for n in ("//Alice", "//Bob", "//Charlie")],
        "job_secret_seed": JOB_KEY_SEED.hex(),
        "vectors": certificate_vectors(sigs),
    }


# --------------------------------------------------------------------------------------------
# RPC authentication
# --------------------------------------------------------------------------------------------

LIST_JOBS = "/horde.v1.ValidatorService/ListJobs"
SUBMIT_JOB = "/horde.v1.ValidatorService/SubmitJob"
LIST_RECEIPTS = "/horde.v1.MinerService/ListReceipts"
TIMESTAMP_NS = 1_764_000_123_456_789_012


def rpc_vectors(sigs: Signatures) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    validator = str(VALIDATOR.identity)
    miner = str(ALICE.identity)

    def add(
        name: str,
        description: str,
        *,
        caller: str,
        signer: str,
        method: str,
        callee: str,
        nonce: str,
        valid: bool,
        signed: dict[str, Any] | None = None,
        wrap: bool = False,
    ) -> None:
        # What was signed (may differ from what is presented, for invalid vectors).
        what: dict[str, Any] = {
            "method": method,
            "callee": callee,
            "timestamp_ns": TIMESTAMP_NS,
            "nonce": nonce,
            **(signed or {}),
        }
        message = signing_message(
            what["method"], what["callee"], what["timestamp_ns"], what["nonce"]
        )
        if wrap:
            message = WRAP_PREFIX + message + WRAP_SUFFIX
        signature = sigs.sign(name, signer, message)
        presented = signing_message(method, callee, TIMESTAMP_NS, nonce)
        out.append(
            {
                "name": name,
                "description": description,
                "valid": valid,
                "method": method,
                "callee": callee,
                "now_ns": TIMESTAMP_NS,
                "metadata": {
                    "x-horde-caller": str(SIGNERS[caller].identity),
                    "x-horde-callee": callee,
                    "x-horde-timestamp-ns": str(TIMESTAMP_NS),
                    "x-horde-nonce": nonce,
                    "x-horde-signature": signature.hex(),
                },
                "signer": signer,
                "signed_message": presented.hex(),
            }
        )

    # Who calls whom: an ed25519 client a validator, an sr25519 validator (//Charlie) a miner.
    client: dict[str, Any] = {
        "caller": "ed25519 client",
        "signer": "ed25519 client",
        "method": LIST_JOBS,
        "callee": validator,
        "nonce": "00112233445566778899aabbccddeeff",
    }
    charlie: dict[str, Any] = {
        "caller": "//Charlie",
        "signer": "//Charlie",
        "method": LIST_RECEIPTS,
        "callee": miner,
        "nonce": "ffeeddccbbaa99887766554433221100",
    }
    add("ed25519-client-valid", "an ed25519 client calls a validator", **client, valid=True)
    add(
        "sr25519-validator-valid",
        "an sr25519 validator (//Charlie) calls a miner (//Alice)",
        **charlie,
        valid=True,
    )
    add(
        "ed25519-other-method",
        "signed for SubmitJob, presented on ListJobs",
        **client,
        valid=False,
        signed={"method": SUBMIT_JOB},
    )
    add(
        "ed25519-other-timestamp",
        "signed with timestamp_ns - 1, presented with timestamp_ns",
        **client,
        valid=False,
        signed={"timestamp_ns": TIMESTAMP_NS - 1},
    )
    add(
        "ed25519-wrong-key",
        "names the client but was signed by another ed25519 key",
        **{**client, "signer": "ed25519 other key"},
        valid=False,
    )
    add(
        "sr25519-wrapped-message",
        "//Charlie signed <Bytes> || message || </Bytes>",
        **charlie,
        valid=False,
        wrap=True,
    )
    return out


def rpc_document(previous: dict[str, str] | None = None) -> dict[str, Any]:
    if previous is None:
        previous = {}
        if RPC_FILE.exists():
            doc = json.loads(RPC_FILE.read_text())
            previous = {v["name"]: v["metadata"]["x-horde-signature"] for v in doc["vectors"]}
    return {
        "description": (
            "RPC call signatures (docs/protocol.md, 'Authentication metadata'). The callee is "
            "`callee`, its clock reads `now_ns`; a verifier rebuilds the signed message from "
            "`method` and the metadata and checks x-horde-signature under x-horde-caller. It "
            "must accept every vector with valid true and reject every other. "
            "Generated by tests/vectors/gen_vectors.py."
        ),
        "domain": b"horde.rpc-auth.v1\x00".hex(),
        "keys": [key_entry(n) for n in ("ed25519 client", "ed25519 other key", "//Charlie")],
        "vectors": rpc_vectors(Signatures(previous)),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    check = parser.parse_args().check
    stale = []
    for path, doc in ((CERT_FILE, certificate_document()), (RPC_FILE, rpc_document())):
        text = render(doc)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("stale:", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
