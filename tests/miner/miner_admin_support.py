"""Harness for the miner operator's commands: a real miner (gRPC on port 0, SQLite, real
signatures) with an admin, a validator and executors enrolled, executor links driven by hand
(each says what hardware it has and answers its jobs when the test says so), a validator's
RunJob that countersigns the miner's receipts, and the `horde` CLI run as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from horde.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    job_pb2,
    manifest_pb2,
    miner_pb2,
    miner_pb2_grpc,
    receipts_pb2,
    synthetic_pb2,
)

from horde_services.core import lifecycle
from horde_services.core.app import ServiceApp
from horde_services.core.chain import write_roster
from horde_services.core.config import MinerSettings, load_settings
from horde_services.core.identity import Ed25519Signer, Signer, create_key_file
from horde_services.core.proto_util import event, result
from horde_services.core.server import open_channel
from horde_services.miner.app import start_miner

WAIT_S = 15.0
HORDE = Path(sys.executable).parent / "horde"

H100 = manifest_pb2.HardwareInfo(
    gpus=[
        manifest_pb2.GpuInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, uuid="GPU-1")
    ],
    driver_version="550.54",
    cuda_version="12.4",
    cpu_model="AMD EPYC 9454",
    cpu_count=16,
    memory_bytes=128 * 2**30,
    disk_free_bytes=500 * 2**30,
)
CPU_ONLY = manifest_pb2.HardwareInfo(cpu_model="Intel Xeon", cpu_count=4, memory_bytes=8 * 2**30)


@dataclass
class MinerNet:
    """A miner and the keys around it: its own (a key file, as the operator runs it with), an
    admin's, a validator's, a stranger's, and executors'."""

    root: Path
    settings: MinerSettings
    signer: Signer
    admin_key: Path
    stranger_key: Path
    validator: Signer
    executors: list[Ed25519Signer]
    app: ServiceApp | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stopped: bool = False  # the app was stopped by `stop_app` (its address still reads)

    @property
    def miner_key(self) -> Path:
        return self.root / "miner.json"

    @property
    def identity(self) -> str:
        return str(self.signer.identity)

    @property
    def address(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.port}"

    async def start(self) -> None:
        self.app = await start_miner(self.settings, self.signer)
        self.app.start_background()

    async def stop(self, grace_s: float = 0.0) -> None:
        for channel in self.channels:
            await channel.close()
        self.channels.clear()
        if self.app is not None and not self.stopped:
            await self.app.stop(grace_s)
        self.app = None
        self.stopped = False

    async def stop_app(self, grace_s: float | None = None) -> None:
        """Stop the miner as a signal does (drain first, then the servers), leaving the test's
        channels open to see what reaches them."""
        assert self.app is not None
        self.stopped = True
        await self.app.stop(grace_s)

    def channel(self, signer: Signer) -> grpc.aio.Channel:
        channel = open_channel(self.address, signer=signer, callee=self.identity)
        self.channels.append(channel)
        return channel

    def admin_stub(self, signer: Signer) -> miner_pb2_grpc.MinerAdminServiceStub:
        return miner_pb2_grpc.MinerAdminServiceStub(self.channel(signer))

    def miner_stub(self, signer: Signer) -> miner_pb2_grpc.MinerServiceStub:
        return miner_pb2_grpc.MinerServiceStub(self.channel(signer))

    async def horde(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run the `horde` CLI as a subprocess (without blocking the miner serving it here),
        with `env` added to this process's environment."""
        proc = await asyncio.create_subprocess_exec(
            str(HORDE),
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def horde_json(self, *argv: str) -> dict[str, Any]:
        code, out, err = await self.horde(*argv, "--json")
        assert code == 0, err
        doc: dict[str, Any] = json.loads(out)
        return doc


async def make_net(root: Path, executors: int = 2, **overrides: Any) -> MinerNet:
    root.mkdir(parents=True, exist_ok=True)
    signer = create_key_file(root / "miner.json", "hotkey")
    admin = create_key_file(root / "admin.json", "ed25519")
    create_key_file(root / "stranger.json", "ed25519")
    validator = create_key_file(root / "validator.json", "hotkey")
    keys = [Ed25519Signer.generate() for _ in range(executors)]
    settings = load_settings(
        MinerSettings,
        state_dir=root / "state",
        roster_file=write_roster(root / "roster.toml", []),
        executors=[str(k.identity) for k in keys],
        validators=[str(validator.identity)],
        admins=[str(admin.identity)],
        **{
            "heartbeat_interval_s": 1.0,
            "executor_timeout_s": 30.0,
            "shutdown_grace_s": 0.5,
            "drain_timeout_s": 0,
            **overrides,
        },
    )
    return MinerNet(
        root=root,
        settings=settings,
        signer=signer,
        admin_key=root / "admin.json",
        stranger_key=root / "stranger.json",
        validator=validator,
        executors=keys,
    )


class FakeExecutor:
    """One executor link to the miner: claims a class and hardware, and answers its jobs when
    the test says so."""

    def __init__(
        self,
        net: MinerNet,
        key: Ed25519Signer,
        executor_class: str,
        hardware: manifest_pb2.HardwareInfo,
    ) -> None:
        self._net = net
        self._key = key
        self._outbox: asyncio.Queue[executor_pb2.ConnectRequest] = asyncio.Queue()
        self.manifest = manifest_pb2.ExecutorManifest(
            executor_class=executor_class,
            executor_identity=str(key.identity),
            hardware=hardware,
            version="test",
            cached_images=["horde/base:latest"],
        )
        self.executor_id = ""
        self.accepted = asyncio.Event()
        self.jobs: asyncio.Queue[miner_pb2.RunJobStart] = asyncio.Queue()
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self.challenges: asyncio.Queue[synthetic_pb2.SyntheticChallenge] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeExecutor:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(WAIT_S):
            await self.accepted.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def next_job(self) -> miner_pb2.RunJobStart:
        async with asyncio.timeout(WAIT_S):
            return await self.jobs.get()

    async def next_cancel(self) -> str:
        async with asyncio.timeout(WAIT_S):
            return await self.cancels.get()

    async def next_challenge(self) -> synthetic_pb2.SyntheticChallenge:
        async with asyncio.timeout(WAIT_S):
            return await self.challenges.get()

    def answer(self, challenge_id: str) -> None:
        self._outbox.put_nowait(
            executor_pb2.ConnectRequest(
                synthetic_answer=synthetic_pb2.SyntheticAnswer(
                    challenge_id=challenge_id, secrets=[7], backend="cpu"
                )
            )
        )

    def report(self, job_uuid: str, state: common_pb2.JobState.ValueType) -> None:
        self._outbox.put_nowait(
            executor_pb2.ConnectRequest(
                event=event(job_uuid, state, common_pb2.STAGE_EXECUTION, "test")
            )
        )

    def finish(self, job_uuid: str, state: common_pb2.JobState.ValueType, **kw: Any) -> None:
        self._outbox.put_nowait(executor_pb2.ConnectRequest(result=result(job_uuid, state, **kw)))

    async def _run(self) -> None:
        self._outbox.put_nowait(executor_pb2.ConnectRequest(manifest=self.manifest))

        async def requests() -> AsyncIterator[executor_pb2.ConnectRequest]:
            while True:
                yield await self._outbox.get()

        async with open_channel(
            self._net.address, signer=self._key, callee=self._net.identity
        ) as channel:
            call = executor_pb2_grpc.ExecutorLinkServiceStub(channel).Connect(requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "accepted":
                        self.executor_id = msg.accepted.executor_id
                        self.accepted.set()
                    elif kind == "run_job":
                        self.jobs.put_nowait(msg.run_job)
                    elif kind == "cancel":
                        self.cancels.put_nowait(msg.cancel.job_uuid)
                    elif kind == "synthetic_challenge":
                        self.challenges.put_nowait(msg.synthetic_challenge)
            except grpc.aio.AioRpcError:
                return  # the miner went away


class ValidatorJob:
    """A validator's RunJob at the miner: countersigns the miner's receipts as they come."""

    def __init__(self, net: MinerNet, executor_class: str, job_kind: str = "organic") -> None:
        self.job_uuid = str(uuid.uuid4())
        self._net = net
        self._outbox: asyncio.Queue[miner_pb2.RunJobRequest] = asyncio.Queue()
        spec = job_pb2.JobSpec(
            image="horde/base:latest", command=["true"], executor_class=executor_class
        )
        self._outbox.put_nowait(
            miner_pb2.RunJobRequest(
                start=miner_pb2.RunJobStart(job_uuid=self.job_uuid, spec=spec, job_kind=job_kind)
            )
        )

        async def requests() -> AsyncIterator[miner_pb2.RunJobRequest]:
            while True:
                yield await self._outbox.get()

        self._call = net.miner_stub(net.validator).RunJob(requests(), timeout=WAIT_S * 2)
        self.receipts: list[receipts_pb2.LifecycleReceipt] = []

    async def next(self) -> miner_pb2.RunJobResponse:
        async with asyncio.timeout(WAIT_S):
            msg = await self._call.read()
        assert msg is not grpc.aio.EOF, "the miner ended the job stream without a result"
        assert isinstance(msg, miner_pb2.RunJobResponse)
        if msg.WhichOneof("payload") == "receipt":
            signed = lifecycle.countersign(msg.receipt, self._net.validator)
            self.receipts.append(signed)
            self._outbox.put_nowait(miner_pb2.RunJobRequest(countersigned_receipt=signed))
        return msg

    async def started(self) -> None:
        """Until the miner's job-started receipt (the executor is reserved by then)."""
        assert (await self.next()).WhichOneof("payload") == "receipt"

    async def until_event(self, state: common_pb2.JobState.ValueType) -> None:
        while True:
            msg = await self.next()
            if msg.WhichOneof("payload") == "event" and msg.event.state == state:
                return

    async def result(self) -> job_pb2.JobResult:
        while (msg := await self.next()).WhichOneof("payload") != "result":
            pass
        return msg.result

    def cancel(self) -> None:
        self._call.cancel()
