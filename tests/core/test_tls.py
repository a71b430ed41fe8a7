"""TLS listeners: server-authenticated and mutual TLS with certificates made by the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import miner_pb2

from horde_services.core.config import TLSSettings
from horde_services.core.server import open_channel

if TYPE_CHECKING:  # fixtures come from conftest.py; these are only their types
    from conftest import Callers, StartServer


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of the above


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=Horde test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(
        d,
        "server",
        "ca",
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    _make_leaf(
        d,
        "client",
        "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
    )
    return PKI(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


async def _health(channel: grpc.aio.Channel) -> int:
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    finally:
        await channel.close()
    return int(resp.status)


async def _expect_unavailable(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _health(channel)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE, info.value


async def test_tls_round_trip_with_signed_calls(
    start_server: StartServer, callers: Callers, pki: PKI
) -> None:
    served = await start_server(tls=TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key))
    client_tls = TLSSettings(ca_file=pki.ca)

    resp = await served.stub(callers.hotkey, tls=client_tls).GetManifest(
        miner_pb2.GetManifestRequest(), timeout=10
    )
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)
    stream = served.stub(callers.ed25519, tls=client_tls).RunSyntheticRound(
        miner_pb2.RunSyntheticRoundRequest(round=1), timeout=10
    )
    assert len([r async for r in stream]) == 2

    # The certificate also names "localhost": an override of the checked name works.
    resp = await served.stub(callers.hotkey, tls=client_tls, server_name="localhost").GetManifest(
        miner_pb2.GetManifestRequest(), timeout=10
    )
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)
    # Authentication still applies on top of TLS.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub(callers.stranger, tls=client_tls).GetManifest(
            miner_pb2.GetManifestRequest(), timeout=10
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_plaintext_or_untrusted_client_cannot_reach_tls_port(
    start_server: StartServer, pki: PKI
) -> None:
    served = await start_server(tls=TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key))
    await _expect_unavailable(open_channel(served.address))
    await _expect_unavailable(open_channel(served.address, tls=TLSSettings(ca_file=pki.other_ca)))
    # A name the certificate does not carry is refused too.
    await _expect_unavailable(
        open_channel(served.address, tls=TLSSettings(ca_file=pki.ca), server_name="evil.example")
    )
    assert await _health(open_channel(served.address, tls=TLSSettings(ca_file=pki.ca))) == (
        health_pb2.HealthCheckResponse.SERVING
    )


async def test_mutual_tls(start_server: StartServer, callers: Callers, pki: PKI) -> None:
    served = await start_server(
        tls=TLSSettings(
            cert_file=pki.server_cert,
            key_file=pki.server_key,
            ca_file=pki.ca,
            require_client_cert=True,
        )
    )
    with_cert = TLSSettings(
        ca_file=pki.ca,
        cert_file=pki.client_cert,
        key_file=pki.client_key,
        require_client_cert=True,
    )
    resp = await served.stub(callers.ed25519, tls=with_cert).GetManifest(
        miner_pb2.GetManifestRequest(), timeout=10
    )
    assert resp.manifest.miner_hotkey == str(callers.ed25519.identity)
    # No client certificate, or a server certificate presented as a client one: refused.
    await _expect_unavailable(open_channel(served.address, tls=TLSSettings(ca_file=pki.ca)))
    await _expect_unavailable(
        open_channel(
            served.address,
            tls=TLSSettings(
                ca_file=pki.ca,
                cert_file=pki.server_cert,
                key_file=pki.server_key,
                require_client_cert=True,
            ),
        )
    )


def test_missing_tls_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file not found"):
        TLSSettings(cert_file=tmp_path / "nope.pem", key_file=tmp_path / "nope.key")


async def test_a_services_own_listener_certificate_does_not_make_its_channels_tls(
    start_server: StartServer, pki: PKI
) -> None:
    """A service serving TLS (cert and key, no ca_file) still dials a plaintext peer in plain:
    its channels speak TLS only when ca_file says whom to trust."""
    plain = await start_server()
    listener_only = TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key)
    assert await _health(open_channel(plain.address, tls=listener_only)) == (
        health_pb2.HealthCheckResponse.SERVING
    )
    # With ca_file it speaks TLS, so the plaintext peer cannot be reached.
    await _expect_unavailable(
        open_channel(
            plain.address,
            tls=TLSSettings(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca),
        )
    )
