"""Harness for the organic end-to-end tests: a whole Horde network in-process (real gRPC, real
signatures, real Docker), with a handle on every service so a test can stop or restart the miner,
stop the executor or run one as a subprocess; job helpers; a local HTTP server's state.

Leftovers: every job a network runs is remembered; after each test (while its executor is still
up) and again after the session no container, volume or network labelled with one of those jobs
may remain. The Docker engine may be shared with other test runs (executors only sweep their own
instance's objects), so the session check only looks at this session's jobs, unless
HORDE_STRICT_LEFTOVERS=1 asks for a check of every ``io.horde.managed`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import grpc
from horde.v1 import (
    common_pb2,
    job_pb2,
    miner_pb2,
    miner_pb2_grpc,
    validator_pb2,
    validator_pb2_grpc,
)

from horde_services.core.app import ServiceApp
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    ExecutorSettings,
    MinerSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.identity import Signer, create_key_file
from horde_services.core.server import open_channel
from horde_services.executor.agent import ExecutorAgent
from horde_services.executor.app import start_executor
from horde_services.executor.sandbox import JOB_LABEL, ROLE_LABEL
from horde_services.miner.app import start_miner
from horde_services.validator.app import start_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
HORDE_BIN = REPO_ROOT / ".venv" / "bin" / "horde"
BASE_IMAGE = "horde/base:latest"
DEMO_IMAGE = "horde/demo-job:latest"
MISSING_IMAGE = "horde/does-not-exist:latest"
IMAGES = [BASE_IMAGE, DEMO_IMAGE]

# Sandbox limits of the test executors: small, so the limit tests are quick and cheap.
MEMORY_LIMIT_MB = 256
PIDS_LIMIT = 64
OUTPUT_LIMIT_MB = 16
HEARTBEAT_S = 1.0
EXECUTOR_TIMEOUT_S = 5.0
JOB_DEADLINE_S = 90.0
LEFTOVER_WAIT_S = 30.0

# Every job uuid any network of this session ran (for the session-end leftover check).
SESSION_JOBS: set[str] = set()

S = common_pb2


# --------------------------------------------------------------------------------------- docker


async def labelled_objects(docker: aiodocker.Docker, label: str) -> list[tuple[str, str, str]]:
    """(kind, name, job uuid) of every container, volume and network carrying ``label``."""
    filters = json.dumps({"label": [label]})
    found: list[tuple[str, str, str]] = []
    containers = await docker._query_json(
        "containers/json", params={"all": "true", "filters": filters}
    )
    for c in containers:
        found.append(
            ("container", ",".join(c["Names"]), (c.get("Labels") or {}).get(JOB_LABEL, ""))
        )
    volumes = await docker._query_json("volumes", params={"filters": filters})
    for v in volumes.get("Volumes") or []:
        found.append(("volume", v["Name"], (v.get("Labels") or {}).get(JOB_LABEL, "")))
    for n in await docker._query_json("networks", params={"filters": filters}):
        found.append(("network", n["Name"], (n.get("Labels") or {}).get(JOB_LABEL, "")))
    return found


async def job_objects(docker: aiodocker.Docker, job_uuids: Iterable[str]) -> list[str]:
    out: list[str] = []
    for job_uuid in job_uuids:
        out += [f"{k} {n}" for k, n, _ in await labelled_objects(docker, f"{JOB_LABEL}={job_uuid}")]
    return out


async def wait_for(
    predicate: Callable[[], Any], within: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def job_containers(docker: aiodocker.Docker, job_uuid: str) -> list[dict[str, Any]]:
    """The job's own container(s) (role "job"; not the output holder), any state."""
    filters = json.dumps({"label": [f"{JOB_LABEL}={job_uuid}", f"{ROLE_LABEL}=job"]})
    found = await docker._query_json("containers/json", params={"filters": filters, "all": "true"})
    return list(found)


