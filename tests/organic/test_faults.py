"""Organic jobs that go wrong: the job's own faults, sandbox escapes that must not work, and the
network's faults (executor killed, miner restarted). Every failure must carry a precise reason."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import shutil
import signal
import tarfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
from horde.v1 import common_pb2 as S
from horde.v1 import job_pb2, miner_pb2, validator_pb2, validator_pb2_grpc
from organic_support import (
    BASE_IMAGE,
    DEMO_IMAGE,
    EXECUTOR_TIMEOUT_S,
    HEARTBEAT_S,
    HORDE_BIN,
    MEMORY_LIMIT_MB,
    MISSING_IMAGE,
    OUTPUT_LIMIT_MB,
    PIDS_LIMIT,
    JobCall,
    Network,
    assert_result,
    job_containers,
    job_objects,
    python_job,
    sha256,
    spec_for,
    wait_for,
    wait_job_container_running,
    wait_no_job_objects,
)

from horde_services.core.config import ExecutorSettings, load_settings
from horde_services.core.identity import Ed25519Signer
from horde_services.executor.app import start_executor

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------ the job's faults


async def test_nonzero_exit_captures_stderr(net: Network) -> None:
    run = await net.run_job(
        python_job("import sys; print('partial'); sys.stderr.write('boom: bad input\\n'); exit(3)")
    )
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_NONZERO_EXIT, S.STAGE_EXECUTION)
    assert res.exit_code == 3
    assert "status 3" in res.detail
    assert res.stdout.data == b"partial\n"
    assert res.stderr.data == b"boom: bad input\n"
    assert res.stderr.total_bytes == len(b"boom: bad input\n") and not res.stderr.truncated
    assert S.JOB_STATE_RUNNING in run.states


async def test_a_failed_job_still_returns_its_outputs(net: Network) -> None:
    """What a failing job wrote under /output (partial results, its own logs) comes back with
    its failure: it was thrown away, and with it what the client needed to see why."""
    script = "mkdir /output/logs && echo partial > /output/p.txt && echo why > /output/logs/l"
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", script + " && exit 3"]))
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_NONZERO_EXIT, S.STAGE_EXECUTION)
    assert res.exit_code == 3 and res.detail == "the job exited with status 3"
    assert run.files() == {"p.txt": b"partial\n", "logs/l": b"why\n"}
    assert sorted(o.path for o in res.outputs) == ["logs/l", "p.txt"]
    # Killed at its time limit: what it wrote before comes back too.
    run = await net.run_job(
        spec_for(BASE_IMAGE, ["sh", "-c", "echo before > /output/pre.txt; sleep 60"], execution_s=2)
    )
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_TIMEOUT, S.STAGE_EXECUTION)
    assert run.files() == {"pre.txt": b"before\n"}


async def test_execution_timeout_kills_container(net: Network) -> None:
    started = time.monotonic()
    run = await net.run_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=2))
    elapsed = time.monotonic() - started
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_TIMEOUT, S.STAGE_EXECUTION)
    assert elapsed < 30, f"a 2 s limit took {elapsed:.1f}s to enforce"
    assert "time limit" in res.detail
    # The job's container was removed before the result was sent (the output holder and volume
    # may follow in the background; the fixture checks they go too).
    assert await job_containers(net.docker, res.job_uuid) == []


PROBE = """
import json, os, socket, sys
results = {}
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        results[f"{host}:{port}"] = "connected"
    except OSError as exc:
        results[f"{host}:{port}"] = f"failed: {exc}"
    finally:
        s.close()
try:
    socket.getaddrinfo("example.com", 80)
    results["dns"] = "resolved"
except OSError as exc:
    results["dns"] = f"failed: {exc}"
