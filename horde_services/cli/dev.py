"""`horde dev up`: a whole local network on 127.0.0.1 in one process, for trying Horde out."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from horde_services.cli.devenv import ENDPOINTS
from horde_services.core.app import ServiceApp
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import (
    ExecutorSettings,
    GatewaySettings,
    MinerSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.identity import create_key_file, load_key_file
from horde_services.executor.app import start_executor
from horde_services.miner.app import start_miner
from horde_services.streaming_gateway.app import start_gateway
from horde_services.validator.app import start_validator

log = structlog.get_logger("horde.dev")

DEFAULT_IMAGES = ["horde/base:latest", "horde/demo-job:latest"]
# Images gateways may start as streaming jobs on the dev network (any local build of them).
STREAMING_IMAGES = ["horde/demo-llm:latest", "horde/demo-llm-dishonest:latest"]
# Held (flock) by the running `horde dev up` of a state dir; it holds that process's pid.
LOCK_FILE = "dev.lock"


def _free_port() -> int:
    """A port free now on 127.0.0.1 (the validator must know the gateway's before it starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key(path: Path, kind: str) -> Path:
    if not path.exists():
        create_key_file(path, kind)  # type: ignore[arg-type]
    return path


class StateDirBusy(Exception):
    """Another `horde dev up` holds the state dir's lock."""


@contextlib.contextmanager
def _state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on STATE_DIR/dev.lock (which says whose pid) while the block
    runs: two networks on one state dir would share its databases, rewrite each other's roster
    and remove each other's endpoints.json. The kernel drops the lock when the process ends."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirBusy(
                f"another `horde dev up`{who} is running with state dir {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race a newcomer)


async def dev_up(
    state_dir: Path,
    allow_images: list[str],
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the network until `stop` is set (or SIGINT/SIGTERM); `ready` is set once
    endpoints.json is written. Raises StateDirBusy when another one runs on `state_dir`."""
    state_dir = state_dir.resolve()
    with _state_dir_lock(state_dir):
        await _dev_up(state_dir, allow_images, stop, ready)


async def _dev_up(
    state_dir: Path,
    allow_images: list[str],
    stop: asyncio.Event | None,
    ready: asyncio.Event | None,
) -> None:
    keys = state_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    paths = {
        "validator": _key(keys / "validator.json", "hotkey"),
        "miner": _key(keys / "miner.json", "hotkey"),
        "executor": _key(keys / "executor.json", "ed25519"),
        "gateway": _key(keys / "gateway.json", "ed25519"),
        "client": _key(keys / "client.json", "ed25519"),
        # The validator operator's own miner for spot checks: not in the roster.
        "trusted_miner": _key(keys / "trusted-miner.json", "hotkey"),
        "trusted_executor": _key(keys / "trusted-executor.json", "ed25519"),
    }
    signers = {name: load_key_file(path) for name, path in paths.items()}
    ids = {name: s.identity for name, s in signers.items()}
    images = list(dict.fromkeys([*DEFAULT_IMAGES, *allow_images]))
    roster = state_dir / "roster.toml"
    validator_neuron = Neuron(
        uid=0, hotkey=ids["validator"].ss58, stake=10_000.0, validator_permit=True
    )
    write_roster(roster, [validator_neuron])
    common: dict[str, Any] = {
        "state_dir": state_dir,
        "roster_file": roster,
        "shutdown_grace_s": 2.0,
    }
    apps: list[ServiceApp] = []
    trusted_apps: list[ServiceApp] = []
    try:
        miner = await start_miner(
            load_settings(
                MinerSettings,
                executors=[str(ids["executor"])],
                heartbeat_interval_s=2.0,
                executor_timeout_s=6.0,
                drain_timeout_s=0,  # the whole network stops at once: no job to drain for
                **common,
            ),
            signers["miner"],
        )
        apps.append(miner)
        miner.start_background()
        miner_addr = f"127.0.0.1:{miner.port}"
        write_roster(
            roster,
            [
                validator_neuron,
                Neuron(uid=1, hotkey=ids["miner"].ss58, stake=100.0, endpoint=miner_addr),
            ],
        )
        executor, agent = await start_executor(
            load_settings(
                ExecutorSettings,
                miner_address=miner_addr,
                miner_identity=str(ids["miner"]),
                allowed_images=[*images, *STREAMING_IMAGES],
                work_dir=state_dir / "executor-work",
                drain_timeout_s=0,  # the whole network stops at once: no job to drain for
                **common,
            ),
            signers["executor"],
        )
        apps.append(executor)
        executor.start_background()
        # The trusted miner and its executor: own state dir, same roster (it trusts the
        # validator's permit) but not registered in it, so it gets no jobs but spot checks.
        trusted_common = {**common, "state_dir": state_dir / "trusted"}
        trusted_miner = await start_miner(
            load_settings(
                MinerSettings,
                executors=[str(ids["trusted_executor"])],
                validators=[str(ids["validator"])],
                heartbeat_interval_s=2.0,
                executor_timeout_s=6.0,
                drain_timeout_s=0,  # the whole network stops at once: no job to drain for
                **trusted_common,
            ),
            signers["trusted_miner"],
        )
        trusted_apps.append(trusted_miner)
        trusted_miner.start_background()
        trusted_addr = f"127.0.0.1:{trusted_miner.port}"
        trusted_executor, trusted_agent = await start_executor(
            load_settings(
                ExecutorSettings,
                miner_address=trusted_addr,
                miner_identity=str(ids["trusted_miner"]),
                allowed_images=[*images, *STREAMING_IMAGES],
                work_dir=state_dir / "trusted" / "executor-work",
                drain_timeout_s=0,
                **trusted_common,
            ),
            signers["trusted_executor"],
        )
        trusted_apps.append(trusted_executor)
        trusted_executor.start_background()
        gateway_port = _free_port()
        validator = await start_validator(
            load_settings(
                ValidatorSettings,
                clients=[str(ids["client"]), str(ids["gateway"])],
                # The dev client is also the operator: `horde validator round|weights --dev`.
                admins=[str(ids["client"])],
                allowed_images=images,
                streaming_whitelist=STREAMING_IMAGES,
                # Spot checks: samples from the dev gateway, replayed on the trusted miner
                # (`horde validator spotcheck --dev`).
                gateways={str(ids["gateway"]): f"127.0.0.1:{gateway_port}"},
                trusted_miner={"identity": str(ids["trusted_miner"]), "address": trusted_addr},
                drain_timeout_s=0,  # the whole network stops at once: no job to drain for
                **common,
            ),
            signers["validator"],
        )
        apps.append(validator)
        validator.start_background()
        gateway = await start_gateway(
            load_settings(
                GatewaySettings,
                validator_address=f"127.0.0.1:{validator.port}",
                validator_identity=str(ids["validator"]),
                clients=[str(ids["client"])],
                listen=f"127.0.0.1:{gateway_port}",
                # A quarter of the pairs kept in full, so a short session leaves some to check.
                sample_rate=0.25,
                **common,
            ),
            signers["gateway"],
        )
        apps.append(gateway)
        gateway.start_background()
        async with asyncio.timeout(30):
            await agent.connected.wait()
            await trusted_agent.connected.wait()
        services: dict[str, dict[str, str]] = {
            app.name: {"address": f"127.0.0.1:{app.port}", "identity": app.identity} for app in apps
        }
        services["executor"]["proxy"] = agent.proxy_endpoint
        endpoints = {
            "services": services,
            "client_key": str(paths["client"]),
            "client_identity": str(ids["client"]),
            "roster": str(roster),
            "trusted_miner": {
                "address": trusted_addr,
                "identity": str(ids["trusted_miner"]),
                "executor": f"127.0.0.1:{trusted_executor.port}",
                "executor_proxy": trusted_agent.proxy_endpoint,
            },
            "allowed_images": images,
            "streaming_images": STREAMING_IMAGES,
            "pid": os.getpid(),
        }
        tmp = state_dir / (ENDPOINTS + ".tmp")
        tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
        tmp.replace(state_dir / ENDPOINTS)
        log.info("dev_network_up", state_dir=str(state_dir), **{a.name: a.port for a in apps})
        print(
            f"horde dev network up; endpoints in {state_dir / ENDPOINTS} (Ctrl-C to stop)",
            flush=True,
        )
        if ready is not None:
            ready.set()
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        (state_dir / ENDPOINTS).unlink(missing_ok=True)
        for app in reversed(apps):
            await app.stop(2.0)
        for app in reversed(trusted_apps):
            await app.stop(2.0)
        log.info("dev_network_down")
