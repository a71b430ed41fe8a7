"""The executor's Docker runtime: runs one job container in a strict sandbox (aiodocker).

Sandbox (DESIGN.md, "Executor sandbox"): no network, every capability dropped, no-new-privileges,
read-only root with a size-capped noexec ``/tmp``, memory (no swap), CPU and pids limits, inputs
bind-mounted read-only at ``/volume``, ``/output`` hard size-capped, GPUs only when asked for.
Every container and volume Horde creates carries ``io.horde.managed=1`` and
``io.horde.job_uuid=<uuid>``, and is removed on every path, cancellation included; ``sweep()``
removes leftovers of a crashed executor at start-up.

How ``/output`` is capped: it is a Docker volume of the ``local`` driver backed by a tmpfs
(``o=size=N,nr_inodes=M``), so the kernel refuses writes past the cap with ENOSPC; nothing the job
does can exceed it. A tmpfs volume is unmounted, and its content lost, when the last container
using it stops, so a tiny "holder" container (``sleep infinity`` in ``horde/base``, same sandbox,
mounting the volume read-only) keeps it mounted from before the job starts until its files have
been read back through the archive API. Note that tmpfs pages are charged to the memory cgroup of
the writer, so ``/output`` and ``/tmp`` contents count against the job's memory limit.

Logs are read through an attach stream opened before the container starts (nothing is lost, and
the ``none`` log driver keeps the daemon from writing them to disk); each stream keeps its head
and its tail and drops the middle, so a runaway log costs at most ``log_cap_bytes`` of memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import re
import secrets
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
import structlog
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from horde_services.executor.archive import ArchiveError, safe_extract_tar

log = structlog.get_logger(__name__)

LABEL = "io.horde.managed"
JOB_LABEL = "io.horde.job_uuid"
ROLE_LABEL = "io.horde.role"
# Which runtime created an object, so that sweep() only touches its own: several executors (or
# test runs) may share one Docker engine.
INSTANCE_LABEL = "io.horde.executor"
DEFAULT_INSTANCE = "default"
# Where within an instance: an executor's instance is its key, and this its work_dir (hashed), so
# two executors run by mistake with one key never sweep each other's objects. A runtime's
# instance string carries it after an "@" ("KEY@PLACE"); objects without it (made by an older
# version) belong to any place of their instance.
PLACE_LABEL = "io.horde.place"

DEFAULT_HOLDER_IMAGE = "horde/base:latest"
OUTPUT_PATH = "/output"
VOLUME_PATH = "/volume"

_MiB = 1 << 20
_PAGE = 4096
_T = TypeVar("_T")

ProgressCallback = Callable[[str], Awaitable[None] | None]
ImagePolicy = Collection[str] | Callable[[str], bool] | None

# Messages shells and libcs print when fork() fails with EAGAIN (pids cgroup exhausted).
_FORK_FAILURE_MARKERS = (
    b"Resource temporarily unavailable",
    b"Cannot fork",
    b"can't fork",
    b"fork: retry",
)


class SandboxError(Exception):
    """The sandbox could not be set up, run or torn down (the network's fault, not the job's)."""


class ImageError(SandboxError):
    """The job's image is missing and cannot be pulled, or it is not allowed."""


