"""Organic-job overhead: a trivial container through Horde versus a bare `docker run`.

Baseline: ``docker run --rm --network none horde/base:latest true`` through the docker CLI, which is
what a user would type. Horde: a whole local network started in-process (``horde dev up``), and the
same job (``horde/base:latest``, command ``true``) submitted through the client path that
``horde job run`` uses (a signed channel from ``validator_target`` and the
``ValidatorService.SubmitJob`` stream), timed from submit to the result. The two are interleaved
(A/B, then B/A) after one warm-up of each, so machine noise falls on both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from horde.v1 import common_pb2, job_pb2, validator_pb2_grpc
from rich.console import Console
from rich.table import Table

from benchmarks import PartResult, median, p90
from horde_services.cli.client import Target, _requests, validator_target
from horde_services.cli.dev import dev_up
from horde_services.cli.devenv import ENDPOINTS
from horde_services.core.logging import configure_logging
from horde_services.core.proto_util import reason_name, stage_name, state_name

IMAGE = "horde/base:latest"
COMMAND = ["true"]
DOCKER_ARGV = ["docker", "run", "--rm", "--network", "none", IMAGE, *COMMAND]
TARGET_RATIO = 1.5
NETWORK_UP_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 180.0
CLI_RUNS = 3  # the cold-start CLI figures are informational (not in the ratio): a few runs do
HORDE_CLI = Path(sys.executable).with_name("horde")

progress = Console(stderr=True)


class BenchError(RuntimeError):
    """A run did not do what it should; the benchmark's figures would be meaningless."""


@dataclass
class HordeRun:
    wall_s: float
    result_s: float  # when the result message arrived (the wall time also counts closing)
    milestones: dict[str, float]  # "state/stage" of each event -> seconds since submit
    stages: dict[str, float]  # executor-side stage timings from the result


@dataclass
class Samples:
    docker: list[float] = field(default_factory=list)
    horde: list[HordeRun] = field(default_factory=list)
    cli_job_run: list[float] = field(default_factory=list)  # `horde job run` as a new process
    cli_import: list[float] = field(default_factory=list)  # just importing the CLI's modules


async def docker_once() -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *DOCKER_ARGV, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(
            f"`{' '.join(DOCKER_ARGV)}` exited {proc.returncode}: {err.decode(errors='replace')}"
        )
    return wall


async def timed_process(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(RUN_TIMEOUT_S):
        _, err = await proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {err.decode(errors='replace')}"
        )
    return wall


def job_spec() -> job_pb2.JobSpec:
    # The spec `horde job run horde/base:latest -- true` builds (horde_services/cli/main.py).
    return job_pb2.JobSpec(
        image=IMAGE,
        command=COMMAND,
        output=job_pb2.OutputSpec(stream=job_pb2.StreamOutput()),
    )


async def horde_once(target: Target) -> HordeRun:
    milestones: dict[str, float] = {}
    final: job_pb2.JobResult | None = None
    result_s = 0.0
    t0 = time.perf_counter()
    async with asyncio.timeout(RUN_TIMEOUT_S), target.channel() as channel:
        stub = validator_pb2_grpc.ValidatorServiceStub(channel)
        async for msg in stub.SubmitJob(_requests(job_spec(), [])):
            now = time.perf_counter() - t0
            kind = msg.WhichOneof("payload")
            if kind == "event":
                ev = msg.event
                milestones.setdefault(f"{state_name(ev.state)}/{stage_name(ev.stage)}", now)
            elif kind == "result":
                final, result_s = msg.result, now
    wall = time.perf_counter() - t0
    if final is None:
        raise BenchError("the validator closed the SubmitJob stream without a result")
    if final.state != common_pb2.JOB_STATE_COMPLETED or final.exit_code != 0:
        raise BenchError(
            f"job {final.job_uuid} ended {state_name(final.state)}"
            f" ({reason_name(final.reason)} in {stage_name(final.stage)}: {final.detail});"
            f" exit code {final.exit_code if final.HasField('exit_code') else None}"
        )
    stages = {stage_name(t.stage): t.seconds for t in final.stage_timings}
    return HordeRun(wall, result_s, milestones, stages)


@contextlib.asynccontextmanager
async def dev_network(log_path: Path | None) -> Any:
    """`horde dev up` in this process; yields (Target, seconds until endpoints.json appeared,
    state dir)."""
    state_dir = Path(tempfile.mkdtemp(prefix="horde-bench-"))
    log_file = (log_path or state_dir / "horde.log").open("w")
    # JSON log lines to a file: the table stays readable and the lines carry timestamps.
    configure_logging("info", json=True, stream=log_file)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(dev_up(state_dir, [], stop=stop))
    try:
        # dev_up prints one line once it is up; keep it out of the report.
        with contextlib.redirect_stdout(log_file):
            async with asyncio.timeout(NETWORK_UP_TIMEOUT_S):
                while not (state_dir / ENDPOINTS).is_file():
                    if task.done():
                        task.result()  # raises what killed it
                        raise BenchError("horde dev up ended before the network was up")
                    await asyncio.sleep(0.05)
        up_s = time.perf_counter() - t0
        target = validator_target(dev=state_dir, address=None, identity=None, key=None)
        yield target, up_s, state_dir
    finally:
        stop.set()
        try:
            async with asyncio.timeout(60):
                await task
        finally:
            log_file.close()
            shutil.rmtree(state_dir, ignore_errors=True)


def _stats_row(label: str, values: list[float]) -> list[str]:
    return [
        label,
        f"{median(values):.3f}",
        f"{p90(values):.3f}",
        f"{min(values):.3f}",
        f"{max(values):.3f}",
    ]


