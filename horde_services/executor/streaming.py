"""Streaming jobs on the executor: the service container, its relay, the job key, extra data.

Isolation. The job's container has no network but its own loopback (``NetworkMode: none``): it
can listen on 127.0.0.1 and nothing it tries to reach outside its network namespace exists, the
host's loopback, the miner, the Docker bridge and the internet included. Requests come in through
a relay container (``horde/base``, our own few lines of Python, as ``nobody``, the same hardening)
that joins the job's network namespace (``NetworkMode: container:<job>``) and bridges a unix socket
in a host directory, bind-mounted into the relay only, to ``127.0.0.1:<port>`` inside it. The job
proxy speaks HTTP over that socket. So the only traffic the job has is accepting and answering
the proxy's connections; no Docker network is created. Both containers carry the usual labels
(``io.horde.managed``, ``io.horde.job_uuid``, ``io.horde.executor``; roles "job" and "relay") and
are removed on every path; the start-up sweep removes leftovers.

Lifecycle. Image (allow-list, then the digest the validator whitelisted when it pins one), the
service started and polled on its health path until it answers 200 within
``timeouts.streaming_start_s``, then a fresh Ed25519 job key, the proxy session and
``ExecutorStreamingReady`` to the miner. The session then lasts until its time limit
(``timeouts.execution_s``: completed), the service exits (failed), or a cancel (the validator
stopped it, or the link to the miner broke); every path drops the key and removes both
containers and the job's directory.

Extra data. Files arrive in chunks over the miner link, are written beside the job and moved
(atomically, read-only, 0644) into the directory mounted read-only at ``/volume/extra/`` in the
container. Then the service is told with ``POST /extra-data`` and the JSON body
``{"file": "<name>", "path": "/volume/extra/<name>", "size": N, "sha256": "<hex>"}``; a
service without that route may just look in the directory. Each file is confirmed to the miner
with ``ExtraDataPlaced``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nacl.signing
import structlog
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from horde.v1 import common_pb2, executor_pb2, job_pb2, streaming_pb2

from horde_services.core.proto_util import PLAIN_NAME_RULE, event, plain_file_name, result
from horde_services.executor.http1 import Http1Client
from horde_services.executor.jobs import (
    JobContext,
    JobFailure,
    Send,
    failed,
    job_dir_failure,
    log_result,
)
from horde_services.executor.proxy import LiveStream, StreamSessions
from horde_services.executor.sandbox import (
    DEFAULT_HOLDER_IMAGE,
    CappedBuffer,
    DockerRuntime,
    ImageError,
    SandboxError,
    SandboxLimits,
    _hardening,
    _labels,
    _read_stream,
    _safe_name,
    init_missing,
    normalise_image_ref,
)

log = structlog.get_logger("horde.executor.streaming")

DEFAULT_PORT = 8000
DEFAULT_REQUEST_PATH = "/"
DEFAULT_HEALTH_PATH = "/health"
EXTRA_PATH = "/volume/extra"
RELAY_DIR = "/relay"
SOCKET_NAME = "job.sock"
EXTRA_NOTIFY_PATH = "/extra-data"
DEFAULT_TIMEOUTS = {"image_pull_s": 600, "streaming_start_s": 120, "execution_s": 3600}
HEALTH_POLL_S = (0.02, 0.5)  # first and largest pause between health checks
NOTIFY_TIMEOUT_S = 10.0
CLEANUP_TIMEOUT_S = 60.0

# The relay: accept on the unix socket, connect to the service on the namespace's loopback, pipe
# bytes both ways (half-closes passed on). Run with `python3 -c` in horde/base: no extra image.
RELAY_SCRIPT = r"""
import asyncio, os, socket, sys
SOCK, PORT = sys.argv[1], int(sys.argv[2])
async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(262144)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()
async def handle(client_r, client_w):
    try:
        service_r, service_w = await asyncio.open_connection("127.0.0.1", PORT)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(pipe(client_r, service_w), pipe(service_r, client_w))
    finally:
        service_w.close()
        client_w.close()