results["interfaces"] = sorted(os.listdir("/sys/class/net"))
print(json.dumps(results))
"""


async def test_job_cannot_reach_host_miner_or_internet(net: Network) -> None:
    # A listener on every host interface: reachable from any container with a network.
    connected = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writer.close()

    listener = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    listen_port = listener.sockets[0].getsockname()[1]
    bridge = await net.docker.networks.get("bridge")
    ipam = (await bridge.show()).get("IPAM", {}).get("Config") or [{}]
    gateway = ipam[0].get("Gateway") or "172.17.0.1"
    targets = [
        ("127.0.0.1", net.miner_port),
        (gateway, net.miner_port),
        (gateway, listen_port),
        ("1.1.1.1", 53),
    ]
    try:
        run = await net.run_job(
            spec_for(BASE_IMAGE, ["python3", "-c", PROBE, json.dumps(targets)], execution_s=30)
        )
    finally:
        listener.close()
        await listener.wait_closed()
    assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
    results = json.loads(run.result.stdout.data)
    for host, port in targets:
        assert results[f"{host}:{port}"].startswith("failed"), results
    assert results["dns"].startswith("failed"), results
    assert results["interfaces"] == ["lo"], results
    assert not connected.is_set()


async def test_root_filesystem_is_read_only(net: Network) -> None:
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", "touch /x"]))
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_NONZERO_EXIT, S.STAGE_EXECUTION)
    assert res.exit_code != 0
    assert b"Read-only file system" in res.stderr.data


async def test_fork_bomb_hits_pids_limit(net: Network) -> None:
    code = (
        "import subprocess\n"
        "procs = []\n"
        "while True:\n"
        "    procs.append(subprocess.Popen(['sleep', '60']))\n"
    )
    started = time.monotonic()
    run = await net.run_job(python_job(code, execution_s=60))
    elapsed = time.monotonic() - started
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_PIDS_LIMIT, S.STAGE_EXECUTION)
    assert f"limit of {PIDS_LIMIT} processes" in res.detail
    assert b"Resource temporarily unavailable" in res.stderr.data
    assert elapsed < 30, f"the fork bomb took {elapsed:.1f}s to end"


async def test_memory_hog_is_out_of_memory(net: Network) -> None:
    code = (
        "hog = []\n"
        "for i in range(128):\n"
        "    hog.append(bytearray(16 * 2**20))\n"
        "    print(i, flush=True)\n"
        "print('survived')\n"
    )
    run = await net.run_job(python_job(code, execution_s=60))
    res = assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_OUT_OF_MEMORY, S.STAGE_EXECUTION)
    assert f"{MEMORY_LIMIT_MB} MiB" in res.detail
    assert b"survived" not in res.stdout.data


HARDENING_PROBE = """
import json, os, shutil, subprocess
out = {}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out["cap_eff"] = status["CapEff"].strip()
out["cap_bnd"] = status["CapBnd"].strip()
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["env"] = os.environ.get("HORDE_TEST_VALUE")
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
out["write_volume"] = attempt(lambda: open("/volume/new.txt", "w").write("x"))
out["read_volume"] = open("/volume/in.txt").read()
out["write_tmp"] = attempt(lambda: open("/tmp/t.txt", "w").write("x"))
def exec_tmp():
    shutil.copy("/bin/true", "/tmp/true")
    os.chmod("/tmp/true", 0o755)
    subprocess.run(["/tmp/true"], check=True)