async def wait_job_container_running(
    docker: aiodocker.Docker, job_uuid: str, within: float = 30.0
) -> str:
    """Wait until the job's own container (not the output holder) is running; its id."""

    async def running() -> str:
        found = await job_containers(docker, job_uuid)
        return next((str(c["Id"]) for c in found if c.get("State") == "running"), "")

    return str(await wait_for(running, within, f"the container of job {job_uuid} to run"))


async def wait_no_job_objects(
    docker: aiodocker.Docker, job_uuids: Iterable[str], within: float = LEFTOVER_WAIT_S
) -> None:
    uuids = list(job_uuids)
    left: list[str] = []

    async def gone() -> bool:
        nonlocal left
        left = await job_objects(docker, uuids)
        return not left

    try:
        await wait_for(gone, within, "job containers/volumes to be removed", interval=0.2)
    except AssertionError:
        raise AssertionError(f"sandbox objects left behind: {left}") from None


# --------------------------------------------------------------------------------------- jobs


@dataclass
class JobRun:
    """Everything a SubmitJob (or WatchJob) stream returned."""

    events: list[job_pb2.JobEvent] = field(default_factory=list)
    chunks: list[job_pb2.OutputChunk] = field(default_factory=list)
    result: job_pb2.JobResult | None = None
    order: list[str] = field(default_factory=list)  # "event" / "output_chunk" / "result"

    @property
    def job_uuid(self) -> str:
        if self.result is not None and self.result.job_uuid:
            return self.result.job_uuid
        return self.events[0].job_uuid if self.events else ""

    @property
    def states(self) -> list[int]:
        """Event states in order, consecutive repeats collapsed."""
        out: list[int] = []
        for ev in self.events:
            if not out or out[-1] != ev.state:
                out.append(ev.state)
        return out

    def files(self) -> dict[str, bytes]:
        out: dict[str, bytearray] = {}
        for chunk in self.chunks:
            buf = out.setdefault(chunk.path, bytearray())
            assert chunk.offset == len(buf), f"chunk of {chunk.path} out of order"
            buf += chunk.data
        return {k: bytes(v) for k, v in out.items()}

    def describe(self) -> str:
        res = self.result
        if res is None:
            return "no result"
        return (
            f"{S.JobState.Name(res.state)} {S.FailureReason.Name(res.reason)} "
            f"{S.Stage.Name(res.stage)}: {res.detail!r} "
            f"exit={res.exit_code if res.HasField('exit_code') else None} "
            f"stderr={res.stderr.data[-400:]!r}"
        )


def submit_requests(
    spec: job_pb2.JobSpec, inline: dict[int, bytes]
) -> Iterator[validator_pb2.SubmitJobRequest]:
    yield validator_pb2.SubmitJobRequest(spec=spec)
    for index, data in sorted(inline.items()):
        step = 256 * 1024
        offsets = range(0, len(data), step) if data else [0]
        for offset in offsets:
            block = data[offset : offset + step]
            yield validator_pb2.SubmitJobRequest(
                input_chunk=job_pb2.InputChunk(
                    volume_index=index, data=block, last=offset + step >= len(data)
                )
            )


