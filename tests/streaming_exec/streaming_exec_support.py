"""Harness for the streaming execution tests: validator, miner and executor in-process (real gRPC,
real signatures, real Docker), the test playing the gateway: it starts sessions at the validator
and talks to the job proxy itself.

Leftovers: every job a network starts is remembered; after each test no container, volume or
network labelled with one of those jobs may remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
    streaming_pb2,
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
from horde_services.core.proxy_wire import ProxyError, ProxyLink
from horde_services.core.receipts import StreamReceipt
from horde_services.core.server import open_channel
from horde_services.executor.agent import ExecutorAgent
from horde_services.executor.app import start_executor
from horde_services.executor.sandbox import JOB_LABEL
from horde_services.miner.app import start_miner
from horde_services.validator.app import start_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
HORDE_BIN = REPO_ROOT / ".venv" / "bin" / "horde"
BASE_IMAGE = "horde/base:latest"
LLM_IMAGE = "horde/demo-llm:latest"
DISHONEST_IMAGE = "horde/demo-llm-dishonest:latest"
IMAGES = [BASE_IMAGE, "horde/demo-job:latest", LLM_IMAGE, DISHONEST_IMAGE]
# horde/base runs the test's probe service (PROBE below) as a whitelisted streaming image.
STREAMING_WHITELIST = [BASE_IMAGE, LLM_IMAGE, DISHONEST_IMAGE]
CALL_TIMEOUT_S = 120.0
READY_WITHIN_S = 60.0

S = common_pb2

# A streaming service for the isolation and extra-data tests: POST / takes a JSON op and answers
# JSON; it records the executor's POST /extra-data notes.
PROBE = r"""
import errno, json, os, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
NOTES = []

def connect(host, port, kind):
    try:
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(b"x", (host, port))
            return {"ok": True, "error": ""}
        with socket.create_connection((host, port), timeout=2):
            return {"ok": True, "error": ""}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

