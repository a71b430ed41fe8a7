"""Graceful shutdown: health goes NOT_SERVING, in-flight RPCs drain within the grace period,
background tasks are cancelled, and a real SIGTERM ends a server process cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import miner_pb2, miner_pb2_grpc

from horde_services.core.identity import Ed25519Signer
from horde_services.core.server import open_channel, serve_until_signal

if TYPE_CHECKING:  # fixtures come from conftest.py; these are only their types
    from conftest import Callers, Served

SERVICE = "horde.v1.MinerService"
REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("shutdown_server.py")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Background:
    """A background coroutine for serve_until_signal that records how it ended."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.started = asyncio.Event()
        # What the in-flight stream had done by the time the background task was cancelled.
        self.cancelled_after: list[str | None] = []

    async def __call__(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_after.append(self.served.servicer.stream_outcome)
            raise


async def test_graceful_shutdown_drains_in_flight_rpc(served: Served, callers: Callers) -> None:
    served.servicer.gate = asyncio.Event()
    stop = asyncio.Event()
    background = Background(served)
    events: list[str] = []

    async def on_stop() -> None:
        events.append("on_stop")

    serve = asyncio.create_task(
        serve_until_signal(
            [served.running],
            grace_s=30,
            background=[background],
            stop=stop,
            on_stop=on_stop,
            on_ready=lambda: events.append("ready"),
        )
    )
    await background.started.wait()
    assert events == ["ready"]

    watch = health_pb2_grpc.HealthStub(served.channel()).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert (await watch.read()).status == SERVING

    stream = served.stub(callers.hotkey).RunSyntheticRound(
        miner_pb2.RunSyntheticRoundRequest(round=1)
    )
    first = await stream.read()
    assert first.executor_id == f"first:{callers.hotkey.identity}"
    await served.servicer.stream_waiting.wait()

    stop.set()
    assert (await watch.read()).status == NOT_SERVING
    watch.cancel()  # let the Watch stream go so only our RPC is left in flight
    assert not serve.done()
    assert background.cancelled_after == []  # still running while RPCs drain

    served.servicer.gate.set()
    second = await stream.read()
    assert second.executor_id == f"second:{callers.hotkey.identity}"
    assert await stream.read() is grpc.aio.EOF
    assert await stream.code() is grpc.StatusCode.OK

    await asyncio.wait_for(serve, timeout=10)
    assert served.servicer.stream_outcome == "completed"
    # Cancelled only after the in-flight RPC completed, and on_stop ran last.
    assert background.cancelled_after == ["completed"]
    assert events == ["ready", "on_stop"]


async def test_rpc_outliving_the_grace_period_is_cancelled(
    served: Served, callers: Callers
) -> None:
    served.servicer.gate = asyncio.Event()  # never set
    stop = asyncio.Event()
    background = Background(served)
    serve = asyncio.create_task(
        serve_until_signal([served.running], grace_s=0.2, background=[background], stop=stop)
    )
    await background.started.wait()
    stream = served.stub(callers.ed25519).RunSyntheticRound(
        miner_pb2.RunSyntheticRoundRequest(round=1)
    )
    assert (await stream.read()).executor_id.startswith("first:")
    await served.servicer.stream_waiting.wait()

    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(serve, timeout=10)
    assert time.monotonic() - started < 5
    await asyncio.wait_for(served.servicer.stream_done.wait(), timeout=5)
    assert served.servicer.stream_outcome == "cancelled"
    assert background.cancelled_after == ["cancelled"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_failing_background_task_stops_serving(served: Served) -> None:
    async def crash() -> None:
        raise RuntimeError("background failed")

    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(
            serve_until_signal([served.running], grace_s=1, background=[crash]), timeout=10
        )
    assert info.group_contains(RuntimeError, match="background failed")


# ---- a real process and a real SIGTERM ---------------------------------------------------------


@pytest.fixture
def server_process(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    param = getattr(request, "param", 0.3)
    args = [str(a) for a in (param if isinstance(param, tuple) else (param,))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "protos"), str(REPO)])}
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


