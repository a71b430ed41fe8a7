"""The gateway's storage: every checked receipt and the sampled request/response pairs.

`GatewayStore` has an in-memory and an SQL implementation (SQLite or PostgreSQL; several gateways
may share one database). `ReceiptWriter` sits in front of a store and writes in the background,
batching whatever has queued up into one transaction (group commit), so a response is never held
back by a disk write; `flush()` waits until everything submitted so far is stored (sessions flush
before they report their end, and the gateway flushes on shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import db
from horde_services.core.receipts import StreamReceipt

log = structlog.get_logger("horde.gateway.store")

MAX_BATCH = 1000
# How long the writer lets receipts gather before a transaction (unless a flush or a full batch
# cuts it short): a few commits per second under load instead of one per response, which kept
# the gateway's event loop busy with SQLAlchemy between a request and its response.
BATCH_WINDOW_S = 0.05
WRITE_RETRIES = 5
# Receipts the database refused are kept (up to MAX_UNSTORED) and written again every
# RETRY_UNSTORED_S until it takes them: nothing is lost to a full disk that is freed, and the
# gateway learns it may serve again without waiting for new sessions.
RETRY_UNSTORED_S = 5.0
MAX_UNSTORED = 100_000


@dataclass(frozen=True)
class SampleRecord:
    """A serialized horde.v1.Sample, with the keys it is listed by."""

    job_uuid: str
    seq: int
    sample: bytes


@dataclass(frozen=True)
class StoredSample:
    cursor: int
    record: SampleRecord


class GatewayStore(Protocol):
    async def add(self, receipts: Sequence[StreamReceipt], samples: Sequence[SampleRecord]) -> None:
        """Store in one transaction; storing a receipt again (same job and seq) is a no-op."""

    async def receipts(self, job_uuid: str) -> list[StreamReceipt]:
        """A job's receipts by seq."""

    async def samples_after(self, cursor: int, limit: int) -> list[StoredSample]:
        """Samples with a cursor above `cursor`, oldest first."""

    async def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._receipts: dict[tuple[str, int], StreamReceipt] = {}
        self._samples: list[SampleRecord] = []

    async def add(self, receipts: Sequence[StreamReceipt], samples: Sequence[SampleRecord]) -> None:
        for r in receipts:
            self._receipts.setdefault((str(r.job_uuid), r.seq), r)
        self._samples.extend(samples)

    async def receipts(self, job_uuid: str) -> list[StreamReceipt]:
        found = [r for (job, _), r in self._receipts.items() if job == job_uuid]
        return sorted(found, key=lambda r: r.seq)

    async def samples_after(self, cursor: int, limit: int) -> list[StoredSample]:
        start = max(cursor, 0)
        return [
            StoredSample(start + i + 1, rec)
            for i, rec in enumerate(self._samples[start : start + limit])
        ]

    async def close(self) -> None:
        return None


