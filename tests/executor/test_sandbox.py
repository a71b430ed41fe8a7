"""The Docker sandbox against a real Docker engine and the horde/base image."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from horde_services.executor.sandbox import (
    INSTANCE_LABEL,
    JOB_LABEL,
    LABEL,
    ROLE_LABEL,
    CappedBuffer,
    ContainerRun,
    DockerRuntime,
    ImageError,
    ImageNotAllowedError,
    SandboxError,
    SandboxLimits,
    build_job_config,
    normalise_image_ref,
    output_volume_bytes,
)

pytestmark = pytest.mark.timeout(120)

BASE = "horde/base:latest"
MiB = 1 << 20


def py(script: str) -> list[str]:
    return ["python3", "-c", script]


@contextlib.asynccontextmanager
async def docker_events(
    docker: aiodocker.Docker, filters: dict[str, list[str]]
) -> AsyncIterator[aiohttp.StreamReader]:
    """Subscribe to Docker events first, then act: nothing can happen before we listen."""
    async with docker._query(
        "events",
        params={"filters": json.dumps(filters)},
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
    ) as response:
        try:
            yield response.content
        finally:
            response.close()


# --------------------------------------------------------------------------- pure units


@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(min_value=2, max_value=400))
def test_capped_buffer_keeps_head_and_tail(chunks: list[bytes], cap: int) -> None:
    buf = CappedBuffer(cap)
    for chunk in chunks:
        buf.feed(chunk)
    data = b"".join(chunks)
    value = buf.getvalue()
    assert buf.total == len(data)
    if len(data) <= cap:
        assert not buf.truncated
        assert value == data
    else:
        assert buf.truncated
        head, tail = cap // 2, cap - cap // 2
        assert value.startswith(data[:head])
        assert value.endswith(data[-tail:])
        assert b"bytes omitted" in value
        assert len(value) < cap + 64


def test_job_config_is_locked_down(tmp_path: Path) -> None:
    run = ContainerRun(
        job_uuid="u1",
        image="horde/base",
        command=["true"],
        env={"A": "1"},
        volume_dir=tmp_path,
        limits=SandboxLimits(memory_bytes=64 * MiB, pids_limit=16),
    )
    config = build_job_config(run, "sha256:abc", "vol")
    host = config["HostConfig"]
    assert config["Labels"][LABEL] == "1" and config["Labels"][JOB_LABEL] == "u1"
    assert host["NetworkMode"] == "none" and config["NetworkDisabled"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Memory"] == host["MemorySwap"] == 64 * MiB
    assert host["PidsLimit"] == 16
    assert "noexec" in host["Tmpfs"]["/tmp"]
    volume_mount, output_mount = host["Mounts"]
    assert volume_mount["Target"] == "/volume" and volume_mount["ReadOnly"] is True
    assert output_mount["Target"] == "/output" and output_mount["Source"] == "vol"
    assert "DeviceRequests" not in host


@pytest.mark.parametrize(
    ("gpus", "ids", "expected"),
    [
        (1, (), {"Count": 1}),
        (-1, (), {"Count": -1}),
        (0, ("GPU-123",), {"Count": 0, "DeviceIDs": ["GPU-123"]}),
    ],
)
def test_gpu_device_requests(gpus: int, ids: tuple[str, ...], expected: dict[str, Any]) -> None:
    run = ContainerRun(job_uuid="u", image="x", gpus=gpus, gpu_device_ids=ids)
    (request,) = build_job_config(run, "sha256:abc", "vol")["HostConfig"]["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]]
    for key, value in expected.items():
        assert request[key] == value


def test_normalise_image_ref() -> None:
    assert normalise_image_ref("horde/base") == "horde/base:latest"
    assert normalise_image_ref("host:5000/a/b") == "host:5000/a/b:latest"
    assert normalise_image_ref("a/b:1") == "a/b:1"
    assert normalise_image_ref("a@sha256:00") == "a@sha256:00"


# --------------------------------------------------------------------------- real Docker


async def test_happy_path_reads_input_and_extracts_outputs(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "a.txt").write_text("hello ")
    (inputs / "sub" / "b.txt").write_text("world")
    out = tmp_path / "out"
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(), image="horde/demo-job", volume_dir=inputs, timeout_s=60
        ),
        out,
    )
    assert result.succeeded, result
    assert result.exit_code == 0 and result.start_error is None
    assert b"summarised 2 file(s), 11 bytes" in result.stdout
    assert sorted(result.output_files) == ["summary.json", "upper.txt"]
    assert (out / "upper.txt").read_text() == "HELLO WORLD"
    summary = json.loads((out / "summary.json").read_text())
    assert [f["name"] for f in summary["files"]] == ["a.txt", "sub/b.txt"]
    assert result.image_id == await runtime.image_digest("horde/demo-job")
    assert result.image_id.startswith("sha256:")


async def test_nested_outputs_and_env(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    script = (
        "import os; os.makedirs('/output/d/e'); "
        "open('/output/d/e/f.txt','w').write(os.environ['GREETING'])"
    )
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(script),
            env={"GREETING": "hi"},
            timeout_s=60,
        ),
        tmp_path / "out",
    )
    assert result.succeeded, result
    assert result.output_files == ("d/e/f.txt",)
    assert (tmp_path / "out" / "d" / "e" / "f.txt").read_text() == "hi"


async def test_nonzero_exit_reports_stderr(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=["sh", "-c", "echo to-out; echo boom >&2; exit 3"],
            timeout_s=60,
        ),
        tmp_path / "out",
    )
    assert result.exit_code == 3
    assert not result.succeeded and not result.timed_out and not result.oom_killed
    assert result.stdout == b"to-out\n"
    assert result.stderr == b"boom\n"


# The job forks a child that forks a grandchild and exits at once: the grandchild, orphaned,
# is re-parented to PID 1. Once it has exited (its end of a pipe closes) the job watches it in
# /proc: PID 1 reaping it makes it disappear; a PID 1 that does not (the job's own command)
# leaves a zombie ("Z").
ORPHAN_JOB = """
import os, time
r, w = os.pipe()
child = os.fork()
if child == 0:
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
    os._exit(0)
