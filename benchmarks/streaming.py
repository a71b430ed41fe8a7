"""Streaming overhead: requests through client -> gateway -> job proxy -> job, versus the same
job's HTTP endpoint called directly, in the same run; 1 KiB payloads; 1 and 16 concurrent
sessions (each session sends its requests one after another, as `horde stream` does).

Figures (build/bench.json, section "streaming"): throughput_ratio_1 and throughput_ratio_16
(Horde requests/s over direct requests/s), added_p50_ms and added_p99_ms (latency through Horde
minus direct, one session), and the raw figures beside them: requests/s, latencies, and the
machine's busy CPU per request on each path, and that CPU split by process (`*_by_process`: the
measuring client, the gateway, the executors' process, and the rest: job containers, relays,
kernel). The `floor_*` figures (benchmarks/streaming_floor.py)
measure, in the same run, what the design adds at the least (one gRPC and one framed-TCP round
trip, one Ed25519 signature, two verifications), and `ceiling_ratio_1` / `ceiling_ratio_16` are
the best ratios those alone would allow. The measuring client runs in a child process on uvloop,
as `horde stream` does. `mode` says what stood behind the
gateway:

* "real" (the default): the production services, each network part in its own process
  (benchmarks/streaming_real.py: validator, miner and 16 executors in one, the gateway in
  another), one horde/demo-llm container per session behind the executor's job proxy. The
  direct baseline calls the *same container instance* over the unix socket of its relay, the
  only way into the job's network namespace (it has no network but its own loopback): so both
  sides run the same service process and the same relay hop, and the difference is what Horde
  adds on the request path (client gRPC stream, gateway relay and receipt checks, job proxy
  HTTP client, hashing and signing).
* "fake-proxy" (HORDE_BENCH_STREAMING=fake): a forwarding job proxy and an aiohttp echo job
  started by benchmarks/streaming_fake.py, for a host without Docker.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

from benchmarks import PartResult
from benchmarks.organic import BenchError
from benchmarks.streaming_floor import floor, process_cpu_s
from horde_services.core.identity import load_key_file
from horde_services.core.server import open_channel
from horde_services.streaming_gateway.client import StreamClient

PAYLOAD_BYTES = 1024
CONCURRENCY = (1, 16)
REQUESTS_PER_RUN = 40  # per session and per run count
WARMUP = 50
TARGET_RATIO = 0.6
WINDOW = 8  # requests in flight in the pipelined figure
TARGET_ADDED_P50_MS = 1.0
START_TIMEOUT_S = 60.0
SESSION_LIMIT_S = 3600


@dataclass(frozen=True)
class Target:
    """How the benchmark calls one session's job directly."""

    url: str
    socket: str | None = None  # a unix socket (the job's relay) instead of TCP

    def http(self) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=self.socket) if self.socket else aiohttp.TCPConnector()
        )
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)


@dataclass
class Setup:
    mode: str
    gateway: str
    gateway_identity: str
    validator_identity: str
    client_key: Path
    image: str
    direct: Callable[[str], Target]  # job uuid -> its direct endpoint
    baseline: str
    processes: dict[str, int] = field(default_factory=dict)  # role -> pid, for the CPU split


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process, containers too)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(processes: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: the machine's busy total, this (the measuring client's) process, and
    each of `processes`."""
    snap = {"machine": busy_cpu_s(), "client": time.process_time()}
    for role, pid in processes.items():
        try:
            snap[role] = process_cpu_s(pid)
        except OSError:
            snap[role] = 0.0
    return snap


@dataclass
class Measure:
    requests: int
    wall_s: float
    latencies_s: list[float]
    cpu_s: float = 0.0  # machine-wide busy CPU during the measurement
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # role -> CPU s; and "rest"

    def took_cpu(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Record the CPU used between two `cpu_snapshot`s; what no named process used (job
        containers, relays, kernel, anything else) is "rest"."""
        used = {k: max(after[k] - before[k], 0.0) for k in before}
        self.cpu_s = used.pop("machine")
        used["rest"] = max(self.cpu_s - sum(used.values()), 0.0)
        self.cpu_by_process = used

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @staticmethod
    def merge(parts: list[Measure]) -> Measure:
        by_process: dict[str, float] = {}
        for p in parts:
            for role, cpu in p.cpu_by_process.items():
                by_process[role] = by_process.get(role, 0.0) + cpu
        return Measure(
            sum(p.requests for p in parts),
            sum(p.wall_s for p in parts),
            [x for p in parts for x in p.latencies_s],
            sum(p.cpu_s for p in parts),
            by_process,
        )

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6

    def cpu_us_per_request_by_process(self) -> dict[str, float]:
        return {
            role: round(cpu / self.requests * 1e6, 1) for role, cpu in self.cpu_by_process.items()
        }


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
                gateway=ends["gateway"],
                gateway_identity=ends["gateway_identity"],
                validator_identity=ends["validator_identity"],
                client_key=Path(ends["client_key"]),
                image="bench/echo:latest",
                direct=lambda _job: Target(info["url"]),
                baseline="an aiohttp echo job over TCP (stand-in)",
                processes={"job (stand-in)": job.pid, "gateway and proxy (stand-ins)": net.pid},
            )
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()


