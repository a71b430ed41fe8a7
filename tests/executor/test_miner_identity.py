"""An executor whose miner_identity is not the miner answering at miner_address logs an error
naming both identities and the settings to fix (it used to log a generic link_down warning with
the miner's refusal, for ever), and keeps trying."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from log_support import record_log

from horde_services.core.chain import write_roster
from horde_services.core.config import ExecutorSettings, MinerSettings
from horde_services.core.identity import Ed25519Signer, HotkeySigner
from horde_services.executor import agent
from horde_services.executor.app import start_executor
from horde_services.miner.app import start_miner


async def test_a_wrong_miner_identity_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    miner_key = HotkeySigner.generate()
    executor_key = Ed25519Signer.generate()
    miner = await start_miner(
        MinerSettings(
            state_dir=tmp_path / "miner",
            roster_file=write_roster(tmp_path / "roster.toml", []),
            executors=[str(executor_key.identity)],
        ),
        miner_key,
    )
    wrong = str(HotkeySigner.generate().identity)
    named = asyncio.Event()
    errors = record_log(
        monkeypatch,
        agent,
        ("error",),
        on=lambda event, _: named.set() if event == "miner_identity_mismatch" else None,
    )
    try:
        executor, _ = await start_executor(
            ExecutorSettings(
                work_dir=tmp_path / "work",
                state_dir=tmp_path / "executor",
                miner_address=f"127.0.0.1:{miner.port}",
                miner_identity=wrong,
            ),
            executor_key,
        )
        executor.start_background()  # (the link to the miner)
        try:
            async with asyncio.timeout(30):
                await named.wait()
        finally:
            await executor.stop(0)
    finally:
        await miner.stop(0)
    (event, *_) = [fields for _, name, fields in errors if name == "miner_identity_mismatch"]
    assert (event["miner_identity"], event["answering"]) == (wrong, str(miner_key.identity))
    assert event["miner"] == f"127.0.0.1:{miner.port}"