os.close(w)
os.waitpid(child, 0)
data = b""
while chunk := os.read(r, 64):
    data += chunk
grandchild = int(data)
state, deadline = "?", time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
        break
    if state == "Z" and os.getpid() == 1:
        break  # we are PID 1 and do not reap: it stays a zombie
    time.sleep(0.01)
print(os.getpid(), state)
raise SystemExit(3)
"""


@pytest.mark.parametrize("init", [True, False])
async def test_the_engines_init_runs_as_pid_1_and_reaps_orphans(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path, init: bool
) -> None:
    """With job_init (the executor's default) the job's command is not PID 1: docker-init is,
    and it reaps the job's orphans; the job's exit status comes through unchanged."""
    runtime.job_init = init
    result = await runtime.run(
        ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=["python3", "-c", ORPHAN_JOB]),
        tmp_path / "out",
    )
    assert result.exit_code == 3, result.stderr
    pid, state = result.stdout.split()
    if init:
        assert pid != b"1" and state == b"gone", result.stdout
    else:
        assert pid == b"1" and state == b"Z", result.stdout


async def test_command_that_cannot_start(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    result = await runtime.run(
        ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=["/no/such/binary"]),
        tmp_path / "out",
    )
    # What a shell would say: 127, and the reason without the engine's runc preamble.
    assert result.exit_code == 127
    error = result.start_error or ""
    assert error.startswith('exec: "/no/such/binary": ') and "no such file" in error, error
    assert "runc" not in error and "shim" not in error, error


async def test_command_that_is_not_executable(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    result = await runtime.run(
        ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=["/etc"]),
        tmp_path / "out",
    )
    assert result.exit_code == 126
    assert (result.start_error or "").startswith('exec: "/etc": permission denied')


async def test_timeout_kills_and_removes_container(
    runtime: DockerRuntime,
    new_job_uuid: Callable[[], str],
    find_leftovers: Callable[[list[str]], Awaitable[list[str]]],
    docker_client: aiodocker.Docker,
    tmp_path: Path,
) -> None:
    job_uuid = new_job_uuid()
    result = await runtime.run(
        ContainerRun(job_uuid=job_uuid, image=BASE, command=["sleep", "300"], timeout_s=1.0),
        tmp_path / "out",
    )
    assert result.timed_out and not result.succeeded
    assert 1.0 <= result.duration_s < 30
    assert await find_leftovers([job_uuid]) == []


def _host_ipv4_addresses() -> set[str]:
    addresses: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addresses.add(str(info[4][0]))
    except OSError:
        pass
    # The address of the default route (no packet is sent by connecting a UDP socket).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    return {a for a in addresses if not a.startswith("127.")}


NETWORK_PROBE = """
import json, socket, sys, os
results = {}
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=3).close()
        results[f"{host}:{port}"] = 0
    except OSError as exc:
        results[f"{host}:{port}"] = exc.errno if exc.errno is not None else -1