async def _readline(stream: IO[str] | None) -> str:
    assert stream is not None
    return await asyncio.to_thread(stream.readline)


async def _start(proc: subprocess.Popen[str]) -> tuple[str, str]:
    line = await asyncio.wait_for(_readline(proc.stdout), timeout=30)
    assert line.startswith("READY "), (line, proc.stderr.read() if proc.poll() is not None else "")
    _, port, identity = line.split()
    return f"127.0.0.1:{port}", identity


def _log_events(stderr: str) -> list[str]:
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError):
            continue
    return events


async def test_sigterm_shuts_the_process_down_cleanly(
    server_process: subprocess.Popen[str],
) -> None:
    address, identity = await _start(server_process)
    client = Ed25519Signer.generate()
    async with open_channel(address, signer=client, callee=identity) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
        )
        assert health.status == SERVING
        stream = miner_pb2_grpc.MinerServiceStub(channel).RunSyntheticRound(
            miner_pb2.RunSyntheticRoundRequest(round=1), timeout=30
        )
        assert (await stream.read()).executor_id == "first"  # an RPC is in flight

        started = time.monotonic()
        server_process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(server_process.communicate, timeout=15)
        elapsed = time.monotonic() - started
        with pytest.raises(grpc.aio.AioRpcError):
            await stream.read()

    assert server_process.returncode == 0, stderr
    assert elapsed < 10
    events = _log_events(stderr)
    assert events[-1] == "shutdown_complete", stderr
    assert "shutdown_requested" in events
    assert events.index("shutdown_requested") < events.index("in_flight_rpc_cancelled")
    assert events.index("in_flight_rpc_cancelled") < events.index("background_cancelled")
    requested = next(
        json.loads(line) for line in stderr.splitlines() if "shutdown_requested" in line
    )
    assert requested["signal"] == "SIGTERM"


@pytest.mark.parametrize("server_process", [60.0], indirect=True)
async def test_a_second_signal_cuts_the_grace_period_short(
    server_process: subprocess.Popen[str],
) -> None:
    """A second signal cancels the calls in flight at once (not after the 60 s grace period),
    the clean-up still runs, and the process exits 130."""
    address, identity = await _start(server_process)
    client = Ed25519Signer.generate()
    async with open_channel(address, signer=client, callee=identity) as channel:
        stream = miner_pb2_grpc.MinerServiceStub(channel).RunSyntheticRound(
            miner_pb2.RunSyntheticRoundRequest(round=1), timeout=30
        )
        assert (await stream.read()).executor_id == "first"
        server_process.send_signal(signal.SIGTERM)
        # Wait until the first signal was handled: the long grace period is now running.
        while "shutdown_requested" not in (line := await _readline(server_process.stderr)):
            assert line, "server exited before logging shutdown_requested"
        started = time.monotonic()
        server_process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(server_process.communicate, timeout=15)
        elapsed = time.monotonic() - started
    assert server_process.returncode == 130, stderr
    assert elapsed < 10
    events = _log_events(stderr)
    assert "second_signal_stopping_now" in events, stderr
    assert events.index("second_signal_stopping_now") < events.index("in_flight_rpc_cancelled")
    assert events[-2:] == ["cleanup_done", "shutdown_complete"], stderr


@pytest.mark.parametrize("server_process", [(60.0, "--stuck-cleanup")], indirect=True)
async def test_a_third_signal_exits_during_a_stuck_cleanup(
    server_process: subprocess.Popen[str],
) -> None:
    await _start(server_process)
    server_process.send_signal(signal.SIGTERM)
    while "cleanup_started" not in (line := await _readline(server_process.stderr)):
        assert line, "server exited before its clean-up started"
    server_process.send_signal(signal.SIGTERM)  # a second signal: the clean-up goes on
    while "second_signal_stopping_now" not in (line := await _readline(server_process.stderr)):
        assert line, "server exited on the second signal"
    assert server_process.poll() is None
    server_process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(server_process.communicate, timeout=15)
    assert server_process.returncode == 130, stderr
    assert "third_signal_exit_now" in _log_events(stderr), stderr