async def main():
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    server = await asyncio.start_unix_server(handle, SOCK, backlog=1024)
    os.chmod(SOCK, 0o666)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

_MiB = 1 << 20
RELAY_LIMITS = SandboxLimits(
    memory_bytes=64 * _MiB, nano_cpus=1_000_000_000, pids_limit=16, tmp_bytes=_MiB
)


@dataclass(frozen=True)
class ServiceSpec:
    """How the proxy reaches the service in the container (JobSpec.streaming with defaults)."""

    port: int = DEFAULT_PORT
    request_path: str = DEFAULT_REQUEST_PATH
    health_path: str = DEFAULT_HEALTH_PATH

    @classmethod
    def from_proto(cls, spec: job_pb2.StreamingSpec) -> ServiceSpec:
        port = spec.port or DEFAULT_PORT
        if not 1 <= port <= 65535:
            raise ValueError(f"streaming.port {port} is not a TCP port")
        paths = (spec.request_path or DEFAULT_REQUEST_PATH, spec.health_path or DEFAULT_HEALTH_PATH)
        for path in paths:
            if not path.startswith("/") or any(c in path for c in " \r\n\x00#"):
                raise ValueError(f"streaming path {path!r} must be an absolute URL path")
        return cls(port, *paths)


def build_service_config(
    job_uuid: str,
    image_id: str,
    env: dict[str, str],
    command: list[str],
    extra_dir: Path,
    service: ServiceSpec,
    limits: SandboxLimits,
    instance: str,
    gpus: int = 0,
    init: bool = False,
) -> dict[str, Any]:
    """The service container: the organic sandbox, loopback only, extra data read-only."""
    for key, value in env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise SandboxError(f"invalid environment variable name or value: {key!r}")
    # Horde's own variables win (the validator refuses specs that set them).
    env = {**env, "HORDE_PORT": str(service.port), "HORDE_EXTRA_DIR": EXTRA_PATH}
    host_config = _hardening(limits)  # NetworkMode "none": a loopback interface and nothing else
    host_config["Mounts"] = [
        {
            "Type": "bind",
            "Source": str(extra_dir),
            "Target": EXTRA_PATH,
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        }
    ]
    if gpus != 0:
        host_config["DeviceRequests"] = [
            {"Driver": "nvidia", "Count": -1 if gpus < 0 else gpus, "Capabilities": [["gpu"]]}
        ]
    if init:
        host_config["Init"] = True  # docker-init as PID 1 (see build_job_config)
    config: dict[str, Any] = {
        "Image": image_id,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Labels": _labels(job_uuid, "job", instance),
        "Tty": False,
        "OpenStdin": False,
        "AttachStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "HostConfig": host_config,
    }
    if command:
        config["Cmd"] = list(command)
    return config


def build_relay_config(
    job_uuid: str, image_id: str, service_container: str, relay_dir: Path, port: int, instance: str
) -> dict[str, Any]:
    """The relay: in the service's network namespace, the socket directory its only mount."""
    host_config = _hardening(RELAY_LIMITS)
    host_config["NetworkMode"] = f"container:{service_container}"
    del host_config["ShmSize"]  # not allowed with a joined namespace on every engine
    host_config["Mounts"] = [
        {"Type": "bind", "Source": str(relay_dir), "Target": RELAY_DIR, "ReadOnly": False}
    ]
    return {
        "Image": image_id,
        "Entrypoint": ["python3", "-c", RELAY_SCRIPT],
        "Cmd": [f"{RELAY_DIR}/{SOCKET_NAME}", str(port)],
        "User": "65534:65534",
        "Labels": _labels(job_uuid, "relay", instance),
        "Tty": False,
        "HostConfig": host_config,
    }


@dataclass
class _Exit:
    exit_code: int | None
    oom_killed: bool
    stdout: CappedBuffer
    stderr: CappedBuffer