print(json.dumps({"results": results, "interfaces": sorted(os.listdir("/sys/class/net"))}))
"""


async def test_no_network_at_all(
    runtime: DockerRuntime,
    new_job_uuid: Callable[[], str],
    docker_client: aiodocker.Docker,
    tmp_path: Path,
) -> None:
    accepted: list[object] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(on_connect, host="0.0.0.0", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        bridge = await docker_client._query_json("networks/bridge")
        gateways = {c["Gateway"] for c in bridge["IPAM"]["Config"] if c.get("Gateway")}
        local_targets = [("127.0.0.1", port)] + [
            (ip, port) for ip in sorted(gateways | _host_ipv4_addresses())
        ]
        external_targets = [("1.1.1.1", 443), ("8.8.8.8", 53), ("9.9.9.9", 80)]
        result = await runtime.run(
            ContainerRun(
                job_uuid=new_job_uuid(),
                image=BASE,
                command=[*py(NETWORK_PROBE), json.dumps(local_targets + external_targets)],
                timeout_s=60,
            ),
            tmp_path / "out",
        )
    finally:
        server.close()
        await server.wait_closed()
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert report["interfaces"] == ["lo"]
    results = report["results"]
    # Its own loopback: nothing listens there, and the host's loopback is not reachable.
    assert results[f"127.0.0.1:{port}"] == errno.ECONNREFUSED
    # Everything else: no route at all (not merely filtered).
    for host, target_port in local_targets[1:] + external_targets:
        assert results[f"{host}:{target_port}"] == errno.ENETUNREACH, (host, results)
    assert accepted == []
    assert len(local_targets) >= 2  # at least the bridge gateway was tried


SANDBOX_PROBE = """
import json, os, subprocess
report = {}
def attempt(name, fn):
    try:
        fn()
        report[name] = "ok"
    except OSError as exc:
        report[name] = exc.errno
attempt("root", lambda: open("/horde-test", "w"))
attempt("etc", lambda: open("/etc/horde-test", "w"))
attempt("volume", lambda: open("/volume/new", "w"))
attempt("volume_existing", lambda: open("/volume/in.txt", "a"))
attempt("tmp", lambda: open("/tmp/t.sh", "w").write("#!/bin/sh\\necho hi\\n"))
os.chmod("/tmp/t.sh", 0o755)
attempt("tmp_exec", lambda: subprocess.run(["/tmp/t.sh"], check=True))
attempt("output", lambda: open("/output/ok.txt", "w").write("ok"))
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report["CapEff"] = status["CapEff"].strip()
report["CapBnd"] = status["CapBnd"].strip()
report["NoNewPrivs"] = status["NoNewPrivs"].strip()
report["volume_text"] = open("/volume/in.txt").read()
print(json.dumps(report))
"""


async def test_filesystem_and_privileges_are_locked_down(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "in.txt").write_text("input")
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(SANDBOX_PROBE),
            volume_dir=inputs,
            timeout_s=60,
        ),
        tmp_path / "out",
    )
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert report["root"] == errno.EROFS
    assert report["etc"] == errno.EROFS
    assert report["volume"] == errno.EROFS
    assert report["volume_existing"] == errno.EROFS
    assert report["tmp"] == "ok"
    assert report["tmp_exec"] == errno.EACCES  # /tmp is noexec
    assert report["output"] == "ok"
    assert int(report["CapEff"], 16) == 0 and int(report["CapBnd"], 16) == 0
    assert report["NoNewPrivs"] == "1"
    assert report["volume_text"] == "input"
    assert (inputs / "in.txt").read_text() == "input"
    assert result.output_files == ("ok.txt",)


FORK_BOMB = """
import os, signal, sys, time
forked = 0
reported = False
while True:
    try:
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        forked += 1
    except OSError as exc:
        if not reported:
            print(f"fork failed after {forked}: {exc}", file=sys.stderr, flush=True)
            reported = True
        time.sleep(0.01)
