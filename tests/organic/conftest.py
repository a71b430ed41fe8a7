"""Fixtures for the organic end-to-end tests (the harness itself is in organic_support.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest
from aiohttp import BodyPartReader, web
from docker_images import docker_problem, ensure_images
from horde.v1 import validator_pb2_grpc
from organic_support import (
    HORDE_BIN,
    IMAGES,
    SESSION_JOBS,
    HttpServer,
    Keys,
    Network,
    labelled_objects,
    make_keys,
    wait_no_job_objects,
)

from horde_services.executor.sandbox import LABEL


@pytest.fixture(scope="session")
def horde_images() -> list[str]:
    """Horde's job images, built with deploy/images/build.sh when missing."""
    ensure_images(IMAGES)
    return IMAGES


@pytest.fixture(scope="session", autouse=True)
def no_leftovers_after_session() -> Iterator[None]:
    """After the session: nothing labelled io.horde.managed from this session's jobs remains."""
    yield
    if docker_problem() is not None:
        return
    strict = os.environ.get("HORDE_STRICT_LEFTOVERS") == "1"

    async def check() -> list[tuple[str, str, str]]:
        async with aiodocker.Docker() as docker:
            return await labelled_objects(docker, f"{LABEL}=1")

    found = asyncio.run(check())
    mine = [f for f in found if strict or f[2] in SESSION_JOBS]
    assert not mine, f"objects labelled {LABEL} remain after the session: {mine}"


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
async def docker(horde_images: list[str]) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def extra_images() -> list[str]:
    """Images added to both allow-lists (override in a test module or with parametrize)."""
    return []


@pytest.fixture
def validator_only_images() -> list[str]:
    """Images added to the validator's allow-list only (override with parametrize)."""
    return []


@pytest.fixture
async def bare_net(
    tmp_path: Path,
    session_keys: Keys,
    docker: aiodocker.Docker,
    extra_images: list[str],
    validator_only_images: list[str],
) -> AsyncIterator[Network]:
    """Miner and validator, no executor (tests start their own)."""
    net = Network(tmp_path / "net", session_keys, docker, extra_images)
    try:
        await net.start_miner()
        await net.start_validator([*net.images, *validator_only_images])
        yield net
    finally:
        await net.close()
        try:
            # While the executor still runs: every job's containers/volumes must be gone.
            await wait_no_job_objects(docker, net.jobs)
        finally:
            await net.stop_executor()
            if net.validator is not None:
                await net.validator.stop(1.0)
            if net.miner is not None:
                await net.stop_miner()


@pytest.fixture
async def net(bare_net: Network) -> Network:
    """A whole network: miner, an in-process executor connected to it, validator."""
    await bare_net.start_executor()
    return bare_net


@pytest.fixture
def client_stub(net: Network) -> validator_pb2_grpc.ValidatorServiceStub:
    """The enrolled client's ValidatorService stub."""
    return net.client()


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    state = HttpServer()

    async def get(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.gets.append(name)
        if name not in state.files:
            raise web.HTTPNotFound()
        return web.Response(body=state.files[name], content_type="application/octet-stream")

    async def stall(request: web.Request) -> web.StreamResponse:
        state.gets.append(request.match_info["name"])
        response = web.StreamResponse(headers={"Content-Length": "1000000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await state.release.wait()
        return response

    async def put(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.uploads[name] = await request.read()
        state.upload_headers[name] = dict(request.headers)
        state.uploaded.set()
        return web.Response(status=state.upload_status)

    async def post(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        fields: list[tuple[str, str]] = []
        reader = await request.multipart()
        async for part in reader:
            assert isinstance(part, BodyPartReader)
            if part.filename is not None:
                state.uploads[name] = await part.read()
                fields.append((part.name or "", f"<file {part.filename}>"))
            else:
                fields.append((part.name or "", await part.text()))
        state.upload_forms[name] = fields
        state.uploaded.set()
        return web.Response(status=204 if state.upload_status == 200 else state.upload_status)

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_get("/files/{name}", get)
    app.router.add_get("/stall/{name}", stall)
    app.router.add_put("/upload/{name}", put)
    app.router.add_post("/upload/{name}", post)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def pytest_report_header() -> str:
    return f"organic e2e: python {sys.version.split()[0]}, horde cli {HORDE_BIN}"
