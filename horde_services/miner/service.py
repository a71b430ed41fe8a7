"""MinerService: what validators call; a thin servicer over the executor pool and receipts."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import sqlalchemy as sa
import structlog
from horde.v1 import (
    common_pb2,
    executor_pb2,
    manifest_pb2,
    miner_pb2,
    miner_pb2_grpc,
    receipts_pb2,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import lifecycle, metrics
from horde_services.core.certificates import sign_certificate
from horde_services.core.db import lifecycle_receipts
from horde_services.core.errors import HordeError, InvalidArgument
from horde_services.core.identity import Signer
from horde_services.core.proto_util import (
    TERMINAL_STATES,
    parse_cursor,
    reason_name,
    result,
    state_name,
)
from horde_services.core.server import current_caller
from horde_services.miner.pool import (
    AllBusy,
    ExecutorConn,
    ExecutorLost,
    ExecutorPool,
    NoExecutorOfClass,
)
from horde_services.miner.relayed import JobRecord, RelayedJobs
from horde_services.miner.synthetic import SyntheticCollector

log = structlog.get_logger("horde.miner")

COUNTERSIGN_WAIT_S = 5.0
# A job certificate is valid from a little before it is signed (clocks differ) to the session's
# time limit plus this slack.
CERTIFICATE_SLACK_S = 60
CERTIFICATE_BACKDATE_S = 5
DEFAULT_SESSION_S = 600


@dataclass
class StoredJob:
    """A job as the miner's lifecycle receipts tell it."""

    started: receipts_pb2.LifecycleReceiptPayload
    finished: receipts_pb2.LifecycleReceiptPayload | None
    # Every receipt stored for the job carries the validator's countersignature.
    countersigned: bool


class ReceiptStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writes: set[asyncio.Future[None]] = set()

    async def put(self, receipt: receipts_pb2.LifecycleReceipt) -> None:
        """Store a receipt. The write runs to its end even when the caller is cancelled (a job
        stream ending at shutdown): a transaction cut off mid-way left its connection to be torn
        down while the engine was being disposed, and the shutdown could hang there."""
        write = asyncio.ensure_future(self._put(receipt))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait (at most `timeout_s`) for the writes still running; before the engine closes."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout_s)

    async def _put(self, receipt: receipts_pb2.LifecycleReceipt) -> None:
        payload = lifecycle.parse(receipt)
        values = {
            "job_uuid": payload.job_uuid,
            "kind": payload.kind,
            "payload": receipt.payload,
            "miner_signature": receipt.miner_signature,
            "validator_signature": receipt.validator_signature,
            "created_ns": time.time_ns(),
        }
        async with self._engine.begin() as conn:
            existing = await conn.execute(
                sa.select(lifecycle_receipts.c.id).where(
                    lifecycle_receipts.c.job_uuid == payload.job_uuid,
                    lifecycle_receipts.c.kind == payload.kind,
                )
            )
            row = existing.first()
            if row is None:
                await conn.execute(lifecycle_receipts.insert().values(**values))
            elif receipt.validator_signature:
                await conn.execute(
                    lifecycle_receipts.update()
                    .where(lifecycle_receipts.c.id == row.id)
                    .values(validator_signature=receipt.validator_signature)
                )

    async def page(
        self, cursor: int, limit: int
    ) -> tuple[list[receipts_pb2.LifecycleReceipt], int]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(lifecycle_receipts)
                    .where(lifecycle_receipts.c.id > cursor)
                    .order_by(lifecycle_receipts.c.id)
                    .limit(limit)
                )
            ).fetchall()
        out = [
            receipts_pb2.LifecycleReceipt(
                payload=r.payload,
                miner_signature=r.miner_signature,
                validator_signature=r.validator_signature,
            )
            for r in rows
        ]
        return out, (rows[-1].id if rows else cursor)

    async def recent_jobs(self, limit: int) -> list[StoredJob]:
        """The `limit` jobs whose started receipts were stored last, newest first, with their
        finished receipts where stored: two reads by primary key (a finished receipt is stored
        after its started one), however long the table."""
        started_kind = receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED
        finished_kind = receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED
        table = lifecycle_receipts
        async with self._engine.connect() as conn:
            started = (
                await conn.execute(
                    sa.select(table.c.id, table.c.payload, table.c.validator_signature)
                    .where(table.c.kind == started_kind)
                    .order_by(table.c.id.desc())
                    .limit(limit)
                )
            ).fetchall()
            if not started:
                return []
            finished = (
                await conn.execute(
                    sa.select(table.c.job_uuid, table.c.payload, table.c.validator_signature).where(
                        table.c.id > started[-1].id, table.c.kind == finished_kind
                    )
                )
            ).fetchall()
        ends = {row.job_uuid: row for row in finished}
        out = []
        for row in started:
            payload = receipts_pb2.LifecycleReceiptPayload.FromString(row.payload)
            end = ends.get(payload.job_uuid)
            out.append(
                StoredJob(
                    started=payload,
                    finished=(
                        receipts_pb2.LifecycleReceiptPayload.FromString(end.payload)
                        if end is not None
                        else None
                    ),
                    countersigned=bool(row.validator_signature)
                    and (end is None or bool(end.validator_signature)),
                )
            )
        return out