class ImageNotAllowedError(ImageError):
    """The image is not on the allow-list (maps to the ``rejected`` job state)."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 512 * _MiB
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 128
    output_bytes: int = 64 * _MiB
    output_files: int = 10_000
    tmp_bytes: int = 64 * _MiB
    log_cap_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "nano_cpus", "pids_limit", "output_bytes", "output_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive")
        if self.tmp_bytes <= 0 or self.log_cap_bytes < 2:
            raise ValueError("SandboxLimits.tmp_bytes and log_cap_bytes must be positive")


@dataclass(frozen=True)
class ContainerRun:
    job_uuid: str
    image: str
    command: list[str] = field(default_factory=list)  # empty: the image's own CMD
    env: dict[str, str] = field(default_factory=dict)
    volume_dir: Path | None = None  # host directory mounted read-only at /volume
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    timeout_s: float = 600.0
    gpus: int = 0  # 0: no GPU; N > 0: N GPUs; -1: all GPUs
    gpu_device_ids: tuple[str, ...] = ()  # specific GPUs (index or UUID); overrides ``gpus``
    # Where the job's stdout/stderr are captured; the caller keeps it to read what a cancelled
    # job wrote (a cancelled run returns no result). A fresh one per run when not given.
    logs: RunLogs | None = None

    def __post_init__(self) -> None:
        if not self.job_uuid or not self.image:
            raise ValueError("ContainerRun needs a job_uuid and an image")
        if not self.timeout_s > 0:
            raise ValueError("ContainerRun.timeout_s must be positive")
        if self.gpus < -1:
            raise ValueError("ContainerRun.gpus must be -1 (all), 0 or a positive count")


@dataclass(frozen=True)
class ContainerResult:
    exit_code: int | None  # None: the container never ran (see start_error)
    timed_out: bool
    oom_killed: bool
    pids_exhausted_hint: bool  # the pids limit was (probably) hit; a heuristic, not proof
    stdout: bytes  # head + marker + tail when truncated
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    image_id: str
    output_files: tuple[str, ...] = ()  # relative paths extracted into output_dir
    output_bytes: int = 0
    output_too_large: bool = False  # nothing is extracted then
    output_error: str | None = None  # outputs refused (e.g. a symlink out); nothing extracted
    start_error: str | None = None  # the container could not start (bad command, ...)
    stdout_total_bytes: int = 0  # size of the whole stream, before capping
    stderr_total_bytes: int = 0

    @property
    def succeeded(self) -> bool:
        return (
            self.exit_code == 0
            and not self.timed_out
            and not self.oom_killed
            and not self.output_too_large
            and self.output_error is None
        )


class RunLogs:
    """A run's stdout and stderr as captured so far (capped like ContainerResult's)."""

    def __init__(self, cap: int) -> None:
        self.stdout = CappedBuffer(cap)
        self.stderr = CappedBuffer(cap)


class CappedBuffer:
    """Keeps the first ``cap // 2`` and the last ``cap - cap // 2`` bytes of a byte stream."""

    def __init__(self, cap: int) -> None:
        self._head_cap = cap // 2
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data[-self._tail_cap :]
            # Trim lazily (at twice the cap) so a stream of tiny writes stays O(n) overall.
            if len(self._tail) > 2 * self._tail_cap:
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self._head_cap + self._tail_cap

    def getvalue(self) -> bytes:
        tail = bytes(self._tail[-self._tail_cap :]) if self._tail_cap else b""
        if not self.truncated:
            return bytes(self._head) + tail
        omitted = self.total - len(self._head) - len(tail)
        marker = f"\n[... horde: {omitted} bytes omitted ...]\n".encode()
        return bytes(self._head) + marker + tail


def normalise_image_ref(ref: str) -> str:
    """``name`` -> ``name:latest``; tagged and digest references are returned unchanged."""
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


