"""The validator's job manager: routes organic jobs to miners and keeps the clock on them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from horde.v1 import common_pb2, job_pb2, miner_pb2, streaming_pb2, validator_pb2

from horde_services.core import lifecycle, metrics
from horde_services.core.certificates import CertificateError, verify_certificate
from horde_services.core.errors import Unavailable
from horde_services.core.identity import Signer
from horde_services.core.proto_util import (
    TERMINAL_STATES,
    event,
    reason_name,
    result,
    stage_name,
    state_name,
)
from horde_services.validator.miners import MinerDirectory, MinerRef
from horde_services.validator.store import JobStore

log = structlog.get_logger("horde.validator.jobs")

INPUT_CHUNK = 1024 * 1024
DEFAULT_TIMEOUTS = {
    "reservation_s": 30,
    "image_pull_s": 600,
    "volume_download_s": 300,
    "execution_s": 600,
    "output_upload_s": 300,
    "streaming_start_s": 120,
}
# Time the network may add on top of the job's own stage limits before the validator gives up.
DEADLINE_SLACK_S = 30.0
CANCEL_WAIT_S = 10.0
# How long a RunJob call waits for the miner to accept it (its initial metadata) before the
# job's start goes anyway (a miner too old to send it early).
MINER_ACCEPT_WAIT_S = 5.0
# Pauses before writing a job's result again when the database refused it (e.g. a full disk);
# its followers have the result by then. After the last, the result stays in memory only (the
# store shows it to readers, and writes it once a later job's result is stored).
FINISH_RETRY_DELAYS_S = (0.1, 0.5, 2.0)
# How often the output files past their retention are deleted.
PRUNE_INTERVAL_S = 3600.0
# Complete output files are stored in batches of this many, or of this many bytes.
OUTPUT_BATCH_FILES = 256
OUTPUT_BATCH_BYTES = 8 * 1024 * 1024
SHUTTING_DOWN = (
    "the validator is shutting down and takes no new job: submit it again once it is back"
)

Item = job_pb2.JobEvent | job_pb2.OutputChunk | job_pb2.JobResult | validator_pb2.StreamingJobReady


def fill_timeouts(spec: job_pb2.JobSpec) -> None:
    for name, default in DEFAULT_TIMEOUTS.items():
        if not getattr(spec.timeouts, name):
            setattr(spec.timeouts, name, default)


@dataclass(eq=False)
class LiveJob:
    job_uuid: str
    spec: job_pb2.JobSpec
    client: str
    spool: Path | None
    history: list[Item] = field(default_factory=list)
    subscribers: set[asyncio.Queue[Item]] = field(default_factory=set)
    result: job_pb2.JobResult | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    outputs: dict[str, bytearray] = field(default_factory=dict)
    output_bytes: int = 0
    # Output files complete but not stored yet: written in batches (a transaction per file took
    # seconds for a job with thousands), and before the job's result.
    unstored_outputs: list[tuple[str, bytes]] = field(default_factory=list)
    unstored_output_bytes: int = 0
    # The miner that took the job (answered with more than a refusal, i.e. reserved an
    # executor for it), while it has it: results the validator makes then name that miner, so
    # scoring counts them against it as it counts the miner's own.
    miner: str = ""
    # Streaming jobs: the gateway allowed at the job proxy, the image id the whitelist pins (or
    # ""), the ready message once the miner certified the job key, the open RunJob stream's
    # outbox (extra data) and the placements awaited, by file name.
    kind: str = "organic"
    gateway: str = ""
    image_digest: str = ""
    ready: validator_pb2.StreamingJobReady | None = None
    outbox: asyncio.Queue[miner_pb2.RunJobRequest | None] | None = None
    placements: dict[str, asyncio.Future[streaming_pb2.ExtraDataPlaced]] = field(
        default_factory=dict
    )
    # Set when the validator, shutting down, stops the job: why (its result says so), and the
    # event its routing waits on next to `cancel`.
    stopped_by_shutdown: str = ""
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)


class JobManager:
    def __init__(
        self,
        signer: Signer,
        store: JobStore,
        directory: MinerDirectory,
        spool_dir: Path,
        max_output_bytes: int,
    ) -> None:
        self._signer = signer
        self._store = store
        self._directory = directory
        self._spool_dir = spool_dir
        self._max_output = max_output_bytes
        self._live: dict[str, LiveJob] = {}
        # Shutting down: no new job is taken (callers answer UNAVAILABLE).
        self.draining = False

    @property
    def spool_dir(self) -> Path:
        return self._spool_dir

    def new_spool(self) -> tuple[str, Path]:
        job_uuid = str(uuid.uuid4())
        path = self._spool_dir / job_uuid
        path.mkdir(parents=True, exist_ok=True)
        return job_uuid, path

    async def recover(self) -> int:
        """After a restart no job may stay 'running' forever: end each as horde_failed."""
        stale = await self._store.unfinished()
        for job_uuid in stale:
            await self._store.finish(
                result(
                    job_uuid,
                    common_pb2.JOB_STATE_HORDE_FAILED,
                    common_pb2.FAILURE_REASON_VALIDATOR_RESTARTED,
                    common_pb2.STAGE_UNSPECIFIED,
                    "the validator restarted while the job was in flight; it was not resumed",
                )
            )
        if stale:
            log.warning("jobs_failed_on_restart", count=len(stale))
        shutil.rmtree(self._spool_dir, ignore_errors=True)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        return len(stale)

    async def submit(
        self,
        job_uuid: str,
        spec: job_pb2.JobSpec,
        client: str,
        spool: Path | None,
        kind: str = "organic",
        *,
        gateway: str = "",
        image_digest: str = "",
    ) -> LiveJob:
        self.refuse_if_draining()
        fill_timeouts(spec)
        if kind == "organic" and spec.output.WhichOneof("target") != "upload":
            # Inline outputs are capped by the validator whatever the client asked for.
            asked = spec.output.stream.max_bytes
            spec.output.stream.max_bytes = (
                min(asked, self._max_output) if asked else self._max_output
            )
        await self._store.create(job_uuid, client, kind, spec)
        job = LiveJob(
            job_uuid=job_uuid,
            spec=spec,
            client=client,
            spool=spool,
            kind=kind,
            gateway=gateway,
            image_digest=image_digest,
        )
        self._live[job_uuid] = job
        await self._publish(
            job,
            event(job_uuid, common_pb2.JOB_STATE_ACCEPTED, common_pb2.STAGE_ACCEPT, "job accepted"),
        )
        if self.draining:  # the drain began while this job was being recorded: it ends at once
            self._stop_for_shutdown(job, 0)
        job.task = asyncio.create_task(self._run(job))
        return job

    async def reject(
        self,
        job_uuid: str,
        spec: job_pb2.JobSpec,
        client: str,
        res: job_pb2.JobResult,
        kind: str = "organic",
    ) -> None:
        await self._store.create(job_uuid, client, kind, spec)
        await self._store.finish(res)

    async def prune_outputs_forever(self, retention_s: float) -> None:
        """Every PRUNE_INTERVAL_S, delete the output files of jobs that ended more than
        `retention_s` ago (a background loop)."""
        while True:
            try:
                pruned = await self._store.prune_outputs(time.time_ns() - int(retention_s * 1e9))
            except Exception as exc:  # the database refusing now: the next round tries again
                log.warning("outputs_prune_failed", error=repr(exc))
            else:
                if pruned:
                    log.info("outputs_pruned", jobs=pruned, retention_days=retention_s / 86400)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise Unavailable(SHUTTING_DOWN)

    async def drain(self, timeout_s: float) -> None:
        """Shutting down: take no new job, give the organic jobs in flight up to `timeout_s` to
        finish, then end every job still live (streaming sessions too) as horde_failed
        (validator_restarted), naming no miner: its miner sees the call end and stops the
        work, and its followers get that result before the server stops, not a broken call."""
        self.draining = True
        organic = {
            job.task: job.job_uuid
            for job in self._live.values()
            if job.kind == "organic" and job.task is not None and not job.task.done()
        }
        if organic and timeout_s > 0:
            log.info("draining", jobs=len(organic), timeout_s=timeout_s)
            _, pending = await asyncio.wait(organic, timeout=timeout_s)
            if pending:
                log.warning(
                    "drain_timed_out",
                    timeout_s=timeout_s,
                    job_uuids=sorted(organic[task] for task in pending),
                )
            else:
                log.info("drained", jobs=len(organic))
        # Not cancelled: each ends through its own routing, which stops on `shutdown` and
        # returns the result (a task cut inside _finish would lose its stored result).
        live = [job for job in self._live.values() if job.result is None]
        for job in live:
            self._stop_for_shutdown(job, timeout_s)
        tasks = {job.task for job in live if job.task is not None and not job.task.done()}
        if tasks:
            await asyncio.wait(tasks)
        if live:
            log.warning("jobs_stopped_by_shutdown", job_uuids=[job.job_uuid for job in live])

    def _stop_for_shutdown(self, job: LiveJob, drained_s: float) -> None:
        job.stopped_by_shutdown = (
            f"the validator shut down while the job was in flight (after a drain of "
            f"{drained_s:g}s); submit it again"
            if job.kind == "organic"
            else "the validator shut down during the session; start a new one"
        )
        job.shutdown.set()

    async def close(self) -> None:
        """Stop following jobs in flight (shutdown; drain() normally ended them all already):
        their miners see the stream end and cancel the work; the next start ends them as
        horde_failed (validator_restarted). Results the database refused earlier get a last try
        (else the next start would call jobs whose followers saw them end validator_restarted)."""
        tasks = [job.task for job in self._live.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for held in self._store.unstored():
            error = await self._store_result(held)
            if error is not None:
                log.error("job_result_not_stored", job_uuid=held.job_uuid, error=repr(error))
            else:
                log.info("job_result_stored_late", job_uuid=held.job_uuid)

    def live(self, job_uuid: str) -> LiveJob | None:
        return self._live.get(job_uuid)

    async def follow(self, job: LiveJob) -> AsyncIterator[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in job.history:
            queue.put_nowait(item)
        job.subscribers.add(queue)
        try:
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, job_pb2.JobResult):
                    return
        finally:
            job.subscribers.discard(queue)

    async def cancel(self, job_uuid: str) -> bool:
        job = self._live.get(job_uuid)
        if job is None or job.result is not None:
            return False
        job.cancel.set()
        if job.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(job.task)
        return True

    async def _publish(self, job: LiveJob, item: Item) -> None:
        if isinstance(item, job_pb2.JobEvent):
            await self._store.add_event(item)
        if not isinstance(item, job_pb2.OutputChunk):
            job.history.append(item)
        for queue in list(job.subscribers):
            queue.put_nowait(item)

    async def _finish(self, job: LiveJob, res: job_pb2.JobResult) -> None:
        if job.result is not None:
            return
        try:
            await self._store_outputs(job)  # the last batch, before the result says "done"
        except Exception as exc:
            # Its outputs could not be kept for DownloadOutputs (its followers had every byte as
            # it came): not a completed job, and the validator's fault, not the miner's.
            log.error("job_outputs_not_stored", job_uuid=job.job_uuid, error=repr(exc))
            if res.state == common_pb2.JOB_STATE_COMPLETED:
                res.state = common_pb2.JOB_STATE_HORDE_FAILED
                res.reason = common_pb2.FAILURE_REASON_INTERNAL_ERROR
                res.stage = common_pb2.STAGE_OUTPUT_UPLOAD
                res.detail = f"the validator could not store the job's outputs: {exc!r}"
                res.miner_hotkey = ""
        res.job_uuid = job.job_uuid
        job.result = res
        metrics.JOBS.labels(job.kind, state_name(res.state), reason_name(res.reason)).inc()
        for name, waiter in job.placements.items():
            if not waiter.done():
                waiter.set_result(
                    streaming_pb2.ExtraDataPlaced(
                        job_uuid=job.job_uuid, file_name=name, error="the job ended first"
                    )
                )
        for timing in res.stage_timings:
            metrics.STAGE_SECONDS.labels(stage_name(timing.stage)).observe(timing.seconds)
        error: Exception | None = None
        try:
            error = await self._store_result(res)
            if error is not None:
                self._store.hold(res)  # GetJob/ListJobs/WatchJob read it meanwhile
        finally:
            # Its followers get the result whatever became of the write.
            await self._publish(job, res)
        log.info(
            "job_finished",
            job_uuid=job.job_uuid,
            state=common_pb2.JobState.Name(res.state),
            reason=common_pb2.FailureReason.Name(res.reason),
            miner=res.miner_hotkey,
        )
        for delay in FINISH_RETRY_DELAYS_S:
            if error is None:
                break
            log.warning(
                "job_result_store_failed", job_uuid=job.job_uuid, error=repr(error), retry_s=delay
            )
            await asyncio.sleep(delay)
            error = await self._store_result(res)
        if error is not None:
            log.error(
                "job_result_not_stored",
                job_uuid=job.job_uuid,
                error=repr(error),
                attempts=1 + len(FINISH_RETRY_DELAYS_S),
                state=common_pb2.JobState.Name(res.state),
                reason=common_pb2.FailureReason.Name(res.reason),
            )
            return
        # The database takes writes again: store the results it refused before.
        for held in self._store.unstored():
            if await self._store_result(held) is not None:
                break
            log.info("job_result_stored_late", job_uuid=held.job_uuid)

    async def _store_result(self, res: job_pb2.JobResult) -> Exception | None:
        """Write a job's result; the error when the database refused it."""
        try:
            await self._store.finish(res)
        except Exception as exc:
            return exc
        return None

    def _deadline_s(self, job: LiveJob) -> float:
        t = job.spec.timeouts
        if job.kind == "streaming":
            # The session's time limit starts once the service is up.
            return (
                t.reservation_s
                + t.image_pull_s
                + t.streaming_start_s
                + t.execution_s
                + DEADLINE_SLACK_S
            )
        return (
            t.reservation_s
            + t.image_pull_s
            + t.volume_download_s
            + t.execution_s
            + t.output_upload_s
            + DEADLINE_SLACK_S
        )

    async def _route_or_cancel(self, job: LiveJob) -> job_pb2.JobResult:
        """The job's result from its miner; once the client cancels, the miner has
        CANCEL_WAIT_S to confirm, after which the job ends cancelled here (dropping the miner's
        stream tells it to stop the job)."""
        route = asyncio.create_task(self._route(job))
        cancelled = asyncio.create_task(job.cancel.wait())
        shutdown = asyncio.create_task(job.shutdown.wait())
        try:
            await asyncio.wait({route, cancelled, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if job.shutdown.is_set() and not route.done():
                # The validator stops (drain()): dropping the miner's call stops the job there.
                return result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_HORDE_FAILED,
                    common_pb2.FAILURE_REASON_VALIDATOR_RESTARTED,
                    common_pb2.STAGE_UNSPECIFIED,
                    job.stopped_by_shutdown,
                )
            if not route.done():
                await asyncio.wait({route}, timeout=CANCEL_WAIT_S)
            if route.done():
                return route.result()
            log.warning("cancel_unconfirmed", job_uuid=job.job_uuid, waited_s=CANCEL_WAIT_S)
            return _on_miner(
                job.miner,
                result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_CANCELLED,
                    common_pb2.FAILURE_REASON_CANCELLED,
                    common_pb2.STAGE_UNSPECIFIED,
                    f"cancelled; the miner did not confirm within {CANCEL_WAIT_S:.0f} s (its "
                    "stream was dropped, which stops the job there)",
                ),
            )
        finally:
            cancelled.cancel()
            shutdown.cancel()
            if not route.done():
                route.cancel()
                # Wait for it to stop without taking its cancellation for ours: a shutdown or
                # the deadline cancelling this task still goes through.
                await asyncio.wait({route})

    async def _run(self, job: LiveJob) -> None:
        try:
            async with asyncio.timeout(self._deadline_s(job)):
                res = await self._route_or_cancel(job)
        except TimeoutError:
            if job.cancel.is_set():  # the client had cancelled it: that is how it ended
                res = result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_CANCELLED,
                    common_pb2.FAILURE_REASON_CANCELLED,
                    common_pb2.STAGE_UNSPECIFIED,
                    "cancelled (at the job's overall deadline)",
                )
            else:
                res = result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_HORDE_FAILED,
                    common_pb2.FAILURE_REASON_DEADLINE_MISSED,
                    common_pb2.STAGE_UNSPECIFIED,
                    f"the job missed its overall deadline of {self._deadline_s(job):.0f}s",
                )
            # Still on a miner at the deadline: it held the job past every stage's limit.
            _on_miner(job.miner, res)
        except Exception as exc:
            # The validator's own error: not held against the miner the job was on.
            log.exception("job_route_error", job_uuid=job.job_uuid)
            res = result(
                job.job_uuid,
                common_pb2.JOB_STATE_HORDE_FAILED,
                common_pb2.FAILURE_REASON_INTERNAL_ERROR,
                common_pb2.STAGE_UNSPECIFIED,
                f"validator error: {exc!r}",
            )
        try:
            await self._finish(job, res)
        except Exception:
            # Nothing may escape this task (nobody awaits it but a cancel or a shutdown).
            log.exception("job_finish_error", job_uuid=job.job_uuid)
        finally:
            self._live.pop(job.job_uuid, None)
            if job.spool is not None:
                await asyncio.to_thread(shutil.rmtree, job.spool, True)

    async def _route(self, job: LiveJob) -> job_pb2.JobResult:
        spec = job.spec
        stage = common_pb2.STAGE_RESERVATION
        deadline = time.monotonic() + spec.timeouts.reservation_s
        tried: set[MinerRef] = set()
        saw_class = False
        while True:
            if job.cancel.is_set():
                return result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_CANCELLED,
                    common_pb2.FAILURE_REASON_CANCELLED,
                    stage,
                    "cancelled before an executor was reserved",
                )
            found = await self._directory.candidates(spec.executor_class)
            unreachable = found.unreachable
            saw_class = saw_class or found.any_of_class
            fresh = [m for m in found.free if m not in tried]
            if (
                not saw_class
                and not unreachable
                and not self._directory.recently_offered(spec.executor_class)
            ):
                return result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS,
                    stage,
                    f"no miner offers an executor of class {spec.executor_class!r}",
                )
            for miner in fresh:
                tried.add(miner)
                outcome = await self._attempt(job, miner)
                if outcome is not None:
                    return outcome
            if time.monotonic() >= deadline:
                if not saw_class and not unreachable:
                    return result(
                        job.job_uuid,
                        common_pb2.JOB_STATE_HORDE_FAILED,
                        common_pb2.FAILURE_REASON_EXECUTOR_LOST,
                        stage,
                        f"executors of class {spec.executor_class!r} were offered recently but "
                        f"none reconnected within {spec.timeouts.reservation_s}s",
                    )
                if not saw_class:
                    return result(
                        job.job_uuid,
                        common_pb2.JOB_STATE_HORDE_FAILED,
                        common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
                        stage,
                        f"{unreachable} miner(s) could not be reached for "
                        f"{spec.timeouts.reservation_s}s and no other offers an executor of "
                        f"class {spec.executor_class!r}",
                    )
                return result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    common_pb2.FAILURE_REASON_BUSY,
                    stage,
                    f"every executor of class {spec.executor_class!r} stayed busy for "
                    f"{spec.timeouts.reservation_s}s"
                    + (
                        f" ({found.draining} of them shutting down: their miner takes no new job)"
                        if found.draining
                        else ""
                    ),
                )
            if not fresh:
                tried.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await job.cancel.wait()

    async def _attempt(self, job: LiveJob, miner: MinerRef) -> job_pb2.JobResult | None:
        """Run the job on one miner; None when the miner was busy (try the next)."""
        # Bounded, so a big input streams at the pace the miner takes it.
        outbox: asyncio.Queue[miner_pb2.RunJobRequest | None] = asyncio.Queue(maxsize=8)

        async def requests() -> AsyncIterator[miner_pb2.RunJobRequest]:
            while (msg := await outbox.get()) is not None:
                yield msg

        start = miner_pb2.RunJobRequest(
            start=miner_pb2.RunJobStart(
                job_uuid=job.job_uuid,
                spec=job.spec,
                job_kind=job.kind,
                gateway_identity=job.gateway,
                image_digest=job.image_digest,
            )
        )
        job.outbox = outbox
        call = self._directory.stub(miner).RunJob(requests())
        sender: asyncio.Task[None] | None = None
        canceller: asyncio.Task[None] | None = None
        stage = common_pb2.STAGE_RESERVATION
        # Whether this miner took the job: anything but a refusal (its first message then is
        # the job-started receipt, sent once it reserved an executor).
        taken = False
        try:
            # The miner sends its initial metadata once it accepted the call: a refusal (say,
            # a validator it does not serve) then ends the call with the miner's own status, no
            # write racing it (grpc.aio reports such a race as "INTERNAL: Internal error from
            # Core"). A miner that sends none in time gets the job anyway.
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                async with asyncio.timeout(MINER_ACCEPT_WAIT_S):
                    await call.initial_metadata()
            outbox.put_nowait(start)
            canceller = asyncio.create_task(self._watch_cancel(job, outbox))
            async for msg in call:
                kind = msg.WhichOneof("payload")
                if kind != "result" and not taken:
                    taken = True
                    job.miner = miner.identity
                if kind == "result":
                    res: job_pb2.JobResult = msg.result
                    if res.state == common_pb2.JOB_STATE_REJECTED and res.reason in (
                        common_pb2.FAILURE_REASON_BUSY,
                        common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS,
                    ):
                        log.info("miner_busy", job_uuid=job.job_uuid, miner=miner.identity)
                        job.miner = ""
                        return None
                    # The miner this stream is with, whatever its result says: a miner cannot
                    # put its failures on another's account.
                    res.miner_hotkey = miner.identity
                    if job.cancel.is_set() and res.state not in TERMINAL_STATES - {
                        common_pb2.JOB_STATE_CANCELLED
                    }:
                        res.state = common_pb2.JOB_STATE_CANCELLED
                    return res
                if kind == "receipt":
                    receipt = msg.receipt
                    problem = lifecycle.verify(receipt, require_validator=False)
                    if problem is None and lifecycle.parse(receipt).miner_hotkey != miner.identity:
                        problem = "signed for another miner"
                    if problem is not None:  # (a malformed one is not parsed: no crash here)
                        log.warning("bad_lifecycle_receipt", miner=miner.identity, problem=problem)
                        continue
                    signed = lifecycle.countersign(receipt, self._signer)
                    await self._store.put_receipt(signed)
                    await outbox.put(miner_pb2.RunJobRequest(countersigned_receipt=signed))
                    if sender is None:
                        sender = asyncio.create_task(self._send_inputs(job, outbox))
                elif kind == "event":
                    stage = msg.event.stage
                    await self._publish(job, msg.event)
                elif kind == "output_chunk":
                    await self._collect(job, msg.output_chunk)
                elif kind == "streaming_ready" and job.kind == "streaming":
                    problem = self._streaming_ready(job, miner, msg.streaming_ready)
                    if problem is not None:
                        log.warning("bad_streaming_ready", job_uuid=job.job_uuid, problem=problem)
                        return _on_miner(
                            miner.identity,
                            result(
                                job.job_uuid,
                                common_pb2.JOB_STATE_HORDE_FAILED,
                                common_pb2.FAILURE_REASON_INVALID_SIGNATURE,
                                common_pb2.STAGE_STREAMING_START,
                                f"miner {miner.identity}: {problem}",
                            ),
                        )
                    stage = common_pb2.STAGE_EXECUTION
                    assert job.ready is not None
                    await self._publish(job, job.ready)
                elif kind == "extra_data_placed":
                    placed = msg.extra_data_placed
                    waiter = job.placements.pop(placed.file_name, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(placed)
            return _on_miner(
                miner.identity if taken else "",
                result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_HORDE_FAILED,
                    common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
                    stage,
                    f"miner {miner.identity} closed the job stream without a result",
                ),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "miner_call_failed",
                job_uuid=job.job_uuid,
                miner=miner.identity,
                code=exc.code().name,
            )
            if (
                not taken
                and stage == common_pb2.STAGE_RESERVATION
                and exc.code() == grpc.StatusCode.UNAVAILABLE
            ):
                job.miner = ""  # the job goes to another miner
                return None
            # A miner that went away before it took the job (unreachable, or refusing this
            # validator) is not blamed for it; one that took it is.
            return _on_miner(
                miner.identity if taken else "",
                result(
                    job.job_uuid,
                    common_pb2.JOB_STATE_HORDE_FAILED,
                    common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
                    stage,
                    f"lost the miner {miner.identity}: {exc.code().name}: {exc.details()}",
                ),
            )
        finally:
            job.outbox = None
            if canceller is not None:
                canceller.cancel()
            if sender is not None:
                sender.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                outbox.put_nowait(None)
            call.cancel()

    def _streaming_ready(
        self, job: LiveJob, miner: MinerRef, ready: miner_pb2.StreamingReady
    ) -> str | None:
        """Check the miner's certificate for the job key; None when the job may be served."""
        if job.ready is not None:
            return "sent a second streaming_ready"
        try:
            payload = verify_certificate(
                ready.certificate, miner=miner.identity, job_uuid=job.job_uuid
            )
        except CertificateError as exc:
            return f"bad job certificate: {exc}"
        if payload.validator_hotkey != str(self._signer.identity):
            return f"the job certificate names validator {payload.validator_hotkey}"
        if payload.endpoint != ready.proxy_endpoint:
            return f"the job certificate names endpoint {payload.endpoint}"
        if job.image_digest and payload.image_digest != job.image_digest:
            return (
                f"the job runs image {payload.image_digest}, the whitelist pins {job.image_digest}"
            )
        job.ready = validator_pb2.StreamingJobReady(
            job_uuid=job.job_uuid,
            proxy_endpoint=ready.proxy_endpoint,
            certificate=ready.certificate,
            proxy_identity=ready.proxy_identity,
        )
        log.info(
            "streaming_job_ready",
            job_uuid=job.job_uuid,
            miner=miner.identity,
            endpoint=ready.proxy_endpoint,
            image_digest=payload.image_digest,
        )
        return None

    async def _watch_cancel(
        self, job: LiveJob, outbox: asyncio.Queue[miner_pb2.RunJobRequest | None]
    ) -> None:
        await job.cancel.wait()
        await outbox.put(miner_pb2.RunJobRequest(cancel=True))

    async def _send_inputs(
        self, job: LiveJob, outbox: asyncio.Queue[miner_pb2.RunJobRequest | None]
    ) -> None:
        for index, volume in enumerate(job.spec.inputs):
            if volume.WhichOneof("source") not in ("inline_archive", "inline_file"):
                continue
            assert job.spool is not None
            path = job.spool / str(index)
            with path.open("rb") as fh:
                while True:
                    block = fh.read(INPUT_CHUNK)
                    at_end = fh.tell() >= path.stat().st_size
                    await outbox.put(
                        miner_pb2.RunJobRequest(
                            input_chunk=job_pb2.InputChunk(
                                volume_index=index, data=block, last=at_end or not block
                            )
                        )
                    )
                    if at_end or not block:
                        break

    async def _collect(self, job: LiveJob, chunk: job_pb2.OutputChunk) -> None:
        buf = job.outputs.setdefault(chunk.path, bytearray())
        job.output_bytes += len(chunk.data)
        if job.output_bytes <= self._max_output:
            buf.extend(chunk.data)
        await self._publish(job, chunk)
        if chunk.last and job.output_bytes <= self._max_output:
            job.unstored_outputs.append((chunk.path, bytes(buf)))
            job.unstored_output_bytes += len(buf)
            del job.outputs[chunk.path]
            if (
                len(job.unstored_outputs) >= OUTPUT_BATCH_FILES
                or job.unstored_output_bytes >= OUTPUT_BATCH_BYTES
            ):
                await self._store_outputs(job)

    async def _store_outputs(self, job: LiveJob) -> None:
        files, job.unstored_outputs, job.unstored_output_bytes = job.unstored_outputs, [], 0
        if files:
            await self._store.put_outputs(job.job_uuid, files)


def _on_miner(miner_hotkey: str, res: job_pb2.JobResult) -> job_pb2.JobResult:
    """A result the validator made, naming the miner the job was on ("": none took it)."""
    if miner_hotkey and not res.miner_hotkey:
        res.miner_hotkey = miner_hotkey
    return res
