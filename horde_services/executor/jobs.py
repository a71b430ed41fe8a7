"""One organic job on the executor: image, volumes, run, outputs - each stage under its deadline."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp.resolver import DefaultResolver
from horde.v1 import common_pb2, executor_pb2, job_pb2, miner_pb2
from yarl import URL

from horde_services.core import metrics
from horde_services.core.proto_util import event, reason_name, result, state_name
from horde_services.executor.archive import ArchiveError, clean_member_name, safe_extract
from horde_services.executor.sandbox import (
    ContainerResult,
    ContainerRun,
    DockerRuntime,
    ImageError,
    RunLogs,
    SandboxLimits,
    normalise_image_ref,
)
from horde_services.executor.urlguard import (
    GuardedResolver,
    NonPublicAddressError,
    allow_all,
    check_url,
    guarded_get,
    is_public,
)

log = structlog.get_logger("horde.executor.job")

Send = Callable[[executor_pb2.ConnectRequest], Awaitable[None]]
OUTPUT_CHUNK = 1024 * 1024
MAX_DOWNLOAD_BYTES = 4 * 1024**3

DEFAULT_TIMEOUTS = {
    "image_pull_s": 600,
    "volume_download_s": 300,
    "execution_s": 600,
    "output_upload_s": 300,
}


class JobFailure(Exception):
    """Ends the job with a given state and reason."""

    def __init__(
        self,
        state: common_pb2.JobState.ValueType,
        reason: common_pb2.FailureReason.ValueType,
        stage: common_pb2.Stage.ValueType,
        detail: str,
    ) -> None:
        super().__init__(detail)
        self.state, self.reason, self.stage, self.detail = state, reason, stage, detail


# Failures of the job's own after which its inline outputs are still returned.
OUTPUTS_OF_FAILED = frozenset(
    {
        common_pb2.FAILURE_REASON_NONZERO_EXIT,
        common_pb2.FAILURE_REASON_TIMEOUT,
        common_pb2.FAILURE_REASON_OUT_OF_MEMORY,
        common_pb2.FAILURE_REASON_PIDS_LIMIT,
    }
)


def failed(
    reason: common_pb2.FailureReason.ValueType, stage: common_pb2.Stage.ValueType, detail: str
) -> JobFailure:
    return JobFailure(common_pb2.JOB_STATE_FAILED, reason, stage, detail)


def _timeout(spec: job_pb2.JobSpec, name: str) -> float:
    value = getattr(spec.timeouts, name)
    return float(value or DEFAULT_TIMEOUTS[name])


def _captured(data: bytes, truncated: bool, total: int) -> job_pb2.CapturedOutput:
    return job_pb2.CapturedOutput(
        data=data, truncated=truncated, total_bytes=max(total, 0 if truncated else len(data))
    )


def log_result(res: job_pb2.JobResult, kind: str = "organic") -> None:
    """One line (and a count) per job the executor ends: how, and why."""
    metrics.EXECUTOR_JOBS.labels(kind, state_name(res.state), reason_name(res.reason)).inc()
    log.info(
        "job_finished",
        job_uuid=res.job_uuid,
        state=common_pb2.JobState.Name(res.state),
        reason=common_pb2.FailureReason.Name(res.reason),
        detail=res.detail[:200],
    )


def job_dir_failure(job_uuid: str, work_dir: Path, exc: OSError) -> executor_pb2.ConnectRequest:
    """The result of a job whose directory cannot be made (work_dir unwritable, disk full): the
    executor's fault, said at once rather than leaving the job (and the executor) hanging."""
    why = exc.strerror or str(exc)
    log.error("job_dir_failed", job_uuid=job_uuid, work_dir=str(work_dir), error=why)
    return executor_pb2.ConnectRequest(
        result=result(
            job_uuid,
            common_pb2.JOB_STATE_HORDE_FAILED,
            common_pb2.FAILURE_REASON_INTERNAL_ERROR,
            common_pb2.STAGE_RESERVATION,
            f"executor error: cannot create the job's directory in {work_dir}: {why}",
        )
    )