class SqlStore:
    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = True) -> None:
        self._engine = engine
        self._owns = owns_engine
        dialect = engine.dialect.name
        self._insert_receipts: sa.Insert
        if dialect == "postgresql":
            self._insert_receipts = postgresql.insert(db.stream_receipts).on_conflict_do_nothing(
                index_elements=["job_uuid", "seq"]
            )
        elif dialect == "sqlite":
            self._insert_receipts = sqlite.insert(db.stream_receipts).on_conflict_do_nothing(
                index_elements=["job_uuid", "seq"]
            )
        else:  # pragma: no cover - only the two supported databases
            raise ValueError(f"unsupported database dialect {dialect}")

    async def add(self, receipts: Sequence[StreamReceipt], samples: Sequence[SampleRecord]) -> None:
        now = time.time_ns()
        async with self._engine.begin() as conn:
            if receipts:
                await conn.execute(
                    self._insert_receipts,
                    [
                        {
                            "job_uuid": str(r.job_uuid),
                            "seq": r.seq,
                            "receipt_json": r.to_json(),
                            "created_ns": now,
                        }
                        for r in receipts
                    ],
                )
            if samples:
                await conn.execute(
                    sa.insert(db.samples),
                    [
                        {
                            "job_uuid": s.job_uuid,
                            "seq": s.seq,
                            "sample": s.sample,
                            "created_ns": now,
                        }
                        for s in samples
                    ],
                )

    async def receipts(self, job_uuid: str) -> list[StreamReceipt]:
        query = (
            sa.select(db.stream_receipts.c.receipt_json)
            .where(db.stream_receipts.c.job_uuid == job_uuid)
            .order_by(db.stream_receipts.c.seq)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [StreamReceipt.from_json(row[0]) for row in rows]

    async def samples_after(self, cursor: int, limit: int) -> list[StoredSample]:
        t = db.samples
        query = (
            sa.select(t.c.id, t.c.job_uuid, t.c.seq, t.c.sample)
            .where(t.c.id > cursor)
            .order_by(t.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [StoredSample(int(r[0]), SampleRecord(r[1], int(r[2]), bytes(r[3]))) for r in rows]

    async def close(self) -> None:
        if self._owns:
            await self._engine.dispose()


@dataclass
class _Batch:
    receipts: list[StreamReceipt] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_Item = StreamReceipt | SampleRecord | asyncio.Future[None]


class ReceiptWriter:
    """Background group-commit writer in front of a GatewayStore."""

    def __init__(self, store: GatewayStore) -> None:
        self.store = store
        # Told when a batch could not be stored (the jobs whose receipts were lost, and why),
        # and when one was stored again: the gateway ends those sessions and reports its health.
        self.on_lost: Callable[[set[str], str], None] | None = None
        self.on_stored: Callable[[], None] | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._unstored: list[_Batch] = []  # refused by the database, to write again
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()  # a flush is waiting, or a batch is full

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway-receipt-writer")

    def submit(self, receipt: StreamReceipt, sample: SampleRecord | None = None) -> None:
        self._queue.put_nowait(receipt)
        if sample is not None:
            self._queue.put_nowait(sample)
        if self._queue.qsize() >= MAX_BATCH:
            self._hurry.set()

    async def flush(self) -> None:
        """Return once everything submitted before this call is stored."""
        if self._task is None or self._task.done():
            await self._write(self._drain(_Batch()))
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        self._hurry.set()
        await done

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # refused: kept as unstored, tried below
            await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._unstored:
            await self._store_unstored()  # a last try before the gateway stops
        for batch in self._unstored:
            log.error("receipts_lost", receipts=len(batch.receipts), samples=len(batch.samples))
        self._unstored.clear()

    def _keep_unstored(self, batch: _Batch, error: BaseException) -> None:
        """Keep a refused batch to write again later; past MAX_UNSTORED the oldest go."""
        log.error(
            "receipts_not_stored",
            receipts=len(batch.receipts),
            samples=len(batch.samples),
            error=repr(error),
            retry_s=RETRY_UNSTORED_S,
        )
        self._unstored.append(_Batch(list(batch.receipts), list(batch.samples)))
        kept = sum(len(b.receipts) + len(b.samples) for b in self._unstored)
        while kept > MAX_UNSTORED and len(self._unstored) > 1:
            dropped = self._unstored.pop(0)
            kept -= len(dropped.receipts) + len(dropped.samples)
            log.error("receipts_lost", receipts=len(dropped.receipts), samples=len(dropped.samples))

    async def _store_unstored(self) -> None:
        """Write the refused batches again, oldest first, until one is refused again."""
        while self._unstored:
            batch = self._unstored[0]
            try:
                await self.store.add(batch.receipts, batch.samples)
            except Exception as exc:
                log.warning("receipts_still_not_stored", error=repr(exc))
                return
            self._unstored.pop(0)
            log.info("receipts_stored_late", receipts=len(batch.receipts))
        if self.on_stored is not None:
            self.on_stored()

    def _drain(self, batch: _Batch) -> _Batch:
        while len(batch.receipts) + len(batch.samples) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._add(batch, item)
        return batch

    @staticmethod
    def _add(batch: _Batch, item: _Item) -> None:
        if isinstance(item, StreamReceipt):
            batch.receipts.append(item)
        elif isinstance(item, SampleRecord):
            batch.samples.append(item)
        else:
            batch.waiters.append(item)

    async def _run(self) -> None:
        while True:
            batch = _Batch()
            try:
                async with asyncio.timeout(RETRY_UNSTORED_S if self._unstored else None):
                    item = await self._queue.get()
            except TimeoutError:
                await self._store_unstored()
                continue
            self._add(batch, item)
            if not batch.waiters and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BATCH_WINDOW_S):
                        await self._hurry.wait()
            self._hurry.clear()
            await self._write(self._drain(batch))

    async def _write(self, batch: _Batch) -> None:
        error: BaseException | None = None
        if batch.receipts or batch.samples:
            for attempt in range(1, WRITE_RETRIES + 1):
                try:
                    await self.store.add(batch.receipts, batch.samples)
                    error = None
                    break
                except Exception as exc:  # the database may be briefly unreachable
                    error = exc
                    log.warning(
                        "receipt_write_failed",
                        attempt=attempt,
                        receipts=len(batch.receipts),
                        samples=len(batch.samples),
                        error=repr(exc),
                    )
                    await asyncio.sleep(0.2 * attempt)  # back-off before retrying, not a sync
            if error is not None:
                self._keep_unstored(batch, error)
                if self.on_lost is not None:
                    jobs = {str(r.job_uuid) for r in batch.receipts}
                    self.on_lost(jobs | {s.job_uuid for s in batch.samples}, repr(error))
            else:
                if self.on_stored is not None:
                    self.on_stored()
                if self._unstored:
                    await self._store_unstored()
        for waiter in batch.waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(RuntimeError(f"storing receipts failed: {error!r}"))
