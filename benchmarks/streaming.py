"""Streaming overhead: requests through client -> gateway -> job proxy -> job, versus the same
job's HTTP endpoint called directly, in the same run; 1 KiB payloads; 1 and 16 concurrent
sessions (each session sends its requests one after another, as `horde stream` does).

Figures (build/bench.json, section "streaming"): throughput_ratio_1 and throughput_ratio_16
(Horde requests/s over direct requests/s), added_p50_ms and added_p99_ms (latency through Horde
minus direct, one session), and the raw figures beside them. `mode` says what stood behind the
gateway: "fake-proxy" is a forwarding job proxy and an aiohttp echo job started by
benchmarks/streaming_fake.py (each in its own process), used while the executor's job proxy and
the demo-llm image are not available.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

from benchmarks import PartResult
from benchmarks.organic import BenchError
from services.core.identity import load_key_file
from services.core.server import open_channel
from services.streaming_gateway.client import StreamClient

PAYLOAD_BYTES = 1024
CONCURRENCY = (1, 16)
REQUESTS_PER_RUN = 40  # per session and per run count
WARMUP = 50
TARGET_RATIO = 0.6
TARGET_ADDED_P50_MS = 1.0
START_TIMEOUT_S = 60.0


@dataclass
class Setup:
    mode: str
    direct_url: str
    gateway: str
    gateway_identity: str
    validator_identity: str
    client_key: Path
    image: str


@dataclass
class Measure:
    requests: int
    wall_s: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @staticmethod
    def merge(parts: list[Measure]) -> Measure:
        return Measure(
            sum(p.requests for p in parts),
            sum(p.wall_s for p in parts),
            [x for p in parts for x in p.latencies_s],
        )


def payload(i: int) -> bytes:
    head = f"{i:08d}".encode()
    return head + os.urandom((PAYLOAD_BYTES - len(head)) // 2).hex().encode()[: PAYLOAD_BYTES - 8]


async def _spawn_line(*argv: str) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await proc.stdout.readline()
    except TimeoutError:
        proc.kill()
        raise BenchError(f"{' '.join(argv)} did not start") from None
    if not line:
        raise BenchError(f"{' '.join(argv)} exited before it was ready")
    return proc, json.loads(line)


@contextlib.asynccontextmanager
async def fake_setup() -> AsyncIterator[Setup]:
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="horde-bench-stream-") as tmp:
        try:
            job, info = await _spawn_line("-m", "benchmarks.streaming_fake", "job")
            procs.append(job)
            net, ends = await _spawn_line(
                "-m", "benchmarks.streaming_fake", "network", info["url"], tmp
            )
            procs.append(net)
            yield Setup(
                mode="fake-proxy",
                direct_url=info["url"],
                gateway=ends["gateway"],
                gateway_identity=ends["gateway_identity"],
                validator_identity=ends["validator_identity"],
                client_key=Path(ends["client_key"]),
                image="bench/echo:latest",
            )
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()


async def _direct(setup: Setup, sessions: int, n: int) -> Measure:
    latencies: list[float] = []
    clients = [aiohttp.ClientSession() for _ in range(sessions)]

    async def worker(http: aiohttp.ClientSession, w: int) -> None:
        for i in range(n):
            body = payload(w * n + i)
            t0 = time.perf_counter()
            async with http.post(setup.direct_url, data=body) as resp:
                out = await resp.read()
            latencies.append(time.perf_counter() - t0)
            if resp.status != 200 or not out:
                raise BenchError(f"direct request failed: HTTP {resp.status}")

    try:
        for w, http in enumerate(clients):  # connect first, as sessions are opened first
            async with http.post(setup.direct_url, data=payload(w)) as resp:
                await resp.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http, w) for w, http in enumerate(clients)))
        wall = time.perf_counter() - t0
    finally:
        for http in clients:
            await http.close()
    return Measure(sessions * n, wall, latencies)


async def _horde(setup: Setup, sessions: int, n: int) -> Measure:
    signer = load_key_file(setup.client_key)
    channel = open_channel(setup.gateway, signer=signer, callee=setup.gateway_identity)
    clients = [
        StreamClient(channel, validator_identity=setup.validator_identity) for _ in range(sessions)
    ]
    latencies: list[float] = []

    async def worker(client: StreamClient, w: int) -> None:
        for i in range(n):
            res = await client.request(payload(w * n + i))
            latencies.append(res.latency_s)

    try:
        await asyncio.gather(*(c.open(setup.image) for c in clients))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, w) for w, c in enumerate(clients)))
        wall = time.perf_counter() - t0
        await asyncio.gather(*(c.close("benchmark done") for c in clients))
    finally:
        for c in clients:
            c.cancel()
        await channel.close()
    return Measure(sessions * n, wall, latencies)


async def measure(setup: Setup, runs: int) -> dict[int, dict[str, Measure]]:
    n = REQUESTS_PER_RUN
    await _direct(setup, 1, WARMUP)
    await _horde(setup, 1, WARMUP)
    out: dict[int, dict[str, Measure]] = {}
    for sessions in CONCURRENCY:
        parts: dict[str, list[Measure]] = {"direct": [], "horde": []}
        for r in range(runs):
            # Interleaved A/B then B/A, so machine noise falls on both alike.
            order: list[tuple[str, Callable[[Setup, int, int], Awaitable[Measure]]]] = [
                ("direct", _direct),
                ("horde", _horde),
            ]
            if r % 2:
                order.reverse()
            for name, fn in order:
                parts[name].append(await fn(setup, sessions, n))
        out[sessions] = {k: Measure.merge(v) for k, v in parts.items()}
    return out


def report(setup: Setup, runs: int, results: dict[int, dict[str, Measure]]) -> PartResult:
    one = results[1]
    figures: dict[str, Any] = {
        "mode": setup.mode,
        "payload_bytes": PAYLOAD_BYTES,
        "requests_per_session_per_run": REQUESTS_PER_RUN,
        "runs": runs,
        "added_p50_ms": round(one["horde"].pct(0.5) - one["direct"].pct(0.5), 3),
        "added_p99_ms": round(one["horde"].pct(0.99) - one["direct"].pct(0.99), 3),
    }
    table = Table(
        title=f"streaming: 1 KiB requests, {setup.mode}, {runs} runs x {REQUESTS_PER_RUN} "
        "requests per session, interleaved"
    )
    for col in ("sessions", "path", "req/s", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="right" if col not in ("path",) else "left")
    for sessions, by_path in results.items():
        ratio = by_path["horde"].rps / by_path["direct"].rps
        figures[f"throughput_ratio_{sessions}"] = round(ratio, 3)
        for path, m in by_path.items():
            figures[f"{path}_rps_{sessions}"] = round(m.rps, 1)
            figures[f"{path}_p50_ms_{sessions}"] = round(m.pct(0.5), 3)
            figures[f"{path}_p99_ms_{sessions}"] = round(m.pct(0.99), 3)
            table.add_row(
                str(sessions),
                path,
                f"{m.rps:.0f}",
                f"{m.pct(0.5):.3f}",
                f"{m.pct(0.99):.3f}",
                f"{statistics.fmean(m.latencies_s) * 1000:.3f}",
            )
    passed = (
        figures["throughput_ratio_1"] >= TARGET_RATIO
        and figures["throughput_ratio_16"] >= TARGET_RATIO
        and figures["added_p50_ms"] <= TARGET_ADDED_P50_MS
    )
    verdict = "PASS" if passed else "MISS"
    summary = (
        f"{verdict}: throughput ratio {figures['throughput_ratio_1']} (1 session), "
        f"{figures['throughput_ratio_16']} (16 sessions), target >= {TARGET_RATIO}; added "
        f"latency p50 {figures['added_p50_ms']} ms (target <= {TARGET_ADDED_P50_MS}), p99 "
        f"{figures['added_p99_ms']} ms"
    )
    if setup.mode == "fake-proxy":
        summary += (
            "\nNOTE: measured against a stand-in job proxy and an echo job "
            "(benchmarks/streaming_fake.py), not the executor's job proxy and horde/demo-llm."
        )
    return PartResult("streaming", figures, [table], passed, summary)


async def run(runs: int, build: Path) -> PartResult:
    async with fake_setup() as setup:
        results = await measure(setup, runs)
    return report(setup, runs, results)
