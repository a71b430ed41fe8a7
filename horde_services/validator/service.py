"""ValidatorService: the job API for clients (thin: validate, then hand to the JobManager)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc

from horde_services.core.errors import (
    FailedPrecondition,
    HordeError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from horde_services.core.proto_util import (
    TERMINAL_STATES,
    UPLOAD_ACCEPTED,
    UPLOAD_REFUSED,
    parse_cursor,
    result,
    state_name,
)
from horde_services.core.server import current_caller
from horde_services.executor.archive import ArchiveError, clean_member_name
from horde_services.validator.jobs import JobManager
from horde_services.validator.spec_checks import is_sha256_hex, shorten, spec_problem
from horde_services.validator.store import JobStore, chunks
from horde_services.validator.streaming import StreamingRpcs, parse_job_uuid

log = structlog.get_logger("horde.validator")
OUTPUT_CHUNK = 1024 * 1024
# A SubmitJob refused while the client is still uploading inputs is not answered at once: the
# rest of the upload is read and thrown away first, and the refusal is sent once the client
# half-closes. Answering earlier fails the client's pending write, and grpc.aio then reports the
# call as INTERNAL ("Internal error from Core") instead of the validator's status. At most this
# many bytes past the cap (and never more than the cap again) are read from a refused upload; a
# client that sends more is cut off mid-stream, as is one that declares more than that up front.
REFUSED_UPLOAD_DRAIN_BYTES = 256 * 1024 * 1024
# ...and a client that sends nothing for this long gets the refusal anyway (e.g. one that keeps
# the stream open after its inputs, to be able to cancel).
REFUSED_UPLOAD_IDLE_S = 5.0
# The handshake that spares a client this: once the spec passed every check made from it, the
# validator sends its initial metadata with ("horde-upload", "accepted") before it reads any input
# chunk; a refusal made from the spec sends ("horde-upload", "refused") first. A client that waits
# for this before its first chunk (the CLI) sends no byte of a refused upload: it half-closes on
# "refused" (or reads the status when the call ended), and the validator answers at once. Older
# clients, which write their chunks without waiting, still have theirs read and thrown away.
# A ListJobs page ends early rather than pass this many bytes of jobs: under gRPC's default
# 4 MiB receive limit of clients, whatever the jobs' results hold (next_cursor goes on).
LIST_PAGE_BYTES = 3 * 1024 * 1024


def validate_spec(spec: job_pb2.JobSpec, max_stage_timeout_s: int | None = None) -> None:
    """Raise InvalidArgument naming the first bad field."""
    problem = spec_problem(spec)
    if problem is not None:
        raise InvalidArgument(problem)
    if spec.HasField("streaming"):
        raise InvalidArgument(
            "spec.streaming: streaming jobs start through a gateway (StartStreamingJob), not "
            "SubmitJob"
        )
    if max_stage_timeout_s is not None:
        for field, value in spec.timeouts.ListFields():
            if value > max_stage_timeout_s:
                raise InvalidArgument(
                    f"spec.timeouts.{field.name}: {value} s exceeds this validator's maximum of "
                    f"{max_stage_timeout_s} s"
                )
    single_files: dict[str, int] = {}  # path under /volume -> the input that puts a file there
    for index, volume in enumerate(spec.inputs):
        where = f"spec.inputs[{index}]"
        source = volume.WhichOneof("source")
        if source is None:
            raise InvalidArgument(
                f"{where}: a source (inline_archive, url or inline_file) is required"
            )
        if volume.mount_path:
            try:
                clean_member_name(volume.mount_path)
            except ArchiveError as exc:
                raise InvalidArgument(f"{where}.mount_path: {exc}") from None
        if source == "inline_file":
            name = volume.inline_file.file_name
            if not name or "/" in name or name in (".", ".."):
                raise InvalidArgument(
                    f"{where}.inline_file.file_name: a plain file name is required"
                )
            path = f"{volume.mount_path.strip('/')}/{name}".lstrip("/")
            other = single_files.setdefault(path, index)
            if other != index:
                raise InvalidArgument(
                    f"{where}.inline_file: /volume/{path} is already spec.inputs[{other}]'s"
                )
        if source == "url":
            if not volume.url.url.startswith(("http://", "https://")):
                raise InvalidArgument(f"{where}.url.url: must be an http(s) URL")
            if not is_sha256_hex(volume.url.sha256):
                raise InvalidArgument(f"{where}.url.sha256: a 64-hex-digit sha256 is required")
        if source in ("inline_archive", "inline_file"):
            declared = getattr(volume, source).sha256
            if declared and not is_sha256_hex(declared):
                raise InvalidArgument(
                    f"{where}.{source}.sha256: {shorten(declared)!r} is not a 64-hex-digit sha256"
                )
    if spec.output.WhichOneof("target") == "upload" and not spec.output.upload.url.startswith(
        ("http://", "https://")
    ):
        raise InvalidArgument("spec.output.upload.url: must be an http(s) URL")


# Inline-input uploads one client may have under way at once (each up to max_inline_input_bytes,
# spooled to the state_dir's disk, which must keep spool_min_free_mb free).
MAX_UPLOADS_PER_CLIENT = 4


class ValidatorServicer(StreamingRpcs, validator_pb2_grpc.ValidatorServiceServicer):
    def __init__(
        self,
        manager: JobManager,
        store: JobStore,
        allowed_images: set[str],
        default_class: str,
        max_input_bytes: int,
        max_stage_timeout_s: int | None = None,
        admins: set[str] | None = None,
        spool_min_free_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self._spool_min_free = spool_min_free_bytes
        self._manager = manager
        # Identity strings that see every client's jobs (the others see their own).
        self._admins = admins or set()
        self._max_stage_timeout_s = max_stage_timeout_s
        self._store = store
        self._allowed = allowed_images
        self._default_class = default_class
        self._max_input = max_input_bytes
        self._uploads: dict[str, int] = {}  # inline-input uploads under way, by client
        # Bytes read from one upload at most (stored ones included) before it is cut off.
        self._read_limit = max_input_bytes + min(max_input_bytes, REFUSED_UPLOAD_DRAIN_BYTES)

    async def SubmitJob(
        self,
        request_iterator: AsyncIterator[validator_pb2.SubmitJobRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[validator_pb2.SubmitJobResponse]:
        client = str(current_caller())
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("the first SubmitJob message must carry the job spec")
        spec = first.spec
        try:
            self._manager.refuse_if_draining()
            validate_spec(spec, self._max_stage_timeout_s)
        except (InvalidArgument, Unavailable):
            await self._refuse_upload(context, requests, first.ByteSize())  # the client reads why
            raise
        if not spec.executor_class:
            spec.executor_class = self._default_class
        inline = [
            getattr(v, v.WhichOneof("source") or "")
            for v in spec.inputs
            if v.WhichOneof("source") in ("inline_archive", "inline_file")
        ]
        declared = sum(i.size_bytes for i in inline)
        if declared > self._max_input:
            # Refused before any input byte is stored (nothing on disk, nothing in the DB).
            refusal = ResourceExhausted(
                f"inline inputs exceed the validator's cap of {self._max_input} bytes "
                f"(the spec declares {declared})"
            )
            if declared <= self._read_limit:
                await self._refuse_upload(context, requests, 0)
            else:  # (no use reading it: a client that waits for the handshake sent none)
                await context.send_initial_metadata((UPLOAD_REFUSED,))
            raise refusal
        if inline:
            problem = self._upload_refusal(client, declared, all(i.size_bytes for i in inline))
            if problem is not None:
                await self._refuse_upload(context, requests, first.ByteSize())
                raise problem
        # Counted from the check above on, with no await between (only inline inputs count as
        # uploads): concurrent calls of one client cannot all pass it.
        uploads = 1 if inline else 0
        self._uploads[client] = self._uploads.get(client, 0) + uploads
        job_uuid, spool = self._manager.new_spool()
        rejected: job_pb2.JobResult | None = None
        try:
            if spec.image not in self._allowed:
                rejected = result(
                    job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                    common_pb2.STAGE_ACCEPT,
                    f"image {spec.image!r} is not on the validator's allow-list",
                )
                await self._manager.reject(job_uuid, spec, client, rejected)
                spool.rmdir()
            else:
                if inline:
                    # Accepted for upload: the client may send its input chunks now.
                    await context.send_initial_metadata((UPLOAD_ACCEPTED,))
                await self._spool_inputs(spec, requests, spool)
                # (A drain that began during the upload refuses it here, its spool removed.)
                job = await self._manager.submit(job_uuid, spec, client, spool)
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        finally:
            self._uploads[client] -= uploads
            if not self._uploads[client]:
                del self._uploads[client]
        if rejected is not None:
            yield validator_pb2.SubmitJobResponse(result=rejected)
            return
        log.info("job_submitted", job_uuid=job_uuid, image=spec.image, client=client)
        watcher = asyncio.create_task(self._watch_cancel(requests, job_uuid))
        try:
            async for item in self._manager.follow(job):
                if isinstance(item, job_pb2.JobEvent):
                    yield validator_pb2.SubmitJobResponse(event=item)
                elif isinstance(item, job_pb2.OutputChunk):
                    yield validator_pb2.SubmitJobResponse(output_chunk=item)
                elif isinstance(item, job_pb2.JobResult):
                    yield validator_pb2.SubmitJobResponse(result=item)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def _upload_refusal(self, client: str, declared: int, all_declared: bool) -> HordeError | None:
        """Why an upload of inline inputs may not start now, if it may not: the client has
        MAX_UPLOADS_PER_CLIENT under way already, or the spool's disk would be left with less
        than spool_min_free_mb (the database shares it: a full disk stops the validator)."""
        under_way = self._uploads.get(client, 0)
        if under_way >= MAX_UPLOADS_PER_CLIENT:
            return ResourceExhausted(
                f"{under_way} uploads of inline inputs of yours are under way, the most a "
                f"client may have at once: submit this job once one of them has finished"
            )
        need = declared if all_declared else self._max_input
        try:
            free = shutil.disk_usage(self._manager.spool_dir).free
        except OSError:
            return None  # (the spool itself then says what is wrong)
        if free - need < self._spool_min_free:
            return Unavailable(
                f"the validator is short of disk space for inputs ({free // 2**20} MiB free, "
                f"{need // 2**20} MiB asked, {self._spool_min_free // 2**20} MiB kept free): "
                f"try again later"
            )
        return None

    async def _watch_cancel(
        self, requests: AsyncIterator[validator_pb2.SubmitJobRequest], job_uuid: str
    ) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            async for msg in requests:
                if msg.WhichOneof("payload") == "cancel" and msg.cancel:
                    await self._manager.cancel(job_uuid)
                    return

    async def _spool_inputs(
        self,
        spec: job_pb2.JobSpec,
        requests: AsyncIterator[validator_pb2.SubmitJobRequest],
        spool: Path,
    ) -> None:
        pending = {
            i: getattr(v, v.WhichOneof("source") or "")
            for i, v in enumerate(spec.inputs)
            if v.WhichOneof("source") in ("inline_archive", "inline_file")
        }
        total = 0
        digests = {i: hashlib.sha256() for i in pending}
        sizes = dict.fromkeys(pending, 0)
        files = {i: (spool / str(i)).open("wb") for i in pending}
        try:
            while pending:
                msg = await anext(requests, None)
                if msg is None:
                    missing = ", ".join(str(i) for i in sorted(pending))
                    raise InvalidArgument(
                        f"the stream ended before the bytes of input(s) {missing}"
                    )
                total += msg.ByteSize()
                try:
                    self._spool_chunk(msg, pending, files, digests, sizes)
                except HordeError:
                    # Refused mid-upload: read the rest first, so the client sees this status.
                    await self._discard_upload(requests, total)
                    raise
        finally:
            for fh in files.values():
                fh.close()

    def _spool_chunk(
        self,
        msg: validator_pb2.SubmitJobRequest,
        pending: dict[int, job_pb2.InlineArchive | job_pb2.InlineFile],
        files: dict[int, io.BufferedWriter],
        digests: dict[int, hashlib._Hash],
        sizes: dict[int, int],
    ) -> None:
        """Store one input chunk; a HordeError refuses the upload."""
        if msg.WhichOneof("payload") != "input_chunk":
            raise InvalidArgument("expected input_chunk messages until every inline input is sent")
        chunk = msg.input_chunk
        if chunk.volume_index not in pending:
            raise InvalidArgument(
                f"input_chunk for input {chunk.volume_index}, which is not an open inline input"
            )
        if sum(sizes.values()) + len(chunk.data) > self._max_input:
            raise ResourceExhausted(
                f"inline inputs exceed the validator's cap of {self._max_input} bytes"
            )
        i = chunk.volume_index
        files[i].write(chunk.data)
        digests[i].update(chunk.data)
        sizes[i] += len(chunk.data)
        if chunk.last:
            declared = pending.pop(i)
            if declared.size_bytes and sizes[i] != declared.size_bytes:
                raise InvalidArgument(
                    f"spec.inputs[{i}]: got {sizes[i]} bytes, declared {declared.size_bytes}"
                )
            if declared.sha256 and digests[i].hexdigest() != declared.sha256.lower():
                raise InvalidArgument(f"spec.inputs[{i}]: sha256 mismatch")
            if not declared.size_bytes:
                declared.size_bytes = sizes[i]

    async def _refuse_upload(
        self,
        context: grpc.aio.ServicerContext,
        requests: AsyncIterator[validator_pb2.SubmitJobRequest],
        read: int,
    ) -> None:
        """Before a refusal made from the spec: say so in the initial metadata (a client that
        waits for the handshake half-closes without sending a chunk), then read and drop what an
        older client sends meanwhile (_discard_upload)."""
        await context.send_initial_metadata((UPLOAD_REFUSED,))
        await self._discard_upload(requests, read)

    async def _discard_upload(
        self, requests: AsyncIterator[validator_pb2.SubmitJobRequest], read: int
    ) -> None:
        """Read and drop the rest of a refused upload (`read` bytes of it already read) until the
        client half-closes, goes idle, or the upload passes the read limit. The caller then
        raises its refusal: after a half-close (or while idle) every write of the client has
        succeeded and it reads that status; past the limit the stream is cut off mid-write."""
        while read <= self._read_limit:
            try:
                async with asyncio.timeout(REFUSED_UPLOAD_IDLE_S):
                    msg = await anext(requests, None)
            except TimeoutError:
                return
            if msg is None:
                return
            read += msg.ByteSize()
        log.info("refused_upload_cut_off", read_bytes=read, limit=self._read_limit)

    async def _own_record(self, job_uuid: str) -> job_pb2.JobRecord:
        """The job's record, when the caller submitted it (or is an admin)."""
        record = await self._store.get(job_uuid)
        if record is None:
            raise NotFound(f"no job {job_uuid}")
        caller = str(current_caller())
        if record.client != caller and caller not in self._admins:
            raise PermissionDenied(f"job {job_uuid} was submitted by another client")
        return record

    async def WatchJob(
        self, request: validator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.WatchJobResponse]:
        job_uuid = parse_job_uuid(request.job_uuid)
        record = await self._own_record(job_uuid)
        job = self._manager.live(job_uuid)
        if job is not None:
            async for item in self._manager.follow(job):
                if isinstance(item, job_pb2.JobEvent):
                    yield validator_pb2.WatchJobResponse(event=item)
                elif isinstance(item, job_pb2.JobResult):
                    yield validator_pb2.WatchJobResponse(result=item)
            return
        record = await self._store.get(job_uuid) or record  # it may have ended meanwhile
        for ev in await self._store.events(job_uuid):
            yield validator_pb2.WatchJobResponse(event=ev)
        if record.state in TERMINAL_STATES:
            yield validator_pb2.WatchJobResponse(result=record.result)

    async def GetJob(
        self, request: validator_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.GetJobResponse:
        record = await self._own_record(parse_job_uuid(request.job_uuid))
        return validator_pb2.GetJobResponse(job=record)

    async def CancelJob(
        self, request: validator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.CancelJobResponse:
        job_uuid = parse_job_uuid(request.job_uuid)
        await self._own_record(job_uuid)
        await self._manager.cancel(job_uuid)
        record = await self._store.get(job_uuid)
        assert record is not None
        return validator_pb2.CancelJobResponse(state=record.state)

    async def ListJobs(
        self, request: validator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.ListJobsResponse:
        limit = min(request.limit or 50, 500)
        cursor = parse_cursor(request.cursor)
        if request.state and request.state not in common_pb2.JobState.values():
            raise InvalidArgument(f"state: {request.state} is not a JobState")
        caller = str(current_caller())
        records, next_cursor = await self._store.list_jobs(
            limit,
            cursor,
            request.state or None,
            client=None if caller in self._admins else caller,
            max_bytes=LIST_PAGE_BYTES,
        )
        return validator_pb2.ListJobsResponse(
            jobs=records, next_cursor=str(next_cursor) if next_cursor is not None else ""
        )

    async def DownloadOutputs(
        self, request: validator_pb2.DownloadOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.DownloadOutputsResponse]:
        job_uuid = parse_job_uuid(request.job_uuid)
        record = await self._own_record(job_uuid)
        if record.state not in TERMINAL_STATES:
            # Not "no files": a job still under way has made none yet that anyone may fetch.
            raise FailedPrecondition(
                f"job {job_uuid} has not finished ({state_name(record.state)}): its outputs come "
                "with its result (WatchJob), or from DownloadOutputs once it has ended"
            )
        files = await self._store.outputs(job_uuid)
        inline = record.spec.output.WhichOneof("target") != "upload"
        if not files and inline and len(record.result.outputs):
            raise NotFound(
                f"the output files of job {job_uuid} are no longer kept (a validator keeps them "
                f"for output_retention_days after the job ends)"
            )
        for chunk in chunks(files, OUTPUT_CHUNK):
            yield validator_pb2.DownloadOutputsResponse(chunk=chunk)
