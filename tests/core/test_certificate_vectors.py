"""tests/vectors/job-certificate-v1.json and rpc-auth-v1.json: the project's verifiers accept every
valid vector and reject every invalid one, and the files are what tests/vectors/gen_vectors.py
produces (so they cannot drift from the code that documents them)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import bittensor_core as sp_core
import grpc
import nacl.signing
import pytest
from horde.v1 import receipts_pb2

from horde_services.core.auth import AllowAll, Authenticator, AuthFailure, signing_message
from horde_services.core.certificates import CertificateError, verify_certificate
from horde_services.core.identity import Identity

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
CERTS = json.loads((VECTORS / "job-certificate-v1.json").read_text())
RPC = json.loads((VECTORS / "rpc-auth-v1.json").read_text())


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_vectors", VECTORS / "gen_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_vectors", module)
    spec.loader.exec_module(module)
    return module


def _names(doc: dict[str, Any]) -> list[str]:
    return [v["name"] for v in doc["vectors"]]


def test_both_kinds_of_key_and_of_outcome_are_covered() -> None:
    for doc in (CERTS, RPC):
        kinds = {(v["name"].split("-")[0], v["valid"]) for v in doc["vectors"]}
        assert {("ed25519", True), ("sr25519", True), ("ed25519", False)} <= kinds
        assert ("sr25519", False) in kinds
    assert "sr25519-wrapped-message" in _names(CERTS)
    assert "sr25519-wrapped-message" in _names(RPC)


@pytest.mark.parametrize("vector", CERTS["vectors"], ids=_names(CERTS))
def test_verify_certificate(vector: dict[str, Any]) -> None:
    cert = receipts_pb2.JobCertificate.FromString(bytes.fromhex(vector["certificate"]))
    assert cert.payload.hex() == vector["payload"]
    assert cert.miner_signature.hex() == vector["miner_signature"]
    assert vector["signed_message"] == CERTS["domain"] + vector["payload"]
    fields = vector["payload_fields"]
    payload = receipts_pb2.JobCertificatePayload.FromString(cert.payload)
    assert payload.miner_hotkey == fields["miner_hotkey"]
    assert payload.job_public_key.hex() == fields["job_public_key"]
    assert payload.endpoint == fields["endpoint"]
    if vector["valid"]:
        got = verify_certificate(
            cert, miner=fields["miner_hotkey"], job_uuid=fields["job_uuid"], now_ns=vector["now_ns"]
        )
        assert got == payload
    else:
        with pytest.raises(CertificateError):
            verify_certificate(cert, now_ns=vector["now_ns"])


@pytest.mark.parametrize("vector", RPC["vectors"], ids=_names(RPC))
async def test_authenticate_call(vector: dict[str, Any]) -> None:
    md = vector["metadata"]
    message = signing_message(
        vector["method"], md["x-horde-callee"], int(md["x-horde-timestamp-ns"]), md["x-horde-nonce"]
    )
    assert message.hex() == vector["signed_message"]
    auth = Authenticator(
        Identity.parse(vector["callee"]), AllowAll(), clock_ns=lambda: vector["now_ns"]
    )
    if vector["valid"]:
        caller = await auth.authenticate(vector["method"], md.items())
        assert str(caller) == md["x-horde-caller"]
    else:
        with pytest.raises(AuthFailure) as failure:
            await auth.authenticate(vector["method"], md.items())
        assert failure.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert failure.value.reason == "bad signature"


def test_wrapped_signatures_are_genuine() -> None:
    """The wrapped vectors are real signatures over <Bytes>message</Bytes>, which bittensor's own
    verify accepts for the bare message: only Horde's rule rejects them."""
    for doc, signature_of in (
        (CERTS, lambda v: v["miner_signature"]),
        (RPC, lambda v: v["metadata"]["x-horde-signature"]),
    ):
        (vector,) = [v for v in doc["vectors"] if v["name"] == "sr25519-wrapped-message"]
        message = bytes.fromhex(vector["signed_message"])
        signature = bytes.fromhex(signature_of(vector))
        key = next(k for k in doc["keys"] if k["name"] == vector["signer"])
        sr = int(sp_core.CRYPTO_SR25519)
        assert sp_core.verify(b"<Bytes>" + message + b"</Bytes>", signature, key["ss58"], sr)
        assert sp_core.verify(message, signature, key["ss58"], sr)
        assert not Identity.parse(key["identity"]).verify(message, signature)


def test_keys_are_what_they_say() -> None:
    for doc in (CERTS, RPC):
        for key in doc["keys"]:
            identity = Identity.parse(key["identity"])
            assert identity.public_key.hex() == key["public_key"]
            assert identity.ss58 == key["ss58"]
            assert Identity.from_ss58(key["ss58"], identity.key_type) == identity
            if "ed25519_seed" in key:
                seed = bytes.fromhex(key["ed25519_seed"])
                assert bytes(nacl.signing.SigningKey(seed).verify_key) == identity.public_key
    # //Alice is Substrate's well-known dev key.
    alice = next(k for k in CERTS["keys"] if k["name"] == "//Alice")
    assert alice["ss58"] == "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def test_files_match_the_generator() -> None:
    gen = _generator()
    assert (VECTORS / "job-certificate-v1.json").read_text() == gen.render(
        gen.certificate_document()
    )
    assert (VECTORS / "rpc-auth-v1.json").read_text() == gen.render(gen.rpc_document())


def test_generator_signs_afresh_what_no_longer_verifies() -> None:
    """A stale sr25519 signature is not carried over: the document then differs from the file."""
    gen = _generator()
    stale = {v["name"]: "00" * 64 for v in CERTS["vectors"]}
    fresh = gen.certificate_document(previous=stale)
    by_name = {v["name"]: v for v in fresh["vectors"]}
    assert by_name["sr25519-valid"]["miner_signature"] != "00" * 64
    assert by_name["ed25519-valid"] == next(
        v for v in CERTS["vectors"] if v["name"] == "ed25519-valid"
    )
    cert = receipts_pb2.JobCertificate.FromString(
        bytes.fromhex(by_name["sr25519-valid"]["certificate"])
    )
    verify_certificate(cert, now_ns=by_name["sr25519-valid"]["now_ns"])