def _relay_socket(work_dirs: list[str], job_uuid: str) -> str:
    found = [
        str(p) for d in work_dirs for p in Path(d).glob(f"stream-{job_uuid[:8]}-*/relay/job.sock")
    ]
    if len(found) != 1:
        raise BenchError(f"job {job_uuid}: expected one relay socket, found {found}")
    return found[0]


@contextlib.asynccontextmanager
async def real_setup() -> AsyncIterator[Setup]:
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="horde-bench-stream-") as tmp:
        try:
            net, _ = await _spawn_line(
                "-m", "benchmarks.streaming_real", "network", tmp, str(max(CONCURRENCY))
            )
            procs.append(net)
            gw, ends = await _spawn_line("-m", "benchmarks.streaming_real", "gateway", tmp)
            procs.append(gw)
            work_dirs = list(ends["work_dirs"])
            yield Setup(
                mode="real",
                gateway=ends["gateway"],
                gateway_identity=ends["gateway_identity"],
                validator_identity=ends["validator_identity"],
                client_key=Path(ends["client_key"]),
                image="horde/demo-llm:latest",
                direct=lambda job: Target("http://job/", _relay_socket(work_dirs, job)),
                baseline=(
                    "the same horde/demo-llm container, called with aiohttp over its relay's "
                    "unix socket (same service process, same relay hop; no gateway, no job proxy)"
                ),
                # The network process runs the validator and the miner too; they idle meanwhile.
                processes={"gateway": gw.pid, "executors": net.pid},
            )
        finally:
            for proc in reversed(procs):
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                async with asyncio.timeout(60):
                    await proc.wait()


async def _direct(
    https: list[aiohttp.ClientSession], targets: list[Target], n: int, base: int
) -> Measure:
    latencies: list[float] = []

    async def worker(http: aiohttp.ClientSession, target: Target, w: int) -> None:
        for i in range(n):
            body = payload(base + w * n + i)
            t0 = time.perf_counter()
            async with http.post(target.url, data=body) as resp:
                out = await resp.read()
            latencies.append(time.perf_counter() - t0)
            if resp.status != 200 or not out:
                raise BenchError(f"direct request failed: HTTP {resp.status}")

    t0 = time.perf_counter()
    await asyncio.gather(
        *(worker(h, t, w) for w, (h, t) in enumerate(zip(https, targets, strict=True)))
    )
    wall = time.perf_counter() - t0
    return Measure(len(https) * n, wall, latencies)