def op(req):
    kind = req["op"]
    if kind in ("tcp", "udp"):
        return connect(req["host"], req["port"], kind)
    if kind == "resolve":
        try:
            return {"ok": True, "error": "", "addr": socket.gethostbyname(req["host"])}
        except OSError as exc:
            return {"ok": False, "error": str(exc)}
    if kind == "read":
        try:
            with open(req["path"], "rb") as fh:
                return {"ok": True, "data": fh.read().decode(errors="replace")}
        except OSError as exc:
            return {"ok": False, "error": str(exc)}
    if kind == "write":
        try:
            with open(req["path"], "wb") as fh:
                fh.write(b"overwritten")
            return {"ok": True, "error": ""}
        except OSError as exc:
            return {"ok": False, "error": f"{errno.errorcode.get(exc.errno, '?')}: {exc}"}
    if kind == "interfaces":
        with open("/proc/net/dev") as fh:
            lines = fh.read().splitlines()[2:]
        return {"ok": True, "interfaces": sorted(l.split(":")[0].strip() for l in lines)}
    if kind == "notes":
        return {"ok": True, "notes": list(NOTES)}
    if kind == "exit":
        os._exit(int(req.get("code", 3)))
    return {"ok": False, "error": "unknown op"}

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply({"ok": True})
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/extra-data":
            NOTES.append(json.loads(body))
            self.reply({"ok": True})
            return
        req = json.loads(body)
        if req["op"] == "drop":  # no answer: the connection just closes
            self.close_connection = True
            return
        self.reply(op(req))

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("HORDE_PORT", "8000"))), H)
server.daemon_threads = True
server.serve_forever()
"""


# --------------------------------------------------------------------------------------- docker


async def job_objects(docker: aiodocker.Docker, job_uuids: set[str]) -> list[str]:
    """Every container, volume and network labelled with one of these jobs."""
    found: list[str] = []
    for job_uuid in sorted(job_uuids):
        filters = json.dumps({"label": [f"{JOB_LABEL}={job_uuid}"]})
        containers = await docker._query_json(
            "containers/json", params={"all": "true", "filters": filters}
        )
        found += [f"container {','.join(c['Names'])}" for c in containers]
        volumes = await docker._query_json("volumes", params={"filters": filters})
        found += [f"volume {v['Name']}" for v in volumes.get("Volumes") or []]
        networks = await docker._query_json("networks", params={"filters": filters})
        found += [f"network {n['Name']}" for n in networks]
    return found


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


# --------------------------------------------------------------------------------------- sessions


def streaming_spec(
    image: str = LLM_IMAGE,
    *,
    command: list[str] | None = None,
    time_limit_s: int = 120,
    env: dict[str, str] | None = None,
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(image=image, command=command or [], env=env or {})
    spec.timeouts.execution_s = time_limit_s
    spec.timeouts.reservation_s = 15
    spec.timeouts.image_pull_s = 30
    spec.timeouts.streaming_start_s = 30
    spec.streaming.port = 8000
    return spec


def probe_spec(time_limit_s: int = 120) -> job_pb2.JobSpec:
    return streaming_spec(BASE_IMAGE, command=["python3", "-c", PROBE], time_limit_s=time_limit_s)


class Session:
    """One StartStreamingJob call, consumed in the background."""

    def __init__(self, net: Network, call: Any) -> None:
        self.net = net
        self.call = call
        self.events: list[job_pb2.JobEvent] = []
        self.ready: validator_pb2.StreamingJobReady | None = None
        self.result: job_pb2.JobResult | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        try:
            async for msg in self.call:
                kind = msg.WhichOneof("payload")
                if kind == "event":
                    self.events.append(msg.event)
                    self.net.remember(msg.event.job_uuid)
                elif kind == "ready":
                    self.ready = msg.ready
                    self.net.remember(msg.ready.job_uuid)
                elif kind == "result":
                    self.result = msg.result
                    self.net.remember(msg.result.job_uuid)
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    @property
    def job_uuid(self) -> str:
        if self.ready is not None:
            return self.ready.job_uuid
        if self.result is not None:
            return self.result.job_uuid
        return self.events[0].job_uuid if self.events else ""

    def describe(self) -> str:
        res = self.result
        if res is None:
            return f"no result (error {self.error!r})"
        return (
            f"{S.JobState.Name(res.state)} {S.FailureReason.Name(res.reason)} "
            f"{S.Stage.Name(res.stage)}: {res.detail!r} stderr={res.stderr.data[-400:]!r}"
        )

    async def _until(self, check: Callable[[], bool], within: float, what: str) -> None:
        try:
            async with asyncio.timeout(within):
                while not check() and not self._task.done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}") from None
        if not check():
            raise AssertionError(f"stream ended before {what}: {self.describe()}")

    async def wait_ready(self, within: float = READY_WITHIN_S) -> validator_pb2.StreamingJobReady:
        await self._until(
            lambda: self.ready is not None or self.result is not None, within, "ready"
        )
        assert self.ready is not None, f"the job did not start: {self.describe()}"
        return self.ready

    async def finished(self, within: float = 60.0) -> job_pb2.JobResult:
        await self._until(lambda: self.result is not None, within, "the job's result")
        async with asyncio.timeout(10):
            await self._task
        assert self.result is not None
        return self.result

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class Answer:
    frames: list[streaming_pb2.StreamResponseFrame]

    @property
    def body(self) -> bytes:
        return b"".join(f.body for f in self.frames)

    @property
    def status(self) -> int:
        return self.frames[-1].http_status

    @property
    def receipt(self) -> StreamReceipt:
        return StreamReceipt.from_proto(self.frames[-1].receipt)

    def json(self) -> Any:
        return json.loads(self.body)


class Proxy:
    """The gateway's stream to a job proxy (horde_services/core/proxy_wire.py)."""

    def __init__(
        self,
        ready: validator_pb2.StreamingJobReady,
        signer: Signer,
        clock_ns: Callable[[], int],
    ) -> None:
        self.ready = ready
        self.job_uuid = ready.job_uuid
        self.signer = signer
        self.link: ProxyLink | None = None
        self.seq = 0
        self._clock = clock_ns

    async def open(self) -> None:
        self.link = await ProxyLink.connect(
            self.ready.proxy_endpoint,
            signer=self.signer,
            callee=self.ready.proxy_identity,
            job_uuid=self.job_uuid,
        )

    async def send(self, body: bytes, *, pieces: int = 1, seq: int | None = None) -> int:
        assert self.link is not None
        if seq is None:
            self.seq += 1
            seq = self.seq
        step = max(1, -(-len(body) // pieces))
        parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
        for index, part in enumerate(parts):
            frame = streaming_pb2.StreamRequestFrame(
                seq=seq,
                client_timestamp_ns=self._clock(),
                body=part,
                last=index == len(parts) - 1,
            )
            await self.link.write(frame)
        return seq

    async def receive(self) -> Answer:
        assert self.link is not None
        frames: list[streaming_pb2.StreamResponseFrame] = []
        while True:
            frame = await self.link.read()
            assert frame is not None, "the proxy stream ended mid-response"
            frames.append(frame)
            if frame.last:
                return Answer(frames)

    async def ask(self, body: bytes, **kwargs: Any) -> Answer:
        await self.send(body, **kwargs)
        return await self.receive()

    async def op(self, **req: Any) -> Any:
        return (await self.ask(json.dumps(req).encode())).json()

    async def ended(self) -> ProxyError | None:
        """Read to the end of the stream: how the proxy ended it (None: OK)."""
        assert self.link is not None
        try:
            while await self.link.read() is not None:
                pass
        except ProxyError as exc:
            return exc
        return None

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


# --------------------------------------------------------------------------------------- network


@dataclass
class Keys:
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
        "gateway": "ed25519",
        "stranger": "ed25519",
    }
    paths = {name: root / f"{name}.json" for name in kinds}
    signers = {name: create_key_file(paths[name], kind) for name, kind in kinds.items()}  # type: ignore[arg-type]
    return Keys(paths, signers)


@dataclass
class Network:
    """Miner, executor and validator on 127.0.0.1; the test is the gateway."""

    root: Path
    keys: Keys
    docker: aiodocker.Docker
    whitelist: list[str] = field(default_factory=lambda: list(STREAMING_WHITELIST))
    jobs: set[str] = field(default_factory=set)
    miner: ServiceApp | None = None
    executor: ServiceApp | None = None
    agent: ExecutorAgent | None = None
    validator: ServiceApp | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    _sessions: list[Session] = field(default_factory=list)
    _proxies: list[Proxy] = field(default_factory=list)

    def remember(self, job_uuid: str) -> None:
        if job_uuid:
            self.jobs.add(job_uuid)

    def _common(self) -> dict[str, Any]:
        return {
            "state_dir": self.root,
            "roster_file": self.root / "roster.toml",
            "shutdown_grace_s": 1.0,
        }

    @property
    def miner_address(self) -> str:
        assert self.miner is not None
        return f"127.0.0.1:{self.miner.port}"

    async def start(self, *, executor: bool = True, **executor_overrides: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        validator_neuron = Neuron(
            uid=0,
            hotkey=self.keys.signers["validator"].identity.ss58,
            stake=10_000.0,
            validator_permit=True,
        )
        write_roster(self.root / "roster.toml", [validator_neuron])
        self.miner = await start_miner(
            load_settings(
                MinerSettings,
                executors=[self.keys.identity("executor")],
                heartbeat_interval_s=1.0,
                executor_timeout_s=5.0,
                **self._common(),
            ),
            self.keys.signers["miner"],
        )
        self.miner.start_background()
        write_roster(
            self.root / "roster.toml",
            [
                validator_neuron,
                Neuron(
                    uid=1,
                    hotkey=self.keys.signers["miner"].identity.ss58,
                    stake=100.0,
                    endpoint=self.miner_address,
                ),
            ],
        )
        if executor:
            await self.start_executor(**executor_overrides)
        await self.start_validator()

    async def start_validator(self, **overrides: Any) -> None:
        self.validator = await start_validator(
            load_settings(
                ValidatorSettings,
                clients=[self.keys.identity("gateway"), self.keys.identity("stranger")],
                allowed_images=IMAGES,
                streaming_whitelist=self.whitelist,
                **{**self._common(), **overrides},
            ),
            self.keys.signers["validator"],
        )
        self.validator.start_background()

    def executor_settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "miner_address": self.miner_address,
            "miner_identity": self.keys.identity("miner"),
            "allowed_images": IMAGES,
            "work_dir": self.root / "executor-work",
            "memory_limit_mb": 256,
            "pids_limit": 64,
            "cpu_limit": 1.0,
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

    def executor_config(self) -> Path:
        """A TOML config for `horde executor serve` with the same key and settings."""
        settings = self.executor_settings()
        settings["key_file"] = self.keys.paths["executor"]
        lines = []
        for key, value in settings.items():
            plain = str(value) if isinstance(value, Path) else value
            lines.append(f"{key} = {json.dumps(plain)}")
        path = self.root / "executor.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def stop_executor(self) -> None:
        if self.executor is not None:
            executor, self.executor = self.executor, None
            await executor.stop(1.0)

    # ---- calls

    def channel(self, address: str, signer: Signer, callee: str) -> grpc.aio.Channel:
        ch = open_channel(address, signer=signer, callee=callee)
        self._channels.append(ch)
        return ch

    def validator_stub(self, who: str = "gateway") -> validator_pb2_grpc.ValidatorServiceStub:
        assert self.validator is not None
        ch = self.channel(
            f"127.0.0.1:{self.validator.port}", self.keys.signers[who], self.validator.identity
        )
        return validator_pb2_grpc.ValidatorServiceStub(ch)

    def miner_stub(self) -> miner_pb2_grpc.MinerServiceStub:
        ch = self.channel(
            self.miner_address, self.keys.signers["validator"], self.keys.identity("miner")
        )
        return miner_pb2_grpc.MinerServiceStub(ch)

    async def wait_executor_at_miner(self, within: float = 30.0) -> None:
        stub = self.miner_stub()

        async def ready() -> bool:
            try:
                resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), timeout=3)
            except grpc.aio.AioRpcError:
                return False
            return len(resp.manifest.executors) == 1

        await wait_for(ready, within, "the executor at the miner", interval=0.2)

    def start_session(self, spec: job_pb2.JobSpec, who: str = "gateway") -> Session:
        call = self.validator_stub(who).StartStreamingJob(
            validator_pb2.StartStreamingJobRequest(
                spec=spec,
                gateway_identity=self.keys.identity(who),
                client_identity="ed25519:" + "00" * 32,
            ),
            timeout=CALL_TIMEOUT_S + spec.timeouts.execution_s,
        )
        session = Session(self, call)
        self._sessions.append(session)
        return session

    async def proxy(
        self,
        ready: validator_pb2.StreamingJobReady,
        who: str = "gateway",
        clock_ns: Callable[[], int] = time.time_ns,
        open_stream: bool = True,
    ) -> Proxy:
        proxy = Proxy(ready, self.keys.signers[who], clock_ns)
        self._proxies.append(proxy)
        if open_stream:
            await proxy.open()
        return proxy

    async def add_extra(
        self, job_uuid: str, name: str, data: bytes, pieces: int = 2
    ) -> validator_pb2.AddExtraDataResponse:
        step = max(1, -(-len(data) // pieces))

        async def requests() -> AsyncIterator[validator_pb2.AddExtraDataRequest]:
            offsets = list(range(0, len(data), step)) or [0]
            for offset in offsets:
                yield validator_pb2.AddExtraDataRequest(
                    job_uuid=job_uuid,
                    data=streaming_pb2.ExtraData(
                        file_name=name,
                        offset=offset,
                        data=data[offset : offset + step],
                        last=offset == offsets[-1],
                    ),
                )

        resp: validator_pb2.AddExtraDataResponse = await self.validator_stub().AddExtraData(
            requests(), timeout=60
        )
        return resp

    async def close(self) -> None:
        for proxy in self._proxies:
            proxy.close()
        for session in self._sessions:
            await session.close()
        for ch in self._channels:
            await ch.close()

    async def shutdown(self) -> None:
        await self.stop_executor()
        if self.validator is not None:
            await self.validator.stop(1.0)
        if self.miner is not None:
            await self.miner.stop(1.0)


def random_uuid() -> str:
    return str(uuid.uuid4())