out["exec_tmp"] = attempt(exec_tmp)
out["write_output"] = attempt(lambda: open("/output/o.txt", "w").write("o"))
out["mknod"] = attempt(lambda: os.mknod("/tmp/dev", 0o600 | 0o020000, os.makedev(1, 3)))
print(json.dumps(out))
"""


async def test_sandbox_hardening(net: Network) -> None:
    data = b"read me"
    spec = spec_for(BASE_IMAGE, ["python3", "-c", HARDENING_PROBE])
    spec.env["HORDE_TEST_VALUE"] = "passed through"
    spec.inputs.append(
        job_pb2.InputVolume(
            inline_file=job_pb2.InlineFile(file_name="in.txt", size_bytes=len(data))
        )
    )
    run = await net.run_job(spec, {0: data})
    assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
    got = json.loads(run.result.stdout.data)
    assert got["cap_eff"] == "0000000000000000", got
    assert got["cap_bnd"] == "0000000000000000", got
    assert got["no_new_privs"] == "1", got
    assert got["env"] == "passed through"
    assert got["read_volume"] == "read me"
    assert got["write_volume"] == "OSError: Read-only file system", got
    assert got["write_tmp"] == "ok"
    assert got["exec_tmp"] == "PermissionError: Permission denied", got  # /tmp is noexec
    assert got["write_output"] == "ok"
    assert got["mknod"].startswith("PermissionError"), got
    assert run.files() == {"o.txt": b"o"}


@pytest.mark.parametrize(
    "size",
    [OUTPUT_LIMIT_MB * 2**20 + 512 * 1024, 4 * OUTPUT_LIMIT_MB * 2**20],
    ids=["just_over_the_cap", "fills_the_volume"],
)
async def test_output_too_large(net: Network, size: int) -> None:
    code = (
        "with open('/output/big.bin', 'wb') as fh:\n"
        f"    for _ in range({size} // 65536):\n"
        "        fh.write(b'x' * 65536)\n"
    )
    run = await net.run_job(python_job(code))
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_OUTPUT_TOO_LARGE, S.STAGE_OUTPUT_UPLOAD
    )
    assert f"{OUTPUT_LIMIT_MB} MiB" in res.detail
    assert run.chunks == [] and list(res.outputs) == []


LOUD = "import sys; sys.stdout.write('H' + 'o' * 199_998 + 'T'); sys.stderr.write('e' * 300_000)"


async def test_large_logs_are_capped_head_and_tail(net: Network) -> None:
    run = await net.run_job(python_job(LOUD))
    res = run.result
    assert res is not None and res.state == S.JOB_STATE_COMPLETED, run.describe()
    out = res.stdout
    assert out.truncated and res.stderr.truncated
    assert out.data.startswith(b"Hooo") and out.data.endswith(b"oooT")
    assert b"bytes omitted" in out.data
    assert len(out.data) < 70_000 and len(res.stderr.data) < 70_000


async def test_capped_logs_report_full_stream_size(net: Network) -> None:
    run = await net.run_job(python_job(LOUD))
    res = run.result
    assert res is not None and res.state == S.JOB_STATE_COMPLETED, run.describe()
    assert res.stdout.total_bytes == 200_000
    assert res.stderr.total_bytes == 300_000


def _tar(add: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        assert callable(add)
        add(tar)
    return buf.getvalue()


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


UNSAFE_ARCHIVES = {
    "dotdot_member": lambda t: (_file(t, "ok.txt"), _file(t, "../escape.txt")),
    "absolute_member": lambda t: _file(t, "/etc/escape.txt"),
    "symlink_out_absolute": lambda t: _link(t, "passwd", "/etc/passwd"),
    "symlink_out_relative": lambda t: _link(t, "up", "../../../../etc"),
    "hardlink_out": lambda t: _link(t, "shadow", "/etc/shadow", tarfile.LNKTYPE),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ARCHIVES))
async def test_unsafe_archive_fails_before_any_container(net: Network, case: str) -> None:
    data = _tar(UNSAFE_ARCHIVES[case])
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                inline_archive=job_pb2.InlineArchive(size_bytes=len(data), sha256=sha256(data))
            )
        ],
    )
    run = await net.run_job(spec, {0: data})
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_INVALID_INPUT, S.STAGE_VOLUME_DOWNLOAD
    )
    assert res.detail.startswith("input 0:"), res.detail
    assert S.JOB_STATE_RUNNING not in run.states
    assert S.JOB_STATE_VOLUMES_READY not in run.states
    assert not res.HasField("exit_code")
    # Nothing escaped into the executor's work dir (or beyond it).
    work = net.root / "executor-work"
    assert not any(p.name in ("escape.txt", "passwd", "up", "shadow") for p in work.rglob("*"))
    assert not (net.root / "escape.txt").exists()


async def test_image_not_on_validator_allow_list_is_rejected(net: Network) -> None:
    run = await net.run_job(spec_for("horde/not-allowed:latest", ["true"]))
    res = assert_result(
        run, S.JOB_STATE_REJECTED, S.FAILURE_REASON_IMAGE_NOT_ALLOWED, S.STAGE_ACCEPT
    )
    assert "horde/not-allowed:latest" in res.detail
    assert run.events == []  # rejected at the door: no lifecycle at all
    record = (
        await net.client().GetJob(validator_pb2.GetJobRequest(job_uuid=res.job_uuid), timeout=10)
    ).job
    assert record.state == S.JOB_STATE_REJECTED


@pytest.mark.parametrize("validator_only_images", [["horde/validator-only:latest"]])
async def test_image_not_on_executor_allow_list_is_rejected(net: Network) -> None:
    run = await net.run_job(spec_for("horde/validator-only:latest", ["true"]))
    res = assert_result(run, S.JOB_STATE_REJECTED, S.FAILURE_REASON_IMAGE_NOT_ALLOWED)
    assert "executor" in res.detail
    assert S.JOB_STATE_RUNNING not in run.states


@pytest.mark.parametrize("extra_images", [[MISSING_IMAGE]])
async def test_allowed_but_missing_image_is_image_not_found(net: Network) -> None:
    run = await net.run_job(spec_for(MISSING_IMAGE, ["true"]))
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_IMAGE_NOT_FOUND, S.STAGE_IMAGE_PULL
    )
    assert MISSING_IMAGE in res.detail
    assert S.JOB_STATE_EXECUTOR_READY not in run.states
    assert S.JOB_STATE_RUNNING not in run.states


# ----------------------------------------------------------------------------- the network's faults


async def spawn_service(service: str, config: Path, log_path: Path) -> asyncio.subprocess.Process:
    """`horde SERVICE serve --config FILE` as a child process, logging (JSON lines) to a file."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            str(HORDE_BIN),
            service,
            "serve",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


async def spawn_executor(net: Network, config: Path, log_path: Path) -> asyncio.subprocess.Process:
    """`horde executor serve --config FILE` as a child process, logging to a file."""
    return await spawn_service("executor", config, log_path)


def log_events(log_path: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == name:
                out.append(doc)
    return out


async def stop_process(proc: asyncio.subprocess.Process, sig: int | None = signal.SIGTERM) -> int:
    """Signal the process (unless ``sig`` is None: it was already told) and wait for its exit."""
    if proc.returncode is None and sig is not None:
        proc.send_signal(sig)
    try:
        async with asyncio.timeout(20):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        return await proc.wait()


async def test_a_job_directory_that_cannot_be_made_fails_the_job_at_once(
    bare_net: Network,
) -> None:
    """work_dir unusable (here a file where the directory was; a full disk or a read-only
    mount alike): the job ends horde_failed at once, saying why, instead of hanging until the
    validator's deadline with the executor held busy; the executor takes the next job."""
    net = bare_net
    work_dir = net.root / "broken-work"
    await net.start_executor(work_dir=work_dir)
    shutil.rmtree(work_dir)
    work_dir.write_text("not a directory")
    started = time.monotonic()
    run = await net.run_job(spec_for(BASE_IMAGE, ["true"]), within=30)
    res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_INTERNAL_ERROR)
    assert f"cannot create the job's directory in {work_dir}: Not a directory" in res.detail
    assert time.monotonic() - started < 20
    work_dir.unlink()
    work_dir.mkdir()
    after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert after.result is not None and after.result.state == S.JOB_STATE_COMPLETED, (
        after.describe()
    )


