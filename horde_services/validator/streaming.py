"""Streaming jobs at the validator: the gateway-facing RPCs over the JobManager's routing.

`StartStreamingJob` checks the image against the streaming whitelist, routes the job like an
organic one (`job_kind="streaming"`), relays the start-up events, then `ready` once the miner's
certificate for the job key checks out (horde_services/validator/jobs.py), and keeps the call open
until the job ends with its result. Cancelling the call, or `StopStreamingJob`, stops the job.

Whitelist entries are image references, ``"ref"`` (any build of that image) or
``"ref@sha256:<image id>"`` (only the image whose id, as `docker image inspect -f {{.Id}}` prints
it, is that digest: the executor refuses another build and the certificate must name it).
Streaming jobs take no input volumes; files for a running job come through `AddExtraData`.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog
from horde.v1 import common_pb2, job_pb2, miner_pb2, streaming_pb2, validator_pb2

from horde_services.core.certificates import CertificateError, parse_certificate, verify_certificate
from horde_services.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HordeError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from horde_services.core.identity import Identity
from horde_services.core.proto_util import PLAIN_NAME_RULE, TERMINAL_STATES, plain_file_name, result
from horde_services.core.server import current_caller
from horde_services.executor.sandbox import normalise_image_ref
from horde_services.executor.streaming import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_PORT,
    DEFAULT_REQUEST_PATH,
    ServiceSpec,
)
from horde_services.validator.jobs import JobManager, LiveJob
from horde_services.validator.scoring import add_penalty
from horde_services.validator.spec_checks import spec_problem
from horde_services.validator.store import JobStore
from horde_services.validator.synthetic import SyntheticStore

log = structlog.get_logger("horde.validator.streaming")

# How long StopStreamingJob waits for the job's final result.
STOP_WAIT_S = 30.0
# How long AddExtraData waits for the executor to confirm each file once its last chunk is sent.
PLACE_WAIT_S = 60.0
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The spellings of a UUID that `parse_job_uuid` accepts (uuid.UUID alone would also take
# surrounding spaces, "+" or "_" between the digits: int(..., 16) does).
_UUID_TEXT = re.compile(r"(?:urn:uuid:)?\{?[0-9A-Fa-f-]+\}?")


def parse_job_uuid(value: str) -> str:
    """The canonical (lowercase, hyphenated) form of a job uuid given in any case or spelling
    Python's uuid module reads; InvalidArgument when `value` is not a UUID. Every job lookup of
    the validator's job and streaming APIs goes through here."""
    try:
        if _UUID_TEXT.fullmatch(value):
            return str(uuid.UUID(value))
    except ValueError:
        pass
    shown = value if len(value) <= 80 else value[:80] + "..."
    raise InvalidArgument(f"job_uuid {shown!r} is not a UUID")


