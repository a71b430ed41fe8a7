"""Fakes for the gateway tests: a validator that starts "streaming jobs" and a job proxy that
serves them. Both are real servers on port 0 (gRPC, and the job proxy's framed TCP protocol) with
real authentication; every job has a real
Ed25519 key certified by a real miner hotkey, and the proxy signs real receipts. Each job's
`Behaviour` makes the proxy misbehave on purpose (tamper, skew its clock, chunk its answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nacl.signing
from horde.v1 import (
    common_pb2,
    job_pb2,
    job_proxy_pb2,
    receipts_pb2,
    streaming_pb2,
    validator_pb2,
    validator_pb2_grpc,
)

from horde_services.core.app import ServiceApp
from horde_services.core.auth import Authenticator, StaticPolicy
from horde_services.core.certificates import sign_certificate
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import GatewaySettings, load_settings
from horde_services.core.errors import FailedPrecondition, NotFound
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Identity, Signer
from horde_services.core.proxy_wire import ProxyServer, ResponseWriter
from horde_services.core.receipts import sign_receipt
from horde_services.core.server import (
    RunningServer,
    ServiceRegistration,
    create_server,
    current_caller,
)
from horde_services.streaming_gateway.app import start_gateway
from horde_services.streaming_gateway.store import GatewayStore

WHITELIST = "horde/demo-llm:latest"
SKEW_NS = 2_000_000_000


def answer(body: bytes) -> bytes:
    """The fake service: a deterministic transformation of the request."""
    return b"echo:" + body[::-1]


@dataclass
class Behaviour:
    """How the fake proxy serves one job (honest by default)."""

    clock_offset_ns: int = 0  # the proxy's clock is this far off
    check_client_clock: bool = True  # refuse requests whose timestamp is off by more than SKEW_NS
    chunks: int = 1  # response chunks per request
    tamper: str | None = None  # "output", "input", "seq", "key", "job", "backwards", "missing"
    tamper_seq: int = 1  # the request whose receipt is tampered
    respond: Callable[[bytes], bytes] = answer
    # Answer only once this many requests have arrived (so a client that waits for each answer
    # before sending the next one would wait forever).
    answer_in_batches_of: int = 1
    # When set, each response's first chunk goes at once and the rest once this is set.
    gate: asyncio.Event | None = None
    # Requests the service gives no answer to: the proxy says so (an `error` frame, no receipt).
    fail_seqs: frozenset[int] = frozenset()


@dataclass
class FakeJob:
    job_uuid: str
    key: nacl.signing.SigningKey
    behaviour: Behaviour
    spec: job_pb2.JobSpec
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    extra: dict[str, bytes] = field(default_factory=dict)
    served: int = 0
    most_held: int = 0  # most requests that had arrived unanswered at once
    stop_reason: str = ""


class FakeProxy:
    """A job proxy (a proxy_wire StreamHandler) answering with `Behaviour`."""

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}

    async def __call__(
        self,
        caller: Identity,
        opened: job_proxy_pb2.StreamOpen,
        requests: AsyncIterator[streaming_pb2.StreamRequestFrame],
        out: ResponseWriter,
    ) -> None:
        job = self.jobs.get(opened.job_uuid)
        if job is None:
            raise NotFound(f"no job {opened.job_uuid}")
        b = job.behaviour
        body = b""
        started = 0
        held: list[tuple[int, bytes, int]] = []  # requests read but not answered yet
        async for frame in requests:
            now = time.time_ns() + b.clock_offset_ns
            if not body and started == 0:
                started = now
                if b.check_client_clock and abs(frame.client_timestamp_ns - now) > SKEW_NS:
                    raise FailedPrecondition(
                        f"request {frame.seq}: client timestamp is "
                        f"{(frame.client_timestamp_ns - now) / 1e9:.3f} s off the proxy's clock"
                    )
            body += frame.body
            if not frame.last:
                continue
            held.append((frame.seq, body, started))
            job.most_held = max(job.most_held, len(held))
            body, started = b"", 0
            if len(held) >= b.answer_in_batches_of:
                await self._flush(job, held, out)
        await self._flush(job, held, out)

    async def _flush(
        self, job: FakeJob, held: list[tuple[int, bytes, int]], out: ResponseWriter
    ) -> None:
        for seq, body, started in held:
            for i, response in enumerate(self._answer(job, seq, body, started)):
                if i == 1 and job.behaviour.gate is not None:
                    await job.behaviour.gate.wait()
                await out.write(response)
            job.served += 1
        held.clear()

    def _answer(
        self, job: FakeJob, seq: int, body: bytes, started: int
    ) -> list[streaming_pb2.StreamResponseFrame]:
        b = job.behaviour
        if seq in b.fail_seqs:
            return [
                streaming_pb2.StreamResponseFrame(
                    seq=seq, last=True, error=f"the job's service did not answer request {seq}"
                )
            ]
        output = b.respond(body)
        finished = time.time_ns() + b.clock_offset_ns
        tamper = b.tamper if seq == b.tamper_seq else None
        key = nacl.signing.SigningKey.generate() if tamper == "key" else job.key
        receipt = sign_receipt(
            key,
            uuid.uuid4() if tamper == "job" else uuid.UUID(job.job_uuid),
            seq + 1 if tamper == "seq" else seq,
            started - 1_500_000_000 if tamper == "backwards" else started,
            finished,
            hashlib.sha256(body + b"x" if tamper == "input" else body).digest(),
            hashlib.sha256(output).digest(),
        )
        if tamper == "output":
            output = b"tampered:" + output
        size = max(1, -(-len(output) // b.chunks))
        pieces = [output[i : i + size] for i in range(0, len(output), size)] or [b""]
        frames = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            frame = streaming_pb2.StreamResponseFrame(
                seq=seq, body=piece, last=last, http_status=200
            )
            if last and tamper != "missing":
                frame.receipt.CopyFrom(receipt.to_proto())
            frames.append(frame)
        return frames


class FakeValidator(validator_pb2_grpc.ValidatorServiceServicer):
    def __init__(
        self, me: Signer, miner: HotkeySigner, proxy: FakeProxy, proxy_identity: str
    ) -> None:
        self.me = me
        self.miner = miner
        self.proxy = proxy
        self.proxy_identity = proxy_identity
        self.proxy_endpoint = ""
        self.whitelist = {WHITELIST}
        self.next_behaviour = Behaviour()
        self.reports: list[validator_pb2.ReportBadReceiptRequest] = []
        self.reported = asyncio.Event()
        self.starts: list[validator_pb2.StartStreamingJobRequest] = []
        self.ended: dict[str, str] = {}  # job -> how it ended
        self.job_ended = asyncio.Condition()
        self.certificate_validator: str | None = None  # issue certificates for someone else
        self.certificate_endpoint: str | None = None
        self.end_job_after_ready = False
        self.refuse_with: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED
        # Extra data: names the executor "refuses" (with this error), and whether it reports a
        # placement that differs from what was sent.
        self.extra_refused: dict[str, str] = {}
        self.extra_misplaced = False
        self.extra_hangs = False  # never answers AddExtraData (until the call is cancelled)
        self.unavailable = ""  # refuses StartStreamingJob UNAVAILABLE with this message
        self.extra_cap: int | None = None  # refuses an upload past this many bytes, as a validator

    async def StartStreamingJob(
        self, request: validator_pb2.StartStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.StartStreamingJobResponse]:
        self.starts.append(request)
        if self.unavailable:  # e.g. a validator shutting down
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable)
        job_uuid = str(uuid.uuid4())
        if self.refuse_with:  # e.g. busy: the job does not start
            yield validator_pb2.StartStreamingJobResponse(
                result=job_pb2.JobResult(
                    job_uuid=job_uuid,
                    state=common_pb2.JOB_STATE_REJECTED,
                    reason=self.refuse_with,
                    stage=common_pb2.STAGE_RESERVATION,
                    detail="the stand-in refuses",
                )
            )
            return
        if request.spec.image not in self.whitelist:
            yield validator_pb2.StartStreamingJobResponse(
                result=job_pb2.JobResult(
                    job_uuid=job_uuid,
                    state=common_pb2.JOB_STATE_REJECTED,
                    reason=common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                    stage=common_pb2.STAGE_ACCEPT,
                    detail=f"{request.spec.image} is not on the streaming whitelist",
                )
            )
            return
        assert request.gateway_identity == str(current_caller())
        yield validator_pb2.StartStreamingJobResponse(
            event=job_pb2.JobEvent(
                job_uuid=job_uuid,
                state=common_pb2.JOB_STATE_ACCEPTED,
                stage=common_pb2.STAGE_ACCEPT,
                message="accepted",
            )
        )
        key = nacl.signing.SigningKey.generate()
        job = FakeJob(job_uuid, key, self.next_behaviour, request.spec)
        self.proxy.jobs[job_uuid] = job
        now = time.time_ns()
        payload = receipts_pb2.JobCertificatePayload(
            job_uuid=job_uuid,
            job_public_key=bytes(job.key.verify_key),
            miner_hotkey=str(self.miner.identity),
            validator_hotkey=self.certificate_validator or str(self.me.identity),
            image_digest="sha256:" + "ab" * 32,
            endpoint=self.certificate_endpoint or self.proxy_endpoint,
            not_before_ns=now - 10**9,
            not_after_ns=now + 3600 * 10**9,
        )
        yield validator_pb2.StartStreamingJobResponse(
            ready=validator_pb2.StreamingJobReady(
                job_uuid=job_uuid,
                proxy_endpoint=self.proxy_endpoint,
                certificate=sign_certificate(payload, self.miner),
                proxy_identity=self.proxy_identity,
            )
        )
        how = "cancelled"
        try:
            if not self.end_job_after_ready:
                await job.stopped.wait()
            how = job.stop_reason or "ended"
            yield validator_pb2.StartStreamingJobResponse(
                result=job_pb2.JobResult(
                    job_uuid=job_uuid,
                    state=common_pb2.JOB_STATE_CANCELLED
                    if job.stop_reason
                    else common_pb2.JOB_STATE_FAILED,
                    reason=common_pb2.FAILURE_REASON_CANCELLED
                    if job.stop_reason
                    else common_pb2.FAILURE_REASON_TIMEOUT,
                    stage=common_pb2.STAGE_EXECUTION,
                    detail=job.stop_reason or "session time limit reached",
                )
            )
        finally:
            await self._ended(job_uuid, how)

    async def _ended(self, job_uuid: str, how: str) -> None:
        async with self.job_ended:
            self.ended.setdefault(job_uuid, how)
            self.job_ended.notify_all()

    async def wait_ended(self, job_uuid: str) -> str:
        async with self.job_ended:
            await self.job_ended.wait_for(lambda: job_uuid in self.ended)
        return self.ended[job_uuid]

    async def StopStreamingJob(
        self, request: validator_pb2.StopStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.StopStreamingJobResponse:
        job = self.proxy.jobs.get(request.job_uuid)
        if job is None:
            raise NotFound(f"no job {request.job_uuid}")
        job.stop_reason = f"stopped: {request.reason}"
        job.stopped.set()
        return validator_pb2.StopStreamingJobResponse(
            result=job_pb2.JobResult(
                job_uuid=request.job_uuid,
                state=common_pb2.JOB_STATE_CANCELLED,
                reason=common_pb2.FAILURE_REASON_CANCELLED,
                stage=common_pb2.STAGE_EXECUTION,
                detail=request.reason,
            )
        )

    async def AddExtraData(
        self,
        request_iterator: AsyncIterator[validator_pb2.AddExtraDataRequest],
        context: grpc.aio.ServicerContext,
    ) -> validator_pb2.AddExtraDataResponse:
        placed: list[streaming_pb2.ExtraDataPlaced] = []
        got: dict[str, bytes] = {}
        job_uuid = ""
        if self.extra_hangs:
            await asyncio.Event().wait()
        async for msg in request_iterator:
            job_uuid = msg.job_uuid or job_uuid
            job = self.proxy.jobs[job_uuid]
            name = msg.data.file_name
            got[name] = got.get(name, b"") + msg.data.data  # this call's bytes: a new upload
            job.extra[name] = got[name]  # replaces what an earlier one left
            if self.extra_cap is not None and len(job.extra[name]) > self.extra_cap:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"extra data exceeds the validator's cap of {self.extra_cap} bytes per call",
                )
            if msg.data.last:
                if name in self.extra_refused:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"extra data {name} was not placed: {self.extra_refused[name]}",
                    )
                data = job.extra[name] + (b"!" if self.extra_misplaced else b"")
                placed.append(
                    streaming_pb2.ExtraDataPlaced(
                        job_uuid=job_uuid,
                        file_name=name,
                        size_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
        return validator_pb2.AddExtraDataResponse(
            file_names=[p.file_name for p in placed], placed=placed
        )

    async def ReportBadReceipt(
        self, request: validator_pb2.ReportBadReceiptRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.ReportBadReceiptResponse:
        self.reports.append(request)
        self.reported.set()
        return validator_pb2.ReportBadReceiptResponse()


@dataclass
class Harness:
    """Fake validator and proxy, and any number of gateways in front of them."""

    root: Path
    validator_signer: HotkeySigner
    miner: HotkeySigner
    gateway_signer: Ed25519Signer
    client: Ed25519Signer
    proxy_signer: Ed25519Signer
    fake_proxy: FakeProxy
    fake_validator: FakeValidator
    servers: list[RunningServer] = field(default_factory=list)
    proxy_server: ProxyServer | None = None
    gateways: list[ServiceApp] = field(default_factory=list)

    @property
    def validator_address(self) -> str:
        return f"127.0.0.1:{self.servers[0].port}"

    async def start_gateway(
        self, *, database_url: str = "", store: GatewayStore | None = None, **overrides: object
    ) -> ServiceApp:
        defaults: dict[str, object] = {
            "validator_address": self.validator_address,
            "validator_identity": str(self.validator_signer.identity),
            "clients": [str(self.client.identity)],
            "state_dir": self.root,
            "roster_file": self.root / "roster.toml",
            "database_url": database_url,
        }
        settings = load_settings(GatewaySettings, **{**defaults, **overrides})
        app = await start_gateway(settings, self.gateway_signer, store=store)
        self.gateways.append(app)
        return app

    async def stop_gateway(self, app: ServiceApp) -> None:
        self.gateways.remove(app)
        await app.stop(1.0)

    async def close(self) -> None:
        for app in list(self.gateways):
            await self.stop_gateway(app)
        for server in self.servers:
            await server.stop(None)
        if self.proxy_server is not None:
            await self.proxy_server.stop()


async def start_harness(root: Path) -> Harness:
    validator = HotkeySigner.generate()
    miner = HotkeySigner.generate()
    gateway = Ed25519Signer.generate()
    client = Ed25519Signer.generate()
    proxy_signer = Ed25519Signer.generate()
    write_roster(
        root / "roster.toml",
        [
            Neuron(uid=0, hotkey=validator.identity.ss58, stake=1000.0, validator_permit=True),
            Neuron(uid=1, hotkey=miner.identity.ss58, stake=10.0, endpoint="127.0.0.1:1"),
        ],
    )
    fake_proxy = FakeProxy()
    fake_validator = FakeValidator(validator, miner, fake_proxy, str(proxy_signer.identity))
    harness = Harness(
        root, validator, miner, gateway, client, proxy_signer, fake_proxy, fake_validator
    )
    harness.servers.append(
        await create_server(
            "127.0.0.1:0",
            [
                ServiceRegistration(
                    "horde.v1.ValidatorService",
                    validator_pb2_grpc.add_ValidatorServiceServicer_to_server,
                    fake_validator,
                )
            ],
            authenticator=Authenticator(
                validator.identity, StaticPolicy({str(gateway.identity)}, "the gateway")
            ),
            service_label="fake-validator",
        )
    )
    proxy_server = ProxyServer(
        fake_proxy,
        Authenticator(
            proxy_signer.identity, StaticPolicy({str(gateway.identity)}, "the session's gateway")
        ),
        label="fake-proxy",
    )
    harness.proxy_server = proxy_server
    fake_validator.proxy_endpoint = f"127.0.0.1:{await proxy_server.start('127.0.0.1:0')}"
    return harness


@contextlib.asynccontextmanager
async def harness_at(root: Path) -> AsyncIterator[Harness]:
    h = await start_harness(root)
    try:
        yield h
    finally:
        await h.close()