async def test_two_executors_with_one_key_are_told_why_they_lose_their_link(
    bare_net: Network,
) -> None:
    """A misconfiguration (one key, two executors): each new link replaces the other; the
    replaced executor's log says so (ABORTED: replaced by a newer link ...), not just that the
    miner closed the link."""
    net = bare_net
    log_path = net.root / "twin.log"
    proc = await spawn_executor(net, net.executor_config("executor"), log_path)
    try:
        await net.wait_executors(1, within=60)
        # The same key, another work_dir (one executor per work_dir), in process: replaces
        # the twin's link.
        await net.start_executor(work_dir=net.root / "twin-work")

        def replaced() -> bool:
            return any(
                "replaced by a newer link with this executor's key" in str(e.get("reason"))
                for e in log_events(log_path, "link_down")
            )

        await wait_for(replaced, 30, "the twin to log why its link ended")
        (event, *_) = [e for e in log_events(log_path, "link_down") if "replaced" in str(e)]
        assert str(event["reason"]).startswith("ABORTED: "), event
    finally:
        await stop_process(proc, signal.SIGKILL)


async def test_an_executor_allow_list_entry_without_a_tag_means_latest(
    bare_net: Network,
) -> None:
    net = bare_net
    await net.start_executor(allowed_images=[BASE_IMAGE.removesuffix(":latest")])
    run = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()


async def test_executor_killed_mid_job(bare_net: Network) -> None:
    net = bare_net
    config = net.executor_config("executor2")
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120))
        running = await job.wait_state(S.JOB_STATE_RUNNING)
        job_uuid = running.job_uuid
        # The RUNNING event precedes the container's creation: wait for the container itself.
        await wait_job_container_running(net.docker, job_uuid)

        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        run = await job.finished(within=20)
        took = time.monotonic() - killed_at
        res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
        assert took < 20, f"executor loss took {took:.1f}s to report"
        assert res.miner_hotkey == net.keys.identity("miner")
        record = (await net.client().GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
        assert record.state == S.JOB_STATE_HORDE_FAILED
    finally:
        code = await stop_process(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL, log_path.read_text()[-3000:]

    # Nobody was left to remove the job's objects: the job container (still running `sleep`),
    # the output holder and the output volume are orphaned...
    orphans = await job_objects(net.docker, [job_uuid])
    assert len(orphans) == 3, orphans
    # ...until the executor restarts: its start-up sweep removes them before it dials the miner.
    proc = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        assert await job_objects(net.docker, [job_uuid]) == []
        swept = log_events(log_path, "swept_leftovers")
        assert [doc.get("count") for doc in swept] == [3], swept
        # And the restarted executor serves jobs.
        after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
        assert after.result is not None, after.describe()
        assert after.result.state == S.JOB_STATE_COMPLETED, after.describe()
    finally:
        code = await stop_process(proc)
    assert code == 0, log_path.read_text()[-3000:]


# A miner drains on stop (up to drain_timeout_s): this job outlasts a short drain.
@pytest.mark.usefixtures("quick_miner_drain")
async def test_miner_restarted_mid_job(net: Network) -> None:
    job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120))
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    job_uuid = running.job_uuid
    await wait_job_container_running(net.docker, job_uuid)

    stopped_at = time.monotonic()
    await net.stop_miner()
    run = await job.finished(within=30)
    took = time.monotonic() - stopped_at
    res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_MINER_UNREACHABLE)
    assert res.stage == S.STAGE_EXECUTION, run.describe()
    assert took < 20, f"losing the miner took {took:.1f}s to report"
    # The executor lost its link and stopped the job: its container is removed.
    await wait_no_job_objects(net.docker, [job_uuid], within=30)
    assert net.agent is not None
    await wait_for(lambda: not net.agent.connected.is_set(), 10, "the executor to see the loss")

    # The miner comes back on the same address; the executor reconnects and jobs run again.
    await net.start_miner()
    await net.wait_executors(1, within=30)
    after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert after.result is not None, after.describe()
    assert after.result.state == S.JOB_STATE_COMPLETED, after.describe()


