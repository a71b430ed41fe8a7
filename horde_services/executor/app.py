"""Start an executor: lock its work_dir, probe the hardware, sweep leftovers, dial the miner,
run jobs."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiodocker.exceptions import DockerError
from horde.v1 import manifest_pb2

from horde_services import __version__
from horde_services.core.app import ServiceApp
from horde_services.core.auth import Authenticator
from horde_services.core.config import ExecutorSettings, dial_address
from horde_services.core.errors import ConfigError
from horde_services.core.identity import Identity, Signer
from horde_services.core.proxy_wire import ProxyServer
from horde_services.core.runtime import load_signer
from horde_services.core.server import create_server
from horde_services.core.statelock import StateLock, lock_dir
from horde_services.executor.agent import ExecutorAgent
from horde_services.executor.hardware import executor_class, probe
from horde_services.executor.jobs import OrganicJobRunner
from horde_services.executor.proxy import JobProxy, StreamSessions
from horde_services.executor.sandbox import DockerRuntime, SandboxLimits
from horde_services.executor.streaming import StreamingJobRunner
from horde_services.executor.synthetic import DockerSolver

log = structlog.get_logger("horde.executor")

# The directories jobs make in work_dir (tempfile.mkdtemp's names: PREFIX + 8 characters of
# [a-z0-9_]): organic jobs "job-<job uuid[:8]>-" (jobs.py), streaming jobs
# "stream-<sandbox-safe job uuid[:8]>-" (streaming.py), synthetic challenges "synthetic-"
# (synthetic.py).
_JOB_DIR_RE = re.compile(
    r"(?:job-[^/]{0,8}|stream-[a-zA-Z0-9_.-]{1,8})-[a-z0-9_]{8}|synthetic-[a-z0-9_]{8}",
    re.DOTALL,
)


def sweep_job_dirs(work_dir: Path) -> int:
    """Remove the job directories left in ``work_dir`` (by an executor that was killed); only
    directories named as jobs name theirs, never a symlink or anything else. Returns how many
    were removed; one that cannot be removed is logged and left."""
    try:
        with os.scandir(work_dir) as entries:
            leftovers = [
                Path(e.path)
                for e in entries
                if _JOB_DIR_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
    except OSError as exc:
        log.warning("job_dirs_not_swept", work_dir=str(work_dir), error=exc.strerror or str(exc))
        return 0
    removed = 0
    for path in leftovers:
        errors: list[str] = []

        def failed(_fn: object, where: str, exc: Any, errors: list[str] = errors) -> None:
            errors.append(f"{where}: {exc[1]}")

        shutil.rmtree(path, onerror=failed)
        if errors or path.exists():
            log.warning("job_dir_not_swept", path=str(path), error=errors[0] if errors else "")
        else:
            removed += 1
    return removed


async def start_executor(
    settings: ExecutorSettings, signer: Signer | None = None
) -> tuple[ServiceApp, ExecutorAgent]:
    signer = signer or load_signer(settings, "executor")
    if not settings.miner_identity:
        raise ConfigError("invalid setting 'miner_identity': the miner's identity is required")
    try:
        miner = Identity.parse(settings.miner_identity)
    except ValueError as exc:
        raise ConfigError(f"invalid setting 'miner_identity': {exc}") from None
    try:
        dial_address(settings.miner_address)
    except ValueError:
        raise ConfigError(
            f"invalid setting 'miner_address': {settings.miner_address!r}: the miner's "
            "host:port is required"
        ) from None
    work_dir = settings.work_dir.resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        # Jobs make their directories here: find out now, not at the first job.
        tempfile.TemporaryDirectory(dir=work_dir).cleanup()
    except OSError as exc:
        raise ConfigError(
            f"invalid setting 'work_dir': {work_dir}: {exc.strerror or exc} (jobs make their "
            "directories there)"
        ) from None
    cpus = os.cpu_count() or 1
    if settings.cpu_limit > cpus:
        raise ConfigError(
            f"invalid setting 'cpu_limit': {settings.cpu_limit:g} CPUs, this host has {cpus}"
        )
    # One executor per work_dir, found out before the start-up sweep: a second one would remove
    # the live one's job containers (killing its running job) and its jobs' directories. Held
    # until the service is closed (or the process ends, however it ends).
    lock = lock_dir(work_dir, "executor", setting="work_dir")
    try:
        return await _start_locked(settings, signer, miner, work_dir, lock)
    except BaseException:
        lock.release()
        raise


def executor_instance(public_key_hex: str, work_dir: Path) -> str:
    """An executor's runtime instance, "KEY@PLACE" (sandbox.py: PLACE_LABEL): its Docker
    objects are labelled by its key, as ever, and by its work_dir."""
    place = hashlib.sha256(str(work_dir.resolve()).encode()).hexdigest()[:8]
    return f"{public_key_hex[:16]}@{place}"


async def _start_locked(
    settings: ExecutorSettings,
    signer: Signer,
    miner: Identity,
    work_dir: Path,
    lock: StateLock,
) -> tuple[ServiceApp, ExecutorAgent]:
    hardware = probe(work_dir)
    klass = executor_class(hardware, settings.executor_class)
    # Labelled by the executor's identity and its work_dir (the work_dir lock makes that pair one
    # process), so executors sharing an engine never sweep each other, not even two run by
    # mistake with one key.
    runtime = DockerRuntime(
        instance=executor_instance(signer.identity.public_key.hex(), work_dir),
        wait_cleanup=False,
        job_init=settings.job_init,
    )
    try:
        swept = await runtime.sweep()
    except (DockerError, aiohttp.ClientError) as exc:
        await runtime.close()
        # Not a configuration error: the engine may come up later (systemd tries again).
        message = exc.message if isinstance(exc, DockerError) else str(exc)
        raise OSError(
            f"cannot use the Docker engine: {message} (is it running, and may this user use "
            "its socket, e.g. as a member of the docker group?)"
        ) from None
    if swept:
        log.warning("swept_leftovers", count=swept)
    # The job directories of a crashed executor (clients' inputs, outputs) go too: no container
    # uses them any more, and no job of this process has started yet.
    dirs = await asyncio.to_thread(sweep_job_dirs, work_dir)
    if dirs:
        log.warning("swept_job_dirs", count=dirs, work_dir=str(work_dir))
    limits = SandboxLimits(
        memory_bytes=settings.memory_limit_mb * 2**20,
        nano_cpus=int(settings.cpu_limit * 1e9),
        pids_limit=settings.pids_limit,
        output_bytes=settings.output_limit_mb * 2**20,
    )
    runner = OrganicJobRunner(
        runtime,
        set(settings.allowed_images),
        limits,
        work_dir,
        gpus=-1 if hardware.gpus else 0,
        job_urls_allow_private=settings.job_urls_allow_private,
    )
    manifest = manifest_pb2.ExecutorManifest(
        executor_class=klass,
        hardware=hardware.to_proto(),
        executor_identity=str(signer.identity),
        version=__version__,
    )
    synthetic = DockerSolver(runtime, limits, work_dir, gpus=-1 if hardware.gpus else 0)
    # The executor's gRPC listener serves health (and reflection); the job proxy of streaming jobs
    # has a port of its own (horde_services/core/proxy_wire.py). Only the gateway of a running
    # session may open a proxy stream (the sessions are the allow policy).
    sessions = StreamSessions()
    offset_ns = settings.proxy_clock_offset_ns
    proxy = JobProxy(
        sessions,
        skew_s=settings.proxy_clock_skew_s,
        max_request_bytes=settings.streaming_max_request_mb * 2**20,
        clock_ns=(lambda: time.time_ns() + offset_ns) if offset_ns else time.time_ns,
    )
    auth = Authenticator(signer.identity, sessions, max_skew_s=settings.auth.max_clock_skew_s)
    try:
        server = await create_server(
            settings.listen, [], authenticator=auth, service_label="executor", tls=settings.tls
        )
    except BaseException:
        await runtime.close()
        raise
    proxy_server = ProxyServer(proxy, auth, label="executor")
    try:
        proxy_port = await proxy_server.start(settings.proxy_listen)
    except BaseException:
        await server.server.stop(0)
        await runtime.close()
        raise
    streaming = StreamingJobRunner(
        runtime,
        set(settings.allowed_images),
        limits,
        work_dir,
        sessions,
        f"{settings.proxy_advertise_host}:{proxy_port}",
        gpus=-1 if hardware.gpus else 0,
        extra_limit_bytes=settings.extra_data_limit_mb * 2**20,
    )
    agent = ExecutorAgent(
        signer,
        settings.miner_address,
        str(miner),
        manifest,
        runner,
        synthetic,
        tls=settings.tls,
        streaming=streaming,
        # Health says SERVING only while the executor can take jobs: its miner link is up.
        on_link=functools.partial(server.set_serving, reason="miner_link"),
    )
    await server.set_serving(False, "miner_link")

    async def close_all() -> None:
        await agent.stop_job("the executor is shutting down")
        await proxy_server.stop()
        await streaming.close()
        await runtime.sweep()
        await runtime.close()

    app = ServiceApp(
        name="executor",
        signer=signer,
        servers=[server],
        background=[agent.run_forever],
        # The lock goes last (closers run in reverse): after the shutdown sweep.
        closers=[lock.aclose, close_all],
        # SIGTERM: the running job may finish first (up to drain_timeout_s), no new one starts.
        drainers=[lambda _grace_s: agent.drain(settings.drain_timeout_s)],
        grace_s=settings.shutdown_grace_s,
    )
    log.info("executor_ready", executor_class=klass, gpus=len(hardware.gpus))
    return app, agent
