"""An output upload is sent from its tar file as it is read: the executor never holds the
outputs whole in memory (they may be as large as the output cap)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

from aiohttp import web
from horde.v1 import job_pb2

from horde_services.executor.jobs import OrganicJobRunner
from horde_services.executor.sandbox import SandboxLimits

SIZE = 48 * 2**20


async def test_an_upload_streams_from_its_file(tmp_path: Path) -> None:
    got: dict[str, object] = {}

    async def put(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for block in request.content.iter_any():
            digest.update(block)
            size += len(block)
        got.update(size=size, sha256=digest.hexdigest())
        return web.Response(status=201)

    app = web.Application()
    app.router.add_put("/out", put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        output = tmp_path / "job" / "output"
        output.mkdir(parents=True)
        with (output / "big.bin").open("wb") as fh:
            fh.write(os.urandom(SIZE))
        jobs = OrganicJobRunner(
            None,  # type: ignore[arg-type]  # (no container is run: only the upload)
            set(),
            SandboxLimits(),
            tmp_path,
            job_urls_allow_private=True,
        )
        upload = job_pb2.UploadOutput(url=f"http://127.0.0.1:{port}/out")
        tracemalloc.start()
        try:
            await jobs._upload(upload, output)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await runner.cleanup()
    tar = tmp_path / "job" / "output.tar"
    assert got == {
        "size": tar.stat().st_size,
        "sha256": hashlib.sha256(tar.read_bytes()).hexdigest(),
    }
    assert tar.stat().st_size > SIZE
    # The server's own reads are in this process too, and small; the file is 48 MiB.
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB traced during the upload"