async def test_hung_executor_is_lost_and_recovers(bare_net: Network) -> None:
    """An executor that stops heartbeating (SIGSTOP: its TCP link stays open) is declared lost
    after the miner's executor timeout; once it resumes it drops the job and serves again."""
    net = bare_net
    config = net.executor_config("executor2")
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    try:
        await net.wait_executors(1, within=60)
        job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120))
        running = await job.wait_state(S.JOB_STATE_RUNNING)
        job_uuid = running.job_uuid
        await wait_job_container_running(net.docker, job_uuid)

        proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            run = await job.finished(within=EXECUTOR_TIMEOUT_S + 15)
        finally:
            proc.send_signal(signal.SIGCONT)
        took = time.monotonic() - stopped_at
        res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
        assert "no heartbeat" in res.detail, res.detail
        assert EXECUTOR_TIMEOUT_S - 1 <= took < EXECUTOR_TIMEOUT_S + 10, took

        # Resumed, the executor finds its link closed: it abandons the job (container removed)
        # and dials in again.
        async def container_gone() -> bool:
            return not await job_containers(net.docker, job_uuid)

        await wait_for(container_gone, 30, "the abandoned job's container to go")
        await net.wait_executors(1, within=30)
        after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
        assert after.result is not None, after.describe()
        assert after.result.state == S.JOB_STATE_COMPLETED, after.describe()
    finally:
        code = await stop_process(proc)
    assert code == 0, log_path.read_text()[-3000:]


async def test_validator_killed_mid_job(bare_net: Network) -> None:
    """The validator keeps the clock. Killed mid-job: the miner sees its stream break and stops
    the job on the executor; restarted, the validator ends the orphaned job as horde_failed."""
    net = bare_net
    await net.start_executor()
    state_dir = net.root / "validator-sub"
    config = net.validator_config(state_dir)
    log_path = net.root / "validator-sub.log"

    async def spawn() -> tuple[asyncio.subprocess.Process, validator_pb2_grpc.ValidatorServiceStub]:
        with log_path.open("ab") as log:
            start = len(log_events(log_path, "service_started")) if log_path.exists() else 0
            proc = await asyncio.create_subprocess_exec(
                str(HORDE_BIN),
                "validator",
                "serve",
                "--config",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def started() -> dict[str, object] | None:
            events = log_events(log_path, "service_started")
            return events[start] if len(events) > start else None

        doc = await wait_for(started, 60, "the validator to start")
        channel = net.channel(
            f"127.0.0.1:{doc['port']}", net.keys.signers["client"], net.keys.identity("validator")
        )
        return proc, validator_pb2_grpc.ValidatorServiceStub(channel)

    proc, stub = await spawn()
    try:
        job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120), stub=stub)
        running = await job.wait_state(S.JOB_STATE_RUNNING)
        job_uuid = running.job_uuid
        await wait_job_container_running(net.docker, job_uuid)

        proc.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await job.finished(within=20)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_process(proc, signal.SIGKILL)

    # The miner stopped the job the validator no longer follows: its container goes away.
    async def container_gone() -> bool:
        return not await job_containers(net.docker, job_uuid)

    await wait_for(container_gone, 20, "the orphaned job's container to be removed")

    proc, stub = await spawn()
    try:
        record = (await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
        assert record.state == S.JOB_STATE_HORDE_FAILED
        assert record.result.reason == S.FAILURE_REASON_VALIDATOR_RESTARTED
        # The executor is free again and the restarted validator routes jobs to it.
        after = await net.start_job(spec_for(BASE_IMAGE, ["true"]), stub=stub).finished()
        assert after.result is not None, after.describe()
        assert after.result.state == S.JOB_STATE_COMPLETED, after.describe()
    finally:
        code = await stop_process(proc)
    assert code == 0, log_path.read_text()[-3000:]


async def test_unreachable_miner_fails_reservation_as_horde_failed(net: Network) -> None:
    """With the only miner down, the job waits out its reservation limit and then fails as the
    network's fault: not "rejected: no executor of that class", which would blame the client."""
    await net.stop_miner()
    spec = spec_for(BASE_IMAGE, ["true"])
    spec.timeouts.reservation_s = 2
    started = time.monotonic()
    run = await net.run_job(spec, within=30)
    took = time.monotonic() - started
    res = assert_result(
        run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_MINER_UNREACHABLE, S.STAGE_RESERVATION
    )
    assert "could not be reached" in res.detail
    assert 2 <= took < 15, took
    await net.start_miner()  # so the fixture's teardown finds the network whole


def assert_clean_exit(code: int | None, log_path: Path) -> None:
    """A service that exited 0 and logged no error, traceback or leaked task on the way."""
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    for bad in ("Traceback", "Task was destroyed", "Unclosed", "never awaited", '"error"'):
        assert bad not in log, log[-3000:]


async def _sigterm_mid_job(
    net: Network, proc: asyncio.subprocess.Process, spec: job_pb2.JobSpec
) -> tuple[JobCall, str]:
    """Start a job, and SIGTERM the executor process once the job's container runs."""
    job = net.start_job(spec)
    job_uuid = (await job.wait_state(S.JOB_STATE_RUNNING)).job_uuid
    await wait_job_container_running(net.docker, job_uuid)
    proc.send_signal(signal.SIGTERM)
    return job, job_uuid


async def test_executor_stopped_mid_job_lets_the_job_finish(bare_net: Network) -> None:
    """SIGTERM (an operator stopping the service) mid-job: the executor drains. The miner
    routes no new job to it, the running job completes and its result reaches the client, then
    the executor removes what is left and exits cleanly."""
    net = bare_net
    config = net.executor_config("executor2", drain_timeout_s=60)
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    signalled = False
    try:
        await net.wait_executors(1, within=60)
        job, job_uuid = await _sigterm_mid_job(
            net, proc, python_job("import time; time.sleep(4); print('finished')")
        )
        signalled = True
        stub = net.miner_stub()

        async def draining() -> bool:
            resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=3)
            return any(e.draining and e.busy for e in resp.manifest.executors)

        await wait_for(draining, 10, "the miner to list the executor as draining")
        # A job submitted now is not given to the draining executor.
        spec = spec_for(BASE_IMAGE, ["true"])
        spec.timeouts.reservation_s = 1
        refused = await net.run_job(spec, within=30)
        assert refused.result is not None, refused.describe()
        assert refused.result.state == S.JOB_STATE_REJECTED, refused.describe()
        assert S.JOB_STATE_RUNNING not in refused.states, refused.describe()

        run = await job.finished(within=30)
        assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
        assert run.result.stdout.data == b"finished\n", run.describe()
    finally:
        # Only one SIGTERM: a second one means "exit now" to a Horde service.
        code = await stop_process(proc, None if signalled else signal.SIGTERM)
    assert_clean_exit(code, log_path)
    assert [e["job_uuid"] for e in log_events(log_path, "drained")] == [job_uuid]
    assert await job_objects(net.docker, [job_uuid]) == []