def output_volume_bytes(limits: SandboxLimits) -> int:
    """Size of the /output tmpfs: the cap plus headroom, so 'over the cap' is observable."""
    headroom = max(_MiB, limits.output_bytes // 16)
    return -(-(limits.output_bytes + headroom) // _PAGE) * _PAGE


def _labels(job_uuid: str, role: str, instance: str) -> dict[str, str]:
    key, _, place = instance.partition("@")
    labels = {LABEL: "1", JOB_LABEL: job_uuid, ROLE_LABEL: role, INSTANCE_LABEL: key}
    if place:
        labels[PLACE_LABEL] = place
    return labels


def _hardening(limits: SandboxLimits) -> dict[str, Any]:
    return {
        "NetworkMode": "none",
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": True,
        "Privileged": False,
        "IpcMode": "private",
        "Tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={limits.tmp_bytes}"},
        "ShmSize": limits.tmp_bytes,
        "Memory": limits.memory_bytes,
        "MemorySwap": limits.memory_bytes,  # equal to Memory: no swap
        "NanoCpus": limits.nano_cpus,
        "PidsLimit": limits.pids_limit,
        "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}],
        "LogConfig": {"Type": "none", "Config": {}},
        "AutoRemove": False,
        "RestartPolicy": {"Name": "no"},
    }


# "failed to create shim task: OCI runtime create failed: runc create failed: unable to start
# container process: exec: "x": executable file not found in $PATH: unknown": the part a job's
# author needs.
_RUNC_START = re.compile(r"unable to start container process: (.*?)(?:: unknown)?$")


def _start_error(message: str) -> str:
    found = _RUNC_START.search(message)
    return found.group(1) if found else message


def init_missing(message: str) -> bool:
    """A start error saying the engine has no init binary for `Init: true` (the executor's
    setup, not the job's fault)."""
    return "docker-init" in message or "init binary" in message


def build_job_config(
    run: ContainerRun,
    image_id: str,
    volume_name: str,
    instance: str = DEFAULT_INSTANCE,
    init: bool = False,
) -> dict[str, Any]:
    """The container-create body for a job (pure; unit-testable without Docker)."""
    for key, value in run.env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise SandboxError(f"invalid environment variable name or value: {key!r}")
    mounts: list[dict[str, Any]] = [
        {"Type": "volume", "Source": volume_name, "Target": OUTPUT_PATH, "ReadOnly": False}
    ]
    if run.volume_dir is not None:
        source = run.volume_dir.resolve()
        if not source.is_dir():
            raise SandboxError(f"input volume {source} is not a directory")
        mounts.insert(
            0,
            {
                "Type": "bind",
                "Source": str(source),
                "Target": VOLUME_PATH,
                "ReadOnly": True,
                "BindOptions": {"Propagation": "rprivate"},
            },
        )
    host_config = _hardening(run.limits)
    host_config["Mounts"] = mounts
    if init:
        # The engine's init (docker-init) runs as PID 1: it reaps orphaned processes and passes
        # signals on, which the job's own command, as PID 1, would not.
        host_config["Init"] = True
    if run.gpu_device_ids:
        host_config["DeviceRequests"] = [
            {
                "Driver": "nvidia",
                "Count": 0,
                "DeviceIDs": list(run.gpu_device_ids),
                "Capabilities": [["gpu"]],
            }
        ]
    elif run.gpus != 0:
        host_config["DeviceRequests"] = [
            {
                "Driver": "nvidia",
                "Count": -1 if run.gpus < 0 else run.gpus,
                "Capabilities": [["gpu"]],
            }
        ]
    config: dict[str, Any] = {
        "Image": image_id,
        "Env": [f"{k}={v}" for k, v in run.env.items()],
        "Labels": _labels(run.job_uuid, "job", instance),
        "Tty": False,
        "OpenStdin": False,
        "AttachStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "NetworkDisabled": True,
        "HostConfig": host_config,
    }
    if run.command:
        config["Cmd"] = list(run.command)
    return config


def build_holder_config(
    job_uuid: str, image_id: str, volume_name: str, instance: str = DEFAULT_INSTANCE
) -> dict[str, Any]:
    limits = SandboxLimits(
        memory_bytes=32 * _MiB, nano_cpus=100_000_000, pids_limit=8, tmp_bytes=_MiB
    )
    host_config = _hardening(limits)
    host_config["Mounts"] = [
        {"Type": "volume", "Source": volume_name, "Target": OUTPUT_PATH, "ReadOnly": True}
    ]
    return {
        "Image": image_id,
        "Entrypoint": ["sleep"],
        "Cmd": ["infinity"],
        "Labels": _labels(job_uuid, "output-holder", instance),
        "Tty": False,
        "NetworkDisabled": True,
        "HostConfig": host_config,
    }


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value


class DockerRuntime:
    """Runs job containers in the sandbox. One instance per executor; safe for concurrent jobs."""

    def __init__(
        self,
        docker: aiodocker.Docker | None = None,
        *,
        allowed_images: ImagePolicy = None,
        holder_image: str = DEFAULT_HOLDER_IMAGE,
        pull_timeout_s: float = 1800.0,
        cleanup_timeout_s: float = 60.0,
        wait_cleanup: bool = True,
        instance: str = DEFAULT_INSTANCE,
        job_init: bool = False,
    ) -> None:
        """``allowed_images``: image references (``name`` means ``name:latest``) or a predicate;
        None allows every image (the caller then enforces its own policy).

        ``instance`` labels everything this runtime creates; sweep() removes only that
        instance's objects. Use a stable id per executor (e.g. its identity) when several
        executors share a Docker engine, with "@PLACE" after it to tell apart runtimes that
        share the id (an executor: its work_dir; PLACE_LABEL)."""
        self._docker = docker if docker is not None else aiodocker.Docker()
        self._owns_docker = docker is None
        self._holder_image = holder_image
        self._pull_timeout_s = pull_timeout_s
        self._cleanup_timeout_s = cleanup_timeout_s
        self._wait_cleanup = wait_cleanup
        self._instance = instance
        self.job_init = job_init  # run job commands under the engine's init (docker-init)
        self._policy: Callable[[str], bool] | None
        if allowed_images is None:
            self._policy = None
        elif callable(allowed_images):
            self._policy = allowed_images
        else:
            allowed = {normalise_image_ref(r) for r in allowed_images}
            self._policy = lambda ref: normalise_image_ref(ref) in allowed
        self._pending: set[asyncio.Task[Any]] = set()
        self._pull_locks: dict[str, asyncio.Lock] = {}

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def docker(self) -> aiodocker.Docker:
        return self._docker

    def is_allowed(self, ref: str) -> bool:
        return self._policy is None or bool(self._policy(ref))

    # ----------------------------------------------------------------------------- images

    async def image_digest(self, ref: str) -> str | None:
        """The local image's content-addressed id (``sha256:...``), or None if it is absent.

        The id (config digest) is the same wherever the image came from (pulled or built
        locally), unlike a registry manifest digest, so it is what job certificates carry.
        """
        try:
            info = await self._docker.images.inspect(ref)
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise SandboxError(f"cannot inspect image {ref}: {exc.message}") from exc
        image_id = info.get("Id")
        return str(image_id) if image_id else None

    async def ensure_image(
        self, ref: str, on_progress: ProgressCallback | None = None, *, _internal: bool = False
    ) -> str:
        """Make ``ref`` available locally (pulling only when missing); returns its image id."""
        if not _internal and not self.is_allowed(ref):
            raise ImageNotAllowedError(f"image {ref} is not on the allow-list")
        image_id = await self.image_digest(ref)
        if image_id is not None:
            return image_id
        lock = self._pull_locks.setdefault(normalise_image_ref(ref), asyncio.Lock())
        async with lock:
            image_id = await self.image_digest(ref)
            if image_id is not None:
                return image_id
            log.info("sandbox.image_pull_started", image=ref)
            try:
                async with asyncio.timeout(self._pull_timeout_s):
                    await self._pull(ref, on_progress)
            except TimeoutError:
                raise ImageError(
                    f"image {ref} not found locally and could not be pulled: "
                    f"timed out after {self._pull_timeout_s:.0f} s"
                ) from None
            except (DockerError, aiohttp.ClientError) as exc:
                reason = exc.message if isinstance(exc, DockerError) else str(exc)
                raise ImageError(
                    f"image {ref} not found locally and could not be pulled: {reason}"
                ) from exc
            image_id = await self.image_digest(ref)
            if image_id is None:
                raise ImageError(f"image {ref} not found locally after a successful pull")
            log.info("sandbox.image_pulled", image=ref, image_id=image_id)
            return image_id

    async def _pull(self, ref: str, on_progress: ProgressCallback | None) -> None:
        last_sent: dict[str, float] = {}
        events = self._docker.images.pull(ref, stream=True)
        try:
            async for event in events:
                if "error" in event:
                    detail = event.get("errorDetail", {}).get("message") or event["error"]
                    raise ImageError(
                        f"image {ref} not found locally and could not be pulled: {detail}"
                    )
                if on_progress is None:
                    continue
                layer = str(event.get("id", ""))
                status = str(event.get("status", ""))
                progress = str(event.get("progress", ""))
                # Byte-level progress arrives many times a second per layer; pass on state
                # changes always and progress bars at most once a second per layer.
                now = time.monotonic()
                if progress and now - last_sent.get(layer, 0.0) < 1.0:
                    continue
                last_sent[layer] = now
                line = " ".join(p for p in (f"{layer}:" if layer else "", status, progress) if p)
                await _maybe_await(on_progress(line))
        finally:
            # Leaving early (an error event) must release the HTTP response now, not at GC.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    # ----------------------------------------------------------------------------- sweep

    async def sweep(self, job_uuid: str | None = None, *, all_instances: bool = False) -> int:
        """Remove every container, network and volume carrying the Horde label.

        By default only this runtime's instance's objects (``all_instances`` widens it to every
        Horde object on the engine), and only one job's when ``job_uuid`` is given; of its
        instance, only those of its place (or of none: an older version's), the others counted
        in the log as `sandbox.sweep_skipped_other_place`. Meant for start-up and shutdown,
        when none of them can be in use; returns how many were removed.
        """
        key, _, place = self._instance.partition("@")
        labels = [f"{LABEL}=1"]
        if not all_instances:
            labels.append(f"{INSTANCE_LABEL}={key}")
        if job_uuid is not None:
            labels.append(f"{JOB_LABEL}={job_uuid}")
        skipped = 0

        def ours(object_labels: dict[str, str] | None) -> bool:
            nonlocal skipped
            other = (object_labels or {}).get(PLACE_LABEL)
            if all_instances or not other or other == place:
                return True
            skipped += 1
            return False

        removed = 0
        containers = await self._docker.containers.list(
            all=True, filters=_filters({"label": labels})
        )
        for container in containers:
            if ours(container._container.get("Labels")) and await self._delete_container(
                container.id
            ):
                removed += 1
        networks = await self._docker.networks.list(filters={"label": labels})
        for net in networks:
            if not ours(net.get("Labels")):
                continue
            try:
                async with self._docker._query(f"networks/{net['Id']}", method="DELETE"):
                    pass
            except DockerError as exc:
                if exc.status != 404:
                    raise
            else:
                removed += 1
        volumes = await self._docker._query_json(
            "volumes", params={"filters": _filters({"label": labels})}
        )
        for vol in volumes.get("Volumes") or []:
            if ours(vol.get("Labels")) and await self._delete_volume(vol["Name"]):
                removed += 1
        if removed:
            log.info("sandbox.swept", removed=removed, job_uuid=job_uuid)
        if skipped:
            # Same key, another work_dir: another executor's (or this one's, run from another
            # work_dir before): left alone.
            log.warning("sandbox.sweep_skipped_other_place", count=skipped, instance=key)
        return removed

    # ----------------------------------------------------------------------------- run

    async def run(
        self,
        run: ContainerRun,
        output_dir: Path,
        on_started: Callable[[], Awaitable[None]] | None = None,
    ) -> ContainerResult:
        """Run one job to completion and extract its /output files into ``output_dir``.

        ``on_started`` is awaited once the container has really started."""
        image_id = await self.ensure_image(run.image)
        try:
            holder_id = await self.ensure_image(self._holder_image, _internal=True)
        except ImageError as exc:
            # The executor's own image, not the job's: the network's fault, not the job's.
            raise SandboxError(
                f"output holder image {self._holder_image} is unavailable "
                f"(build it with deploy/images/build.sh): {exc}"
            ) from exc
        base = f"horde-{_safe_name(run.job_uuid)}-{secrets.token_hex(4)}"
        names = _Names(job=base, holder=f"{base}-holder", volume=f"{base}-output")
        job_config = build_job_config(run, image_id, names.volume, self._instance, self.job_init)
        inflight: list[asyncio.Task[Any]] = []
        bound = log.bind(job_uuid=run.job_uuid, container=names.job)
        try:
            return await self._run(
                run, output_dir, image_id, holder_id, job_config, names, inflight, bound, on_started
            )
        except DockerError as exc:
            raise SandboxError(f"docker engine error: {exc.message}") from exc
        except aiohttp.ClientError as exc:
            raise SandboxError(f"docker engine unreachable: {exc}") from exc
        finally:
            cleanup = asyncio.ensure_future(self._cleanup(names, inflight, bound))
            self._pending.add(cleanup)
            cleanup.add_done_callback(self._pending.discard)
            # Shielded: a cancelled job must still lose its container. If this await itself is
            # cancelled again, the task finishes in the background and close() waits for it.
            # The job's own container is always gone before run() returns; the output holder
            # and volume (infrastructure, ~100 ms to kill) go in the background unless
            # wait_cleanup asks to wait for everything.
            if self._wait_cleanup:
                await asyncio.shield(cleanup)
            else:
                await asyncio.shield(names.job_removed.wait())

    async def _run(
        self,
        run: ContainerRun,
        output_dir: Path,
        image_id: str,
        holder_image_id: str,
        job_config: dict[str, Any],
        names: _Names,
        inflight: list[asyncio.Task[Any]],
        bound: Any,
        on_started: Callable[[], Awaitable[None]] | None = None,
    ) -> ContainerResult:
        limits = run.limits
        vol_bytes = output_volume_bytes(limits)

        async def setup() -> tuple[DockerContainer, DockerContainer]:
            await self._docker._query_json(
                "volumes/create",
                method="POST",
                data=json.dumps(
                    {
                        "Name": names.volume,
                        "Driver": "local",
                        "DriverOpts": {
                            "type": "tmpfs",
                            "device": "tmpfs",
                            "o": f"size={vol_bytes},nr_inodes={limits.output_files + 2},"
                            "mode=1777,nosuid,nodev",
                        },
                        "Labels": _labels(run.job_uuid, "output", self._instance),
                    }
                ),
            )
            holder = await self._docker.containers.create(
                build_holder_config(run.job_uuid, holder_image_id, names.volume, self._instance),
                name=names.holder,
            )
            await holder.start()
            job = await self._docker.containers.create(job_config, name=names.job)
            return holder, job

        async def setup_and_measure() -> tuple[DockerContainer, DockerContainer, int | None]:
            holder, job = await setup()
            # The empty /output's directory size on this engine, to spot "nothing written".
            return holder, job, await self._path_size(holder, OUTPUT_PATH)

        # Creation runs as its own task so a cancellation cannot leave a container the daemon
        # creates after we stopped listening; cleanup waits for these tasks first.
        try:
            holder, job, empty_size = await self._shielded(setup_and_measure(), inflight)
        except DockerError as exc:
            raise SandboxError(f"cannot set up the sandbox: {exc.message}") from exc

        logs = run.logs if run.logs is not None else RunLogs(limits.log_cap_bytes)
        stdout, stderr = logs.stdout, logs.stderr
        timed_out = False
        duration = 0.0
        pids_at_timeout: int | None = None
        started = time.monotonic()
        async with job.attach(stdout=True, stderr=True, logs=False) as stream:
            reader = asyncio.ensure_future(_read_stream(stream, stdout, stderr))
            try:
                try:
                    await job.start()
                except DockerError as exc:
                    if exc.status != 400 or init_missing(exc.message):
                        # 5xx: the engine's problem (e.g. no GPU driver), not the job's.
                        raise SandboxError(f"cannot start the container: {exc.message}") from exc
                    # 400: bad command, missing binary, ...: the job's fault, reported as a result,
                    # with the status the engine gives it (127 not found, 126 not executable, as
                    # a shell would).
                    bound.info("sandbox.start_failed", error=exc.message)
                    state: dict[str, Any] = {}
                    with contextlib.suppress(DockerError):
                        state = (await job.show()).get("State") or {}
                    return ContainerResult(
                        exit_code=state.get("ExitCode") or None,
                        timed_out=False,
                        oom_killed=False,
                        pids_exhausted_hint=False,
                        stdout=b"",
                        stderr=b"",
                        stdout_truncated=False,
                        stderr_truncated=False,
                        duration_s=0.0,
                        image_id=image_id,
                        start_error=_start_error(exc.message),
                    )
                started = time.monotonic()
                bound.info("sandbox.started", image=run.image, timeout_s=run.timeout_s)
                if on_started is not None:
                    await on_started()
                try:
                    async with asyncio.timeout(run.timeout_s):
                        await job.wait()
                except asyncio.CancelledError:
                    # Cancelled (by the client, the validator, a shutdown): stop the job now and
                    # keep what it wrote up to the end (run.logs), then go on being cancelled.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._kill(job))
                    with contextlib.suppress(Exception):  # also when the kill failed
                        async with asyncio.timeout(2.0):
                            await asyncio.shield(reader)
                    raise
                except TimeoutError:
                    timed_out = True
                    pids_at_timeout = await self._pids_current(job)
                    bound.info("sandbox.timed_out", pids=pids_at_timeout)
                    await self._kill(job)
                    try:
                        async with asyncio.timeout(self._cleanup_timeout_s):
                            await job.wait()
                    except TimeoutError:
                        raise SandboxError("container did not stop after SIGKILL") from None
                duration = time.monotonic() - started
                # The attach stream ends once the container's pipes close; a straggling
                # grandchild holding them open must not hold the job hostage.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await asyncio.shield(reader)
            finally:
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader

        state = (await job.show()).get("State", {})
        exit_code = state.get("ExitCode")
        oom_killed = bool(state.get("OOMKilled"))
        err_bytes = stderr.getvalue()
        pids_hint = (pids_at_timeout is not None and pids_at_timeout >= limits.pids_limit) or any(
            m in err_bytes for m in _FORK_FAILURE_MARKERS
        )

        outcome = await self._collect_output(
            holder, output_dir, limits, vol_bytes, bound, empty_size
        )
        result = ContainerResult(
            exit_code=int(exit_code) if exit_code is not None else None,
            timed_out=timed_out,
            oom_killed=oom_killed,
            pids_exhausted_hint=pids_hint,
            stdout=stdout.getvalue(),
            stderr=err_bytes,
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
            stdout_total_bytes=stdout.total,
            stderr_total_bytes=stderr.total,
            duration_s=duration,
            image_id=image_id,
            output_files=outcome.files,
            output_bytes=outcome.total_bytes,
            output_too_large=outcome.too_large,
            output_error=outcome.error,
        )
        bound.info(
            "sandbox.finished",
            exit_code=result.exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            pids_exhausted_hint=pids_hint,
            duration_s=round(duration, 3),
            output_files=len(outcome.files),
            output_bytes=outcome.total_bytes,
            output_too_large=outcome.too_large,
            output_error=outcome.error,
        )
        return result

    async def _collect_output(
        self,
        holder: DockerContainer,
        output_dir: Path,
        limits: SandboxLimits,
        vol_bytes: int,
        bound: Any,
        empty_size: int | None = None,
    ) -> _Output:
        if empty_size is not None and await self._path_size(holder, OUTPUT_PATH) == empty_size:
            # Nothing written: skip the archive round trip (~80 ms on a busy engine).
            return _Output()
        # Tar framing adds at most ~1.5 KiB per member on top of the (already capped) data.
        stream_cap = vol_bytes + (limits.output_files + 2) * 1536 + _MiB
        with tempfile.TemporaryDirectory(prefix="horde-output-") as tmp:
            tar_path = Path(tmp) / "output.tar"
            try:
                await self._download_archive(holder, OUTPUT_PATH, tar_path, stream_cap)
            except DockerError as exc:
                raise SandboxError(f"cannot read /output back: {exc.message}") from exc
            scan = await asyncio.to_thread(_scan_tar, tar_path)
            if scan.error is not None:
                return _Output(error=scan.error)
            too_large = (
                scan.file_bytes > limits.output_bytes
                or scan.page_bytes + _PAGE > vol_bytes
                or scan.members > limits.output_files
            )
            if too_large:
                bound.info("sandbox.output_too_large", bytes=scan.file_bytes, members=scan.members)
                return _Output(total_bytes=scan.file_bytes, too_large=True)
            try:
                extracted = await asyncio.to_thread(
                    safe_extract_tar,
                    tar_path,
                    output_dir,
                    max_total_bytes=limits.output_bytes,
                    max_files=limits.output_files,
                    strip_components=1,
                )
            except ArchiveError as exc:
                bound.warning("sandbox.output_refused", error=str(exc))
                return _Output(error=str(exc))
            return _Output(files=tuple(extracted.files), total_bytes=extracted.total_bytes)

    async def _download_archive(
        self, container: DockerContainer, path: str, dest: Path, cap: int
    ) -> None:
        # aiodocker's get_archive() buffers the whole tar in memory; stream it to disk instead.
        written = 0
        async with self._docker._query(
            f"containers/{container.id}/archive", method="GET", params={"path": path}
        ) as response:
            with dest.open("wb") as out:
                async for chunk in response.content.iter_chunked(256 * 1024):
                    written += len(chunk)
                    if written > cap:
                        raise SandboxError(f"archive of {path} exceeds {cap} bytes")
                    out.write(chunk)

    async def _path_size(self, container: DockerContainer, path: str) -> int | None:
        """st_size of `path` in the container (HEAD on the archive endpoint), or None."""
        try:
            async with self._docker._query(
                f"containers/{container.id}/archive", method="HEAD", params={"path": path}
            ) as response:
                header = response.headers.get("X-Docker-Container-Path-Stat")
        except DockerError:
            return None
        if not header:
            return None
        try:
            size = json.loads(base64.b64decode(header)).get("size")
        except (ValueError, TypeError):
            return None
        return int(size) if isinstance(size, int) else None

    async def _pids_current(self, container: DockerContainer) -> int | None:
        try:
            stats = await self._docker._query_json(
                f"containers/{container.id}/stats",
                params={"stream": "false", "one-shot": "true"},
            )
        except DockerError:
            return None
        current = (stats.get("pids_stats") or {}).get("current")
        return int(current) if current is not None else None

    async def _kill(self, container: DockerContainer) -> None:
        try:
            await container.kill(signal="SIGKILL")
        except DockerError as exc:
            if exc.status not in (404, 409):  # already exited / gone
                raise

    async def _shielded(
        self, coro: Coroutine[Any, Any, _T], inflight: list[asyncio.Task[Any]]
    ) -> _T:
        task: asyncio.Task[_T] = asyncio.ensure_future(coro)
        inflight.append(task)
        return await asyncio.shield(task)

    async def _cleanup(self, names: _Names, inflight: list[asyncio.Task[Any]], bound: Any) -> None:
        try:
            async with asyncio.timeout(self._cleanup_timeout_s):
                if inflight:
                    await asyncio.gather(*inflight, return_exceptions=True)
                try:
                    await self._delete_container(names.job)
                finally:
                    names.job_removed.set()
                await self._delete_container(names.holder)
                await self._delete_volume(names.volume)
        except Exception as exc:
            # Leftovers are caught by the start-up sweep; log loudly rather than mask the
            # job's own result or exception.
            bound.error("sandbox.cleanup_failed", error=repr(exc))
        finally:
            names.job_removed.set()

    async def _delete_container(self, name_or_id: str) -> bool:
        try:
            await self._docker.containers.container(name_or_id).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status == 404:
                return False
            if exc.status == 409 and "in progress" in exc.message:
                return False
            raise
        return True

    async def _delete_volume(self, name: str) -> bool:
        # A volume can stay "in use" for a moment after its last container is removed.
        for attempt in range(20):
            try:
                await self._docker._query_json(f"volumes/{name}")
            except DockerError as exc:
                if exc.status == 404:
                    return False
                raise
            try:
                async with self._docker._query(f"volumes/{name}", method="DELETE"):
                    pass
                return True
            except DockerError as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409 or attempt == 19:
                    raise
            await asyncio.sleep(0.1 * (attempt + 1))
        return False

    async def wait_cleanups(self) -> None:
        """Wait for background cleanups of cancelled runs."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.wait_cleanups()
        if self._owns_docker:
            await self._docker.close()


@dataclass(frozen=True)
class _Names:
    job: str
    holder: str
    volume: str
    # Set once the job's own container is deleted (or its deletion has failed and was logged).
    job_removed: asyncio.Event = field(default_factory=asyncio.Event, compare=False)


@dataclass(frozen=True)
class _Output:
    files: tuple[str, ...] = ()
    total_bytes: int = 0
    too_large: bool = False
    error: str | None = None


@dataclass(frozen=True)
class _Scan:
    file_bytes: int = 0
    page_bytes: int = 0
    members: int = 0
    error: str | None = None


def _scan_tar(path: Path) -> _Scan:
    """Sizes and member count of the /output archive, without extracting anything."""
    file_bytes = page_bytes = members = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                members += 1
                if member.isreg():
                    file_bytes += member.size
                    page_bytes += -(-member.size // _PAGE) * _PAGE
    except (tarfile.TarError, OSError) as exc:
        return _Scan(error=f"unreadable /output archive: {exc}")
    # The archive's first member is the /output directory itself.
    return _Scan(file_bytes=file_bytes, page_bytes=page_bytes, members=max(members - 1, 0))


async def _read_stream(stream: Any, stdout: CappedBuffer, stderr: CappedBuffer) -> None:
    while True:
        message = await stream.read_out()
        if message is None:
            return
        (stderr if message.stream == 2 else stdout).feed(message.data)


def _filters(filters: dict[str, list[str]]) -> str:
    return json.dumps(filters)


_NAME_RE = re.compile(r"[^a-zA-Z0-9_.-]")


def _safe_name(value: str) -> str:
    return _NAME_RE.sub("-", value)[:64] or "job"


__all__ = [
    "DEFAULT_HOLDER_IMAGE",
    "DEFAULT_INSTANCE",
    "INSTANCE_LABEL",
    "JOB_LABEL",
    "LABEL",
    "ROLE_LABEL",
    "CappedBuffer",
    "ContainerResult",
    "ContainerRun",
    "DockerRuntime",
    "ImageError",
    "ImageNotAllowedError",
    "ImagePolicy",
    "ProgressCallback",
    "SandboxError",
    "SandboxLimits",
    "build_job_config",
    "normalise_image_ref",
]
