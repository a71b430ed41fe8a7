"""The real network behind the streaming benchmark, in two processes of its own:

    python -m benchmarks.streaming_real network STATE_DIR EXECUTORS
        validator, miner and EXECUTORS executors (each with its own job proxy listener, work dir
        and key; one streaming job per executor, so 16 sessions need 16); prints its endpoints
        as one JSON line once every executor is linked
    python -m benchmarks.streaming_real gateway STATE_DIR
        the gateway in front of that validator; prints {"gateway": ..., ...} once serving

Everything is the production code with its production defaults (receipt checks, sampling at
`sample_rate` 0.1, SQLite receipt store), except that logs are at warning level and synthetic
rounds are off (they would steal CPU from the measurement). The executors share one process:
on a small benchmark host their job proxies would otherwise only contend for the same cores.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

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
from horde_services.core.logging import configure_logging
from horde_services.core.loop import run as run_loop
from horde_services.executor.app import start_executor
from horde_services.miner.app import start_miner
from horde_services.streaming_gateway.app import start_gateway
from horde_services.validator.app import start_validator

IMAGE = "horde/demo-llm:latest"
ENDPOINTS = "bench-endpoints.json"


def _key(path: Path, kind: str) -> Any:
    if not path.exists():
        create_key_file(path, kind)  # type: ignore[arg-type]
    return load_key_file(path)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def network(state_dir: Path, count: int) -> None:
    configure_logging("warning", json=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = state_dir / "keys"
    keys.mkdir(exist_ok=True)
    validator = _key(keys / "validator.json", "hotkey")
    miner = _key(keys / "miner.json", "hotkey")
    gateway = _key(keys / "gateway.json", "ed25519")
    _key(keys / "client.json", "ed25519")  # the benchmark client's
    executors = [_key(keys / f"executor-{i}.json", "ed25519") for i in range(count)]
    roster = state_dir / "roster.toml"
    v_neuron = Neuron(uid=0, hotkey=validator.identity.ss58, stake=10_000.0, validator_permit=True)
    write_roster(roster, [v_neuron])
    common: dict[str, Any] = {
        "state_dir": state_dir,
        "roster_file": roster,
        "shutdown_grace_s": 2.0,
        "log_level": "warning",
    }
    apps: list[ServiceApp] = []
    try:
        m = await start_miner(
            load_settings(
                MinerSettings,
                executors=[str(e.identity) for e in executors],
                **common,
            ),
            miner,
        )
        apps.append(m)
        m.start_background()
        miner_addr = f"127.0.0.1:{m.port}"
        write_roster(
            roster,
            [v_neuron, Neuron(uid=1, hotkey=miner.identity.ss58, stake=100.0, endpoint=miner_addr)],
        )
        agents = []
        for i, signer in enumerate(executors):
            app, agent = await start_executor(
                load_settings(
                    ExecutorSettings,
                    miner_address=miner_addr,
                    miner_identity=str(miner.identity),
                    allowed_images=["horde/base:latest", IMAGE],
                    work_dir=state_dir / f"ex{i}",
                    **common,
                ),
                signer,
            )
            apps.append(app)
            app.start_background()
            agents.append(agent)
        v = await start_validator(
            load_settings(
                ValidatorSettings,
                clients=[str(gateway.identity)],
                allowed_images=["horde/base:latest"],
                streaming_whitelist=[IMAGE],
                synthetic={"enabled": False},
                **common,
            ),
            validator,
        )
        apps.append(v)
        v.start_background()
        async with asyncio.timeout(60):
            for agent in agents:
                await agent.connected.wait()
        doc = {
            "validator": f"127.0.0.1:{v.port}",
            "validator_identity": str(validator.identity),
            "client_key": str(keys / "client.json"),
            "work_dirs": [str((state_dir / f"ex{i}").resolve()) for i in range(count)],
        }
        (state_dir / ENDPOINTS).write_text(json.dumps(doc))
        print(json.dumps(doc), flush=True)
        await _until_signalled()
    finally:
        for app in reversed(apps):
            await app.stop(2.0)


async def gateway(state_dir: Path) -> None:
    configure_logging("warning", json=True)
    ends = json.loads((state_dir / ENDPOINTS).read_text())
    keys = state_dir / "keys"
    client = load_key_file(keys / "client.json")
    app = await start_gateway(
        load_settings(
            GatewaySettings,
            validator_address=ends["validator"],
            validator_identity=ends["validator_identity"],
            clients=[str(client.identity)],
            state_dir=state_dir,
            roster_file=state_dir / "roster.toml",
            log_level="warning",
            max_session_time_limit_s=86400,
        ),
        load_key_file(keys / "gateway.json"),
    )
    try:
        app.start_background()
        print(
            json.dumps(
                {
                    "gateway": f"127.0.0.1:{app.port}",
                    "gateway_identity": app.identity,
                    "validator_identity": ends["validator_identity"],
                    "client_key": ends["client_key"],
                    "work_dirs": ends["work_dirs"],
                }
            ),
            flush=True,
        )
        await _until_signalled()
    finally:
        await app.stop(2.0)


def main() -> None:
    what, state = sys.argv[1], Path(sys.argv[2])
    if what == "network":
        run_loop(network(state, int(sys.argv[3])))
    elif what == "gateway":
        run_loop(gateway(state))
    else:
        raise SystemExit(f"unknown role {what!r}")


if __name__ == "__main__":
    main()