async def test_executor_stopped_mid_job_past_its_drain_timeout(bare_net: Network) -> None:
    """SIGTERM mid-job, the job outlasting `drain_timeout_s`: the job ends as executor_lost, the
    executor removes the job's container on its way out and exits cleanly."""
    net = bare_net
    config = net.executor_config("executor2", drain_timeout_s=1)
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    signalled = False
    try:
        await net.wait_executors(1, within=60)
        job, job_uuid = await _sigterm_mid_job(
            net, proc, spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120)
        )
        signalled = True
        run = await job.finished(within=20)
        assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
    finally:
        code = await stop_process(proc, None if signalled else signal.SIGTERM)
    assert_clean_exit(code, log_path)
    assert [e["job_uuid"] for e in log_events(log_path, "drain_timed_out")] == [job_uuid]
    assert await job_objects(net.docker, [job_uuid]) == []
    # The executor stopped the job itself before sweeping its container: not "failed: exited
    # with status 137", which would be the job's own fault.
    [finished] = [e for e in log_events(log_path, "job_finished") if e["job_uuid"] == job_uuid]
    assert (finished["state"], finished["reason"]) == (
        "JOB_STATE_CANCELLED",
        "FAILURE_REASON_CANCELLED",
    ), finished
    [aborted] = [e for e in log_events(log_path, "job_aborted") if e["job_uuid"] == job_uuid]
    assert aborted["reason"] == "the executor is shutting down"


async def test_a_second_signal_cuts_an_executor_drain_short_and_still_cleans_up(
    bare_net: Network,
) -> None:
    """A second SIGTERM while the executor drains (a long drain_timeout_s): it stops at once,
    but still stops the job and removes its container before exiting 130; it used to exit on
    the spot and leave the container running until the next start-up sweep."""
    net = bare_net
    config = net.executor_config("executor2", drain_timeout_s=600)
    log_path = net.root / "executor2.log"
    proc = await spawn_executor(net, config, log_path)
    twice = False
    try:
        await net.wait_executors(1, within=60)
        job, job_uuid = await _sigterm_mid_job(
            net, proc, spec_for(BASE_IMAGE, ["sleep", "600"], execution_s=900)
        )
        await wait_for(lambda: log_events(log_path, "draining"), 10, "the executor to drain")
        proc.send_signal(signal.SIGTERM)
        twice = True
        code = await stop_process(proc, None)
        run = await job.finished(within=20)
        assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_EXECUTOR_LOST)
    finally:
        if not twice:
            await stop_process(proc, signal.SIGKILL)
    log = log_path.read_text()
    assert code == 130, log[-3000:]
    assert log_events(log_path, "second_signal_stopping_now"), log[-3000:]
    [aborted] = [e for e in log_events(log_path, "job_aborted") if e["job_uuid"] == job_uuid]
    assert aborted["reason"] == "the executor is shutting down"
    # Gone when the process is: nothing waits for a next start's sweep.
    assert await job_objects(net.docker, [job_uuid]) == []
    assert log_events(log_path, "shutdown_complete")[-1]["hurried"] is True


async def test_job_waits_for_executors_reconnecting_after_a_miner_restart(net: Network) -> None:
    """A class the miner offered moments ago is not rejected while its executors reconnect:
    the job waits (within its reservation limit) and runs once they are back."""
    first = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert first.result is not None and first.result.state == S.JOB_STATE_COMPLETED
    await net.stop_executor()
    await net.stop_miner()
    await net.start_miner()  # back up with no executor linked
    spec = spec_for(BASE_IMAGE, ["true"])
    spec.timeouts.reservation_s = 60
    job = net.start_job(spec)
    await job.wait_state(S.JOB_STATE_ACCEPTED)
    await net.start_executor()
    run = await job.finished(within=90)
    assert run.result is not None, run.describe()
    assert run.result.state == S.JOB_STATE_COMPLETED, run.describe()