class MinerServicer(miner_pb2_grpc.MinerServiceServicer):
    def __init__(
        self,
        signer: Signer,
        pool: ExecutorPool,
        receipts: ReceiptStore,
        relayed: RelayedJobs | None = None,
    ) -> None:
        self._signer = signer
        self._pool = pool
        self._receipts = receipts
        # The jobs this miner relays now (one record per RunJob that reserved an executor) and
        # those that ended lately (`horde miner jobs`), the synthetic rounds it relays now, and
        # an event set whenever neither is in flight: drain waits on it.
        self.relayed = relayed or RelayedJobs()
        self._rounds = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Shutting down: take no new job (the manifest lists every executor as draining and
        RunJob is refused as busy, so validators route elsewhere) and give the jobs in flight up
        to `timeout_s` to end and their results to reach their validators. A job still running
        after that ends when the server stops (the validator reports miner_unreachable)."""
        self._pool.drain()
        jobs = sorted(r.job_uuid for r in self.relayed.in_flight())
        if self._idle.is_set():
            return
        if timeout_s <= 0:
            log.warning(
                "drain_skipped",
                job_uuids=jobs,
                synthetic_rounds=self._rounds,
                reason="drain_timeout_s is 0",
            )
            return
        log.info("draining", job_uuids=jobs, synthetic_rounds=self._rounds, timeout_s=timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "drain_timed_out",
                job_uuids=sorted(r.job_uuid for r in self.relayed.in_flight()),
                synthetic_rounds=self._rounds,
                timeout_s=timeout_s,
            )
            return
        log.info("drained", job_uuids=jobs)

    def _settle_idle(self) -> None:
        if not self.relayed and not self._rounds:
            self._idle.set()

    async def GetManifest(
        self, request: miner_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.GetManifestResponse:
        return miner_pb2.GetManifestResponse(
            manifest=manifest_pb2.MinerManifest(
                miner_hotkey=str(self._signer.identity),
                executors=self._pool.manifests(),
                timestamp_ns=time.time_ns(),
            )
        )

    async def ListReceipts(
        self, request: miner_pb2.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.ListReceiptsResponse:
        cursor = parse_cursor(request.cursor) or 0
        limit = min(request.limit or 100, 1000)
        receipts, next_cursor = await self._receipts.page(cursor, limit)
        states = [lifecycle.parse(r).state for r in receipts]
        return miner_pb2.ListReceiptsResponse(
            receipts=receipts, next_cursor=str(next_cursor), states=states
        )

    async def RunJob(
        self,
        request_iterator: AsyncIterator[miner_pb2.RunJobRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[miner_pb2.RunJobResponse]:
        validator = current_caller()
        # Accepted (the validator passed authentication): say so at once, so the validator's
        # first write never races a refusal (see validator/jobs.py MINER_ACCEPT_WAIT_S).
        await context.send_initial_metadata(())
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "start":
            raise InvalidArgument("the first RunJob message must be `start`")
        start = first.start
        job_uuid = start.job_uuid
        log_ = log.bind(job_uuid=job_uuid, validator=str(validator))
        executor_class = start.spec.executor_class
        try:
            conn, job = self._pool.reserve(executor_class, job_uuid)
        except (AllBusy, NoExecutorOfClass) as exc:
            reason = (
                common_pb2.FAILURE_REASON_BUSY
                if isinstance(exc, AllBusy)
                else common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS
            )
            log_.info("job_rejected", reason=exc.message)
            yield miner_pb2.RunJobResponse(
                result=result(
                    job_uuid,
                    common_pb2.JOB_STATE_REJECTED,
                    reason,
                    common_pb2.STAGE_RESERVATION,
                    exc.message,
                )
            )
            return
        log_ = log_.bind(executor_id=conn.executor_id)
        log_.info("job_reserved")
        # In flight from the reservation on (before any await), so a drain waits for it.
        record = self.relayed.begin(
            JobRecord(
                job_uuid=job_uuid,
                validator=str(validator),
                executor_id=conn.executor_id,
                executor_class=executor_class,
                job_kind=start.job_kind or "organic",
            )
        )
        self._idle.clear()
        started_at = time.monotonic()
        countersigned: asyncio.Queue[receipts_pb2.LifecycleReceipt] = asyncio.Queue()
        forwarder: asyncio.Task[None] | None = None
        done = False
        try:
            started = self._receipt(
                start, str(validator), receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED
            )
            await self._receipts.put(started)
            forwarder = asyncio.create_task(
                self._forward(request_iterator, conn, record, countersigned)
            )
            yield miner_pb2.RunJobResponse(receipt=started)
            conn.send(executor_pb2.ConnectResponse(run_job=start))
            while True:
                msg = await job.inbox.get()
                if isinstance(msg, ExecutorLost):
                    res = result(
                        job_uuid,
                        common_pb2.JOB_STATE_HORDE_FAILED,
                        common_pb2.FAILURE_REASON_EXECUTOR_LOST,
                        common_pb2.STAGE_EXECUTION,
                        f"executor {conn.executor_id} lost: {msg.reason}",
                    )
                else:
                    kind = msg.WhichOneof("payload")
                    if kind == "event" and msg.event.job_uuid == job_uuid:
                        if msg.event.state not in TERMINAL_STATES:
                            record.state = msg.event.state
                        yield miner_pb2.RunJobResponse(event=msg.event)
                        continue
                    if kind == "output_chunk":
                        yield miner_pb2.RunJobResponse(output_chunk=msg.output_chunk)
                        continue
                    if kind == "streaming_ready" and msg.streaming_ready.job_uuid == job_uuid:
                        ready = self._certify(start, str(validator), conn, msg.streaming_ready)
                        record.state = common_pb2.JOB_STATE_STREAMING_READY
                        log_.info("streaming_ready", endpoint=ready.proxy_endpoint)
                        yield miner_pb2.RunJobResponse(streaming_ready=ready)
                        continue
                    if kind == "extra_data_placed":
                        yield miner_pb2.RunJobResponse(extra_data_placed=msg.extra_data_placed)
                        continue
                    if kind != "result" or msg.result.job_uuid != job_uuid:
                        continue
                    res = msg.result
                res.miner_hotkey = str(self._signer.identity)
                res.executor_id = conn.executor_id
                record.state, record.reason, record.detail = res.state, res.reason, res.detail
                record.ended_ns = time.time_ns()
                finished = self._receipt(
                    start,
                    str(validator),
                    receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED,
                    state=res.state,
                    reason=res.reason,
                    duration_s=time.monotonic() - started_at,
                )
                await self._receipts.put(finished)
                yield miner_pb2.RunJobResponse(receipt=finished)
                # Give the validator a moment to countersign before the stream closes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(COUNTERSIGN_WAIT_S):
                        while True:
                            signed = await countersigned.get()
                            if (
                                lifecycle.parse(signed).kind
                                == receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED
                            ):
                                break
                done = res.state in TERMINAL_STATES
                log_.info(
                    "job_finished",
                    state=common_pb2.JobState.Name(res.state),
                    reason=common_pb2.FailureReason.Name(res.reason),
                )
                metrics.MINER_JOBS.labels(state_name(res.state), reason_name(res.reason)).inc()
                yield miner_pb2.RunJobResponse(result=res)
                return
        finally:
            if forwarder is not None:
                forwarder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await forwarder
                if not done and not conn.closed:
                    # The validator went away mid-job, or the miner stops with the job still
                    # running (past its drain): stop the work nobody follows any more.
                    why = "miner shutting down" if self._pool.draining else "validator disconnected"
                    conn.send(
                        executor_pb2.ConnectResponse(
                            cancel=executor_pb2.CancelExecutorJob(job_uuid=job_uuid, reason=why)
                        )
                    )
            if not record.ended_ns:
                # Ended without a result, so without a finished receipt (`horde miner jobs`).
                failure = sys.exc_info()[1]
                if self._pool.draining:
                    why = "the miner stopped"
                elif failure is None or isinstance(failure, asyncio.CancelledError | GeneratorExit):
                    why = "the validator went away"
                else:
                    why = f"the relay failed ({type(failure).__name__})"
                record.state = common_pb2.JOB_STATE_UNSPECIFIED
                record.detail = f"ended without a result: {why}"
            self._pool.release(conn, job)
            self.relayed.end(record)
            self._settle_idle()

    async def RunSyntheticRound(
        self, request: miner_pb2.RunSyntheticRoundRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[miner_pb2.RunSyntheticRoundResponse]:
        collector = SyntheticCollector.for_pool(self._pool)
        # In flight until its answers are relayed (or its deadline passed): a drain waits.
        self._rounds += 1
        self._idle.clear()
        try:
            async for resp in collector.run(self._pool, request):
                yield resp
        finally:
            self._rounds -= 1
            self._settle_idle()

    def _certify(
        self,
        start: miner_pb2.RunJobStart,
        validator: str,
        conn: ExecutorConn,
        ready: executor_pb2.ExecutorStreamingReady,
    ) -> miner_pb2.StreamingReady:
        """Bind the executor's fresh job key to this miner's hotkey for the session."""
        now = time.time_ns()
        limit_s = start.spec.timeouts.execution_s or DEFAULT_SESSION_S
        payload = receipts_pb2.JobCertificatePayload(
            job_uuid=start.job_uuid,
            job_public_key=ready.job_public_key,
            miner_hotkey=str(self._signer.identity),
            validator_hotkey=validator,
            image_digest=ready.image_digest,
            endpoint=ready.proxy_endpoint,
            not_before_ns=now - CERTIFICATE_BACKDATE_S * 10**9,
            not_after_ns=now + (limit_s + CERTIFICATE_SLACK_S) * 10**9,
        )
        return miner_pb2.StreamingReady(
            proxy_endpoint=ready.proxy_endpoint,
            certificate=sign_certificate(payload, self._signer),
            proxy_identity=str(conn.identity),
        )

    def _receipt(
        self,
        start: miner_pb2.RunJobStart,
        validator: str,
        kind: receipts_pb2.LifecycleReceiptKind.ValueType,
        *,
        state: common_pb2.JobState.ValueType = common_pb2.JOB_STATE_UNSPECIFIED,
        reason: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED,
        duration_s: float = 0.0,
    ) -> receipts_pb2.LifecycleReceipt:
        payload = receipts_pb2.LifecycleReceiptPayload(
            kind=kind,
            job_uuid=start.job_uuid,
            miner_hotkey=str(self._signer.identity),
            validator_hotkey=validator,
            executor_class=start.spec.executor_class,
            timestamp_ns=time.time_ns(),
            state=state,
            reason=reason,
            duration_s=duration_s,
            job_kind=start.job_kind or "organic",
        )
        return lifecycle.miner_sign(payload, self._signer)

    async def _forward(
        self,
        requests: AsyncIterator[miner_pb2.RunJobRequest],
        conn: ExecutorConn,
        record: JobRecord,
        countersigned: asyncio.Queue[receipts_pb2.LifecycleReceipt],
    ) -> None:
        job_uuid = record.job_uuid
        try:
            async for msg in requests:
                kind = msg.WhichOneof("payload")
                if kind == "input_chunk":
                    conn.send(executor_pb2.ConnectResponse(input_chunk=msg.input_chunk))
                elif kind == "cancel":
                    conn.send(
                        executor_pb2.ConnectResponse(
                            cancel=executor_pb2.CancelExecutorJob(
                                job_uuid=job_uuid, reason="cancelled by the validator"
                            )
                        )
                    )
                elif kind == "countersigned_receipt":
                    receipt = msg.countersigned_receipt
                    problem = lifecycle.verify(receipt)
                    if problem is None:
                        await self._receipts.put(receipt)
                        signed = lifecycle.parse(receipt)
                        if signed.job_uuid == job_uuid:
                            record.countersigned.add(signed.kind)
                        countersigned.put_nowait(receipt)
                    else:
                        log.warning("bad_countersignature", job_uuid=job_uuid, problem=problem)
                elif kind == "extra_data":
                    conn.send(
                        executor_pb2.ConnectResponse(
                            extra_data=executor_pb2.ExecutorExtraData(
                                job_uuid=job_uuid, data=msg.extra_data
                            )
                        )
                    )
        except grpc.aio.AioRpcError:
            return


class _Unimplemented(HordeError):
    code = grpc.StatusCode.UNIMPLEMENTED
