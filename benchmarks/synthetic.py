"""Synthetic rounds at scale: one validator process drives rounds against 1,000 executors.

Set-up (all on 127.0.0.1, real gRPC and real signatures everywhere):

* this process runs the validator (``start_validator``, the same code as ``horde validator
  serve``) and nothing else, so its CPU time is the validator's;
* ``MINERS`` (2) subprocesses each run a real miner's MinerService (the real servicer, executor
  pool and answer collector, authenticated by the roster) with ``executors / MINERS`` light
  executors attached to its pool as in-memory links: each answers its challenge at once with the
  real CPU algorithm on a tiny range. No Docker and no per-executor gRPC link: on a small host a
  thousand link clients in a few simulator processes would measure the simulator, not the
  validator (``--links`` runs that variant: each executor a ``LightExecutor`` dialling its miner
  over its own authenticated gRPC stream; 2 vCPUs: p50 146 ms, p99 165 ms, all of it queueing
  in the two simulator processes);
* the roster registers every miner, so the validator finds them as it does on a chain.

Each round is the production path: the validator fetches every manifest, builds one challenge per
claimed executor, sends them with ``MinerService.RunSyntheticRound``, the miners relay each to
their executors at the same moment, the answers stream back, and the validator checks and records
every one. Figures (median over rounds for round time; pooled over every answer for timing error):

* ``round_s``: wall time of ``RoundRunner.run_round`` (manifests to recorded results);
* ``cpu_ms_per_job``: this process's CPU time (all threads) during the rounds, per executor;
* ``timing_error_*_ms``: the duration the validator measured for an executor (send to answer)
  minus the duration the executor reported (its own started/finished). This includes the links
  both ways and the queueing of a thousand executors in a few simulator processes, so it is an
  upper bound on the validator's own timing error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from horde.v1 import synthetic_pb2, validator_admin_pb2, validator_admin_pb2_grpc
from rich.table import Table

from benchmarks import PartResult, median
from benchmarks.organic import BenchError
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    MinerSettings,
    SyntheticClass,
    SyntheticSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.identity import Ed25519Signer, create_key_file, load_key_file
from horde_services.core.logging import configure_logging
from horde_services.core.server import open_channel
from horde_services.executor.synthetic import LightExecutor, solve_cpu

EXECUTORS = 1000
MINERS = 2
TARGET_P99_MS = 50.0
# A tiny range: each in-memory executor does the real algorithm, but 500 of them share one
# simulator process, so every microsecond of simulated work is serial time that would show up
# as validator timing error (range 64 measured p99 52 ms here, range 16 about 30-37 ms).
BENCH_CLASS = SyntheticClass(range_size=16, digests=2, deadline_s=20.0, weight=1.0)
START_TIMEOUT_S = 120.0


async def _light_answer(
    ch: synthetic_pb2.SyntheticChallenge, received_ns: int | None = None
) -> synthetic_pb2.SyntheticAnswer:
    # An executor's own clock starts when the challenge reaches it. In-memory executors share
    # one simulator process, so one queued behind 499 others would otherwise report only its
    # own few microseconds of hashing, and the simulator's serial CPU would count as the
    # validator's timing error; on real hardware each starts the moment its challenge lands.
    started = received_ns if received_ns is not None else time.time_ns()
    found = solve_cpu(ch.salt, ch.range_start, ch.range_end, list(ch.digests))
    return synthetic_pb2.SyntheticAnswer(
        challenge_id=ch.challenge_id,
        secrets=[s for s in found if s is not None],
        started_ns=started,
        finished_ns=time.time_ns(),
        backend="cpu",
    )


async def serve_miner(
    key_file: Path, roster: Path, state_dir: Path, executors: int, links: bool
) -> None:
    """Subprocess: a real miner and its light executors; prints one ready line, runs until
    stdin closes. ``links``: executors dial the miner over real gRPC links; otherwise they sit
    in the miner's pool as in-memory links (the miner's MinerService, pool and answer collector
    are the real ones either way)."""
    from horde.v1 import manifest_pb2, miner_pb2, miner_pb2_grpc

    from horde_services.core.auth import Authenticator
    from horde_services.core.db import open_database
    from horde_services.core.runtime import ChainPolicy, open_chain
    from horde_services.core.server import ServiceRegistration, create_server
    from horde_services.miner.app import start_miner
    from horde_services.miner.pool import ExecutorConn, ExecutorPool
    from horde_services.miner.service import MinerServicer, ReceiptStore
    from horde_services.miner.synthetic import SyntheticCollector

    configure_logging("error")
    keys = [Ed25519Signer.generate() for _ in range(executors)]
    signer = load_key_file(key_file)
    settings = load_settings(
        MinerSettings,
        executors=[str(k.identity) for k in keys],
        state_dir=state_dir,
        roster_file=roster,
        heartbeat_interval_s=5.0,
        executor_timeout_s=120.0,
    )
    tasks: list[asyncio.Task[None]] = []
    if links:
        app = await start_miner(settings, signer)
        app.start_background()
        port = app.port
        address = f"127.0.0.1:{port}"
        light = [
            LightExecutor(k, address, app.identity, "bench", _light_answer, inline=True)
            for k in keys
        ]
        tasks = [asyncio.create_task(ex.run()) for ex in light]
        async with asyncio.timeout(START_TIMEOUT_S):
            for ex in light:
                await ex.connected.wait()
        stop = app.stop
    else:
        engine = await open_database(settings.database("miner"))
        pool = ExecutorPool()
        collector = SyntheticCollector.for_pool(pool)
        server = await create_server(
            settings.listen,
            [
                ServiceRegistration(
                    miner_pb2.DESCRIPTOR.services_by_name["MinerService"].full_name,
                    miner_pb2_grpc.add_MinerServiceServicer_to_server,
                    MinerServicer(signer, pool, ReceiptStore(engine)),
                )
            ],
            authenticator=Authenticator(
                signer.identity, ChainPolicy(open_chain(settings, signer), True)
            ),
            service_label="miner",
        )
        port = server.port

        class TimedConn(ExecutorConn):
            """An in-memory link that notes when each challenge reached the executor."""

            def send(self, msg: Any) -> None:
                if msg.WhichOneof("payload") == "synthetic_challenge":
                    received[msg.synthetic_challenge.challenge_id] = time.time_ns()
                super().send(msg)

        received: dict[str, int] = {}

        async def executor(conn: ExecutorConn) -> None:
            while (msg := await conn.outbox.get()) is not None:
                if msg.WhichOneof("payload") == "synthetic_challenge":
                    ch = msg.synthetic_challenge
                    answer = await _light_answer(ch, received.pop(ch.challenge_id, None))
                    collector.deliver(conn, answer)

        for k in keys:
            conn = TimedConn(
                executor_id=pool.executor_id_for(k.identity),
                identity=k.identity,
                manifest=manifest_pb2.ExecutorManifest(executor_class="bench"),
            )
            pool.register(conn)
            tasks.append(asyncio.create_task(executor(conn)))

        async def stop(grace_s: float | None = None) -> None:
            await server.stop(grace_s)
            await engine.dispose()

    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await stop(0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return float(statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1])


async def run(
    runs: int,
    *,
    executors: int = EXECUTORS,
    miners: int = MINERS,
    links: bool = False,
    log_path: Path | None = None,
) -> PartResult:
    from horde_services.validator.app import start_validator

    configure_logging("error")
    with tempfile.TemporaryDirectory(prefix="horde-bench-synthetic-") as tmp:
        root = Path(tmp)
        validator_key = create_key_file(root / "validator.json", "hotkey")
        admin = Ed25519Signer.generate()
        neurons = [
            Neuron(uid=0, hotkey=validator_key.identity.ss58, stake=1e4, validator_permit=True)
        ]
        roster = root / "roster.toml"
        write_roster(roster, neurons)
        log = log_path.open("w") if log_path is not None else None
        procs: list[asyncio.subprocess.Process] = []
        validator = None
        try:
            per = [
                executors // miners + (1 if i < executors % miners else 0) for i in range(miners)
            ]
            for index, count in enumerate(per, start=1):
                key = root / f"miner{index}.json"
                create_key_file(key, "hotkey")
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "benchmarks.synthetic",
                        "--serve-miner",
                        str(key),
                        str(roster),
                        str(root / f"miner{index}"),
                        str(count),
                        "links" if links else "memory",
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=log if log is not None else asyncio.subprocess.DEVNULL,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                )
            for index, proc in enumerate(procs, start=1):
                assert proc.stdout is not None
                async with asyncio.timeout(START_TIMEOUT_S):
                    line = await proc.stdout.readline()
                if not line:
                    raise BenchError(f"simulated miner {index} did not start (see the log)")
                ready = json.loads(line)
                identity = load_key_file(root / f"miner{index}.json").identity
                neurons.append(
                    Neuron(
                        uid=index,
                        hotkey=identity.ss58,
                        stake=1.0,
                        endpoint=f"127.0.0.1:{ready['port']}",
                    )
                )
            write_roster(roster, neurons)
            validator = await start_validator(
                load_settings(
                    ValidatorSettings,
                    state_dir=root / "validator",
                    roster_file=roster,
                    admins=[str(admin.identity)],
                    synthetic=SyntheticSettings(enabled=False, classes={"bench": BENCH_CLASS}),
                    default_executor_class="bench",
                ),
                validator_key,
            )
            async with open_channel(
                f"127.0.0.1:{validator.port}", signer=admin, callee=str(validator_key.identity)
            ) as channel:
                stub = validator_admin_pb2_grpc.ValidatorAdminServiceStub(channel)
                figures = await _rounds(stub, runs, executors)
        finally:
            if validator is not None:
                await validator.stop(0)
            for proc in procs:
                if proc.stdin is not None:
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        proc.stdin.close()
            for proc in procs:
                try:
                    async with asyncio.timeout(20):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if log is not None:
                log.close()
    return figures


async def _rounds(
    stub: validator_admin_pb2_grpc.ValidatorAdminServiceStub, runs: int, executors: int
) -> PartResult:
    """Rounds through the validator's admin RPC (the path `horde validator round` takes)."""
    request = validator_admin_pb2.RunRoundRequest()
    warm = await stub.RunRound(request, timeout=300)  # opens the miners' channels; not measured
    seen = sum(len(m.verdicts) for m in warm.miners)
    if seen != executors:
        raise BenchError(f"the warm-up round saw {seen} executors, expected {executors}")
    round_s: list[float] = []
    cpu_ms: list[float] = []
    errors_ms: list[float] = []
    failed: list[str] = []
    for _ in range(runs):
        cpu0 = time.process_time()
        resp = await stub.RunRound(request, timeout=300)
        cpu = time.process_time() - cpu0
        verdicts = [v for m in resp.miners for v in m.verdicts]
        failed += [v.reason for v in verdicts if not v.passed]
        round_s.append(resp.duration_s)
        cpu_ms.append(cpu * 1000 / max(1, len(verdicts)))
        errors_ms += [(v.duration_s - v.executor_duration_s) * 1000 for v in verdicts]
    if failed:
        raise BenchError(
            f"{len(failed)} executor verdicts failed (first: {failed[0]}); "
            "the figures would be meaningless"
        )
    p50, p99 = _percentile(errors_ms, 50), _percentile(errors_ms, 99)
    figures = {
        "executors": executors,
        "round_s": round(median(round_s), 4),
        "cpu_ms_per_job": round(median(cpu_ms), 4),
        "timing_error_p50_ms": round(p50, 3),
        "timing_error_p99_ms": round(p99, 3),
        "rounds": runs,
    }
    table = Table("figure", "value")
    table.add_row("executors (light, in the miners' pools)", str(executors))
    table.add_row("rounds measured (after one warm-up)", str(runs))
    table.add_row("round time (median)", f"{figures['round_s']:.3f} s")
    table.add_row("validator CPU per job (median)", f"{figures['cpu_ms_per_job']:.3f} ms")
    table.add_row("timing error p50", f"{p50:.2f} ms")
    table.add_row("timing error p99", f"{p99:.2f} ms (target <= {TARGET_P99_MS:g} ms)")
    passed = p99 <= TARGET_P99_MS
    return PartResult(
        name="synthetic",
        figures=figures,
        tables=[table],
        passed=passed,
        summary=f"synthetic: p99 timing error {p99:.1f} ms with {executors} executors: "
        + ("[green]MET[/green]" if passed else "[red]MISS[/red]"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic")
    parser.add_argument(
        "--serve-miner", nargs=5, metavar=("KEY", "ROSTER", "STATE", "N", "links|memory")
    )
    parser.add_argument(
        "--links", action="store_true", help="executors dial their miner over real gRPC links"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--executors", type=int, default=EXECUTORS)
    parser.add_argument("--miners", type=int, default=MINERS)
    args = parser.parse_args(argv)
    if args.serve_miner:
        key, roster, state, count, mode = args.serve_miner
        asyncio.run(serve_miner(Path(key), Path(roster), Path(state), int(count), mode == "links"))
        return 0
    res = asyncio.run(
        run(args.runs, executors=args.executors, miners=args.miners, links=args.links)
    )
    from rich.console import Console

    console = Console()
    for table in res.tables:
        console.print(table)
    console.print(res.summary)
    print(json.dumps(res.figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