class Unimplemented(HordeError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Whitelist:
    """Images gateways may start: reference -> pinned image id ("" when any build is fine)."""

    def __init__(self, entries: list[str]) -> None:
        self._images: dict[str, str] = {}
        for entry in entries:
            ref, sep, digest = entry.partition("@")
            if sep and not _DIGEST.match(digest):
                raise ValueError(
                    f"streaming_whitelist entry {entry!r}: expected ref@sha256:<64 hex digits>"
                )
            self._images[normalise_image_ref(ref)] = digest

    def lookup(self, image: str) -> str | None:
        """None when `image` is not whitelisted, else the digest it must have ("" for any)."""
        if "@" in image:
            return None
        return self._images.get(normalise_image_ref(image))


class StreamingJobs:
    """The streaming flow at the validator (the servicer's RPCs delegate here)."""

    def __init__(
        self,
        manager: JobManager,
        store: JobStore,
        whitelist: Whitelist,
        default_class: str,
        identity: str,
        reports: SyntheticStore,
        max_extra_bytes: int,
        gateways: frozenset[str] = frozenset(),
    ) -> None:
        # Gateways this validator knows (its `gateways` setting): their word on which client a
        # session serves is taken; any other caller's session is its own.
        self._gateways = gateways
        self._manager = manager
        self._store = store
        self._whitelist = whitelist
        self._default_class = default_class
        self._identity = identity
        self._reports = reports
        self._max_extra = max_extra_bytes

    async def start(
        self, request: validator_pb2.StartStreamingJobRequest, caller: str
    ) -> AsyncIterator[validator_pb2.StartStreamingJobResponse]:
        spec = job_pb2.JobSpec()
        spec.CopyFrom(request.spec)
        if not spec.executor_class:
            spec.executor_class = self._default_class
        job_uuid = str(uuid.uuid4())
        if request.client_identity and caller in self._gateways:
            spec.labels["horde.client"] = request.client_identity
        else:  # a caller may not put its session on another's account
            spec.labels["horde.client"] = caller
        problem = self._check_spec(spec)
        gateway = request.gateway_identity or caller
        if problem is None:
            try:
                gateway = str(Identity.parse(gateway))
            except ValueError as exc:
                problem = f"gateway_identity: {exc}"
        digest = self._whitelist.lookup(spec.image) if spec.image else None
        if problem is not None or digest is None:
            res = (
                result(
                    job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    common_pb2.FAILURE_REASON_INVALID_SPEC,
                    common_pb2.STAGE_ACCEPT,
                    problem,
                )
                if problem is not None
                else result(
                    job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                    common_pb2.STAGE_ACCEPT,
                    f"image {spec.image!r} is not on the validator's streaming whitelist",
                )
            )
            log.info(
                "streaming_job_rejected", job_uuid=job_uuid, image=spec.image[:200], why=res.detail
            )
            if problem is not None:
                # A refused spec is recorded by what identifies it, not stored whole: it may be
                # the very size or bytes it was refused for.
                spec = job_pb2.JobSpec(
                    image=spec.image[:200],
                    executor_class=spec.executor_class[:100],
                    labels={"horde.client": spec.labels["horde.client"][:200]},
                )
            await self._manager.reject(job_uuid, spec, caller, res, kind="streaming")
            yield validator_pb2.StartStreamingJobResponse(result=res)
            return
        job = await self._manager.submit(
            job_uuid, spec, caller, None, "streaming", gateway=gateway, image_digest=digest
        )
        log.info(
            "streaming_job_submitted",
            job_uuid=job_uuid,
            image=spec.image,
            gateway=gateway,
            time_limit_s=spec.timeouts.execution_s,
        )
        try:
            async for item in self._manager.follow(job):
                if isinstance(item, job_pb2.JobEvent):
                    yield validator_pb2.StartStreamingJobResponse(event=item)
                elif isinstance(item, validator_pb2.StreamingJobReady):
                    yield validator_pb2.StartStreamingJobResponse(ready=item)
                elif isinstance(item, job_pb2.JobResult):
                    yield validator_pb2.StartStreamingJobResponse(result=item)
                    return
        finally:
            if job.result is None:
                # The gateway cancelled the call (or went away): the job stops with it.
                log.info("streaming_call_ended", job_uuid=job_uuid)
                job.cancel.set()

    def _check_spec(self, spec: job_pb2.JobSpec) -> str | None:
        problem = spec_problem(spec)
        if problem is not None:
            return problem
        if len(spec.inputs):
            return "spec.inputs: streaming jobs take no input volumes (send extra data instead)"
        streaming = spec.streaming
        streaming.port = streaming.port or DEFAULT_PORT
        streaming.request_path = streaming.request_path or DEFAULT_REQUEST_PATH
        streaming.health_path = streaming.health_path or DEFAULT_HEALTH_PATH
        try:
            ServiceSpec.from_proto(streaming)
        except ValueError as exc:
            return f"spec.streaming: {exc}"
        return None

    def _own_job(self, job_uuid: str, caller: str) -> LiveJob:
        job = self._manager.live(job_uuid)
        if job is None:
            raise NotFound(f"no streaming job {job_uuid} is running")
        if job.kind != "streaming":
            raise InvalidArgument(f"job {job_uuid} is not a streaming job")
        if job.client != caller:
            raise PermissionDenied(f"streaming job {job_uuid} was started by another caller")
        return job

    async def stop(self, job_uuid: str, reason: str, caller: str) -> job_pb2.JobResult:
        job_uuid = parse_job_uuid(job_uuid)
        if self._manager.live(job_uuid) is None:
            record = await self._store.get(job_uuid)
            if record is None:
                raise NotFound(f"no job {job_uuid}")
            if record.client != caller:
                raise PermissionDenied(f"job {job_uuid} was started by another caller")
            if record.state in TERMINAL_STATES:
                return record.result
            raise FailedPrecondition(f"job {job_uuid} is not running on this validator")
        job = self._own_job(job_uuid, caller)
        log.info("streaming_job_stop", job_uuid=job_uuid, reason=reason)
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                await self._manager.cancel(job_uuid)
        except TimeoutError:
            raise DeadlineExceeded(
                f"job {job_uuid} was told to stop but did not end within {STOP_WAIT_S:.0f}s"
            ) from None
        assert job.result is not None
        return job.result

    async def add_extra(
        self, requests: AsyncIterator[validator_pb2.AddExtraDataRequest], caller: str
    ) -> list[streaming_pb2.ExtraDataPlaced]:
        it = aiter(requests)
        msg = await anext(it, None)
        if msg is None or not msg.job_uuid:
            raise InvalidArgument("the first AddExtraData message must name the job")
        job_uuid = parse_job_uuid(msg.job_uuid)
        job = self._own_job(job_uuid, caller)
        if job.ready is None:
            raise FailedPrecondition(f"streaming job {job_uuid} is not ready yet")
        loop = asyncio.get_running_loop()
        waiters: list[tuple[str, asyncio.Future[streaming_pb2.ExtraDataPlaced]]] = []
        total = 0
        while msg is not None:
            if msg.job_uuid and parse_job_uuid(msg.job_uuid) != job_uuid:
                raise InvalidArgument("every AddExtraData message must be for the same job")
            data = msg.data
            if not plain_file_name(data.file_name):
                raise InvalidArgument(f"data.file_name {data.file_name!r}: {PLAIN_NAME_RULE}")
            total += len(data.data)
            if total > self._max_extra:
                raise ResourceExhausted(
                    f"extra data exceeds the validator's cap of {self._max_extra} bytes per call"
                )
            if data.last:
                pending = job.placements.get(data.file_name)
                if pending is not None and not pending.done():
                    # Confirmations are matched by name: a second upload of the same name would
                    # leave one of the two waiting for a confirmation that never comes.
                    raise AlreadyExists(
                        f"extra data {data.file_name!r} is still being placed: send it again "
                        "once that is confirmed"
                    )
                waiter: asyncio.Future[streaming_pb2.ExtraDataPlaced] = loop.create_future()
                job.placements[data.file_name] = waiter
                waiters.append((data.file_name, waiter))
            await self._send(job, miner_pb2.RunJobRequest(extra_data=data))
            msg = await anext(it, None)
        placed_files = []
        for name, waiter in waiters:
            try:
                async with asyncio.timeout(PLACE_WAIT_S):
                    placed = await waiter
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the executor did not confirm {name} within {PLACE_WAIT_S:.0f}s"
                ) from None
            if placed.error:
                raise FailedPrecondition(f"extra data {name} was not placed: {placed.error}")
            placed_files.append(placed)
        names = [p.file_name for p in placed_files]
        log.info("extra_data_placed", job_uuid=job_uuid, files=names, bytes=total)
        return placed_files

    async def _send(self, job: LiveJob, msg: miner_pb2.RunJobRequest) -> None:
        """Put a message on the job's RunJob stream, unless the job ends first."""
        outbox = job.outbox
        if outbox is None or job.result is not None or job.task is None:
            raise FailedPrecondition(f"streaming job {job.job_uuid} has ended")
        if not outbox.full():
            outbox.put_nowait(msg)
            return
        put = asyncio.ensure_future(outbox.put(msg))
        done, _ = await asyncio.wait({put, job.task}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            raise FailedPrecondition(f"streaming job {job.job_uuid} has ended")

    async def report(self, request: validator_pb2.ReportBadReceiptRequest, caller: str) -> None:
        job_uuid = parse_job_uuid(request.job_uuid)
        record = await self._store.get(job_uuid)
        if record is None:
            raise NotFound(f"no job {job_uuid}")
        if record.client != caller:
            raise PermissionDenied(f"job {job_uuid} was started by another caller")
        try:
            # The certificate's signature must hold, whenever the receipt was made.
            payload = parse_certificate(request.certificate)
            verify_certificate(request.certificate, job_uuid=job_uuid, now_ns=payload.not_before_ns)
        except CertificateError as exc:
            raise InvalidArgument(f"certificate: {exc}") from None
        if payload.validator_hotkey != self._identity:
            raise InvalidArgument("certificate: issued for another validator")
        # Kept as evidence beside the penalties (amount 0: the streaming checks of issue 6
        # decide what a report is worth).
        await add_penalty(
            self._reports,
            payload.miner_hotkey,
            "bad_receipt_report",
            0.0,
            f"job {job_uuid}: {request.reason}",
            request.SerializeToString(),
        )
        log.warning(
            "bad_receipt_reported",
            job_uuid=job_uuid,
            miner=payload.miner_hotkey,
            reason=request.reason,
        )


class StreamingRpcs:
    """The ValidatorService's streaming RPCs; UNIMPLEMENTED until `streaming` is set."""

    streaming: StreamingJobs | None = None

    def _streaming(self) -> StreamingJobs:
        if self.streaming is None:
            raise Unimplemented("streaming jobs are not served by this validator")
        return self.streaming

    async def StartStreamingJob(
        self, request: validator_pb2.StartStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.StartStreamingJobResponse]:
        async for msg in self._streaming().start(request, str(current_caller())):
            yield msg

    async def StopStreamingJob(
        self, request: validator_pb2.StopStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.StopStreamingJobResponse:
        res = await self._streaming().stop(request.job_uuid, request.reason, str(current_caller()))
        return validator_pb2.StopStreamingJobResponse(result=res)

    async def AddExtraData(
        self,
        request_iterator: AsyncIterator[validator_pb2.AddExtraDataRequest],
        context: grpc.aio.ServicerContext,
    ) -> validator_pb2.AddExtraDataResponse:
        placed = await self._streaming().add_extra(request_iterator, str(current_caller()))
        return validator_pb2.AddExtraDataResponse(
            file_names=[p.file_name for p in placed], placed=placed
        )

    async def ReportBadReceipt(
        self, request: validator_pb2.ReportBadReceiptRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.ReportBadReceiptResponse:
        await self._streaming().report(request, str(current_caller()))
        return validator_pb2.ReportBadReceiptResponse()
