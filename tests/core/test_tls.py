"""TLS listeners: server-authenticated and mutual TLS with certificates made by the openssl CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import miner_pb2
from tls_support import PKI, make_pki

from horde_services.core.config import TLSSettings
from horde_services.core.server import open_channel

if TYPE_CHECKING:  # fixtures come from conftest.py; these are only their types
    from conftest import Callers, StartServer


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


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


TURNED_AWAY = """
import asyncio, sys
import horde_services  # noqa: F401  (every Horde entry point imports it before grpc)
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

async def main() -> None:
    cert, key = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as exc:
            print(exc.code().name)
    await server.stop(None)

asyncio.run(main())
"""


@pytest.mark.parametrize("verbosity", [None, "INFO"])
def test_grpc_core_log_lines_stay_out_of_a_services_log(pki: PKI, verbosity: str | None) -> None:
    """A TLS listener turning a plaintext client away logs nothing of gRPC core's own on stderr
    (a plain-text line there breaks the service's JSON lines), unless the operator asks for it
    with GRPC_VERBOSITY."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if verbosity is not None:
        env["GRPC_VERBOSITY"] = verbosity
    done = subprocess.run(
        [sys.executable, "-c", TURNED_AWAY, str(pki.server_cert), str(pki.server_key)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.stdout == "UNAVAILABLE\n", done.stderr
    assert ("Handshake failed" in done.stderr) == (verbosity == "INFO"), done.stderr
