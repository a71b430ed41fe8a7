"""Contract tests: every store behaves the same on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from horde.v1 import common_pb2, job_pb2, receipts_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import lifecycle
from horde_services.core.identity import HotkeySigner
from horde_services.core.proto_util import event, result
from horde_services.miner.service import ReceiptStore
from horde_services.validator import store as store_module
from horde_services.validator.store import JobStore


def spec(image: str = "horde/base:latest") -> job_pb2.JobSpec:
    return job_pb2.JobSpec(image=image, command=["true"], executor_class="cpu-small")


async def test_job_lifecycle_round_trips(engine: AsyncEngine) -> None:
    store = JobStore(engine)
    job = str(uuid.uuid4())
    await store.create(job, "ed25519:" + "ab" * 32, "organic", spec())
    await store.add_event(
        event(job, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION, "go")
    )
    record = await store.get(job)
    assert record is not None and record.state == common_pb2.JOB_STATE_RUNNING
    assert await store.unfinished() == [job]
    res = result(job, common_pb2.JOB_STATE_COMPLETED, stage=common_pb2.STAGE_EXECUTION)
    res.exit_code = 0
    res.outputs.add(path="a.txt", size_bytes=3, sha256="00" * 32)
    await store.finish(res)
    # A late event never moves a finished job out of its terminal state.
    await store.add_event(event(job, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION))
    record = await store.get(job)
    assert record is not None
    assert record.state == common_pb2.JOB_STATE_COMPLETED
    assert record.result.exit_code == 0 and record.result.outputs[0].path == "a.txt"
    assert [e.message for e in await store.events(job)] == ["go", ""]
    assert await store.unfinished() == []
    await store.put_outputs(job, [("a.txt", b"abc"), ("dir/b.bin", b"\x00\xff")])
    assert await store.outputs(job) == [("a.txt", b"abc"), ("dir/b.bin", b"\x00\xff")]
    assert await store.get(str(uuid.uuid4())) is None


async def test_outputs_of_jobs_ended_before_the_cutoff_are_pruned(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PRUNE_BATCH_JOBS", 2)  # several transactions
    store = JobStore(engine)
    ended = [str(uuid.uuid4()) for _ in range(5)]
    running = str(uuid.uuid4())
    for job in (*ended, running):
        await store.create(job, "ed25519:" + "ab" * 32, "organic", spec())
        await store.put_outputs(job, [("a.txt", b"abc"), ("b.txt", b"de")])
    for job in ended:
        await store.finish(
            result(job, common_pb2.JOB_STATE_COMPLETED, common_pb2.FAILURE_REASON_UNSPECIFIED)
        )
    before = await store.get(ended[-1])
    assert before is not None
    assert await store.prune_outputs(before.updated_ns) == 4  # the last ended not before that
    assert len(await store.outputs(ended[-1])) == 2
    assert await store.prune_outputs(before.updated_ns + 1) == 1
    assert [await store.outputs(job) for job in ended] == [[]] * 5
    ended = ended[-1]
    assert len(await store.outputs(running)) == 2  # a job still running keeps its files
    after = await store.get(ended)
    assert after is not None and after.result == before.result  # the record stays whole
    assert await store.prune_outputs(before.updated_ns + 1) == 0


async def test_list_pages_newest_first_without_loss_or_duplicates(engine: AsyncEngine) -> None:
    store = JobStore(engine)
    made = []
    for i in range(7):
        job = str(uuid.uuid4())
        await store.create(job, "client", "organic", spec(f"img{i}"))
        made.append(job)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_jobs(3, cursor, None)
        seen += [r.job_uuid for r in page]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    await store.finish(result(made[0], common_pb2.JOB_STATE_FAILED))
    failed, _ = await store.list_jobs(10, None, common_pb2.JOB_STATE_FAILED)
    assert [r.job_uuid for r in failed] == [made[0]]


async def test_concurrent_writers_lose_nothing(engine: AsyncEngine) -> None:
    store = JobStore(engine)
    job = str(uuid.uuid4())
    await store.create(job, "client", "organic", spec())
    await asyncio.gather(
        *(
            store.add_event(
                event(job, common_pb2.JOB_STATE_RUNNING, common_pb2.STAGE_EXECUTION, str(i))
            )
            for i in range(40)
        )
    )
    assert sorted(int(e.message) for e in await store.events(job)) == list(range(40))


def _receipt(
    miner: HotkeySigner, validator: HotkeySigner, job: str, kind: int
) -> receipts_pb2.LifecycleReceipt:
    payload = receipts_pb2.LifecycleReceiptPayload(
        kind=kind,  # type: ignore[arg-type]
        job_uuid=job,
        miner_hotkey=str(miner.identity),
        validator_hotkey=str(validator.identity),
        executor_class="cpu-small",
        timestamp_ns=1,
    )
    return lifecycle.miner_sign(payload, miner)


async def test_lifecycle_receipts_store_once_and_take_the_countersignature(
    engine: AsyncEngine,
) -> None:
    miner, validator = HotkeySigner.generate(), HotkeySigner.generate()
    store = ReceiptStore(engine)
    job = str(uuid.uuid4())
    started = _receipt(miner, validator, job, receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED)
    await store.put(started)
    await store.put(started)
    signed = lifecycle.countersign(started, validator)
    await store.put(signed)
    finished = _receipt(miner, validator, job, receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED)
    await store.put(finished)
    first, cursor = await store.page(0, 1)
    assert len(first) == 1 and lifecycle.verify(first[0]) is None
    rest, cursor2 = await store.page(cursor, 10)
    assert (
        len(rest) == 1
        and lifecycle.parse(rest[0]).kind == receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED
    )
    assert lifecycle.verify(rest[0]) == "validator signature does not verify"
    assert (await store.page(cursor2, 10))[0] == []

    # The validator's store (same table, its own database in production) keeps the first copy.
    validator_store = JobStore(engine)
    await validator_store.put_receipt(signed)
    stored = await validator_store.receipts(job)
    assert lifecycle.verify(stored[0]) is None
