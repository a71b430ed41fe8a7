"""A service started twice on one state (the same config run twice, a unit and a manual run) must
not harm the one already running: the second `horde validator serve` on a live validator's
state_dir, or `horde executor serve` on a live executor's work_dir, exits 2 in one line before it
recovers or sweeps anything, and the running job goes on to complete. And an executor restarted
after kill -9 sweeps its leftover job directories, not only its containers.

Real processes, gRPC, Docker and SQLite. The jobs here wait for a gate (a file the test makes in
the container through `docker exec`), so they are surely running while the second process starts,
however slow the host, and end when the test says."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import aiodocker
import pytest
from horde.v1 import common_pb2 as S
from horde.v1 import validator_pb2, validator_pb2_grpc
from organic_support import (
    BASE_IMAGE,
    HORDE_BIN,
    Network,
    assert_result,
    job_containers,
    spec_for,
    wait_for,
    wait_job_container_running,
)
from process_support import one_line
from test_faults import log_events, spawn_executor, spawn_service, stop_process

pytestmark = pytest.mark.timeout(180)

# A job that runs until the test opens its gate (/tmp is the container's own tmpfs).
GATED = ["sh", "-c", "until [ -e /tmp/gate ]; do sleep 0.1; done; echo through"]


async def open_gate(net: Network, container_id: str) -> None:
    """Let a GATED job finish: make its gate file with `docker exec`."""
    container = net.docker.containers.container(container_id)
    run = await container.exec(["touch", "/tmp/gate"])
    await run.start(detach=True)

    async def exited() -> dict[str, object] | None:
        try:
            info: dict[str, object] = await run.inspect()
        except aiodocker.exceptions.DockerError as exc:
            if exc.status != 404:
                raise
            # The gate opened, the job ended and its container (with the exec) is gone already:
            # the job's own result, checked by the caller, says the rest.
            return {"Running": False, "ExitCode": 0}
        return None if info["Running"] else info

    info = await wait_for(exited, 30, "`docker exec touch /tmp/gate` to end")
    assert info["ExitCode"] == 0, info


async def serve_again(kind: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`horde KIND serve --config CONFIG` once more; it must exit by itself within a minute."""
    proc = await asyncio.create_subprocess_exec(
        str(HORDE_BIN),
        kind,
        "serve",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"a second `horde {kind} serve` kept running: {err.decode()[-3000:]}")
    assert proc.returncode is not None
    return subprocess.CompletedProcess([kind], proc.returncode, out.decode(), err.decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_second_validator_on_the_same_state_dir_leaves_the_live_one_alone(
    bare_net: Network,
) -> None:
    """The same config twice (a fixed listen port, as in deploy/config/): the second validator
    used to run its crash recovery (ending the live one's running jobs as validator_restarted and
    emptying its spool) before finding its port busy. Now it stops at the state dir's lock."""
    net = bare_net
    await net.start_executor()
    state_dir = net.root / "validator-sub"
    config = net.validator_config(state_dir)
    port = free_port()
    with config.open("a") as f:
        f.write(f'listen = "127.0.0.1:{port}"\n')
    log_path = net.root / "validator-sub.log"
    first = await spawn_service("validator", config, log_path)
    try:
        await wait_for(
            lambda: log_events(log_path, "service_started"), 60, "the validator to start"
        )
        stub = validator_pb2_grpc.ValidatorServiceStub(
            net.channel(
                f"127.0.0.1:{port}", net.keys.signers["client"], net.keys.identity("validator")
            )
        )
        job = net.start_job(spec_for(BASE_IMAGE, GATED, execution_s=150), stub=stub)
        job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
        container_id = await wait_job_container_running(net.docker, job_uuid)
        # A queued job's spooled inputs (what recover() would have removed with the spool).
        spooled = state_dir / "spool" / str(uuid.uuid4()) / "input.bin"
        spooled.parent.mkdir(parents=True)
        spooled.write_bytes(b"a client's input")

        second = await serve_again("validator", config)
        assert second.returncode == 2, second.stderr
        assert one_line(second) == (
            f"horde validator: configuration error: state_dir {state_dir} is in use by another "
            f"validator (pid {first.pid})"
        )
        # The live validator's job is still running, in its records and in Docker...
        record = (await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
        assert S.JobState.Name(record.state) == "JOB_STATE_RUNNING"
        assert [c["Id"] for c in await job_containers(net.docker, job_uuid)] == [container_id]
        assert spooled.read_bytes() == b"a client's input"
        assert not log_events(log_path, "jobs_failed_on_restart")
        # ...and completes.
        await open_gate(net, container_id)
        run = await job.finished()
        assert run.result is not None, run.describe()
        assert S.JobState.Name(run.result.state) == "JOB_STATE_COMPLETED", run.describe()
        record = (await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
        assert S.JobState.Name(record.state) == "JOB_STATE_COMPLETED"
    finally:
        code = await stop_process(first)
    assert code == 0, log_path.read_text()[-3000:]


async def test_a_second_executor_on_the_same_work_dir_does_not_sweep_the_running_job(
    bare_net: Network,
) -> None:
    """The same config twice: the second executor used to sweep the live one's containers at
    start-up (the running job failed nonzero_exit 137). Now it stops at the work dir's lock."""
    net = bare_net
    config = net.executor_config("executor2")
    work_dir = net.root / "executor2-work"
    log_path = net.root / "executor2.log"
    first = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        job = net.start_job(spec_for(BASE_IMAGE, GATED, execution_s=150))
        job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
        container_id = await wait_job_container_running(net.docker, job_uuid)
        job_dirs = sorted(work_dir.glob(f"job-{job_uuid[:8]}-*"))
        assert len(job_dirs) == 1, list(work_dir.iterdir())

        second = await serve_again("executor", config)
        assert second.returncode == 2, second.stderr
        assert one_line(second) == (
            f"horde executor: configuration error: work_dir {work_dir} is in use by another "
            f"executor (pid {first.pid})"
        )
        # Nothing of the running job was touched...
        assert [c["Id"] for c in await job_containers(net.docker, job_uuid)] == [container_id]
        assert [c["State"] for c in await job_containers(net.docker, job_uuid)] == ["running"]
        assert job_dirs[0].is_dir()
        # ...and it completes, on the executor still linked to the miner.
        await open_gate(net, container_id)
        run = await job.finished()
        assert run.result is not None, run.describe()
        assert S.JobState.Name(run.result.state) == "JOB_STATE_COMPLETED", run.describe()
        await net.wait_executors(1)
    finally:
        code = await stop_process(first)
    assert code == 0, log_path.read_text()[-3000:]


async def test_an_executor_restarted_after_kill_9_sweeps_its_job_directories(
    bare_net: Network,
) -> None:
    """kill -9 mid-job leaves the job's directory (the client's inputs) in work_dir; the restart
    removes it and any other leftover job, streaming or synthetic directory, and nothing else."""
    net = bare_net
    config = net.executor_config("executor2")
    work_dir = net.root / "executor2-work"
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        job = net.start_job(spec_for(BASE_IMAGE, GATED, execution_s=150))
        job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
        await wait_job_container_running(net.docker, job_uuid)
        killed_job_dirs = sorted(work_dir.glob(f"job-{job_uuid[:8]}-*"))
        assert len(killed_job_dirs) == 1, list(work_dir.iterdir())
        proc.send_signal(signal.SIGKILL)
        run = await job.finished(within=30)
        assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
    finally:
        code = await stop_process(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL, log_path.read_text()[-3000:]
    assert killed_job_dirs[0].is_dir()

    # Leftovers of other kinds, named as streaming.py and synthetic.py name them...
    leftovers = [
        *killed_job_dirs,
        work_dir / "job-7f3e9a10-x_4k2m9q",
        work_dir / "stream-0b1c2d3e-ab12cd34",
        work_dir / "synthetic-q1w2e3r4",
    ]
    for leftover in leftovers[1:]:
        (leftover / "volume").mkdir(parents=True)
        (leftover / "volume" / "input.bin").write_bytes(b"a client's input")
    # ...and what is not a job's directory: kept.
    outside = net.root / "outside"
    outside.mkdir()
    (outside / "data").write_text("not the executor's")
    kept = {
        "notes": "dir",
        "job-notes.txt": "file",
        "job-12345678-abcdefgh": "file",  # a job's name, but a file
        "synthetic-results": "dir",
        "stream-": "dir",
        "job-deadbeef-zzzzzzzz": "symlink",  # a job's name, but a link out of work_dir
    }
    for name, kind in kept.items():
        if kind == "dir":
            (work_dir / name).mkdir()
            (work_dir / name / "f").write_text("keep")
        elif kind == "file":
            (work_dir / name).write_text("keep")
        else:
            (work_dir / name).symlink_to(outside, target_is_directory=True)

    proc = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        assert [p for p in leftovers if p.exists()] == []
        swept = log_events(log_path, "swept_job_dirs")
        assert [doc.get("count") for doc in swept] == [len(leftovers)], swept
        for name, kind in kept.items():
            path = work_dir / name
            assert path.is_symlink() if kind == "symlink" else path.exists(), name
        assert (outside / "data").read_text() == "not the executor's"
        assert (work_dir / "executor.lock").is_file()
        # And the restarted executor serves jobs.
        after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
        assert after.result is not None, after.describe()
        assert after.result.state == S.JOB_STATE_COMPLETED, after.describe()
    finally:
        code = await stop_process(proc)
    assert code == 0, log_path.read_text()[-3000:]