@dataclass(eq=False)
class _Job:
    """One running streaming job's resources."""

    ctx: JobContext
    job_dir: Path
    extra_dir: Path
    service: ServiceSpec
    names: list[str] = field(default_factory=list)  # containers to remove, relay first
    http: aiohttp.ClientSession | None = None  # health checks and extra-data notices
    client: Http1Client | None = None  # the job proxy's requests
    relay_fd: int | None = None  # O_PATH handle on the relay's socket directory
    relay: DockerContainer | None = None  # the relay container, once started
    live: LiveStream | None = None
    extra: asyncio.Queue[streaming_pb2.ExtraData] = field(default_factory=asyncio.Queue)
    extra_bytes: int = 0
    tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    @property
    def job_uuid(self) -> str:
        return self.ctx.job_uuid


class StreamingJobRunner:
    """Runs streaming jobs (one at a time per executor, as the agent hands them)."""

    def __init__(
        self,
        runtime: DockerRuntime,
        allowed_images: set[str],
        limits: SandboxLimits,
        work_dir: Path,
        sessions: StreamSessions,
        proxy_endpoint: str,
        *,
        gpus: int = 0,
        extra_limit_bytes: int = 1024 * _MiB,
        relay_image: str = DEFAULT_HOLDER_IMAGE,
    ) -> None:
        self._runtime = runtime
        self._allowed = {normalise_image_ref(i) for i in allowed_images}
        self._limits = limits
        self._work_dir = work_dir
        self._sessions = sessions
        self._endpoint = proxy_endpoint
        self._gpus = gpus
        self._extra_limit = extra_limit_bytes
        self._relay_image = relay_image
        self._jobs: dict[str, _Job] = {}
        self._sessions_running: set[asyncio.Future[Any]] = set()  # run() of each session
        self._running: set[asyncio.Future[Any]] = set()  # cleanups and stray sends

    @property
    def proxy_endpoint(self) -> str:
        return self._endpoint

    # ------------------------------------------------------------------------------ entry

    async def run(self, ctx: JobContext) -> None:
        """Run the session to its end; the result is always sent (also on cancellation)."""
        task = asyncio.current_task()
        if task is not None:
            self._sessions_running.add(task)
        try:
            job_dir = Path(
                tempfile.mkdtemp(
                    prefix=f"stream-{_safe_name(ctx.job_uuid)[:8]}-", dir=self._work_dir
                )
            )
        except OSError as exc:
            if task is not None:
                self._sessions_running.discard(task)
            await ctx.send(job_dir_failure(ctx.job_uuid, self._work_dir, exc))
            return
        job = _Job(ctx=ctx, job_dir=job_dir, extra_dir=job_dir / "extra", service=ServiceSpec())
        timings: list[job_pb2.StageTiming] = []
        res: job_pb2.JobResult | None = None
        try:
            res = await self._stages(job, timings)
        except JobFailure as exc:
            res = result(ctx.job_uuid, exc.state, exc.reason, exc.stage, exc.detail)
            if isinstance(exc, _ExitFailure):
                out = exc.out
                if out.exit_code is not None:
                    res.exit_code = out.exit_code
                res.stdout.CopyFrom(_captured(out.stdout))
                res.stderr.CopyFrom(_captured(out.stderr))
        except asyncio.CancelledError:
            stage = common_pb2.STAGE_EXECUTION if job.live else common_pb2.STAGE_STREAMING_START
            res = result(
                ctx.job_uuid,
                common_pb2.JOB_STATE_CANCELLED,
                common_pb2.FAILURE_REASON_CANCELLED,
                stage,
                "the streaming session was stopped",
            )
            raise
        except SandboxError as exc:
            log.warning("streaming_sandbox_error", job_uuid=ctx.job_uuid, error=str(exc))
            res = result(
                ctx.job_uuid,
                common_pb2.JOB_STATE_HORDE_FAILED,
                common_pb2.FAILURE_REASON_INTERNAL_ERROR,
                common_pb2.STAGE_STREAMING_START,
                f"executor sandbox error: {exc}",
            )
        except Exception as exc:
            log.exception("streaming_internal_error", job_uuid=ctx.job_uuid)
            res = result(
                ctx.job_uuid,
                common_pb2.JOB_STATE_HORDE_FAILED,
                common_pb2.FAILURE_REASON_INTERNAL_ERROR,
                common_pb2.STAGE_UNSPECIFIED,
                f"executor error: {exc!r}",
            )
        finally:
            # Shielded: a cancelled session must still lose its key, containers and files.
            cleanup = asyncio.ensure_future(self._cleanup(job, res))
            self._running.add(cleanup)
            cleanup.add_done_callback(self._running.discard)
            try:
                await asyncio.shield(cleanup)
            finally:
                if task is not None:
                    self._sessions_running.discard(task)
                if res is not None:
                    if not res.stage_timings:
                        res.stage_timings.extend(timings)
                    log_result(res, "streaming")
                    await asyncio.shield(ctx.send(executor_pb2.ConnectRequest(result=res)))

    def extra_data(self, msg: executor_pb2.ExecutorExtraData, send: Send) -> None:
        """Queue extra data for a running job (written in order by the job's own task)."""
        job = self._jobs.get(msg.job_uuid)
        if job is None:
            task = asyncio.ensure_future(
                send(
                    executor_pb2.ConnectRequest(
                        extra_data_placed=_placed(
                            msg.job_uuid, msg.data.file_name, error="no such streaming job runs"
                        )
                    )
                )
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return
        job.extra.put_nowait(msg.data)

    async def close(self) -> None:
        """Stop every session (shutdown): each sends its result and cleans up."""
        for task in list(self._sessions_running):
            task.cancel()
        while self._sessions_running or self._running:
            await asyncio.gather(*self._sessions_running, *self._running, return_exceptions=True)

    # ------------------------------------------------------------------------------ stages

    async def _event(
        self,
        job: _Job,
        state: common_pb2.JobState.ValueType,
        stage: common_pb2.Stage.ValueType,
        message: str = "",
    ) -> None:
        await job.ctx.send(
            executor_pb2.ConnectRequest(event=event(job.job_uuid, state, stage, message))
        )

    async def _stages(self, job: _Job, timings: list[job_pb2.StageTiming]) -> job_pb2.JobResult:
        ctx, spec = job.ctx, job.ctx.spec
        if normalise_image_ref(spec.image) not in self._allowed:
            raise JobFailure(
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                common_pb2.STAGE_IMAGE_PULL,
                f"image {spec.image!r} is not on this executor's allow-list",
            )
        try:
            job.service = ServiceSpec.from_proto(spec.streaming)
        except ValueError as exc:
            raise JobFailure(
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_INVALID_SPEC,
                common_pb2.STAGE_ACCEPT,
                str(exc),
            ) from None
        if len(spec.inputs):
            raise JobFailure(
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_INVALID_SPEC,
                common_pb2.STAGE_ACCEPT,
                "streaming jobs take no input volumes; feed files as extra data",
            )

        t0 = time.monotonic()
        image_id = await self._image(job)
        if ctx.start.image_digest and image_id != ctx.start.image_digest:
            raise JobFailure(
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                common_pb2.STAGE_IMAGE_PULL,
                f"image {spec.image} here is {image_id}, "
                f"but the validator whitelisted {ctx.start.image_digest}",
            )
        relay_image = await self._runtime.ensure_image(self._relay_image, _internal=True)
        timings.append(_timing(common_pb2.STAGE_IMAGE_PULL, t0))
        await self._event(
            job, common_pb2.JOB_STATE_EXECUTOR_READY, common_pb2.STAGE_IMAGE_PULL, "image ready"
        )
        job.extra_dir.mkdir(mode=0o755)
        os.chmod(job.extra_dir, 0o755)
        (job.job_dir / "partial").mkdir(mode=0o700)
        relay_dir = job.job_dir / "relay"
        relay_dir.mkdir()
        # The relay runs as nobody and must create its socket here; the job dir (0700) above it
        # keeps other host users out.
        os.chmod(relay_dir, 0o777)
        await self._event(
            job,
            common_pb2.JOB_STATE_VOLUMES_READY,
            common_pb2.STAGE_VOLUME_DOWNLOAD,
            f"{EXTRA_PATH} ready for extra data",
        )

        t0 = time.monotonic()
        stage = common_pb2.STAGE_STREAMING_START
        self._jobs[job.job_uuid] = job
        service, logs = await self._start(job, image_id, relay_image, relay_dir)
        exited = asyncio.ensure_future(self._wait_exit(service, logs))
        job.tasks.add(exited)
        # The relay is Horde's own: if it dies, the job cannot be served, and that is not the
        # service's fault (nor the client's): the job ends horde_failed, saying so.
        relay_exited = asyncio.ensure_future(self._wait_relay(job))
        job.tasks.add(relay_exited)
        start_s = float(spec.timeouts.streaming_start_s or DEFAULT_TIMEOUTS["streaming_start_s"])
        healthy = asyncio.ensure_future(self._healthy(job))
        try:
            done, _ = await asyncio.wait(
                {exited, healthy, relay_exited},
                timeout=start_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            healthy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await healthy
        if exited in done:
            raise self._exit_failure(exited.result(), stage, "before it became healthy")
        if relay_exited in done:
            raise self._relay_failure(relay_exited.result(), stage, "before the service was ready")
        if healthy not in done:
            raise failed(
                common_pb2.FAILURE_REASON_TIMEOUT,
                stage,
                f"the service did not answer GET {job.service.health_path} with 200 "
                f"within {start_s:.0f}s",
            )
        timings.append(_timing(stage, t0))

        key = nacl.signing.SigningKey.generate()
        assert job.client is not None
        job.live = LiveStream(
            job_uuid=job.job_uuid,
            gateway=ctx.start.gateway_identity,
            key=key,
            client=job.client,
            request_path=job.service.request_path,
        )
        self._sessions.add(job.live)
        writer = asyncio.ensure_future(self._extra_writer(job))
        job.tasks.add(writer)
        await self._event(
            job,
            common_pb2.JOB_STATE_STREAMING_READY,
            stage,
            f"service healthy; job proxy at {self._endpoint}",
        )
        await ctx.send(
            executor_pb2.ConnectRequest(
                streaming_ready=executor_pb2.ExecutorStreamingReady(
                    job_uuid=job.job_uuid,
                    proxy_endpoint=self._endpoint,
                    job_public_key=bytes(key.verify_key),
                    image_digest=image_id,
                )
            )
        )
        await self._event(
            job, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION, "serving requests"
        )
        log.info("streaming_ready", job_uuid=job.job_uuid, image=spec.image, port=job.service.port)

        t0 = time.monotonic()
        limit_s = float(spec.timeouts.execution_s or DEFAULT_TIMEOUTS["execution_s"])
        done, _ = await asyncio.wait(
            {exited, relay_exited}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
        )
        timings.append(_timing(common_pb2.STAGE_EXECUTION, t0))
        if exited in done:
            raise self._exit_failure(exited.result(), common_pb2.STAGE_EXECUTION, "mid-session")
        if relay_exited in done:
            raise self._relay_failure(
                relay_exited.result(), common_pb2.STAGE_EXECUTION, "mid-session"
            )
        res = result(
            job.job_uuid,
            common_pb2.JOB_STATE_COMPLETED,
            stage=common_pb2.STAGE_EXECUTION,
            detail=f"the session reached its time limit of {limit_s:.0f}s",
        )
        res.stage_timings.extend(timings)
        return res

    async def _image(self, job: _Job) -> str:
        last = 0.0

        async def progress(line: str) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.5:
                last = now
                await self._event(
                    job, common_pb2.JOB_STATE_ACCEPTED, common_pb2.STAGE_IMAGE_PULL, line
                )

        limit = float(job.ctx.spec.timeouts.image_pull_s or DEFAULT_TIMEOUTS["image_pull_s"])
        try:
            async with asyncio.timeout(limit):
                return await self._runtime.ensure_image(job.ctx.spec.image, progress)
        except TimeoutError:
            raise failed(
                common_pb2.FAILURE_REASON_TIMEOUT,
                common_pb2.STAGE_IMAGE_PULL,
                f"image {job.ctx.spec.image!r} was not ready within the pull time limit",
            ) from None
        except ImageError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_IMAGE_NOT_FOUND, common_pb2.STAGE_IMAGE_PULL, str(exc)
            ) from None

    async def _start(
        self, job: _Job, image_id: str, relay_image: str, relay_dir: Path
    ) -> tuple[DockerContainer, tuple[CappedBuffer, CappedBuffer, asyncio.Future[None]]]:
        docker = self._runtime.docker
        spec = job.ctx.spec
        base = f"horde-{_safe_name(job.job_uuid)}-stream"
        config = build_service_config(
            job.job_uuid,
            image_id,
            dict(spec.env),
            list(spec.command),
            job.extra_dir,
            job.service,
            self._limits,
            self._runtime.instance,
            self._gpus,
            self._runtime.job_init,
        )
        # Names are recorded before each create, so cleanup finds whatever the engine made.
        job.names.append(base)
        try:
            service = await docker.containers.create(config, name=base)
        except DockerError as exc:
            if exc.status in (400, 404):
                raise failed(
                    common_pb2.FAILURE_REASON_NONZERO_EXIT,
                    common_pb2.STAGE_STREAMING_START,
                    f"the service container could not be created: {exc.message}",
                ) from None
            raise SandboxError(f"cannot create the service container: {exc.message}") from exc
        stdout = CappedBuffer(self._limits.log_cap_bytes)
        stderr = CappedBuffer(self._limits.log_cap_bytes)
        # Attached before the start, so nothing the service prints is lost.
        stream = await service.attach(stdout=True, stderr=True, logs=False).__aenter__()

        async def read_logs() -> None:
            try:
                await _read_stream(stream, stdout, stderr)
            finally:
                await stream.close()

        reader: asyncio.Future[None] = asyncio.ensure_future(read_logs())
        job.tasks.add(reader)
        try:
            await service.start()
        except DockerError as exc:
            if exc.status != 400 or init_missing(exc.message):
                raise SandboxError(f"cannot start the service: {exc.message}") from exc
            raise failed(
                common_pb2.FAILURE_REASON_NONZERO_EXIT,
                common_pb2.STAGE_STREAMING_START,
                f"the service container could not start: {exc.message}",
            ) from None
        relay_name = f"{base}-relay"
        job.names.insert(0, relay_name)
        try:
            relay = await docker.containers.create(
                build_relay_config(
                    job.job_uuid,
                    relay_image,
                    service.id,
                    relay_dir,
                    job.service.port,
                    self._runtime.instance,
                ),
                name=relay_name,
            )
            await relay.start()
            job.relay = relay
        except DockerError as exc:
            state = (await service.show()).get("State", {})
            if not state.get("Running"):
                # The service exited at once; its exit status tells the story.
                return service, (stdout, stderr, reader)
            raise SandboxError(f"cannot start the relay: {exc.message}") from exc
        # A unix socket path may not exceed 107 bytes and the work dir can be deep: reach the
        # socket through a handle on its directory instead.
        job.relay_fd = os.open(relay_dir, os.O_PATH | os.O_DIRECTORY)
        job.http = aiohttp.ClientSession(
            base_url="http://job",
            connector=aiohttp.UnixConnector(
                path=f"/proc/self/fd/{job.relay_fd}/{SOCKET_NAME}",
                limit=0,
                keepalive_timeout=60.0,
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            auto_decompress=False,
        )
        socket_path = f"/proc/self/fd/{job.relay_fd}/{SOCKET_NAME}"
        job.client = Http1Client(lambda: asyncio.open_unix_connection(socket_path))
        log.info("streaming_started", job_uuid=job.job_uuid, container=base)
        return service, (stdout, stderr, reader)

    async def _wait_exit(
        self,
        service: DockerContainer,
        logs: tuple[CappedBuffer, CappedBuffer, asyncio.Future[None]],
    ) -> _Exit:
        stdout, stderr, reader = logs
        await service.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.shield(reader)
        state = (await service.show()).get("State", {})
        code = state.get("ExitCode")
        return _Exit(
            exit_code=int(code) if code is not None else None,
            oom_killed=bool(state.get("OOMKilled")),
            stdout=stdout,
            stderr=stderr,
        )

    async def _wait_relay(self, job: _Job) -> int | None:
        """The relay's exit status once it stops (None: unknown); never returns while it runs.
        Without a relay (the service exited before one started) this waits forever: the
        service's own exit ends the job."""
        if job.relay is None:
            await asyncio.Future()  # cancelled with the job's other tasks
        assert job.relay is not None
        status = (await job.relay.wait()).get("StatusCode")
        return int(status) if status is not None else None

    @staticmethod
    def _relay_failure(
        status: int | None, stage: common_pb2.Stage.ValueType, when: str
    ) -> JobFailure:
        shown = f"status {status}" if status is not None else "an unknown status"
        return JobFailure(
            common_pb2.JOB_STATE_HORDE_FAILED,
            common_pb2.FAILURE_REASON_INTERNAL_ERROR,
            stage,
            f"the job's relay (the executor's side of its socket) exited with {shown} {when}",
        )

    def _exit_failure(
        self, out: _Exit, stage: common_pb2.Stage.ValueType, when: str
    ) -> _ExitFailure:
        if out.oom_killed:
            reason = common_pb2.FAILURE_REASON_OUT_OF_MEMORY
            detail = (
                f"the service exceeded its memory limit of "
                f"{self._limits.memory_bytes // _MiB} MiB {when}"
            )
        else:
            reason = common_pb2.FAILURE_REASON_NONZERO_EXIT
            detail = f"the service exited with status {out.exit_code} {when}"
        return _ExitFailure(reason, stage, detail, out)

    async def _healthy(self, job: _Job) -> None:
        pause = HEALTH_POLL_S[0]
        while True:
            if job.http is not None:
                try:
                    async with job.http.get(
                        job.service.health_path, timeout=aiohttp.ClientTimeout(total=5.0)
                    ) as resp:
                        await resp.read()
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
            await asyncio.sleep(pause)
            pause = min(pause * 2, HEALTH_POLL_S[1])

    # ------------------------------------------------------------------------------ extra data

    async def _extra_writer(self, job: _Job) -> None:
        partial: dict[str, tuple[Path, int, Any]] = {}
        while True:
            data = await job.extra.get()
            name = data.file_name
            try:
                if not plain_file_name(name):
                    raise _Refused(f"file name {name!r}: {PLAIN_NAME_RULE}")
                if job.extra_bytes + len(data.data) > self._extra_limit:
                    raise _Refused(
                        f"extra data exceeds this executor's limit of {self._extra_limit} bytes"
                    )
                path, size, digest = partial.get(name) or (
                    job.job_dir / "partial" / name,
                    0,
                    hashlib.sha256(),
                )
                if data.offset != size:
                    raise _Refused(f"{name}: chunk at offset {data.offset}, expected {size}")
                mode = "ab" if size else "wb"
                await asyncio.to_thread(_write, path, mode, data.data)
                digest.update(data.data)
                size += len(data.data)
                job.extra_bytes += len(data.data)
                partial[name] = (path, size, digest)
                if not data.last:
                    continue
                del partial[name]
                os.chmod(path, 0o644)
                os.replace(path, job.extra_dir / name)
                placed = _placed(job.job_uuid, name, size=size, sha256=digest.hexdigest())
            except _Refused as exc:
                dropped = partial.pop(name, None)
                if dropped is not None:
                    dropped[0].unlink(missing_ok=True)
                placed = _placed(job.job_uuid, name, error=str(exc))
            except OSError as exc:
                partial.pop(name, None)
                placed = _placed(job.job_uuid, name, error=f"could not write {name}: {exc}")
            log.info(
                "extra_data_placed",
                job_uuid=job.job_uuid,
                file=name,
                size=placed.size_bytes,
                error=placed.error or None,
            )
            await job.ctx.send(executor_pb2.ConnectRequest(extra_data_placed=placed))
            if not placed.error:
                notify = asyncio.ensure_future(self._notify(job, placed))
                job.tasks.add(notify)
                notify.add_done_callback(job.tasks.discard)

    async def _notify(self, job: _Job, placed: streaming_pb2.ExtraDataPlaced) -> None:
        if job.http is None:
            return
        body = {
            "file": placed.file_name,
            "path": f"{EXTRA_PATH}/{placed.file_name}",
            "size": placed.size_bytes,
            "sha256": placed.sha256,
        }
        try:
            async with job.http.post(
                EXTRA_NOTIFY_PATH,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=NOTIFY_TIMEOUT_S),
            ) as resp:
                await resp.read()
                log.info("extra_data_notified", job_uuid=job.job_uuid, status=resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("extra_data_notify_failed", job_uuid=job.job_uuid, error=repr(exc))

    # ------------------------------------------------------------------------------ cleanup

    async def _cleanup(self, job: _Job, res: job_pb2.JobResult | None) -> None:
        reason = res.detail if res is not None and res.detail else "the session ended"
        self._sessions.remove(job.job_uuid, reason)  # the key goes with it
        if self._jobs.get(job.job_uuid) is job:
            del self._jobs[job.job_uuid]
        bound = log.bind(job_uuid=job.job_uuid)
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT_S):
                for task in list(job.tasks):
                    task.cancel()
                await asyncio.gather(*job.tasks, return_exceptions=True)
                if job.client is not None:
                    await job.client.close()
                if job.http is not None:
                    await job.http.close()
                if job.relay_fd is not None:
                    os.close(job.relay_fd)
                    job.relay_fd = None
                for name in job.names:
                    await self._runtime._delete_container(name)
        except Exception as exc:
            # Leftovers are caught by the start-up sweep; never mask the session's result.
            bound.error("streaming_cleanup_failed", error=repr(exc))
        finally:
            await asyncio.to_thread(shutil.rmtree, job.job_dir, True)
        if isinstance(res, job_pb2.JobResult) and res.state != common_pb2.JOB_STATE_COMPLETED:
            bound.info(
                "streaming_ended", state=common_pb2.JobState.Name(res.state), detail=res.detail
            )
        else:
            bound.info("streaming_ended", detail=reason)


class _ExitFailure(JobFailure):
    """The service exited: a failure that carries its exit code and logs."""

    def __init__(
        self,
        reason: common_pb2.FailureReason.ValueType,
        stage: common_pb2.Stage.ValueType,
        detail: str,
        out: _Exit,
    ) -> None:
        super().__init__(common_pb2.JOB_STATE_FAILED, reason, stage, detail)
        self.out = out


class _Refused(Exception):
    pass


def _placed(
    job_uuid: str, name: str, *, size: int = 0, sha256: str = "", error: str = ""
) -> streaming_pb2.ExtraDataPlaced:
    return streaming_pb2.ExtraDataPlaced(
        job_uuid=job_uuid, file_name=name, size_bytes=size, sha256=sha256, error=error
    )


def _write(path: Path, mode: str, data: bytes) -> None:
    with path.open(mode) as fh:
        fh.write(data)


def _captured(buf: CappedBuffer) -> job_pb2.CapturedOutput:
    return job_pb2.CapturedOutput(
        data=buf.getvalue(), truncated=buf.truncated, total_bytes=buf.total
    )


def _timing(stage: common_pb2.Stage.ValueType, t0: float) -> job_pb2.StageTiming:
    return job_pb2.StageTiming(stage=stage, seconds=time.monotonic() - t0)
