"""`--metrics-port` exposes Prometheus metrics that count what the service did."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from horde.v1 import gateway_pb2, gateway_pb2_grpc

from horde_services.core.identity import create_key_file

HORDE = str(Path(sys.executable).with_name("horde"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_count_rejected_calls(tmp_path: Path) -> None:
    key = tmp_path / "gw.json"
    create_key_file(key)
    grpc_port, metrics_port = free_port(), free_port()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'key_file = "{key}"\nstate_dir = "{tmp_path}"\nlisten = "127.0.0.1:{grpc_port}"\n'
    )
    proc = subprocess.Popen(
        [HORDE, "gateway", "serve", "--config", str(config), "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "service_started" in line:
                break
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            try:
                stub.ListSamples(gateway_pb2.ListSamplesRequest(), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("an unsigned call was accepted")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'horde_auth_failures_total{code="UNAUTHENTICATED",service="gateway"} 1.0' in body
        assert (
            'horde_rpcs_total{code="UNAUTHENTICATED",method="/horde.v1.GatewayService/ListSamples",'
            'service="gateway"} 1.0' in body
        )
        assert "process_cpu_seconds_total" in body  # the usual process metrics are there too
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_horde_metrics_stay_out_of_prometheus_default_registry() -> None:
    """An application importing Horde's client helpers and exporting prometheus_client's default
    registry does not publish Horde's metrics with its own."""
    code = (
        "import prometheus_client\n"
        "import horde_services.core.server, horde_services.streaming_gateway.client\n"
        "import horde_services.core.metrics as m\n"
        "mine = [n for n in prometheus_client.REGISTRY._names_to_collectors if 'horde' in n]\n"
        "assert mine == [], mine\n"
        "assert b'horde_rpcs_total' in prometheus_client.generate_latest(m.REGISTRY)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
