"""Stand-ins for the streaming benchmark when the real streaming job path is not available: a
"job" (an aiohttp echo server) and a network (a minimal validator that starts jobs, a job proxy
that forwards each request over HTTP to the job and signs a real receipt, and a real gateway).

    python -m benchmarks.streaming_fake job        # prints {"url": ...} on its first line
    python -m benchmarks.streaming_fake network URL STATE_DIR   # prints the endpoints

Each runs in its own process, as the job container and the Horde services would, so the
benchmark's client does not share an event loop with them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import nacl.signing
from aiohttp import web
from horde.v1 import (
    common_pb2,
    job_pb2,
    job_proxy_pb2,
    receipts_pb2,
    streaming_pb2,
    validator_pb2,
    validator_pb2_grpc,
)

from horde_services.core.auth import Authenticator, StaticPolicy
from horde_services.core.certificates import sign_certificate
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import GatewaySettings, load_settings
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Identity, write_key_file
from horde_services.core.logging import configure_logging
from horde_services.core.loop import run as run_loop
from horde_services.core.proxy_wire import ProxyServer, ResponseWriter
from horde_services.core.receipts import sign_receipt
from horde_services.core.server import ServiceRegistration, create_server
from horde_services.streaming_gateway.app import start_gateway


async def job() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", answer)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}/"}), flush=True)
    await asyncio.Event().wait()


class ForwardingProxy:
    """A stand-in job proxy (a proxy_wire StreamHandler) forwarding to an aiohttp echo job."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: dict[str, nacl.signing.SigningKey] = {}

    async def __call__(
        self,
        caller: Identity,
        opened: job_proxy_pb2.StreamOpen,
        requests: AsyncIterator[streaming_pb2.StreamRequestFrame],
        out: ResponseWriter,
    ) -> None:
        job_uuid = opened.job_uuid
        key = self.keys[job_uuid]
        async with aiohttp.ClientSession() as http:
            body = b""
            async for frame in requests:
                if not body:
                    started = time.time_ns()
                body += frame.body
                if not frame.last:
                    continue
                async with http.post(self.url, data=body) as resp:
                    output = await resp.read()
                    status = resp.status
                receipt = sign_receipt(
                    key,
                    uuid.UUID(job_uuid),
                    frame.seq,
                    started,
                    time.time_ns(),
                    hashlib.sha256(body).digest(),
                    hashlib.sha256(output).digest(),
                )
                await out.write(
                    streaming_pb2.StreamResponseFrame(
                        seq=frame.seq,
                        body=output,
                        last=True,
                        http_status=status,
                        receipt=receipt.to_proto(),
                    )
                )
                body = b""


class MinimalValidator(validator_pb2_grpc.ValidatorServiceServicer):
    def __init__(
        self, me: HotkeySigner, miner: HotkeySigner, proxy: ForwardingProxy, proxy_id: str
    ) -> None:
        self.me, self.miner, self.proxy, self.proxy_id = me, miner, proxy, proxy_id
        self.endpoint = ""

    async def StartStreamingJob(
        self, request: validator_pb2.StartStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.StartStreamingJobResponse]:
        job_uuid = str(uuid.uuid4())
        key = nacl.signing.SigningKey.generate()
        self.proxy.keys[job_uuid] = key
        now = time.time_ns()
        payload = receipts_pb2.JobCertificatePayload(
            job_uuid=job_uuid,
            job_public_key=bytes(key.verify_key),
            miner_hotkey=str(self.miner.identity),
            validator_hotkey=str(self.me.identity),
            image_digest="sha256:" + "00" * 32,
            endpoint=self.endpoint,
            not_before_ns=now - 10**9,
            not_after_ns=now + 3600 * 10**9,
        )
        yield validator_pb2.StartStreamingJobResponse(
            ready=validator_pb2.StreamingJobReady(
                job_uuid=job_uuid,
                proxy_endpoint=self.endpoint,
                certificate=sign_certificate(payload, self.miner),
                proxy_identity=self.proxy_id,
            )
        )
        await asyncio.Event().wait()  # until the gateway cancels the call

    async def StopStreamingJob(
        self, request: validator_pb2.StopStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.StopStreamingJobResponse:
        return validator_pb2.StopStreamingJobResponse(
            result=job_pb2.JobResult(
                job_uuid=request.job_uuid, state=common_pb2.JOB_STATE_CANCELLED
            )
        )


async def network(url: str, state_dir: Path) -> None:
    configure_logging("warning", json=True)
    validator, miner = HotkeySigner.generate(), HotkeySigner.generate()
    gateway, client, proxy_key = (Ed25519Signer.generate() for _ in range(3))
    state_dir.mkdir(parents=True, exist_ok=True)
    write_key_file(state_dir / "client.json", client, overwrite=True)
    write_roster(
        state_dir / "roster.toml",
        [
            Neuron(uid=0, hotkey=validator.identity.ss58, stake=1.0, validator_permit=True),
            Neuron(uid=1, hotkey=miner.identity.ss58, stake=1.0),
        ],
    )
    proxy = ForwardingProxy(url)
    # Only the streaming RPCs are served; the others answer UNIMPLEMENTED from the base class.
    fake = MinimalValidator(validator, miner, proxy, str(proxy_key.identity))  # type: ignore[abstract]
    allow = StaticPolicy({str(gateway.identity)})
    vserver = await create_server(
        "127.0.0.1:0",
        [
            ServiceRegistration(
                "horde.v1.ValidatorService",
                validator_pb2_grpc.add_ValidatorServiceServicer_to_server,
                fake,
            )
        ],
        authenticator=Authenticator(validator.identity, allow),
        service_label="validator",
    )
    pserver = ProxyServer(proxy, Authenticator(proxy_key.identity, allow), label="proxy")
    fake.endpoint = f"127.0.0.1:{await pserver.start('127.0.0.1:0')}"
    app = await start_gateway(
        load_settings(
            GatewaySettings,
            validator_address=f"127.0.0.1:{vserver.port}",
            validator_identity=str(validator.identity),
            clients=[str(client.identity)],
            state_dir=state_dir,
            roster_file=state_dir / "roster.toml",
            log_level="warning",
        ),
        gateway,
    )
    print(
        json.dumps(
            {
                "gateway": f"127.0.0.1:{app.port}",
                "gateway_identity": app.identity,
                "validator_identity": str(validator.identity),
                "client_key": str(state_dir / "client.json"),
            }
        ),
        flush=True,
    )
    await asyncio.Event().wait()


def main() -> None:
    if sys.argv[1] == "job":
        run_loop(job())
    else:
        run_loop(network(sys.argv[2], Path(sys.argv[3])))


if __name__ == "__main__":
    main()
