"""`horde health ADDRESS`: one grpc.health.v1 Check, against real servers on port 0: a plain gRPC
server with grpcio-health-checking's servicer, one with no health service, a socket nobody
answers on, nobody listening, and a real streaming gateway behind TLS."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tls_support import make_pki

from horde_services.core.config import GatewaySettings, load_settings
from horde_services.core.identity import create_key_file
from horde_services.streaming_gateway.app import start_gateway

HORDE = str(Path(sys.executable).parent / "horde")
DOWN = "horde.v1.DownService"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORDE_TLS_")}
    return {**env, **extra}


def horde_health(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HORDE, "health", *args], capture_output=True, text=True, timeout=60, env=_env(**env)
    )


async def horde_health_async(*args: str, **env: str) -> tuple[int, str, str]:
    """The command run beside this test's event loop (an in-process server is on it)."""
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        "health",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(**env),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """A gRPC server whose health says SERVING as a whole and NOT_SERVING for DOWN."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(DOWN, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_serving_is_0(served: str) -> None:
    out = horde_health(served)
    assert (out.returncode, out.stdout, out.stderr) == (0, "SERVING\n", "")


def test_not_serving_is_1(served: str) -> None:
    out = horde_health(served, "--service", DOWN)
    assert (out.returncode, out.stdout, out.stderr) == (1, "NOT_SERVING\n", "")
    out = horde_health(served, "--service", DOWN, "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"address": served, "service": DOWN, "status": "NOT_SERVING"}


def test_unknown_service_is_1(served: str) -> None:
    out = horde_health(served, "--service", "horde.v1.NoSuchService", "--json")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout) == {
        "address": served,
        "service": "horde.v1.NoSuchService",
        "status": "SERVICE_UNKNOWN",
    }
    out = horde_health(served, "--service", "horde.v1.NoSuchService")
    assert (out.returncode, out.stdout) == (1, "SERVICE_UNKNOWN\n")


def test_a_server_without_health_is_1() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        out = horde_health(f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert (out.returncode, out.stdout) == (1, "UNIMPLEMENTED\n")
    assert "serves no grpc.health.v1" in out.stderr


def test_nobody_listening_is_2() -> None:
    with socket.socket() as sock:  # a port of ours, bound but not listening: refused
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        out = horde_health(address, "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"horde health: cannot reach {address}: ")


def test_no_answer_in_time_is_2() -> None:
    with socket.socket() as sock:  # listening, but nobody accepts or speaks HTTP/2 there
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        out = horde_health(address, "--timeout", "0.5")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"horde health: no answer in time from {address} (0.5s)\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nohost"], "ADDRESS 'nohost': HOST:PORT is required"),
        (["127.0.0.1:7100", "--timeout", "0"], "--timeout must be above 0"),
    ],
)
def test_usage_is_2(args: list[str], words: str) -> None:
    out = horde_health(*args)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_unreadable_ca_is_2(tmp_path: Path) -> None:
    out = horde_health("127.0.0.1:7100", HORDE_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    assert out.returncode == 2
    assert "HORDE_TLS_CA_FILE" in out.stderr


async def test_a_real_gateway_behind_tls(tmp_path: Path) -> None:
    """A streaming gateway (no validator: it still serves health) with a TLS listener: plaintext
    cannot reach it, HORDE_TLS_CA_FILE can; NOT_SERVING while a reason holds, e.g. its receipts
    that cannot be stored."""
    pki = make_pki(tmp_path / "pki")
    create_key_file(tmp_path / "gateway.json", "ed25519")
    settings = load_settings(
        GatewaySettings,
        key_file=tmp_path / "gateway.json",
        state_dir=tmp_path / "state",
        require_registered_miner=False,
        tls={"cert_file": pki.server_cert, "key_file": pki.server_key},
    )
    app = await start_gateway(settings)
    address = f"127.0.0.1:{app.port}"
    ca = {"HORDE_TLS_CA_FILE": str(pki.ca)}
    try:
        assert await horde_health_async(address, **ca) == (0, "SERVING\n", "")
        status, out, _ = await horde_health_async(
            address, "--service", "horde.v1.GatewayService", "--json", **ca
        )
        assert status == 0
        assert json.loads(out)["status"] == "SERVING"

        status, out, err = await horde_health_async(address)  # plaintext to a TLS listener
        assert (status, out) == (2, "")
        assert err.startswith(f"horde health: cannot reach {address}: UNAVAILABLE")
        hint = "(a TLS listener? set HORDE_TLS_CA_FILE to the CA that signed its certificate)\n"
        assert err.endswith(hint), err
        # Any command's plaintext call to it gets the hint too (here `horde job status`).
        argv = [
            HORDE, "job", "status", "--validator", address,
            "--validator-identity", app.identity, "--key", str(tmp_path / "gateway.json"),
            "0d9f3a52-7c8e-4a43-9c3c-2b0b8f6c3e11",
        ]  # fmt: skip
        job = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60
        )
        assert job.returncode == 2, job.stderr
        assert job.stderr.startswith(f"horde job status: cannot reach the validator at {address}")
        assert hint.strip() in job.stderr, job.stderr

        await app.servers[0].set_serving(False, "receipt_store")
        assert await horde_health_async(address, **ca) == (1, "NOT_SERVING\n", "")
    finally:
        await app.stop(0)