"""


async def test_fork_bomb_is_contained(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(FORK_BOMB),
            limits=SandboxLimits(pids_limit=32),
            timeout_s=3.0,
        ),
        tmp_path / "out",
    )
    assert result.timed_out
    assert result.pids_exhausted_hint
    assert b"fork failed after" in result.stderr
    forked = int(result.stderr.split(b"fork failed after ")[1].split(b":")[0])
    assert forked < 32


async def test_memory_hog_is_oom_killed(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(hog),
            limits=SandboxLimits(memory_bytes=64 * MiB),
            timeout_s=60,
        ),
        tmp_path / "out",
    )
    assert result.oom_killed, result
    assert result.exit_code == 137
    assert not result.timed_out and not result.succeeded


async def test_output_over_the_cap_is_reported_and_not_extracted(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    limits = SandboxLimits(output_bytes=1 * MiB)
    writer = (
        "import sys\n"
        "with open('/output/big', 'wb') as f:\n"
        "    try:\n"
        "        for _ in range(64):\n"
        "            f.write(b'x' * (64 << 10)); f.flush()\n"
        "    except OSError as exc:\n"
        "        print(exc, file=sys.stderr); sys.exit(9)\n"
    )
    out = tmp_path / "out"
    result = await runtime.run(
        ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=py(writer), limits=limits),
        out,
    )
    # The tmpfs refused the writes past its size: the cap is enforced by the kernel.
    assert result.exit_code == 9
    assert b"No space left on device" in result.stderr
    assert result.output_too_large
    assert 1 * MiB < result.output_bytes <= output_volume_bytes(limits)
    assert result.output_files == ()
    assert not out.exists() or list(out.iterdir()) == []


async def test_too_many_output_files(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    script = "for i in range(50):\n    open(f'/output/f{i}', 'w').close()\n"
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(script),
            limits=SandboxLimits(output_files=10),
        ),
        tmp_path / "out",
    )
    assert result.output_too_large
    assert result.exit_code != 0  # the tmpfs ran out of inodes


async def test_output_symlink_out_is_refused(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    script = "import os; open('/output/a','w').write('a'); os.symlink('/etc/passwd', '/output/pw')"
    out = tmp_path / "out"
    result = await runtime.run(
        ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=py(script)), out
    )
    assert result.exit_code == 0
    assert result.output_error is not None and "pw" in result.output_error
    assert not result.succeeded
    assert not out.exists()


async def test_log_caps_keep_head_and_tail(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    script = (
        "import sys\n"
        "for stream, tag in ((sys.stdout, 'OUT'), (sys.stderr, 'ERR')):\n"
        "    stream.write(tag + '-HEAD\\n')\n"
        "    for _ in range(2000):\n"
        "        stream.write('m' * 1000 + '\\n')\n"
        "    stream.write(tag + '-TAIL\\n')\n"
        "    stream.flush()\n"
    )
    result = await runtime.run(
        ContainerRun(
            job_uuid=new_job_uuid(),
            image=BASE,
            command=py(script),
            limits=SandboxLimits(log_cap_bytes=4096),
        ),
        tmp_path / "out",
    )
    assert result.exit_code == 0
    for data, truncated, tag in (
        (result.stdout, result.stdout_truncated, b"OUT"),
        (result.stderr, result.stderr_truncated, b"ERR"),
    ):
        assert truncated
        assert data.startswith(tag + b"-HEAD\n")
        assert data.endswith(tag + b"-TAIL\n")
        assert b"bytes omitted" in data
        assert len(data) < 4096 + 100


@pytest.mark.parametrize("when", ["setup", "holder-start", "job-create", "job-start"])
async def test_cancelled_run_leaves_nothing(
    when: str,
    runtime: DockerRuntime,
    new_job_uuid: Callable[[], str],
    find_leftovers: Callable[[list[str]], Awaitable[list[str]]],
    docker_client: aiodocker.Docker,
    tmp_path: Path,
) -> None:
    job_uuid = new_job_uuid()
    # Cancel at different points: before anything exists, with only the output holder
    # running, with the job container created but not started, and with the job running.
    role, _, action = when.partition("-")
    filters = {
        "type": ["container"],
        "event": [action or "start"],
        "label": [
            f"{JOB_LABEL}={job_uuid}",
            f"io.horde.role={'output-holder' if role == 'holder' else 'job'}",
        ],
    }
    async with docker_events(docker_client, filters) as events:
        task = asyncio.create_task(
            runtime.run(
                ContainerRun(
                    job_uuid=job_uuid, image=BASE, command=["sleep", "300"], timeout_s=300
                ),
                tmp_path / "out",
            )
        )
        if when != "setup":
            async with asyncio.timeout(60):
                event = json.loads(await events.readline())
            assert event["status"] == action
        else:
            await asyncio.sleep(0)  # let the task begin, so it is cancelled mid-setup
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await find_leftovers([job_uuid]) == []


async def test_sweep_removes_labelled_leftovers(
    runtime: DockerRuntime,
    new_job_uuid: Callable[[], str],
    find_leftovers: Callable[[list[str]], Awaitable[list[str]]],
    docker_client: aiodocker.Docker,
) -> None:
    ours, theirs = new_job_uuid(), new_job_uuid()

    async def leave_behind(job_uuid: str, instance: str) -> None:
        labels = {LABEL: "1", JOB_LABEL: job_uuid, INSTANCE_LABEL: instance}
        name = f"horde-leftover-{job_uuid}"
        await docker_client.containers.create(
            {"Image": BASE, "Cmd": ["true"], "Labels": labels}, name=name
        )
        for kind, extra in (("volumes", {}), ("networks", {"Internal": True})):
            await docker_client._query_json(
                f"{kind}/create",
                method="POST",
                data=json.dumps({"Name": name, "Labels": labels, **extra}),
            )

    await leave_behind(ours, runtime.instance)
    await leave_behind(theirs, "another-executor")
    assert len(await find_leftovers([ours, theirs])) == 6
    # The start-up sweep removes this instance's leftovers and leaves another executor's alone.
    assert await runtime.sweep() == 3
    assert await find_leftovers([ours]) == []
    assert len(await find_leftovers([theirs])) == 3
    assert await runtime.sweep() == 0
    assert await runtime.sweep(job_uuid=theirs, all_instances=True) == 3
    assert await find_leftovers([theirs]) == []


async def test_missing_image_that_cannot_be_pulled(runtime: DockerRuntime) -> None:
    lines: list[str] = []
    with pytest.raises(ImageError, match="not found locally and could not be pulled"):
        await runtime.ensure_image("horde/no-such-image-for-tests:latest", lines.append)


async def test_local_image_is_used_without_pulling(runtime: DockerRuntime) -> None:
    lines: list[str] = []
    image_id = await runtime.ensure_image("horde/base", lines.append)
    assert image_id == await runtime.image_digest(BASE)
    assert lines == []
    assert await runtime.image_digest("horde/no-such-image-for-tests") is None


async def test_allow_list(
    docker_client: aiodocker.Docker,
    horde_images: tuple[str, ...],
    new_job_uuid: Callable[[], str],
    tmp_path: Path,
) -> None:
    rt = DockerRuntime(docker_client, allowed_images=["horde/demo-job"])
    try:
        assert rt.is_allowed("horde/demo-job:latest")
        with pytest.raises(ImageNotAllowedError):
            await rt.run(
                ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=["true"]),
                tmp_path / "out",
            )
        with pytest.raises(ImageNotAllowedError):
            await rt.ensure_image("horde/base")
    finally:
        await rt.close()


class _FakeImages:
    """Just enough of aiodocker's images API to drive ensure_image without a registry."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.present = False
        self.pulls = 0

    async def inspect(self, ref: str) -> dict[str, Any]:
        if not self.present:
            raise aiodocker.DockerError(404, f"No such image: {ref}")
        return {"Id": "sha256:" + "ab" * 32}

    async def _stream(self) -> AsyncIterator[dict[str, Any]]:
        self.pulls += 1
        for event in self.events:
            yield event
        self.present = not any("error" in event for event in self.events)

    def pull(self, ref: str, *, stream: bool) -> AsyncIterator[dict[str, Any]]:
        assert stream
        return self._stream()