async def test_inline_outputs_over_the_clients_cap_fail_before_any_byte_is_sent(
    net: Network,
) -> None:
    spec = python_job("open('/output/big.bin', 'wb').write(b'x' * 4096)")
    spec.output.stream.max_bytes = 1000
    run = await net.run_job(spec)
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_OUTPUT_TOO_LARGE, S.STAGE_OUTPUT_UPLOAD
    )
    assert "4096 bytes, over the 1000-byte cap" in res.detail
    assert run.files() == {}  # no truncated file reached the client


async def test_executor_health_follows_its_miner_link(net: Network) -> None:
    """SERVING only while the executor can take jobs: its link to the miner is up."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from horde_services.core.server import open_channel

    assert net.executor is not None
    async with open_channel(f"127.0.0.1:{net.executor.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await net.stop_miner()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await net.start_miner()  # same port: the executor reconnects
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


# ------------------------------------------------------------------------ the miner's drain


@pytest.fixture
def quick_miner_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's in-process miners drain for at most 1 s (a job outlasting that ends as
    miner_unreachable); requested before the network, so its miner reads it at start."""
    monkeypatch.setenv("HORDE_MINER_DRAIN_TIMEOUT_S", "1")


async def spawn_miner(
    net: Network, log_path: Path, **overrides: object
) -> asyncio.subprocess.Process:
    """`horde miner serve --config FILE` as a child process in place of the network's in-process
    miner: the same key, port and roster entry (the in-process one must be stopped first)."""
    assert net.miner is None, "stop the in-process miner first"
    state_dir = net.root / "miner-sub"
    state_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "listen": net.miner_address,
        "key_file": str(net.keys.paths["miner"]),
        "state_dir": str(state_dir),
        "roster_file": str(net.roster),
        "shutdown_grace_s": 1.0,
        "executors": [net.keys.identity("executor"), net.keys.identity("executor2")],
        "heartbeat_interval_s": HEARTBEAT_S,
        "executor_timeout_s": EXECUTOR_TIMEOUT_S,
        **overrides,
    }
    config = net.root / "miner-sub.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    before = len(log_events(log_path, "service_started")) if log_path.exists() else 0
    proc = await spawn_service("miner", config, log_path)

    def started() -> bool:
        assert proc.returncode is None, log_path.read_text()[-3000:]
        return len(log_events(log_path, "service_started")) > before

    await wait_for(started, 60, "the miner to start")
    return proc


async def _miner_subprocess_with_executor(
    net: Network, log_path: Path, **overrides: object
) -> asyncio.subprocess.Process:
    """The network's miner replaced by a child process, the in-process executor linked to it."""
    await net.stop_miner()
    proc = await spawn_miner(net, log_path, **overrides)
    await net.start_executor()
    await net.wait_executors(1)
    return proc