async def _horde(clients: list[StreamClient], n: int, base: int) -> Measure:
    latencies: list[float] = []

    async def worker(client: StreamClient, w: int) -> None:
        for i in range(n):
            res = await client.request(payload(base + w * n + i))
            latencies.append(res.latency_s)
            if res.http_status != 200 or not res.body:
                raise BenchError(f"request through Horde failed: HTTP {res.http_status}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c, w) for w, c in enumerate(clients)))
    wall = time.perf_counter() - t0
    return Measure(len(clients) * n, wall, latencies)


async def _horde_pipelined(client: StreamClient, n: int, base: int) -> Measure:
    latencies: list[float] = []
    t0 = time.perf_counter()
    async for res in client.pipeline((payload(base + i) for i in range(n)), window=WINDOW):
        latencies.append(res.latency_s)
        if res.http_status != 200 or not res.body:
            raise BenchError(f"request through Horde failed: HTTP {res.http_status}")
    return Measure(n, time.perf_counter() - t0, latencies)


async def measure(setup: Setup, runs: int) -> dict[int, dict[str, Measure]]:
    """Open the sessions once (one job each), then time both paths on the same jobs."""
    n = REQUESTS_PER_RUN
    signer = load_key_file(setup.client_key)
    channel = open_channel(setup.gateway)  # each session signs its own call
    clients = [
        StreamClient(
            channel,
            signer=signer,
            callee=setup.gateway_identity,
            validator_identity=setup.validator_identity,
        )
        for _ in range(max(CONCURRENCY))
    ]
    https: list[aiohttp.ClientSession] = []
    out: dict[int, dict[str, Measure]] = {}
    try:
        async with asyncio.timeout(START_TIMEOUT_S * 3):
            await asyncio.gather(
                *(c.open(setup.image, time_limit_s=SESSION_LIMIT_S) for c in clients)
            )
        targets = [setup.direct(c.job_uuid) for c in clients]
        https = [t.http() for t in targets]
        # Warm-up (connections, caches, JIT-free but allocator-warm): both paths, every session.
        await _direct(https, targets, WARMUP // 4, 0)
        await _horde(clients, WARMUP // 4, 0)
        base = 10**6
        for sessions in CONCURRENCY:
            parts: dict[str, list[Measure]] = {"direct": [], "horde": []}
            for r in range(runs):
                # Interleaved A/B then B/A, so machine noise falls on both alike.
                order = ["direct", "horde"] if r % 2 == 0 else ["horde", "direct"]
                for name in order:
                    base += sessions * n
                    before = cpu_snapshot(setup.processes)
                    if name == "direct":
                        m = await _direct(https[:sessions], targets[:sessions], n, base)
                    else:
                        m = await _horde(clients[:sessions], n, base)
                    m.took_cpu(before, cpu_snapshot(setup.processes))
                    parts[name].append(m)
            if sessions == 1:
                # One more figure, not in the ratio: the same session with WINDOW requests in
                # flight (`horde stream --window`); one HTTP/1.1 connection cannot do that.
                parts["horde_pipelined"] = []
                for _ in range(runs):
                    base += n
                    before = cpu_snapshot(setup.processes)
                    m = await _horde_pipelined(clients[0], n, base)
                    m.took_cpu(before, cpu_snapshot(setup.processes))
                    parts["horde_pipelined"].append(m)
            out[sessions] = {k: Measure.merge(v) for k, v in parts.items()}
        await asyncio.gather(*(c.close("benchmark done") for c in clients))
    finally:
        for c in clients:
            c.cancel()
        for http in https:
            await http.close()
        await channel.close()
    return out


def ceilings(results: dict[int, dict[str, Measure]], floor: dict[str, float]) -> dict[str, float]:
    """The best throughput ratios the design allows here, from the floor figures: at 1 session
    (latency-bound) the direct mean latency over itself plus one gRPC and one framed-TCP round
    trip, one signature and two verifications; at 16 sessions (CPU-bound: the machine is busy)
    the direct path's CPU per request over itself plus the CPU of the same extra work."""
    crypto_us = floor["ed25519_sign_us"] + 2 * floor["ed25519_verify_us"]
    direct_ms = statistics.fmean(results[1]["direct"].latencies_s) * 1000
    extra_ms = floor["grpc_rtt_p50_ms"] + floor["framed_tcp_rtt_p50_ms"] + crypto_us / 1000
    out = {"ceiling_ratio_1": round(direct_ms / (direct_ms + extra_ms), 3)}
    many = max(results)
    direct_cpu = results[many]["direct"].cpu_us_per_request
    if direct_cpu > 0 and f"grpc_cpu_us_per_round_trip_{many}" in floor:
        extra_cpu = (
            floor[f"grpc_cpu_us_per_round_trip_{many}"]
            + floor[f"framed_tcp_cpu_us_per_round_trip_{many}"]
            + crypto_us
        )
        out[f"ceiling_ratio_{many}"] = round(direct_cpu / (direct_cpu + extra_cpu), 3)
    return out


def report(
    mode: str,
    baseline: str,
    runs: int,
    results: dict[int, dict[str, Measure]],
    floor: dict[str, float] | None = None,
) -> PartResult:
    one = results[1]
    figures: dict[str, Any] = {
        "mode": mode,
        "direct_baseline": baseline,
        "client_loop": "uvloop (as `horde stream`), one process for both paths",
        "payload_bytes": PAYLOAD_BYTES,
        "requests_per_session_per_run": REQUESTS_PER_RUN,
        "runs": runs,
        "added_p50_ms": round(one["horde"].pct(0.5) - one["direct"].pct(0.5), 3),
        "added_p99_ms": round(one["horde"].pct(0.99) - one["direct"].pct(0.99), 3),
    }
    table = Table(
        title=f"streaming: 1 KiB requests, {mode}, {runs} runs x {REQUESTS_PER_RUN} "
        "requests per session, interleaved"
    )
    for col in ("sessions", "path", "req/s", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="right" if col not in ("path",) else "left")
    for sessions, by_path in results.items():
        ratio = by_path["horde"].rps / by_path["direct"].rps
        figures[f"throughput_ratio_{sessions}"] = round(ratio, 3)
        if "horde_pipelined" in by_path:
            pipelined = by_path["horde_pipelined"].rps / by_path["direct"].rps
            figures[f"pipelined_ratio_{sessions}"] = round(pipelined, 3)
            figures["pipelined_window"] = WINDOW
        for path, m in by_path.items():
            figures[f"{path}_rps_{sessions}"] = round(m.rps, 1)
            figures[f"{path}_p50_ms_{sessions}"] = round(m.pct(0.5), 3)
            figures[f"{path}_p99_ms_{sessions}"] = round(m.pct(0.99), 3)
            if m.cpu_s > 0:
                figures[f"{path}_cpu_us_per_request_{sessions}"] = round(m.cpu_us_per_request, 1)
                figures[f"{path}_cpu_us_per_request_{sessions}_by_process"] = (
                    m.cpu_us_per_request_by_process()
                )
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
        f"direct baseline: {baseline}\n"
        f"{verdict}: throughput ratio {figures['throughput_ratio_1']} (1 session), "
        f"{figures['throughput_ratio_16']} (16 sessions), target >= {TARGET_RATIO}; added "
        f"latency p50 {figures['added_p50_ms']} ms (target <= {TARGET_ADDED_P50_MS}), p99 "
        f"{figures['added_p99_ms']} ms"
    )
    if "pipelined_ratio_1" in figures:
        summary += (
            f"\nnot in the ratio: one session with {WINDOW} requests in flight (`horde stream "
            f"--window {WINDOW}`) carries {figures['pipelined_ratio_1']} of the direct "
            "connection's requests/s"
        )
    many = max(results)
    split = {
        path: results[many][path].cpu_us_per_request_by_process()
        for path in ("direct", "horde")
        if results[many][path].cpu_by_process
    }
    if split:
        summary += f"\nCPU per request with {many} sessions, by process (us): " + "; ".join(
            f"{path} " + ", ".join(f"{role} {us:.0f}" for role, us in by_role.items())
            for path, by_role in split.items()
        )
    if floor:
        figures.update({f"floor_{k}": v for k, v in floor.items()})
        figures.update(ceilings(results, floor))
        summary += (
            f"\nfloor (measured alone, this run): gRPC round trip p50 "
            f"{floor['grpc_rtt_p50_ms']} ms ({floor['grpc_cpu_us_per_round_trip_1']} us CPU; "
            f"{floor['grpc_cpu_us_per_round_trip_16']} us with 16 streams), framed TCP "
            f"{floor['framed_tcp_rtt_p50_ms']} ms ({floor['framed_tcp_cpu_us_per_round_trip_1']}"
            f" us; {floor['framed_tcp_cpu_us_per_round_trip_16']} us), Ed25519 sign "
            f"{floor['ed25519_sign_us']} us, verify {floor['ed25519_verify_us']} us (x2); best "
            f"ratios the design allows here: {figures['ceiling_ratio_1']} (1 session), "
            f"{figures.get(f'ceiling_ratio_{max(results)}', 'n/a')} ({max(results)} sessions)"
        )
    if mode == "fake-proxy":
        summary += (
            "\nNOTE: measured against a stand-in job proxy and an echo job "
            "(benchmarks/streaming_fake.py), not the executor's job proxy and horde/demo-llm."
        )
    return PartResult("streaming", figures, [table], passed, summary)


async def _measure_here(runs: int) -> dict[str, Any]:
    fake = os.environ.get("HORDE_BENCH_STREAMING", "").strip() == "fake"
    async with fake_setup() if fake else real_setup() as setup:
        results = await measure(setup, runs)
    return {
        "mode": setup.mode,
        "baseline": setup.baseline,
        "results": {
            str(sessions): {
                path: [m.requests, m.wall_s, m.latencies_s, m.cpu_s, m.cpu_by_process]
                for path, m in by_path.items()
            }
            for sessions, by_path in results.items()
        },
        "floor": await floor(),
    }


async def run(runs: int, build: Path) -> PartResult:
    """Measure in a child process on uvloop, the loop `horde stream` runs on (the benchmark
    runner itself stays on asyncio's loop, which the organic part needs to fork `docker run`);
    the direct and the Horde path are timed from the same child, on the same loop."""
    # The figures come back in a file: a ~300 KB line on stdout was once cut at 128 KiB by
    # another write to the same pipe.
    with tempfile.TemporaryDirectory(prefix="horde-bench-figures-") as tmp:
        figures = Path(tmp) / "figures.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.streaming", str(runs), str(figures)
        )
        await proc.wait()
        if proc.returncode != 0 or not figures.exists():
            raise BenchError(f"the streaming measurement failed (exit status {proc.returncode})")
        data = json.loads(figures.read_text())
    results = {
        int(sessions): {path: Measure(*m) for path, m in by_path.items()}
        for sessions, by_path in data["results"].items()
    }
    return report(data["mode"], data["baseline"], runs, results, data["floor"])


def main() -> None:
    from horde_services.core.loop import run as run_loop

    figures = run_loop(_measure_here(int(sys.argv[1])))
    Path(sys.argv[2]).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
