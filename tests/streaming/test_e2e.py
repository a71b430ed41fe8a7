"""Streaming end to end with real Docker through the real services: `horde dev up`'s network
(validator, miner, executor, gateway), the gateway client or `horde stream`, horde/demo-llm.

Nothing here is faked: the gateway opens the job through the validator, the executor starts the
container behind its relay, the miner certifies the job key, the gateway relays every request to
the executor's job proxy and checks every receipt, and so does the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiodocker
import pytest
from docker_images import ensure_images

from horde_services.cli.dev import STREAMING_IMAGES, dev_up
from horde_services.cli.devenv import DevEnv
from horde_services.core.config import GatewaySettings, load_settings
from horde_services.core.db import open_database
from horde_services.core.identity import load_key_file
from horde_services.core.receipts import StreamReceipt
from horde_services.core.server import open_channel
from horde_services.executor.sandbox import JOB_LABEL
from horde_services.streaming_gateway.app import start_gateway
from horde_services.streaming_gateway.client import SessionEnded, StreamClient
from horde_services.streaming_gateway.store import SqlStore

REPO_ROOT = Path(__file__).resolve().parents[2]
HORDE = str(Path(sys.executable).with_name("horde"))
LLM_IMAGE = "horde/demo-llm:latest"
IMAGES = ["horde/base:latest", "horde/demo-job:latest", *STREAMING_IMAGES]
N_REQUESTS = 12


@pytest.fixture(scope="module")
def images() -> None:
    ensure_images(IMAGES)


def _demo_llm() -> ModuleType:
    path = REPO_ROOT / "deploy" / "images" / "demo-llm" / "server.py"
    spec = importlib.util.spec_from_file_location("demo_llm_server_e2e", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected(prompt: bytes) -> bytes:
    return "".join(_demo_llm().generate(prompt, 32, 0.0)).encode()


async def job_containers(job_uuid: str) -> list[str]:
    async with aiodocker.Docker() as docker:
        filters = json.dumps({"label": [f"{JOB_LABEL}={job_uuid}"]})
        found = await docker._query_json(
            "containers/json", params={"all": "true", "filters": filters}
        )
    return [",".join(c["Names"]) for c in found]


@contextlib.asynccontextmanager
async def dev_network(state_dir: Path) -> AsyncIterator[DevEnv]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(dev_up(state_dir, [], stop=stop, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why the network did not come up
        assert ready.is_set(), "the dev network did not come up within 60 s"
        yield DevEnv.load(state_dir)
    finally:
        waiter.cancel()
        stop.set()
        await task


async def horde(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_session_through_the_real_network(images: None, tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    async with dev_network(state) as env:
        signer = load_key_file(env.client_key)
        channel = open_channel(
            env.address("gateway"), signer=signer, callee=env.identity("gateway")
        )
        try:
            # Off the streaming whitelist (allowed for organic jobs): refused before any start.
            refused = StreamClient(channel, validator_identity=env.identity("validator"))
            with pytest.raises(SessionEnded) as ended:
                await refused.open("horde/demo-job:latest", time_limit_s=60)
            assert "not on the validator's streaming whitelist" in ended.value.reason
            assert ended.value.closed is not None
            refused.cancel()

            client = StreamClient(channel, validator_identity=env.identity("validator"))
            ready = await client.open(LLM_IMAGE, time_limit_s=120)
            job_uuid = ready.job_uuid
            assert client.certificate is not None
            # The certificate names the endpoint the gateway was given (ready.proxy_endpoint,
            # checked by the gateway): the executor's job proxy port.
            assert client.certificate.endpoint == env.data["services"]["executor"]["proxy"]
            assert await job_containers(job_uuid), "the job's containers should be running"
            prompts = [f"prompt {i}: tell me about streaming".encode() for i in range(N_REQUESTS)]
            prompts[3] = b"x" * 1024
            responses = [await client.request(p) for p in prompts]
            assert [r.seq for r in responses] == list(range(1, N_REQUESTS + 1))
            for prompt, res in zip(prompts, responses, strict=True):
                assert res.http_status == 200
                assert res.body == expected(prompt)
                assert res.receipt.job_uuid.hex == job_uuid.replace("-", "")
            closed = await client.close("test done")
            assert closed is not None and not closed.bad_receipt
            assert closed.reason == "closed by the client: test done"
            # The job's result came back only after the executor removed its containers.
            assert await job_containers(job_uuid) == []

            # A session reaching its time limit while the client is idle: the client learns
            # at once, with the job's own reason (not the job proxy's broken stream), and so
            # does a request sent after it.
            short = StreamClient(channel, validator_identity=env.identity("validator"))
            await short.open(LLM_IMAGE, time_limit_s=3)
            assert (await short.request(b"one")).receipt.is_valid()
            async with asyncio.timeout(30):
                ended = await short.wait_ended()
            reason = "job ended: completed: the session reached its time limit of 3s"
            assert ended.closed is not None and ended.closed.reason == reason, ended.reason
            with pytest.raises(SessionEnded) as late:
                await short.request(b"too late")
            assert late.value.reason == reason
            assert await job_containers(short.job_uuid) == []
            short.cancel()
        finally:
            await channel.close()

    receipts_file = tmp_path / "receipts.jsonl"
    receipts_file.write_text("".join(r.receipt.to_json() + "\n" for r in responses))
    code, out, err = await horde("receipts", "verify", str(receipts_file))
    assert code == 0, out + err
    assert f"{N_REQUESTS} valid, 0 invalid" in err

    # The network is down; a gateway restarted on the same database still has every receipt.
    settings = load_settings(GatewaySettings, state_dir=state.resolve())
    store = SqlStore(await open_database(settings.database("gateway")))
    gateway = await start_gateway(
        settings, load_key_file(state / "keys" / "gateway.json"), store=store
    )
    try:
        stored = await store.receipts(job_uuid)
    finally:
        await gateway.stop(2.0)
    assert stored == [r.receipt for r in responses]
    assert all(isinstance(r, StreamReceipt) and r.is_valid() for r in stored)


async def test_horde_stream_against_horde_dev_up(images: None, tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        "dev",
        "up",
        "--state-dir",
        str(state),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(60):
            while not (line := await proc.stdout.readline()).startswith(b"horde dev network up"):
                assert line, "horde dev up exited before the network was up"
        drain = asyncio.create_task(proc.stdout.read())
        lines = [b"hello world", b"caf\xc3\xa9 \t tabs", b"y" * 1024, b"the last one"]
        requests = tmp_path / "requests.txt"
        requests.write_bytes(b"\n".join(lines) + b"\n")
        receipts = tmp_path / "receipts.jsonl"
        notes = tmp_path / "notes.txt"
        notes.write_bytes(b"context for the job\n" * 1000)
        code, out, err = await horde(
            "stream",
            "--dev",
            str(state),
            "--image",
            LLM_IMAGE,
            "--input",
            str(requests),
            "--receipts",
            str(receipts),
            "--extra",
            str(notes),
        )
        assert code == 0, err
        # The executor placed the file and reported its size and sha256 (checked by the client).
        digest = hashlib.sha256(notes.read_bytes()).hexdigest()
        assert f"extra data placed: /volume/extra/notes.txt (20000 bytes, sha256 {digest})" in err
        assert out.splitlines() == [expected(line).decode() for line in lines]
        assert f"{len(lines)} responses, receipts verified" in err
        code, out, err = await horde("receipts", "verify", str(receipts))
        assert code == 0, out + err
        assert f"{len(lines)} valid, 0 invalid" in err
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await proc.wait()
        if drain is not None:
            drain.cancel()
    assert proc.returncode == 0


async def test_stopping_the_network_mid_session_ends_it_and_removes_the_job(
    images: None, tmp_path: Path
) -> None:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(dev_up(tmp_path / "devnet", [], stop=stop, ready=ready))
    async with asyncio.timeout(60):
        await ready.wait()
    env = DevEnv.load(tmp_path / "devnet")
    signer = load_key_file(env.client_key)
    channel = open_channel(env.address("gateway"), signer=signer, callee=env.identity("gateway"))
    client = StreamClient(channel, validator_identity=env.identity("validator"))
    try:
        ready_msg = await client.open(LLM_IMAGE, time_limit_s=120)
        assert (await client.request(b"still open")).body == expected(b"still open")
        # Ctrl-C with the session still open: every service stops within its grace, the
        # executor removes the job's containers on the way out.
        stop.set()
        async with asyncio.timeout(30):
            await task
    finally:
        client.cancel()
        await channel.close()
        stop.set()
        await asyncio.wait({task}, timeout=30)
    assert await job_containers(ready_msg.job_uuid) == []
