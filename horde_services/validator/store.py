"""The validator's job store (jobs, their events, inline outputs, lifecycle receipts)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from horde.v1 import common_pb2, job_pb2, receipts_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import lifecycle
from horde_services.core.db import job_events, job_outputs, jobs, lifecycle_receipts
from horde_services.core.proto_util import TERMINAL_STATES

# Jobs whose output files one transaction deletes, at most.
PRUNE_BATCH_JOBS = 200


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Results of ended jobs that could not be written (e.g. a full disk), by job uuid:
        # `get` and `list_jobs` show them over the stored rows (so a job that ended never reads
        # as running while this process lives) until `finish` stores them.
        self._unstored: dict[str, job_pb2.JobResult] = {}

    def hold(self, res: job_pb2.JobResult) -> None:
        """Keep a result the database refused, for readers, until `finish` stores it."""
        kept = job_pb2.JobResult()
        kept.CopyFrom(res)
        self._unstored[res.job_uuid] = kept

    def unstored(self) -> list[job_pb2.JobResult]:
        """The results held by `hold` and not stored since, oldest first."""
        return list(self._unstored.values())

    async def create(self, job_uuid: str, client: str, kind: str, spec: job_pb2.JobSpec) -> None:
        now = time.time_ns()
        async with self.engine.begin() as conn:
            await conn.execute(
                jobs.insert().values(
                    job_uuid=job_uuid,
                    seq=now,
                    client=client,
                    kind=kind,
                    spec=spec.SerializeToString(),
                    state=common_pb2.JOB_STATE_ACCEPTED,
                    created_ns=now,
                    updated_ns=now,
                )
            )

    async def add_event(self, ev: job_pb2.JobEvent) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                job_events.insert().values(job_uuid=ev.job_uuid, event=ev.SerializeToString())
            )
            await conn.execute(
                jobs.update()
                .where(jobs.c.job_uuid == ev.job_uuid, jobs.c.state.not_in(TERMINAL_STATES))
                .values(state=ev.state, updated_ns=time.time_ns())
            )

    async def finish(self, res: job_pb2.JobResult) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                jobs.update()
                .where(jobs.c.job_uuid == res.job_uuid)
                .values(
                    state=res.state,
                    result=res.SerializeToString(),
                    miner_hotkey=res.miner_hotkey or None,
                    updated_ns=time.time_ns(),
                )
            )
        self._unstored.pop(res.job_uuid, None)

    async def put_outputs(self, job_uuid: str, files: list[tuple[str, bytes]]) -> None:
        """Store a job's output files (path, bytes), in one transaction."""
        async with self.engine.begin() as conn:
            await conn.execute(
                job_outputs.insert(),
                [{"job_uuid": job_uuid, "path": path, "data": data} for path, data in files],
            )

    async def prune_outputs(self, ended_before_ns: int) -> int:
        """Delete the stored output files of jobs that ended before `ended_before_ns` (their
        records, results and events stay); the number of jobs whose files went."""
        ended = sa.select(jobs.c.job_uuid).where(
            jobs.c.state.in_(sorted(TERMINAL_STATES)), jobs.c.updated_ns < ended_before_ns
        )
        pruned = 0
        while True:  # a batch of jobs a transaction: job writes wait on no long delete
            async with self.engine.begin() as conn:
                batch = [
                    r.job_uuid
                    for r in await conn.execute(
                        sa.select(job_outputs.c.job_uuid)
                        .where(job_outputs.c.job_uuid.in_(ended))
                        .distinct()
                        .limit(PRUNE_BATCH_JOBS)
                    )
                ]
                if batch:
                    await conn.execute(
                        job_outputs.delete().where(job_outputs.c.job_uuid.in_(batch))
                    )
            pruned += len(batch)
            if len(batch) < PRUNE_BATCH_JOBS:
                return pruned

    async def outputs(self, job_uuid: str) -> list[tuple[str, bytes]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(job_outputs.c.path, job_outputs.c.data)
                .where(job_outputs.c.job_uuid == job_uuid)
                .order_by(job_outputs.c.path)
            )
            return [(r.path, r.data) for r in rows]

    async def events(self, job_uuid: str) -> list[job_pb2.JobEvent]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(job_events.c.event)
                .where(job_events.c.job_uuid == job_uuid)
                .order_by(job_events.c.id)
            )
            return [job_pb2.JobEvent.FromString(r.event) for r in rows]

    async def get(self, job_uuid: str) -> job_pb2.JobRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.job_uuid == job_uuid))).first()
        return self._overlay(_record(row)) if row is not None else None

    async def list_jobs(
        self,
        limit: int,
        cursor: int | None,
        state: int | None,
        client: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[list[job_pb2.JobRecord], int | None]:
        """A page of jobs, newest first (only `client`'s when given), and the cursor of the
        next page (None at the end). With `max_bytes` the page ends early rather than hold more
        serialized bytes than that (it always holds at least one job)."""
        held = list(self._unstored) if state else []
        # A held result's row still has the state before it: with a state asked for, held jobs
        # are read whatever their row says and kept below when their result has that state.
        query = sa.select(jobs).order_by(jobs.c.seq.desc()).limit(limit + 1 + len(held))
        if client is not None:
            query = query.where(jobs.c.client == client)
        if cursor is not None:
            query = query.where(jobs.c.seq < cursor)
        if state:
            matches = jobs.c.state == state
            query = query.where(sa.or_(matches, jobs.c.job_uuid.in_(held)) if held else matches)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).fetchall()
        pairs = [(row, self._overlay(_record(row))) for row in rows]
        if held:
            pairs = [(row, record) for row, record in pairs if record.state == state][: limit + 1]
        more = len(pairs) > limit
        records: list[job_pb2.JobRecord] = []
        size = 0
        last_seq = None
        for row, record in pairs[:limit]:
            size += record.ByteSize()
            if max_bytes is not None and records and size > max_bytes:
                more = True
                break
            records.append(record)
            last_seq = row.seq
        return records, (last_seq if more else None)

    async def unfinished(self) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(jobs.c.job_uuid).where(jobs.c.state.not_in(TERMINAL_STATES))
            )
            return [r.job_uuid for r in rows]

    def _overlay(self, record: job_pb2.JobRecord) -> job_pb2.JobRecord:
        res = self._unstored.get(record.job_uuid)
        if res is not None:
            record.state = res.state
            record.result.CopyFrom(res)
        return record

    async def put_receipt(self, receipt: receipts_pb2.LifecycleReceipt) -> None:
        payload = lifecycle.parse(receipt)
        async with self.engine.begin() as conn:
            exists = await conn.execute(
                sa.select(lifecycle_receipts.c.id).where(
                    lifecycle_receipts.c.job_uuid == payload.job_uuid,
                    lifecycle_receipts.c.kind == payload.kind,
                )
            )
            if exists.first() is None:
                await conn.execute(
                    lifecycle_receipts.insert().values(
                        job_uuid=payload.job_uuid,
                        kind=payload.kind,
                        payload=receipt.payload,
                        miner_signature=receipt.miner_signature,
                        validator_signature=receipt.validator_signature,
                        created_ns=time.time_ns(),
                    )
                )

    async def receipts(self, job_uuid: str) -> list[receipts_pb2.LifecycleReceipt]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(lifecycle_receipts)
                .where(lifecycle_receipts.c.job_uuid == job_uuid)
                .order_by(lifecycle_receipts.c.id)
            )
            return [
                receipts_pb2.LifecycleReceipt(
                    payload=r.payload,
                    miner_signature=r.miner_signature,
                    validator_signature=r.validator_signature,
                )
                for r in rows
            ]


def _record(r: Any) -> job_pb2.JobRecord:
    rec = job_pb2.JobRecord(
        job_uuid=r.job_uuid,
        spec=job_pb2.JobSpec.FromString(r.spec),
        state=r.state,
        created_ns=r.created_ns,
        updated_ns=r.updated_ns,
        client=r.client,
    )
    if r.result:
        rec.result.CopyFrom(job_pb2.JobResult.FromString(r.result))
    return rec


def chunks(items: Iterable[tuple[str, bytes]], size: int) -> Iterable[job_pb2.OutputChunk]:
    for path, data in items:
        if not data:
            yield job_pb2.OutputChunk(path=path, offset=0, data=b"", last=True)
            continue
        for offset in range(0, len(data), size):
            block = data[offset : offset + size]
            yield job_pb2.OutputChunk(
                path=path, offset=offset, data=block, last=offset + len(block) >= len(data)
            )