class _FakeDocker:
    def __init__(self, images: _FakeImages) -> None:
        self.images = images


async def test_pull_reports_progress_and_returns_the_id() -> None:
    images = _FakeImages(
        [
            {"status": "Pulling from horde/x", "id": "latest"},
            {"status": "Downloading", "id": "l1", "progress": "[=>   ] 1MB/9MB"},
            {"status": "Downloading", "id": "l1", "progress": "[==>  ] 2MB/9MB"},
            {"status": "Pull complete", "id": "l1"},
            {"status": "Digest: sha256:00"},
        ]
    )
    rt = DockerRuntime(_FakeDocker(images), allowed_images=["horde/x"])  # type: ignore[arg-type]
    lines: list[str] = []

    async def progress(line: str) -> None:
        lines.append(line)

    assert await rt.ensure_image("horde/x", progress) == "sha256:" + "ab" * 32
    # The second progress bar of the same layer within a second is dropped.
    assert lines == [
        "latest: Pulling from horde/x",
        "l1: Downloading [=>   ] 1MB/9MB",
        "l1: Pull complete",
        "Digest: sha256:00",
    ]
    assert await rt.ensure_image("horde/x") == "sha256:" + "ab" * 32
    assert images.pulls == 1


async def test_pull_error_event_is_an_image_error() -> None:
    images = _FakeImages([{"error": "manifest unknown", "errorDetail": {"message": "not found"}}])
    rt = DockerRuntime(_FakeDocker(images))  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="horde/y not found locally and could not be pulled"):
        await rt.ensure_image("horde/y")