async def run(runs: int, log_path: Path | None = None) -> PartResult:
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if shutil.which("docker") is None:
        raise BenchError("the docker CLI is not on PATH")
    samples = Samples()
    async with dev_network(log_path) as (target, up_s, state_dir):
        progress.print(f"[dim]organic: local network up in {up_s:.2f}s; warming up[/dim]")
        await docker_once()
        await horde_once(target)
        for i in range(runs):
            # A/B then B/A so neither side always runs right after the other.
            order = ("docker", "horde") if i % 2 == 0 else ("horde", "docker")
            for side in order:
                if side == "docker":
                    samples.docker.append(await docker_once())
                else:
                    samples.horde.append(await horde_once(target))
            progress.print(
                f"[dim]organic: run {i + 1}/{runs}: docker {samples.docker[-1]:.3f}s,"
                f" horde {samples.horde[-1].wall_s:.3f}s[/dim]"
            )
        # Informational, not in the ratio: what a user typing `horde job run` waits for, a fresh
        # Python process included, and how much of that is importing the CLI's modules.
        if HORDE_CLI.is_file():
            argv = [str(HORDE_CLI), "job", "run", "--dev", str(state_dir), IMAGE, "--", *COMMAND]
            imports = [
                sys.executable,
                "-c",
                "import horde_services.cli.main, horde_services.cli.client",
            ]
            for i in range(min(runs, CLI_RUNS)):
                samples.cli_job_run.append(await timed_process(argv))
                samples.cli_import.append(await timed_process(imports))
                progress.print(
                    f"[dim]organic: cli {i + 1}/{min(runs, CLI_RUNS)}: `horde job run`"
                    f" {samples.cli_job_run[-1]:.3f}s, imports {samples.cli_import[-1]:.3f}s[/dim]"
                )
    return report(samples, runs, up_s)


def report(samples: Samples, runs: int, up_s: float) -> PartResult:
    docker = samples.docker
    horde = [r.wall_s for r in samples.horde]
    docker_med, horde_med = median(docker), median(horde)
    ratio = horde_med / docker_med
    overhead = horde_med - docker_med
    passed = ratio <= TARGET_RATIO

    main = Table(title=f"organic job: trivial container ({runs} runs each, interleaved)")
    for col in ("", "median s", "p90 s", "min s", "max s"):
        main.add_column(col, justify="left" if not col else "right")
    main.add_row(*_stats_row("docker run (CLI)", docker))
    main.add_row(*_stats_row("horde (submit -> result)", horde))
    verdict = "[green]PASS[/green]" if passed else "[red]MISS[/red]"
    main.add_section()
    main.add_row(
        "ratio horde/docker", f"{ratio:.2f}", "", "", f"target <= {TARGET_RATIO} {verdict}"
    )
    main.add_row("overhead (median diff)", f"{overhead:.3f}", "", "", "")
    if samples.cli_job_run:
        main.add_section()
        main.add_row(
            *_stats_row(
                "[dim]`horde job run` CLI, new process (not in ratio)[/dim]", samples.cli_job_run
            )
        )
        main.add_row(
            *_stats_row("[dim]  of which: importing the CLI modules[/dim]", samples.cli_import)
        )

    # Where Horde's time goes: when each event reached the client, and the executor's stages.
    milestones: dict[str, list[float]] = defaultdict(list)
    stages: dict[str, list[float]] = defaultdict(list)
    for r in samples.horde:
        for name, at in r.milestones.items():
            milestones[name].append(at)
        milestones["result"].append(r.result_s)
        milestones["stream closed"].append(r.wall_s)
        for name, secs in r.stages.items():
            stages[name].append(secs)
    order = sorted(milestones, key=lambda k: median(milestones[k]))
    detail = Table(title="horde breakdown (client clock, seconds since submit; median)")
    for col in ("milestone", "at s", "gap s"):
        detail.add_column(col, justify="left" if col == "milestone" else "right")
    prev = 0.0
    milestone_medians: dict[str, float] = {}
    for name in order:
        at = median(milestones[name])
        milestone_medians[name] = round(at, 4)
        detail.add_row(name, f"{at:.3f}", f"{at - prev:+.3f}")
        prev = at
    detail.add_section()
    stage_medians: dict[str, float] = {}
    for name, values in stages.items():
        stage_medians[name] = round(median(values), 4)
        detail.add_row(f"executor stage: {name}", f"{median(values):.3f}", "")

    figures = {
        "docker_run_s": round(docker_med, 4),
        "horde_s": round(horde_med, 4),
        "ratio": round(ratio, 3),
        "overhead_s": round(overhead, 4),
        "runs": runs,
        "docker_run_p90_s": round(p90(docker), 4),
        "horde_p90_s": round(p90(horde), 4),
        "target_ratio": TARGET_RATIO,
        "pass": passed,
        "network_up_s": round(up_s, 3),
        "horde_milestones_s": milestone_medians,
        "horde_executor_stages_s": stage_medians,
    }
    if samples.cli_job_run:
        figures["cli_job_run_s"] = round(median(samples.cli_job_run), 4)
        figures["cli_import_s"] = round(median(samples.cli_import), 4)
        figures["cli_runs"] = len(samples.cli_job_run)
    summary = (
        f"organic: horde {horde_med:.3f}s vs docker run {docker_med:.3f}s:"
        f" ratio {ratio:.2f} (target <= {TARGET_RATIO}: {'PASS' if passed else 'MISS'}),"
        f" overhead {overhead:.3f}s"
    )
    return PartResult("organic", figures, [main, detail], passed, summary)