class JobCall:
    """A SubmitJob stream consumed in the background; tests wait on its states and result."""

    def __init__(
        self,
        net: Network,
        call: Any,
        more: asyncio.Queue[validator_pb2.SubmitJobRequest | None],
    ) -> None:
        self.net = net
        self.call = call
        self._more = more
        self.run = JobRun()
        self._changed = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        try:
            async for msg in self.call:
                kind = msg.WhichOneof("payload")
                self.run.order.append(kind)
                if kind == "event":
                    self.run.events.append(msg.event)
                    self.net.remember(msg.event.job_uuid)
                elif kind == "output_chunk":
                    self.run.chunks.append(msg.output_chunk)
                elif kind == "result":
                    self.run.result = msg.result
                    self.net.remember(msg.result.job_uuid)
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def _until(self, check: Callable[[], bool], within: float, what: str) -> None:
        try:
            async with asyncio.timeout(within):
                while not check():
                    if self._task.done():
                        break
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}") from None
        if self.error is not None:
            raise self.error
        if not check():
            raise AssertionError(f"stream ended before {what}: {self.run.describe()}")

    async def wait_state(self, state: int, within: float = 60.0) -> job_pb2.JobEvent:
        def seen() -> bool:
            return any(ev.state == state for ev in self.run.events)

        await self._until(seen, within, f"a {S.JobState.Name(state)} event")
        return next(ev for ev in self.run.events if ev.state == state)

    async def finished(self, within: float = JOB_DEADLINE_S) -> JobRun:
        await self._until(lambda: self.run.result is not None, within, "the job's result")
        async with asyncio.timeout(10):
            await self._task  # the stream ends after the result
        return self.run

    def send(self, request: validator_pb2.SubmitJobRequest) -> None:
        self._more.put_nowait(request)

    async def close(self) -> None:
        self._more.put_nowait(None)
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --------------------------------------------------------------------------------------- network


@dataclass
class Keys:
    dir: Path
    paths: dict[str, Path]
    signers: dict[str, Signer]

    def identity(self, name: str) -> str:
        return str(self.signers[name].identity)


def make_keys(root: Path) -> Keys:
    root.mkdir(parents=True, exist_ok=True)
    kinds = {
        "validator": "hotkey",
        "miner": "hotkey",
        "executor": "ed25519",
        "executor2": "ed25519",
        "client": "ed25519",
        "client2": "ed25519",  # another enrolled client
        "admin": "ed25519",  # an enrolled client that is also a validator admin
    }
    paths = {name: root / f"{name}.json" for name in kinds}
    signers = {name: create_key_file(paths[name], kind) for name, kind in kinds.items()}  # type: ignore[arg-type]
    return Keys(root, paths, signers)


