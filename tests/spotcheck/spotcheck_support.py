"""Harness for the spot-check end-to-end tests, all in-process with real gRPC, real signatures and
real Docker: a registered miner + executor serving sessions, the validator, a gateway keeping
every pair (sample_rate 1), and the validator operator's trusted miner + executor (not in the
roster). The test is the client (sessions through the gateway) and the operator (admin RPCs).

A cheating miner: its executor certifies horde/demo-llm (the whitelisted image and digest) but
runs the container from horde/demo-llm-dishonest (the same model, wrong on 10% of prompts).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiodocker
import grpc
from horde.v1 import validator_admin_pb2_grpc

from horde_services.core.app import ServiceApp
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    ExecutorSettings,
    GatewaySettings,
    MinerSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.identity import Signer, create_key_file
from horde_services.core.server import open_channel
from horde_services.executor.agent import ExecutorAgent
from horde_services.executor.app import start_executor
from horde_services.executor.sandbox import JOB_LABEL
from horde_services.miner.app import start_miner
from horde_services.streaming_gateway.app import start_gateway
from horde_services.streaming_gateway.client import StreamClient
from horde_services.validator.app import start_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
LLM_IMAGE = "horde/demo-llm:latest"
DISHONEST_IMAGE = "horde/demo-llm-dishonest:latest"
IMAGES = ["horde/base:latest", "horde/demo-job:latest", LLM_IMAGE, DISHONEST_IMAGE]


def demo_llm() -> ModuleType:
    """deploy/images/demo-llm/server.py, to know which prompts the dishonest model gets wrong."""
    path = REPO_ROOT / "deploy" / "images" / "demo-llm" / "server.py"
    spec = importlib.util.spec_from_file_location("demo_llm_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_id(ref: str) -> str:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def labelled(docker: aiodocker.Docker, job_uuid: str) -> list[str]:
    """Containers, volumes and networks labelled with the job."""
    filters = json.dumps({"label": [f"{JOB_LABEL}={job_uuid}"]})
    found = [
        c["Names"][0]
        for c in await docker._query_json(
            "containers/json", params={"all": "true", "filters": filters}
        )
    ]
    volumes = await docker._query_json("volumes", params={"filters": filters})
    found += [v["Name"] for v in volumes.get("Volumes") or []]
    found += [n["Name"] for n in await docker._query_json("networks", params={"filters": filters})]
    return found


def make_cheat(agent: ExecutorAgent) -> None:
    """The executor certifies the image it was asked for but runs the dishonest build."""
    runner: Any = agent._streaming
    assert runner is not None
    original = runner._start
    dishonest = image_id(DISHONEST_IMAGE)

    async def start(job: Any, _image_id: str, relay_image: str, relay_dir: Path) -> Any:
        return await original(job, dishonest, relay_image, relay_dir)

    runner._start = start


@dataclass
class SpotNet:
    root: Path
    signers: dict[str, Signer] = field(default_factory=dict)
    apps: list[ServiceApp] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    validator: ServiceApp | None = None
    gateway: ServiceApp | None = None

    def identity(self, name: str) -> str:
        return str(self.signers[name].identity)

    async def _start(self, app: ServiceApp) -> ServiceApp:
        self.apps.append(app)
        app.start_background()
        return app

    async def start(self, *, cheat: bool = False, **spotcheck: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        kinds = {
            "validator": "hotkey",
            "miner": "hotkey",
            "executor": "ed25519",
            "trusted_miner": "hotkey",
            "trusted_executor": "ed25519",
            "gateway": "ed25519",
            "client": "ed25519",
        }
        for name, kind in kinds.items():
            self.signers[name] = create_key_file(self.root / "keys" / f"{name}.json", kind)  # type: ignore[arg-type]
        roster = self.root / "roster.toml"
        vneuron = Neuron(
            uid=0,
            hotkey=self.signers["validator"].identity.ss58,
            stake=10_000.0,
            validator_permit=True,
        )
        write_roster(roster, [vneuron])
        common: dict[str, Any] = {"roster_file": roster, "shutdown_grace_s": 1.0}
        agents: list[ExecutorAgent] = []
        addresses = {}
        for prefix in ("", "trusted_"):
            state = self.root / (prefix or "main_")
            miner = await self._start(
                await start_miner(
                    load_settings(
                        MinerSettings,
                        executors=[self.identity(f"{prefix}executor")],
                        heartbeat_interval_s=1.0,
                        executor_timeout_s=5.0,
                        state_dir=state,
                        **common,
                    ),
                    self.signers[f"{prefix}miner"],
                )
            )
            addresses[prefix] = f"127.0.0.1:{miner.port}"
            if not prefix:
                miner_neuron = Neuron(
                    uid=1,
                    hotkey=self.signers["miner"].identity.ss58,
                    stake=100.0,
                    endpoint=addresses[prefix],
                )
                write_roster(roster, [vneuron, miner_neuron])
            executor, agent = await start_executor(
                load_settings(
                    ExecutorSettings,
                    miner_address=addresses[prefix],
                    miner_identity=self.identity(f"{prefix}miner"),
                    allowed_images=IMAGES,
                    work_dir=state / "executor-work",
                    memory_limit_mb=256,
                    pids_limit=64,
                    state_dir=state,
                    **common,
                ),
                self.signers[f"{prefix}executor"],
            )
            await self._start(executor)
            agents.append(agent)
        if cheat:
            make_cheat(agents[0])
        gateway_port = free_port()
        self.validator = await self._start(
            await start_validator(
                load_settings(
                    ValidatorSettings,
                    clients=[self.identity("client"), self.identity("gateway")],
                    admins=[self.identity("client")],
                    allowed_images=IMAGES,
                    streaming_whitelist=[LLM_IMAGE, DISHONEST_IMAGE],
                    gateways={self.identity("gateway"): f"127.0.0.1:{gateway_port}"},
                    trusted_miner={
                        "identity": self.identity("trusted_miner"),
                        "address": addresses["trusted_"],
                    },
                    synthetic={"enabled": False},
                    # The test runs the checks through the admin RPC, not the background loop.
                    spotcheck={"enabled": False, **spotcheck},
                    state_dir=self.root / "validator",
                    **common,
                ),
                self.signers["validator"],
            )
        )
        self.gateway = await self._start(
            await start_gateway(
                load_settings(
                    GatewaySettings,
                    listen=f"127.0.0.1:{gateway_port}",
                    validator_address=f"127.0.0.1:{self.validator.port}",
                    validator_identity=self.identity("validator"),
                    clients=[self.identity("client")],
                    sample_rate=1.0,
                    state_dir=self.root / "gateway",
                    **common,
                ),
                self.signers["gateway"],
            )
        )
        async with asyncio.timeout(30):
            for agent in agents:
                await agent.connected.wait()

    def channel(self, address: str, callee: str) -> grpc.aio.Channel:
        ch = open_channel(address, signer=self.signers["client"], callee=callee)
        self.channels.append(ch)
        return ch

    def admin(self) -> validator_admin_pb2_grpc.ValidatorAdminServiceStub:
        assert self.validator is not None
        ch = self.channel(f"127.0.0.1:{self.validator.port}", self.identity("validator"))
        return validator_admin_pb2_grpc.ValidatorAdminServiceStub(ch)

    async def session(self, prompts: list[bytes]) -> list[bytes]:
        """One session on horde/demo-llm through the gateway; the responses, receipts checked."""
        assert self.gateway is not None
        ch = self.channel(f"127.0.0.1:{self.gateway.port}", self.identity("gateway"))
        client = StreamClient(ch, validator_identity=self.identity("validator"))
        await client.open(LLM_IMAGE, time_limit_s=120)
        try:
            return [(await client.request(p)).body for p in prompts]
        finally:
            await client.close("done")

    async def stop(self) -> None:
        for ch in self.channels:
            await ch.close()
        for app in reversed(self.apps):
            await app.stop(1.0)