async def test_gpu_request_without_gpu_support_is_a_sandbox_error(
    runtime: DockerRuntime, new_job_uuid: Callable[[], str], tmp_path: Path
) -> None:
    engine = await runtime.docker.system.info()
    if "nvidia" in (engine.get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime")
    with pytest.raises(SandboxError, match="cannot start the container"):
        await runtime.run(
            ContainerRun(job_uuid=new_job_uuid(), image=BASE, command=["true"], gpus=-1),
            tmp_path / "out",
        )


async def test_background_cleanup_removes_the_job_container_before_returning(
    horde_images: tuple[str, ...],
    docker_client: aiodocker.Docker,
    new_job_uuid: Callable[[], str],
    find_leftovers: Callable[[list[str]], Awaitable[list[str]]],
    tmp_path: Path,
) -> None:
    """With wait_cleanup=False (the executor's setting) run() returns as soon as the job's own
    container is gone; the output holder and volume follow in the background."""
    rt = DockerRuntime(docker_client, instance=f"test-{uuid.uuid4().hex[:12]}", wait_cleanup=False)
    job_uuid = new_job_uuid()
    try:
        result = await rt.run(
            ContainerRun(job_uuid=job_uuid, image="horde/base", command=["true"], timeout_s=60),
            tmp_path / "out",
        )
        assert result.succeeded and result.output_files == ()
        jobs = await docker_client._query_json(
            "containers/json",
            params={
                "all": "true",
                "filters": json.dumps({"label": [f"{JOB_LABEL}={job_uuid}", f"{ROLE_LABEL}=job"]}),
            },
        )
        assert jobs == []
    finally:
        await rt.close()  # waits for the background cleanup
    assert await find_leftovers([job_uuid]) == []