class Network:
    """Keys, roster, miner, executor and validator on 127.0.0.1, each stoppable on its own."""

    def __init__(
        self, root: Path, keys: Keys, docker: aiodocker.Docker, extra_images: list[str]
    ) -> None:
        self.root = root
        self.keys = keys
        self.docker = docker
        self.images = [*IMAGES, *extra_images]
        self.roster = root / "roster.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.jobs: set[str] = set()
        self.miner: ServiceApp | None = None
        self.miner_port = 0
        self.executor: ServiceApp | None = None
        self.agent: ExecutorAgent | None = None
        self.validator: ServiceApp | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list[JobCall] = []
        self._validator_neuron = Neuron(
            uid=0,
            hotkey=keys.signers["validator"].identity.ss58,
            stake=10_000.0,
            validator_permit=True,
        )
        write_roster(self.roster, [self._validator_neuron])

    def remember(self, job_uuid: str) -> None:
        if job_uuid and job_uuid not in self.jobs:
            self.jobs.add(job_uuid)
            SESSION_JOBS.add(job_uuid)

    def _common(self) -> dict[str, Any]:
        return {"state_dir": self.root, "roster_file": self.roster, "shutdown_grace_s": 1.0}

    @property
    def miner_address(self) -> str:
        return f"127.0.0.1:{self.miner_port}"

    # ---- services

    async def start_miner(self) -> ServiceApp:
        settings = load_settings(
            MinerSettings,
            listen=f"127.0.0.1:{self.miner_port}",
            executors=[self.keys.identity("executor"), self.keys.identity("executor2")],
            heartbeat_interval_s=HEARTBEAT_S,
            executor_timeout_s=EXECUTOR_TIMEOUT_S,
            **self._common(),
        )
        self.miner = await start_miner(settings, self.keys.signers["miner"])
        self.miner.start_background()
        if not self.miner_port:
            self.miner_port = self.miner.port
            write_roster(
                self.roster,
                [
                    self._validator_neuron,
                    Neuron(
                        uid=1,
                        hotkey=self.keys.signers["miner"].identity.ss58,
                        stake=100.0,
                        endpoint=self.miner_address,
                    ),
                ],
            )
        assert self.miner.port == self.miner_port
        return self.miner

    async def stop_miner(self) -> None:
        assert self.miner is not None
        miner, self.miner = self.miner, None
        await miner.stop(1.0)

    def executor_settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "miner_address": self.miner_address,
            "miner_identity": self.keys.identity("miner"),
            "allowed_images": self.images,
            "work_dir": self.root / "executor-work",
            "memory_limit_mb": MEMORY_LIMIT_MB,
            "pids_limit": PIDS_LIMIT,
            "output_limit_mb": OUTPUT_LIMIT_MB,
            "cpu_limit": 1.0,
            # The tests' URL inputs come from an HttpServer on 127.0.0.1.
            "job_urls_allow_private": True,
            **self._common(),
            **overrides,
        }

    async def start_executor(self, **overrides: Any) -> ExecutorAgent:
        settings = load_settings(ExecutorSettings, **self.executor_settings(**overrides))
        self.executor, self.agent = await start_executor(settings, self.keys.signers["executor"])
        self.executor.start_background()
        async with asyncio.timeout(30):
            await self.agent.connected.wait()
        return self.agent

    def _write_toml(self, name: str, settings: dict[str, Any]) -> Path:
        lines = []
        for key, value in settings.items():
            plain = str(value) if isinstance(value, Path) else value
            lines.append(f"{key} = {json.dumps(plain)}")
        path = self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def executor_config(self, key: str = "executor2", **overrides: Any) -> Path:
        """A TOML config for `horde executor serve` dialling this network's miner."""
        settings = {**self.executor_settings(), **overrides}
        settings["key_file"] = self.keys.paths[key]
        settings["work_dir"] = self.root / f"{key}-work"
        return self._write_toml(key, settings)

    def validator_config(self, state_dir: Path) -> Path:
        """A TOML config for `horde validator serve` (the same hotkey as the in-process one)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            **self._common(),
            "state_dir": state_dir,
            "key_file": self.keys.paths["validator"],
            "clients": [self.keys.identity("client")],
            "allowed_images": self.images,
        }
        return self._write_toml("validator-sub", settings)

    async def stop_executor(self) -> None:
        if self.executor is not None:
            executor, self.executor = self.executor, None
            await executor.stop(1.0)

    async def start_validator(
        self, validator_images: list[str] | None = None, **overrides: Any
    ) -> ServiceApp:
        settings = load_settings(
            ValidatorSettings,
            clients=[self.keys.identity(name) for name in ("client", "client2", "admin")],
            admins=[self.keys.identity("admin")],
            allowed_images=validator_images if validator_images is not None else self.images,
            streaming_whitelist=[],
            **{
                **self._common(),
                # A test's teardown stops it at once; drain tests ask for a drain.
                "drain_timeout_s": 0,
                **overrides,
            },
        )
        self.validator = await start_validator(settings, self.keys.signers["validator"])
        self.validator.start_background()
        return self.validator

    # ---- clients

    def channel(self, address: str, signer: Signer, callee: str) -> grpc.aio.Channel:
        ch = open_channel(address, signer=signer, callee=callee)
        self._channels.append(ch)
        return ch

    def client(self, signer: Signer | None = None) -> validator_pb2_grpc.ValidatorServiceStub:
        assert self.validator is not None
        ch = self.channel(
            f"127.0.0.1:{self.validator.port}",
            signer or self.keys.signers["client"],
            self.validator.identity,
        )
        return validator_pb2_grpc.ValidatorServiceStub(ch)

    def miner_stub(self) -> miner_pb2_grpc.MinerServiceStub:
        """The miner's API as the validator calls it (signed by the validator's hotkey)."""
        ch = self.channel(
            self.miner_address, self.keys.signers["validator"], self.keys.identity("miner")
        )
        return miner_pb2_grpc.MinerServiceStub(ch)

    async def wait_executors(self, count: int, within: float = 30.0) -> None:
        """Wait until the miner's manifest lists ``count`` connected executors."""
        stub = self.miner_stub()

        async def ready() -> bool:
            try:
                resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=3)
            except grpc.aio.AioRpcError:
                return False
            return len(resp.manifest.executors) == count

        await wait_for(ready, within, f"{count} executor(s) at the miner", interval=0.2)

    def start_job(
        self,
        spec: job_pb2.JobSpec,
        inline: dict[int, bytes] | None = None,
        stub: validator_pb2_grpc.ValidatorServiceStub | None = None,
        *,
        hold_open: bool = False,
    ) -> JobCall:
        """Submit a job; with ``hold_open`` the request stream stays open after the inputs, so
        the test can send more (``JobCall.send``), e.g. a cancel."""
        stub = stub or self.client()
        more: asyncio.Queue[validator_pb2.SubmitJobRequest | None] = asyncio.Queue()
        if not hold_open:
            more.put_nowait(None)

        async def requests() -> AsyncIterator[validator_pb2.SubmitJobRequest]:
            for request in submit_requests(spec, inline or {}):
                yield request
            while (request := await more.get()) is not None:
                yield request

        call = stub.SubmitJob(requests())
        job = JobCall(self, call, more)
        self._calls.append(job)
        return job

    async def run_job(
        self,
        spec: job_pb2.JobSpec,
        inline: dict[int, bytes] | None = None,
        within: float = JOB_DEADLINE_S,
    ) -> JobRun:
        return await self.start_job(spec, inline).finished(within)

    async def close(self) -> None:
        for job in self._calls:
            await job.close()
        for ch in self._channels:
            await ch.close()


