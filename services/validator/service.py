"""ValidatorService: the job API for clients (thin: validate, then hand to the JobManager)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc

from services.core.errors import InvalidArgument, NotFound, ResourceExhausted
from services.core.proto_util import TERMINAL_STATES, result
from services.core.server import current_caller
from services.executor.archive import ArchiveError, clean_member_name
from services.validator.jobs import JobManager
from services.validator.store import JobStore, chunks
from services.validator.streaming import StreamingRpcs

log = structlog.get_logger("horde.validator")
OUTPUT_CHUNK = 1024 * 1024


def validate_spec(spec: job_pb2.JobSpec) -> None:
    """Raise InvalidArgument naming the first bad field."""
    if not spec.image.strip():
        raise InvalidArgument("spec.image: an image reference is required")
    for key in spec.env:
        if not key or "=" in key or "\x00" in key:
            raise InvalidArgument(f"spec.env: invalid variable name {key!r}")
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
        if source == "url":
            if not volume.url.url.startswith(("http://", "https://")):
                raise InvalidArgument(f"{where}.url.url: must be an http(s) URL")
            if len(volume.url.sha256) != 64:
                raise InvalidArgument(f"{where}.url.sha256: a 64-hex-digit sha256 is required")
    if spec.output.WhichOneof("target") == "upload" and not spec.output.upload.url.startswith(
        ("http://", "https://")
    ):
        raise InvalidArgument("spec.output.upload.url: must be an http(s) URL")


class ValidatorServicer(StreamingRpcs, validator_pb2_grpc.ValidatorServiceServicer):
    def __init__(
        self,
        manager: JobManager,
        store: JobStore,
        allowed_images: set[str],
        default_class: str,
        max_input_bytes: int,
    ) -> None:
        self._manager = manager
        self._store = store
        self._allowed = allowed_images
        self._default_class = default_class
        self._max_input = max_input_bytes

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
        validate_spec(spec)
        if not spec.executor_class:
            spec.executor_class = self._default_class
        job_uuid, spool = self._manager.new_spool()
        if spec.image not in self._allowed:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                common_pb2.STAGE_ACCEPT,
                f"image {spec.image!r} is not on the validator's allow-list",
            )
            await self._manager.reject(job_uuid, spec, client, res)
            spool.rmdir()
            yield validator_pb2.SubmitJobResponse(result=res)
            return
        try:
            await self._spool_inputs(spec, requests, spool)
        except BaseException:
            import shutil

            shutil.rmtree(spool, ignore_errors=True)
            raise
        job = await self._manager.submit(job_uuid, spec, client, spool)
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
                if msg.WhichOneof("payload") != "input_chunk":
                    raise InvalidArgument(
                        "expected input_chunk messages until every inline input is sent"
                    )
                chunk = msg.input_chunk
                if chunk.volume_index not in pending:
                    raise InvalidArgument(
                        f"input_chunk for input {chunk.volume_index}, "
                        "which is not an open inline input"
                    )
                total += len(chunk.data)
                if total > self._max_input:
                    raise ResourceExhausted(
                        f"inline inputs exceed the validator's cap of {self._max_input} bytes"
                    )
                files[chunk.volume_index].write(chunk.data)
                digests[chunk.volume_index].update(chunk.data)
                sizes[chunk.volume_index] += len(chunk.data)
                if chunk.last:
                    declared = pending.pop(chunk.volume_index)
                    i = chunk.volume_index
                    if declared.size_bytes and sizes[i] != declared.size_bytes:
                        raise InvalidArgument(
                            f"spec.inputs[{i}]: got {sizes[i]} bytes, "
                            f"declared {declared.size_bytes}"
                        )
                    if declared.sha256 and digests[i].hexdigest() != declared.sha256.lower():
                        raise InvalidArgument(f"spec.inputs[{i}]: sha256 mismatch")
                    if not declared.size_bytes:
                        declared.size_bytes = sizes[i]
        finally:
            for fh in files.values():
                fh.close()

    async def WatchJob(
        self, request: validator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.WatchJobResponse]:
        job = self._manager.live(request.job_uuid)
        if job is not None:
            async for item in self._manager.follow(job):
                if isinstance(item, job_pb2.JobEvent):
                    yield validator_pb2.WatchJobResponse(event=item)
                elif isinstance(item, job_pb2.JobResult):
                    yield validator_pb2.WatchJobResponse(result=item)
            return
        record = await self._store.get(request.job_uuid)
        if record is None:
            raise NotFound(f"no job {request.job_uuid}")
        for ev in await self._store.events(request.job_uuid):
            yield validator_pb2.WatchJobResponse(event=ev)
        if record.state in TERMINAL_STATES:
            yield validator_pb2.WatchJobResponse(result=record.result)

    async def GetJob(
        self, request: validator_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.GetJobResponse:
        record = await self._store.get(request.job_uuid)
        if record is None:
            raise NotFound(f"no job {request.job_uuid}")
        return validator_pb2.GetJobResponse(job=record)

    async def CancelJob(
        self, request: validator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.CancelJobResponse:
        record = await self._store.get(request.job_uuid)
        if record is None:
            raise NotFound(f"no job {request.job_uuid}")
        await self._manager.cancel(request.job_uuid)
        record = await self._store.get(request.job_uuid)
        assert record is not None
        return validator_pb2.CancelJobResponse(state=record.state)

    async def ListJobs(
        self, request: validator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.ListJobsResponse:
        limit = min(request.limit or 50, 500)
        try:
            cursor = int(request.cursor) if request.cursor else None
        except ValueError:
            raise InvalidArgument(f"malformed cursor {request.cursor!r}") from None
        records, next_cursor = await self._store.list_jobs(limit, cursor, request.state or None)
        return validator_pb2.ListJobsResponse(
            jobs=records, next_cursor=str(next_cursor) if next_cursor is not None else ""
        )

    async def DownloadOutputs(
        self, request: validator_pb2.DownloadOutputsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.DownloadOutputsResponse]:
        record = await self._store.get(request.job_uuid)
        if record is None:
            raise NotFound(f"no job {request.job_uuid}")
        for chunk in chunks(await self._store.outputs(request.job_uuid), OUTPUT_CHUNK):
            yield validator_pb2.DownloadOutputsResponse(chunk=chunk)