def _refusal(url: str, exc: NonPublicAddressError) -> str:
    """Why a URL input was refused, telling nothing the client did not know: the address only
    for a literal IP host (never what a name resolved to on the miner's host), no query."""
    where = url.split("?", 1)[0]
    if exc.url is not None and exc.url != URL(url):
        where += f" (redirected to {exc.url.with_query(None).with_fragment(None)})"
    what = (
        f"resolves to {exc.address}, which is not a public address"
        if exc.address is not None
        else "resolves to no public address"
    )
    return f"{where} {what} (executor setting job_urls_allow_private)"


@dataclass
class JobContext:
    start: miner_pb2.RunJobStart
    inputs: asyncio.Queue[job_pb2.InputChunk]
    send: Send

    @property
    def job_uuid(self) -> str:
        return self.start.job_uuid

    @property
    def spec(self) -> job_pb2.JobSpec:
        return self.start.spec


class OrganicJobRunner:
    def __init__(
        self,
        runtime: DockerRuntime,
        allowed_images: set[str],
        limits: SandboxLimits,
        work_dir: Path,
        gpus: int = 0,
        job_urls_allow_private: bool = False,
    ) -> None:
        self._runtime = runtime
        # "name" means "name:latest", as everywhere images are named.
        self._allowed = {normalise_image_ref(i) for i in allowed_images}
        self._limits = limits
        self._work_dir = work_dir
        self._gpus = gpus
        # URL inputs connect only to public addresses unless the operator allows private ones.
        self._url_policy = allow_all if job_urls_allow_private else is_public

    async def run(self, ctx: JobContext) -> None:
        """Run the job to a result, which is always sent (also on failure and cancellation)."""
        timings: list[job_pb2.StageTiming] = []
        try:
            job_dir = Path(tempfile.mkdtemp(prefix=f"job-{ctx.job_uuid[:8]}-", dir=self._work_dir))
        except OSError as exc:
            await ctx.send(job_dir_failure(ctx.job_uuid, self._work_dir, exc))
            return
        res: job_pb2.JobResult | None = None
        logs = RunLogs(self._limits.log_cap_bytes)
        try:
            res = await self._stages(ctx, job_dir, timings, logs)
        except JobFailure as exc:
            res = result(ctx.job_uuid, exc.state, exc.reason, exc.stage, exc.detail)
        except asyncio.CancelledError:
            res = result(
                ctx.job_uuid,
                common_pb2.JOB_STATE_CANCELLED,
                common_pb2.FAILURE_REASON_CANCELLED,
                common_pb2.STAGE_EXECUTION,
                "job cancelled",
            )
            # What the job wrote before it was stopped (nothing if it never ran).
            for field, buf in (("stdout", logs.stdout), ("stderr", logs.stderr)):
                if buf.total:
                    getattr(res, field).CopyFrom(
                        _captured(buf.getvalue(), buf.truncated, buf.total)
                    )
            raise
        except Exception as exc:
            log.exception("job_internal_error", job_uuid=ctx.job_uuid)
            res = result(
                ctx.job_uuid,
                common_pb2.JOB_STATE_HORDE_FAILED,
                common_pb2.FAILURE_REASON_INTERNAL_ERROR,
                common_pb2.STAGE_UNSPECIFIED,
                f"executor error: {exc!r}",
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
            if res is not None:
                if not res.stage_timings:
                    res.stage_timings.extend(timings)
                log_result(res)
                await asyncio.shield(ctx.send(executor_pb2.ConnectRequest(result=res)))

    async def _event(
        self,
        ctx: JobContext,
        state: common_pb2.JobState.ValueType,
        stage: common_pb2.Stage.ValueType,
        message: str = "",
        progress: float = -1.0,
    ) -> None:
        await ctx.send(
            executor_pb2.ConnectRequest(event=event(ctx.job_uuid, state, stage, message, progress))
        )

    async def _stages(
        self,
        ctx: JobContext,
        job_dir: Path,
        timings: list[job_pb2.StageTiming],
        logs: RunLogs,
    ) -> job_pb2.JobResult:
        spec = ctx.spec
        if normalise_image_ref(spec.image) not in self._allowed:
            raise JobFailure(
                common_pb2.JOB_STATE_REJECTED,
                common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED,
                common_pb2.STAGE_IMAGE_PULL,
                f"image {spec.image!r} is not on this executor's allow-list",
            )

        t0 = time.monotonic()
        await self._image(ctx)
        timings.append(
            job_pb2.StageTiming(stage=common_pb2.STAGE_IMAGE_PULL, seconds=time.monotonic() - t0)
        )
        await self._event(
            ctx, common_pb2.JOB_STATE_EXECUTOR_READY, common_pb2.STAGE_IMAGE_PULL, "image ready"
        )

        t0 = time.monotonic()
        volume_dir = job_dir / "volume"
        volume_dir.mkdir()
        try:
            async with asyncio.timeout(_timeout(spec, "volume_download_s")):
                await self._volumes(ctx, job_dir, volume_dir)
        except TimeoutError:
            raise failed(
                common_pb2.FAILURE_REASON_TIMEOUT,
                common_pb2.STAGE_VOLUME_DOWNLOAD,
                "inputs did not arrive within the volume stage time limit",
            ) from None
        timings.append(
            job_pb2.StageTiming(
                stage=common_pb2.STAGE_VOLUME_DOWNLOAD, seconds=time.monotonic() - t0
            )
        )
        await self._event(
            ctx,
            common_pb2.JOB_STATE_VOLUMES_READY,
            common_pb2.STAGE_VOLUME_DOWNLOAD,
            "inputs ready",
        )

        t0 = time.monotonic()
        output_dir = job_dir / "output"
        output_dir.mkdir()

        async def started() -> None:
            await self._event(
                ctx, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION, "container started"
            )

        run = ContainerRun(
            job_uuid=ctx.job_uuid,
            image=spec.image,
            command=list(spec.command),
            env=dict(spec.env),
            volume_dir=volume_dir,
            limits=self._limits,
            timeout_s=_timeout(spec, "execution_s"),
            gpus=self._gpus,
            logs=logs,
        )
        try:
            outcome = await self._runtime.run(run, output_dir, on_started=started)
        except ImageError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_IMAGE_NOT_FOUND, common_pb2.STAGE_EXECUTION, str(exc)
            ) from None
        timings.append(
            job_pb2.StageTiming(stage=common_pb2.STAGE_EXECUTION, seconds=time.monotonic() - t0)
        )
        res = self._classify(ctx.job_uuid, outcome)
        res.stage_timings.extend(timings)
        if res.state != common_pb2.JOB_STATE_COMPLETED:
            if res.reason in OUTPUTS_OF_FAILED and spec.output.WhichOneof("target") != "upload":
                await self._outputs_of_failed(ctx, output_dir, res)
            return res

        t0 = time.monotonic()
        try:
            async with asyncio.timeout(_timeout(spec, "output_upload_s")):
                files = await self._outputs(ctx, output_dir, res)
        except TimeoutError:
            raise failed(
                common_pb2.FAILURE_REASON_TIMEOUT,
                common_pb2.STAGE_OUTPUT_UPLOAD,
                "outputs were not delivered within the output stage time limit",
            ) from None
        res.outputs.extend(files)
        res.stage_timings.append(
            job_pb2.StageTiming(stage=common_pb2.STAGE_OUTPUT_UPLOAD, seconds=time.monotonic() - t0)
        )
        if spec.output.WhichOneof("target") == "upload":
            res.upload_url = spec.output.upload.url.split("?", 1)[0]
        return res

    async def _image(self, ctx: JobContext) -> None:
        last = 0.0

        async def progress(line: str) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.5:  # no flood of events for big pulls
                last = now
                await self._event(
                    ctx, common_pb2.JOB_STATE_ACCEPTED, common_pb2.STAGE_IMAGE_PULL, line
                )

        try:
            async with asyncio.timeout(_timeout(ctx.spec, "image_pull_s")):
                await self._runtime.ensure_image(ctx.spec.image, progress)
        except TimeoutError:
            raise failed(
                common_pb2.FAILURE_REASON_TIMEOUT,
                common_pb2.STAGE_IMAGE_PULL,
                f"image {ctx.spec.image!r} was not ready within the pull time limit",
            ) from None
        except ImageError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_IMAGE_NOT_FOUND, common_pb2.STAGE_IMAGE_PULL, str(exc)
            ) from None

    async def _volumes(self, ctx: JobContext, job_dir: Path, volume_dir: Path) -> None:
        stage = common_pb2.STAGE_VOLUME_DOWNLOAD
        for index, volume in enumerate(ctx.spec.inputs):
            mount = clean_member_name(volume.mount_path) if volume.mount_path else None
            target = volume_dir / str(mount) if mount is not None else volume_dir
            target.mkdir(parents=True, exist_ok=True)
            source = volume.WhichOneof("source")
            spool = job_dir / f"input-{index}"
            if source in ("inline_archive", "inline_file"):
                declared = getattr(volume, source)
                await self._receive(ctx, index, spool, declared.size_bytes, declared.sha256)
            elif source == "url":
                await self._download(index, volume.url, spool)
            else:
                raise failed(
                    common_pb2.FAILURE_REASON_INVALID_INPUT, stage, f"input {index} has no source"
                )
            try:
                if source == "inline_archive" or (source == "url" and volume.url.unpack):
                    await asyncio.to_thread(safe_extract, spool, target)
                else:
                    name = (
                        volume.inline_file.file_name
                        if source == "inline_file"
                        else volume.url.file_name or volume.url.url.rstrip("/").rsplit("/", 1)[-1]
                    )
                    rel = clean_member_name(name)
                    if rel is None or len(rel.parts) != 1:
                        raise ArchiveError(f"file name {name!r} must be a plain file name")
                    os.replace(spool, target / rel.name)
            except (ArchiveError, tarfile.TarError, OSError) as exc:
                raise failed(
                    common_pb2.FAILURE_REASON_INVALID_INPUT, stage, f"input {index}: {exc}"
                ) from None
            finally:
                spool.unlink(missing_ok=True)
            await self._event(
                ctx,
                common_pb2.JOB_STATE_EXECUTOR_READY,
                stage,
                f"input {index + 1}/{len(ctx.spec.inputs)} ready",
                (index + 1) / len(ctx.spec.inputs),
            )
        # Inputs are read-only for the job; world-readable so any uid in the container can read.
        for root, dirs, files in os.walk(volume_dir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        os.chmod(volume_dir, 0o755)

    async def _receive(
        self, ctx: JobContext, index: int, spool: Path, size: int, sha256: str
    ) -> None:
        digest = hashlib.sha256()
        received = 0
        with spool.open("wb") as fh:
            while True:
                chunk = await ctx.inputs.get()
                if chunk.volume_index != index:
                    raise failed(
                        common_pb2.FAILURE_REASON_INVALID_INPUT,
                        common_pb2.STAGE_VOLUME_DOWNLOAD,
                        f"input bytes for volume {chunk.volume_index} arrived "
                        f"while expecting {index}",
                    )
                received += len(chunk.data)
                if size and received > size:
                    raise failed(
                        common_pb2.FAILURE_REASON_INVALID_INPUT,
                        common_pb2.STAGE_VOLUME_DOWNLOAD,
                        f"input {index} is larger than its declared {size} bytes",
                    )
                digest.update(chunk.data)
                fh.write(chunk.data)
                if chunk.last:
                    break
        if size and received != size:
            raise failed(
                common_pb2.FAILURE_REASON_INVALID_INPUT,
                common_pb2.STAGE_VOLUME_DOWNLOAD,
                f"input {index}: got {received} bytes, declared {size}",
            )
        if sha256 and digest.hexdigest() != sha256.lower():
            raise failed(
                common_pb2.FAILURE_REASON_INVALID_INPUT,
                common_pb2.STAGE_VOLUME_DOWNLOAD,
                f"input {index}: sha256 mismatch",
            )

    async def _download(self, index: int, url: job_pb2.UrlInput, spool: Path) -> None:
        stage = common_pb2.STAGE_VOLUME_DOWNLOAD
        digest = hashlib.sha256()
        total = 0
        try:
            async with guarded_get(url.url, self._url_policy) as resp:
                if resp.status != 200:
                    raise failed(
                        common_pb2.FAILURE_REASON_DOWNLOAD_FAILED,
                        stage,
                        f"GET {url.url.split('?', 1)[0]} answered HTTP {resp.status}",
                    )
                with spool.open("wb") as fh:
                    async for block in resp.content.iter_chunked(OUTPUT_CHUNK):
                        total += len(block)
                        if total > MAX_DOWNLOAD_BYTES:
                            raise failed(
                                common_pb2.FAILURE_REASON_DOWNLOAD_FAILED,
                                stage,
                                "download too large",
                            )
                        digest.update(block)
                        fh.write(block)
        except NonPublicAddressError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_DOWNLOAD_FAILED,
                stage,
                f"input {index}: {_refusal(url.url, exc)}",
            ) from None
        except aiohttp.ClientError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_DOWNLOAD_FAILED, stage, f"download failed: {exc}"
            ) from None
        if url.sha256 and digest.hexdigest() != url.sha256.lower():
            raise failed(
                common_pb2.FAILURE_REASON_DOWNLOAD_FAILED,
                stage,
                f"sha256 of {url.url.split('?', 1)[0]} is {digest.hexdigest()}, "
                f"expected {url.sha256}",
            )

    def _classify(self, job_uuid: str, out: ContainerResult) -> job_pb2.JobResult:
        stage = common_pb2.STAGE_EXECUTION
        if out.timed_out and out.pids_exhausted_hint:
            # A fork bomb spins until killed: the process limit is the cause, the time limit
            # only the end.
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_PIDS_LIMIT,
                stage,
                f"the job hit its limit of {self._limits.pids_limit} processes and was killed "
                f"at its {out.duration_s:.0f}s time limit",
            )
        elif out.timed_out:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_TIMEOUT,
                stage,
                f"the job ran past its {out.duration_s:.0f}s time limit and was killed",
            )
        elif out.oom_killed:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_OUT_OF_MEMORY,
                stage,
                f"the job exceeded its memory limit of {self._limits.memory_bytes // 2**20} MiB",
            )
        elif out.output_too_large:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_OUTPUT_TOO_LARGE,
                common_pb2.STAGE_OUTPUT_UPLOAD,
                f"files under /output exceed the {self._limits.output_bytes // 2**20} MiB cap",
            )
        elif out.start_error:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_NONZERO_EXIT,
                stage,
                f"the container could not start: {out.start_error}",
            )
        elif out.output_error:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_INVALID_INPUT,
                common_pb2.STAGE_OUTPUT_UPLOAD,
                f"outputs refused: {out.output_error}",
            )
        elif out.exit_code != 0 and out.pids_exhausted_hint:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_PIDS_LIMIT,
                stage,
                f"the job hit its limit of {self._limits.pids_limit} processes",
            )
        elif out.exit_code != 0:
            res = result(
                job_uuid,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.FAILURE_REASON_NONZERO_EXIT,
                stage,
                f"the job exited with status {out.exit_code}",
            )
        else:
            res = result(job_uuid, common_pb2.JOB_STATE_COMPLETED, stage=stage)
        if out.exit_code is not None:
            res.exit_code = out.exit_code
        res.stdout.CopyFrom(_captured(out.stdout, out.stdout_truncated, out.stdout_total_bytes))
        res.stderr.CopyFrom(_captured(out.stderr, out.stderr_truncated, out.stderr_total_bytes))
        return res

    async def _outputs_of_failed(
        self, ctx: JobContext, output_dir: Path, res: job_pb2.JobResult
    ) -> None:
        """A job that failed on its own still returns what it wrote under /output (partial
        results, its own logs) when they come inline: the client may need them to see why. The
        failure stands; outputs that cannot be returned are only noted in its detail."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(_timeout(ctx.spec, "output_upload_s")):
                res.outputs.extend(await self._outputs(ctx, output_dir, res))
        except JobFailure as exc:
            res.detail += f"; its outputs were not returned: {exc.detail}"
        except TimeoutError:
            res.detail += "; its outputs were not returned within the output stage time limit"
        except OSError as exc:
            res.detail += f"; its outputs could not be read: {exc.strerror or exc}"
        res.stage_timings.append(
            job_pb2.StageTiming(stage=common_pb2.STAGE_OUTPUT_UPLOAD, seconds=time.monotonic() - t0)
        )

    async def _outputs(
        self, ctx: JobContext, output_dir: Path, res: job_pb2.JobResult
    ) -> list[job_pb2.OutputFile]:
        """Describe (and upload, or send inline) the files under /output. Returned inline, only
        regular files travel: what else is there (symlinks, fifos, sockets) is named in the
        result's detail rather than dropped without a word."""
        paths, others = await asyncio.to_thread(_scan_outputs, output_dir)
        # Hashing up to the output cap is disk and CPU work: off the event loop, which keeps
        # the link's heartbeats going.
        files = await asyncio.to_thread(_describe_outputs, output_dir, paths)
        target = ctx.spec.output.WhichOneof("target")
        if target == "upload":
            await self._upload(ctx.spec.output.upload, output_dir)
            return files
        if others:
            shown = ", ".join(others[:NOT_RETURNED_SHOWN])
            unnamed = len(others) - NOT_RETURNED_SHOWN
            more = f" and {unnamed} more" if unnamed > 0 else ""
            note = (
                f"{len(others)} entr{'y' if len(others) == 1 else 'ies'} under /output "
                f"not returned (only regular files are): {shown}{more}"
            )
            res.detail = f"{res.detail}; {note}" if res.detail else note
        cap = ctx.spec.output.stream.max_bytes if target == "stream" else 0
        total = sum(f.size_bytes for f in files)
        if cap and total > cap:
            # Checked before a byte is sent, so the client never gets a truncated set of files.
            raise failed(
                common_pb2.FAILURE_REASON_OUTPUT_TOO_LARGE,
                common_pb2.STAGE_OUTPUT_UPLOAD,
                f"files under /output total {total} bytes, over the {cap}-byte cap for outputs "
                "returned inline (use an upload URL for more)",
            )
        for meta, path in zip(files, paths, strict=True):
            offset = 0
            with path.open("rb") as fh:
                while True:
                    block = fh.read(OUTPUT_CHUNK)
                    last = fh.tell() >= meta.size_bytes
                    await ctx.send(
                        executor_pb2.ConnectRequest(
                            output_chunk=job_pb2.OutputChunk(
                                path=meta.path, offset=offset, data=block, last=last or not block
                            )
                        )
                    )
                    offset += len(block)
                    if last or not block:
                        break
        return files

    async def _upload(self, upload: job_pb2.UploadOutput, output_dir: Path) -> None:
        stage = common_pb2.STAGE_OUTPUT_UPLOAD
        tar_path = output_dir.parent / "output.tar"

        def pack() -> None:
            with tarfile.open(tar_path, "w") as tar:
                tar.add(output_dir, arcname=".")

        await asyncio.to_thread(pack)
        # Sent from the file as it is read (aiohttp reads it off the loop): outputs up to the
        # output cap never sit in memory whole. The same address policy as URL inputs, and no
        # redirects (a 3xx is a failed upload).
        guarded = GuardedResolver(DefaultResolver(), self._url_policy)
        try:
            check_url(URL(upload.url), self._url_policy)
            with tar_path.open("rb") as data:
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(resolver=guarded), headers=dict(upload.headers)
                ) as session:
                    if upload.method == job_pb2.HTTP_METHOD_POST:
                        form = aiohttp.FormData()
                        for key, value in upload.form_fields.items():
                            form.add_field(key, value)
                        form.add_field(
                            "file", data, filename="output.tar", content_type="application/x-tar"
                        )
                        async with session.post(upload.url, data=form, allow_redirects=False) as r:
                            status = r.status
                    else:
                        async with session.put(upload.url, data=data, allow_redirects=False) as r:
                            status = r.status
        except NonPublicAddressError as exc:
            raise failed(
                common_pb2.FAILURE_REASON_UPLOAD_FAILED,
                stage,
                f"upload to {_refusal(upload.url, exc)}",
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise failed(
                common_pb2.FAILURE_REASON_UPLOAD_FAILED, stage, f"upload failed: {exc}"
            ) from None
        finally:
            await guarded.close()
        if not 200 <= status < 300:
            raise failed(
                common_pb2.FAILURE_REASON_UPLOAD_FAILED, stage, f"upload answered HTTP {status}"
            )


NOT_RETURNED_SHOWN = 5  # entries named in the note on what /output held besides files


def _scan_outputs(output_dir: Path) -> tuple[list[Path], list[str]]:
    """The regular files under `output_dir` (sorted), and what else is there that is no
    directory, each as "PATH (what it is)"."""
    files: list[Path] = []
    others: list[str] = []
    for path in sorted(output_dir.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            files.append(path)
        elif not stat.S_ISDIR(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            others.append(f"{path.relative_to(output_dir)} ({kind})")
    return files, others


def _describe_outputs(output_dir: Path, paths: list[Path]) -> list[job_pb2.OutputFile]:
    files = []
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(OUTPUT_CHUNK):
                digest.update(block)
        files.append(
            job_pb2.OutputFile(
                path=str(path.relative_to(output_dir)),
                size_bytes=path.stat().st_size,
                sha256=digest.hexdigest(),
            )
        )
    return files
