"""The gateway store: one contract run against memory, SQLite and PostgreSQL; the group-commit
writer; two gateways sharing one database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nacl.signing
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from streaming_support import WHITELIST, Harness, answer

from horde_services.core.db import open_database
from horde_services.core.receipts import StreamReceipt, sha256, sign_receipt
from horde_services.core.server import open_channel
from horde_services.streaming_gateway.client import StreamClient
from horde_services.streaming_gateway.store import (
    GatewayStore,
    MemoryStore,
    ReceiptWriter,
    SampleRecord,
    SqlStore,
)

KEY = nacl.signing.SigningKey.generate()


def receipt(job: uuid.UUID, seq: int) -> StreamReceipt:
    return sign_receipt(KEY, job, seq, 1000 + seq, 2000 + seq, sha256(b"in"), sha256(b"out"))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, new_database_url: Callable[[str], Awaitable[str]]
) -> AsyncIterator[GatewayStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    sql = SqlStore(await open_database(await new_database_url(request.param)))
    try:
        yield sql
    finally:
        await sql.close()


async def test_receipts_are_kept_per_job_in_seq_order(store: GatewayStore) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await store.add([receipt(a, 2), receipt(b, 1), receipt(a, 1)], [])
    await store.add([receipt(a, 3)], [])
    assert [r.seq for r in await store.receipts(str(a))] == [1, 2, 3]
    assert await store.receipts(str(b)) == [receipt(b, 1)]
    assert await store.receipts(str(uuid.uuid4())) == []


async def test_storing_a_receipt_again_is_a_no_op(store: GatewayStore) -> None:
    job = uuid.uuid4()
    first = receipt(job, 1)
    await store.add([first], [])
    await store.add([first, receipt(job, 2)], [])
    assert await store.receipts(str(job)) == [first, receipt(job, 2)]


async def test_samples_page_by_cursor_oldest_first(store: GatewayStore) -> None:
    records = [SampleRecord(str(uuid.uuid4()), i, b"sample %d" % i) for i in range(7)]
    await store.add([], records[:4])
    await store.add([], records[4:])
    seen: list[SampleRecord] = []
    cursor = 0
    while page := await store.samples_after(cursor, 3):
        assert len(page) <= 3
        assert all(p.cursor > cursor for p in page)
        seen.extend(p.record for p in page)
        cursor = page[-1].cursor
    assert seen == records


async def test_the_writer_stores_everything_submitted_before_a_flush(store: GatewayStore) -> None:
    writer = ReceiptWriter(store)
    writer.start()
    job = uuid.uuid4()
    for seq in range(1, 301):
        sample = SampleRecord(str(job), seq, b"s") if seq % 10 == 0 else None
        writer.submit(receipt(job, seq), sample)
    await writer.flush()
    assert [r.seq for r in await store.receipts(str(job))] == list(range(1, 301))
    assert len(await store.samples_after(0, 1000)) == 30
    writer.submit(receipt(job, 301))
    await writer.close()  # drains what is still queued
    assert len(await store.receipts(str(job))) == 301


async def test_two_gateways_on_one_database_lose_and_duplicate_no_receipt(
    harness: Harness, engine: AsyncEngine
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    gateways = [
        await harness.start_gateway(database_url=url, sample_rate=0.5),
        await harness.start_gateway(database_url=url, sample_rate=0.5),
    ]

    async def session(i: int) -> tuple[str, list[StreamReceipt]]:
        app = gateways[i % 2]
        channel = open_channel(f"127.0.0.1:{app.port}", signer=harness.client, callee=app.identity)
        client = StreamClient(channel)
        await client.open(WHITELIST)
        got = []
        for j in range(15):
            body = f"{i}/{j}".encode()
            res = await client.request(body)
            assert res.body == answer(body)
            got.append(res.receipt)
        await client.close()
        await channel.close()
        return client.job_uuid, got

    results = await asyncio.gather(*(session(i) for i in range(8)))
    shared = SqlStore(engine, owns_engine=False)
    for job_uuid, got in results:
        assert await shared.receipts(job_uuid) == got
    samples = await shared.samples_after(0, 1000)
    keys = [(s.record.job_uuid, s.record.seq) for s in samples]
    assert len(keys) == len(set(keys))