async def _miner_health(net: Network) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from horde_services.core.server import open_channel

    async with open_channel(net.miner_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


async def test_miner_stopped_mid_job_lets_the_job_finish(bare_net: Network) -> None:
    """SIGTERM to the miner (an operator restarting it) mid-job: the miner drains. Its health
    says NOT_SERVING, its manifest lists every executor as draining so the validator routes
    nothing new to it (a RunJob that comes anyway is refused as busy), the running job
    completes and its result reaches the client, then the miner exits cleanly."""
    from grpc_health.v1 import health_pb2

    net = bare_net
    log_path = net.root / "miner-sub.log"
    proc = await _miner_subprocess_with_executor(net, log_path, drain_timeout_s=60)
    signalled = False
    try:
        assert await _miner_health(net) == health_pb2.HealthCheckResponse.SERVING
        job, job_uuid = await _sigterm_mid_job(
            net, proc, python_job("import time; time.sleep(6); print('finished')")
        )
        signalled = True
        stub = net.miner_stub()

        async def draining() -> bool:
            resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=3)
            executors = resp.manifest.executors
            return bool(executors) and all(e.draining for e in executors)

        await wait_for(draining, 10, "the miner to list its executors as draining")
        resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=3)
        assert [e.busy for e in resp.manifest.executors] == [True]
        assert await _miner_health(net) == health_pb2.HealthCheckResponse.NOT_SERVING

        # A RunJob that reaches the draining miner anyway is refused as busy (the validator
        # then tries another miner).
        start = miner_pb2.RunJobStart(
            job_uuid=str(uuid.uuid4()), spec=spec_for(BASE_IMAGE, ["true"])
        )
        replies = [
            m async for m in stub.RunJob(iter([miner_pb2.RunJobRequest(start=start)]), timeout=10)
        ]
        assert [m.WhichOneof("payload") for m in replies] == ["result"], replies
        refusal = replies[0].result
        assert (refusal.state, refusal.reason) == (S.JOB_STATE_REJECTED, S.FAILURE_REASON_BUSY)
        assert "shutting down" in refusal.detail, refusal.detail

        # A job submitted to the validator now is not given to the draining miner.
        spec = spec_for(BASE_IMAGE, ["true"])
        spec.timeouts.reservation_s = 1
        refused = await net.run_job(spec, within=30)
        assert refused.result is not None, refused.describe()
        assert refused.result.state == S.JOB_STATE_REJECTED, refused.describe()
        assert S.JOB_STATE_RUNNING not in refused.states, refused.describe()

        run = await job.finished(within=30)
        assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
        assert run.result.stdout.data == b"finished\n", run.describe()
        assert run.result.miner_hotkey == net.keys.identity("miner")
    finally:
        # Only one SIGTERM: a second one means "exit now" to a Horde service.
        code = await stop_process(proc, None if signalled else signal.SIGTERM)
    assert_clean_exit(code, log_path)
    assert [e["job_uuids"] for e in log_events(log_path, "drained")] == [[job_uuid]]
    assert log_events(log_path, "drain_timed_out") == []
    record = (await net.client().GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
    assert record.state == S.JOB_STATE_COMPLETED
    # The executor stays up, its link to the stopped miner down; the job left nothing behind.
    assert net.agent is not None
    await wait_for(lambda: not net.agent.connected.is_set(), 10, "the executor to see the loss")
    assert await job_objects(net.docker, [job_uuid]) == []


async def test_miner_stopped_mid_job_past_its_drain_timeout(bare_net: Network) -> None:
    """SIGTERM to the miner mid-job, the job outlasting the miner's `drain_timeout_s`: the job
    ends as before there was a drain (horde_failed, miner_unreachable), the executor stops it
    and removes its container, and the miner exits cleanly."""
    net = bare_net
    log_path = net.root / "miner-sub.log"
    proc = await _miner_subprocess_with_executor(net, log_path, drain_timeout_s=1)
    signalled = False
    try:
        job, job_uuid = await _sigterm_mid_job(
            net, proc, spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120)
        )
        signalled = True
        run = await job.finished(within=20)
        res = assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_MINER_UNREACHABLE)
        assert res.stage == S.STAGE_EXECUTION, run.describe()
    finally:
        code = await stop_process(proc, None if signalled else signal.SIGTERM)
    assert_clean_exit(code, log_path)
    assert [e["job_uuids"] for e in log_events(log_path, "drain_timed_out")] == [[job_uuid]]
    assert log_events(log_path, "drained") == []
    await wait_no_job_objects(net.docker, [job_uuid], within=30)


async def test_a_second_signal_stops_a_draining_miner_at_once(bare_net: Network) -> None:
    """While the miner drains (a long drain_timeout_s), a second SIGTERM stops it at once (exit
    130, its clean-up done); the job ends miner_unreachable and the executor removes its
    container."""
    net = bare_net
    log_path = net.root / "miner-sub.log"
    proc = await _miner_subprocess_with_executor(net, log_path, drain_timeout_s=600)
    twice = False
    try:
        job, job_uuid = await _sigterm_mid_job(
            net, proc, spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120)
        )
        await wait_for(lambda: log_events(log_path, "draining"), 10, "the miner to drain")
        proc.send_signal(signal.SIGTERM)
        twice = True
        run = await job.finished(within=20)
        assert_result(run, S.JOB_STATE_HORDE_FAILED, S.FAILURE_REASON_MINER_UNREACHABLE)
    finally:
        code = await stop_process(proc, None if twice else signal.SIGKILL)
    assert code == 130, log_path.read_text()[-3000:]
    assert log_events(log_path, "second_signal_stopping_now"), log_path.read_text()[-3000:]
    await wait_no_job_objects(net.docker, [job_uuid], within=30)


async def test_an_executor_the_miner_refuses_leaves_no_link_task_behind(bare_net: Network) -> None:
    """A refused link (the key is not enrolled) is retried with backoff; each failed attempt's
    request stream ends with it, so gRPC's task feeding that stream ends too. They were left
    waiting, and reported "Task was destroyed but it is pending" when collected. (The garbage
    collector is off meanwhile, so a task left behind stays to be seen.)"""
    net = bare_net
    settings = load_settings(ExecutorSettings, **net.executor_settings())
    app, agent = await start_executor(settings, Ed25519Signer.generate())
    refused: list[str] = []
    session = agent._session

    async def counted_session() -> None:
        try:
            await session()
        except grpc.aio.AioRpcError as exc:
            refused.append(f"{exc.code().name}: {exc.details()}")
            raise

    agent._session = counted_session  # type: ignore[method-assign]

    def feeders() -> list[asyncio.Task[object]]:
        return [
            t
            for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").endswith("_consume_request_iterator")
            and not t.done()
        ]

    gc.disable()
    try:
        app.start_background()
        await wait_for(lambda: len(refused) >= 3, 30, "three refused link attempts")
        assert all("is not an enrolled executor" in r for r in refused), refused
        assert len(feeders()) <= 1  # the attempt under way, if any
    finally:
        gc.enable()
        await app.stop(1.0)
    assert not feeders()
