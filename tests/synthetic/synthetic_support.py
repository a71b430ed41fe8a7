"""Harness for the synthetic tests: a validator and any number of real miners on 127.0.0.1 (real
gRPC, real signatures, a local roster as the chain), with light executors dialling the miners
over the real link and answering however a test tells them to."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from horde.v1 import synthetic_pb2, validator_admin_pb2_grpc

from horde_services.core.app import ServiceApp
from horde_services.core.chain import LocalRoster, Neuron, write_roster
from horde_services.core.config import (
    MinerSettings,
    SyntheticClass,
    SyntheticSettings,
    TrustedMiner,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.identity import Ed25519Signer, Signer, create_key_file, load_key_file
from horde_services.core.server import open_channel
from horde_services.executor.synthetic import Behaviour, InProcessSolver, LightExecutor, answer
from horde_services.miner.app import start_miner
from horde_services.validator.app import start_validator

FAST = SyntheticClass(range_size=2_000, digests=4, deadline_s=10.0, weight=1.0)
BIG = SyntheticClass(range_size=2_000, digests=4, deadline_s=10.0, weight=3.0)
WAIT_S = 30.0


def honest() -> Behaviour:
    return lambda ch: answer(InProcessSolver(), ch)


def made_up() -> Behaviour:
    """Answers at once with secrets picked at random inside the range."""

    async def behave(ch: synthetic_pb2.SyntheticChallenge) -> synthetic_pb2.SyntheticAnswer:
        now = time.time_ns()
        guesses = [random.randrange(ch.range_start, ch.range_end) for _ in ch.digests]
        return synthetic_pb2.SyntheticAnswer(
            challenge_id=ch.challenge_id, secrets=guesses, started_ns=now, finished_ns=now
        )

    return behave


def late(after_deadline_s: float) -> Behaviour:
    """A correct answer, sent some time after the challenge's deadline (a too-slow machine)."""

    async def behave(ch: synthetic_pb2.SyntheticChallenge) -> synthetic_pb2.SyntheticAnswer:
        out = await answer(InProcessSolver(), ch)
        # Simulated compute time, not synchronisation: the work "takes" past the deadline.
        await asyncio.sleep(max(0.0, (ch.deadline_ns - time.time_ns()) / 1e9) + after_deadline_s)
        out.finished_ns = time.time_ns()
        return out

    return behave


def silent(release: asyncio.Event) -> Behaviour:
    """Never answers until ``release`` is set (then not at all)."""

    async def behave(ch: synthetic_pb2.SyntheticChallenge) -> None:
        await release.wait()
        return None

    return behave


@dataclass
class MinerHandle:
    app: ServiceApp
    signer: Signer
    executors: list[LightExecutor] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopped: bool = False

    @property
    def identity(self) -> str:
        return str(self.signer.identity)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"


class SynthNet:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.validator_signer = create_key_file(root / "validator.json", "hotkey")
        self.admin = Ed25519Signer.generate()
        self.client = Ed25519Signer.generate()  # enrolled client, not an admin
        self.roster = root / "roster.toml"
        self.neurons = [
            Neuron(
                uid=0,
                hotkey=self.validator_signer.identity.ss58,
                stake=1000.0,
                validator_permit=True,
            )
        ]
        write_roster(self.roster, self.neurons)
        self.miners: list[MinerHandle] = []
        self.validator: ServiceApp | None = None

    @property
    def ledger(self) -> LocalRoster:
        """The local chain's weights ledger, kept in the validator's state dir."""
        return LocalRoster(self.roster, ledger_path=self.root / "validator" / "weights.jsonl")

    async def add_miner(
        self,
        behaviours: list[Behaviour],
        executor_class: str = "cpu-small",
        register: bool = True,
        enrol: tuple[str, ...] = (),
    ) -> MinerHandle:
        """A real miner with one light executor per behaviour (and ``enrol``: identities of
        other executors it accepts)."""
        index = len(self.miners) + 1
        signer = create_key_file(self.root / f"miner{index}.json", "hotkey")
        keys = [Ed25519Signer.generate() for _ in behaviours]
        app = await start_miner(
            load_settings(
                MinerSettings,
                executors=[str(k.identity) for k in keys] + list(enrol),
                state_dir=self.root / f"miner{index}",
                roster_file=self.roster,
                heartbeat_interval_s=1.0,
                executor_timeout_s=30.0,
            ),
            signer,
        )
        app.start_background()
        handle = MinerHandle(app, signer)
        self.miners.append(handle)
        if register:
            self.neurons.append(
                Neuron(uid=index, hotkey=signer.identity.ss58, stake=10.0, endpoint=handle.address)
            )
            write_roster(self.roster, self.neurons)
        for key, behaviour in zip(keys, behaviours, strict=True):
            ex = LightExecutor(key, handle.address, handle.identity, executor_class, behaviour)
            handle.executors.append(ex)
            handle.tasks.append(asyncio.create_task(ex.run()))
        async with asyncio.timeout(WAIT_S):
            for ex in handle.executors:
                await ex.connected.wait()
        return handle

    async def start_validator(
        self,
        classes: dict[str, SyntheticClass] | None = None,
        grace_s: float = 2.0,
        extra_miners: dict[str, str] | None = None,
        gateways: dict[str, str] | None = None,
        trusted_miner: TrustedMiner | None = None,
    ) -> ServiceApp:
        settings = load_settings(
            ValidatorSettings,
            state_dir=self.root / "validator",
            roster_file=self.roster,
            clients=[str(self.client.identity), str(self.admin.identity)],
            admins=[str(self.admin.identity)],
            miners=extra_miners or {},
            gateways=gateways or {},
            trusted_miner=trusted_miner,
            synthetic=SyntheticSettings(
                enabled=False,
                grace_s=grace_s,
                classes=classes or {"cpu-small": FAST, "cpu-big": BIG},
            ),
        )
        self.validator = await start_validator(
            settings, load_key_file(self.root / "validator.json")
        )
        return self.validator

    def admin_stub(
        self, signer: Signer | None = None
    ) -> tuple[validator_admin_pb2_grpc.ValidatorAdminServiceStub, Callable[[], object]]:
        assert self.validator is not None
        channel = open_channel(
            f"127.0.0.1:{self.validator.port}",
            signer=signer or self.admin,
            callee=str(self.validator_signer.identity),
        )
        return validator_admin_pb2_grpc.ValidatorAdminServiceStub(channel), channel.close

    async def stop_miner(self, handle: MinerHandle) -> None:
        for task in handle.tasks:
            task.cancel()
        for task in handle.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        handle.tasks.clear()
        if not handle.stopped:
            handle.stopped = True
            await handle.app.stop(0)

    async def close(self) -> None:
        for handle in self.miners:
            await self.stop_miner(handle)
        if self.validator is not None:
            await self.validator.stop(0)