# --------------------------------------------------------------------------------------- http


@dataclass
class HttpServer:
    """A local aiohttp server: GET /files/<name> serves registered bytes; GET /stall/<name> sends
    headers and never a body (until teardown); PUT /upload/<name> stores the body, POST
    /upload/<name> the multipart form's file and fields (answering ``upload_status``)."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    upload_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    upload_forms: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    upload_status: int = 200
    uploaded: asyncio.Event = field(default_factory=asyncio.Event)
    gets: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


# --------------------------------------------------------------------------------------- helpers


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_for(
    image: str = BASE_IMAGE,
    command: list[str] | None = None,
    *,
    execution_s: int = 60,
    inputs: list[job_pb2.InputVolume] | None = None,
    output: job_pb2.OutputSpec | None = None,
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(
        image=image,
        command=command or [],
        inputs=inputs or [],
        output=output or job_pb2.OutputSpec(stream=job_pb2.StreamOutput()),
    )
    spec.timeouts.execution_s = execution_s
    spec.timeouts.reservation_s = 15
    spec.timeouts.image_pull_s = 30
    spec.timeouts.volume_download_s = 30
    spec.timeouts.output_upload_s = 30
    return spec


def python_job(code: str, *, execution_s: int = 60) -> job_pb2.JobSpec:
    return spec_for(BASE_IMAGE, ["python3", "-c", code], execution_s=execution_s)


def assert_result(
    run: JobRun,
    state: int,
    reason: int,
    stage: int | None = None,
) -> job_pb2.JobResult:
    """The run ended in `state` for `reason` (at `stage`, when given), saying why."""
    res = run.result
    assert res is not None, run.describe()
    assert (common_pb2.JobState.Name(res.state), common_pb2.FailureReason.Name(res.reason)) == (
        common_pb2.JobState.Name(state),
        common_pb2.FailureReason.Name(reason),
    ), run.describe()
    if stage is not None:
        assert common_pb2.Stage.Name(res.stage) == common_pb2.Stage.Name(stage), run.describe()
    assert res.detail, "a failure must say why"
    return res
