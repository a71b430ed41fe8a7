"""Spot checks: replay sampled streaming requests on the trusted miner and compare the outputs.

Samples. The validator pulls the request/response pairs its gateways kept (`ListSamples`, by a
cursor stored per gateway) and keeps those that verify: the certificate under the miner's hotkey,
issued for this validator; the receipt under the certified key; sha256(request) and
sha256(response) equal to the receipt's input and output hashes. Only such pairs can become
evidence against a miner.

Batches. Unchecked pairs are grouped by image digest; a batch is due once it holds
``spotcheck.batch_size`` pairs or its oldest pair is ``spotcheck.max_age_s`` old (or at once, from
`horde validator spotcheck`). For a due batch the validator starts the same image (the executor
refuses any other build: the digest is pinned) for a short time on the trusted miner, an
unregistered miner its operator runs (``trusted_miner``), with the validator itself as the job's
gateway; it replays the requests through the job proxy (every trusted receipt is checked too),
compares each output with the miner's under the image's comparator (horde_services/validator/
comparators.py), and tears the instance down (cancel, then wait for the job's end).

Verdicts. Each pair gets a verdict. A mismatch becomes an evidence record (horde_services/validator/
evidence.py: receipt, certificate, request, claimed and trusted outputs, all verifiable offline)
and a sanction: the miner's score is multiplied by ``weight_factor`` (0 zeroes it) for
``penalty_period_s``, plus ``penalty_amount`` in the penalties table (horde_services/validator/
scoring.py shows both in `horde validator weights`).

Organic cross-checks. With ``organic_share`` > 0, that share of completed organic jobs (with no
inline inputs: those are not kept) is re-run on the trusted miner and the sha256 of each output
file and the exit code compared; a mismatch is recorded (and costs ``organic_penalty_amount``).

Detection. A miner wrong on a share p of requests escapes a check of n independent sampled pairs
with probability (1 - p)^n: for p = 0.1, n = 44 pairs give P(miss) = 0.9^44 = 0.0097 <= 1%.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import sqlalchemy as sa
import structlog
from horde.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    job_pb2,
    miner_pb2,
    miner_pb2_grpc,
    receipts_pb2,
    streaming_pb2,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import lifecycle, metrics
from horde_services.core.certificates import CertificateError, verify_certificate
from horde_services.core.config import SpotCheckSettings, TLSSettings, TrustedMiner
from horde_services.core.db import (
    jobs,
    miner_sanctions,
    spot_checks,
    spot_cursors,
    spot_evidence,
    spot_samples,
    spot_verdicts,
)
from horde_services.core.identity import Identity, Signer
from horde_services.core.proxy_wire import ProxyError, ProxyLink
from horde_services.core.receipts import ReceiptError, StreamReceipt
from horde_services.core.server import open_channel
from horde_services.validator.comparators import for_image
from horde_services.validator.evidence import EvidenceError, build_record, verify_record
from horde_services.validator.scoring import add_penalty
from horde_services.validator.store import JobStore
from horde_services.validator.synthetic import SyntheticStore

log = structlog.get_logger("horde.validator.spotcheck")

PULL_PAGE = 500
PULL_TIMEOUT_S = 30.0
TEARDOWN_WAIT_S = 60.0
REPLAY_TIMEOUT_S = 120.0
ORGANIC_CURSOR = "@organic"
INSTANCE_TIMEOUTS = {
    "reservation_s": 30,
    "image_pull_s": 600,
    "volume_download_s": 300,
    "output_upload_s": 300,
    "streaming_start_s": 120,
}


class SpotCheckError(Exception):
    """A check could not run (not the miner's fault: no verdicts, no penalty)."""


@dataclass(frozen=True)
class PairVerdict:
    miner: str
    job_uuid: str
    seq: int
    passed: bool
    comparator: str
    detail: str
    evidence_id: int | None = None


@dataclass
class CheckReport:
    check_id: int
    kind: str  # "streaming" or "organic"
    image: str
    image_digest: str
    trusted_job_uuid: str
    error: str = ""
    duration_s: float = 0.0
    verdicts: list[PairVerdict] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(1 for v in self.verdicts if not v.passed)


@dataclass
class SpotCheckReport:
    pulled: int = 0
    pull_errors: list[str] = field(default_factory=list)
    checks: list[CheckReport] = field(default_factory=list)


@dataclass(frozen=True)
class StoredSample:
    id: int
    sample: gateway_pb2.Sample
    miner: str
    created_ns: int


def verify_sample(sample: gateway_pb2.Sample, validator: str) -> str:
    """The miner named by a sample's certificate; ValueError when the sample cannot be evidence."""
    try:
        receipt = StreamReceipt.from_proto(sample.receipt)
        payload = verify_certificate(
            sample.certificate, job_uuid=sample.job_uuid, now_ns=receipt.timestamp_from_ns
        )
        receipt.verify()
    except (CertificateError, ReceiptError) as exc:
        raise ValueError(str(exc)) from None
    if payload.validator_hotkey != validator:
        raise ValueError("certificate issued for another validator")
    if receipt.job_public_key != payload.job_public_key:
        raise ValueError("receipt not signed by the certified job key")
    if str(receipt.job_uuid) != sample.job_uuid:
        raise ValueError("receipt for another job")
    if hashlib.sha256(sample.request).digest() != receipt.input_sha256:
        raise ValueError("request does not match the receipt's input_sha256")
    if hashlib.sha256(sample.response).digest() != receipt.output_sha256:
        raise ValueError("response does not match the receipt's output_sha256")
    if sample.image_digest != payload.image_digest:
        raise ValueError("image digest differs from the certificate's")
    return payload.miner_hotkey


# ------------------------------------------------------------------------------------ storage


class SpotStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def cursor(self, key: str) -> str:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(spot_cursors.c.cursor).where(spot_cursors.c.gateway == key)
                )
            ).first()
        return str(row[0]) if row is not None else ""

    async def set_cursor(self, key: str, cursor: str) -> None:
        async with self.engine.begin() as conn:
            done = await conn.execute(
                spot_cursors.update()
                .where(spot_cursors.c.gateway == key)
                .values(cursor=cursor, updated_ns=time.time_ns())
            )
            if not done.rowcount:
                await conn.execute(
                    spot_cursors.insert().values(
                        gateway=key, cursor=cursor, updated_ns=time.time_ns()
                    )
                )

    async def add_samples(
        self, gateway: str, rows: Sequence[tuple[gateway_pb2.Sample, str]]
    ) -> int:
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        insert: Any = postgresql.insert(spot_samples) if dialect == "postgresql" else None
        if insert is None:
            insert = sqlite.insert(spot_samples)
        stmt = insert.on_conflict_do_nothing(index_elements=["gateway", "job_uuid", "seq"])
        now = time.time_ns()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                stmt,
                [
                    {
                        "gateway": gateway,
                        "job_uuid": s.job_uuid,
                        "seq": s.receipt.seq,
                        "miner_hotkey": miner,
                        "image": s.image,
                        "image_digest": s.image_digest,
                        "sample": s.SerializeToString(),
                        "created_ns": now,
                    }
                    for s, miner in rows
                ],
            )
        del result
        return len(rows)

    async def batches(self) -> list[tuple[str, int, int]]:
        """(image digest, unchecked pairs, oldest created_ns) per image digest."""
        t = spot_samples
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(t.c.image_digest, sa.func.count(), sa.func.min(t.c.created_ns))
                    .where(t.c.check_id.is_(None))
                    .group_by(t.c.image_digest)
                )
            ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    async def unchecked(self, image_digest: str, limit: int) -> list[StoredSample]:
        t = spot_samples
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(t.c.id, t.c.sample, t.c.miner_hotkey, t.c.created_ns)
                    .where(t.c.check_id.is_(None), t.c.image_digest == image_digest)
                    .order_by(t.c.id)
                    .limit(limit)
                )
            ).fetchall()
        return [
            StoredSample(int(r[0]), gateway_pb2.Sample.FromString(r[1]), r[2], int(r[3]))
            for r in rows
        ]

    async def new_check(self, kind: str, image: str, digest: str, trusted: str) -> int:
        now = time.time_ns()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                spot_checks.insert().values(
                    kind=kind,
                    image=image,
                    image_digest=digest,
                    trusted_miner=trusted,
                    trusted_job_uuid="",
                    pairs=0,
                    mismatches=0,
                    error="",
                    started_ns=now,
                    finished_ns=0,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    async def finish_check(self, report: CheckReport, sample_ids: Sequence[int]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                spot_checks.update()
                .where(spot_checks.c.id == report.check_id)
                .values(
                    trusted_job_uuid=report.trusted_job_uuid,
                    pairs=len(report.verdicts),
                    mismatches=report.mismatches,
                    error=report.error[:1000],
                    finished_ns=time.time_ns(),
                )
            )
            if report.verdicts:
                await conn.execute(
                    spot_verdicts.insert(),
                    [
                        {
                            "check_id": report.check_id,
                            "miner_hotkey": v.miner,
                            "job_uuid": v.job_uuid,
                            "seq": v.seq,
                            "passed": v.passed,
                            "comparator": v.comparator,
                            "detail": v.detail[:1000],
                            "evidence_id": v.evidence_id,
                            "created_ns": time.time_ns(),
                        }
                        for v in report.verdicts
                    ],
                )
            if sample_ids and not report.error:
                await conn.execute(
                    spot_samples.update()
                    .where(spot_samples.c.id.in_(list(sample_ids)))
                    .values(check_id=report.check_id)
                )

    async def add_evidence(self, record: dict[str, Any]) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                spot_evidence.insert().values(
                    miner_hotkey=record["miner_hotkey"],
                    job_uuid=record["job_uuid"],
                    seq=record["seq"],
                    record_json=json.dumps(record, sort_keys=True),
                    created_ns=record["created_ns"],
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    async def evidence(self, miner: str = "") -> list[str]:
        query = sa.select(spot_evidence.c.record_json).order_by(spot_evidence.c.id)
        if miner:
            query = query.where(spot_evidence.c.miner_hotkey == miner)
        async with self.engine.connect() as conn:
            return [str(r[0]) for r in (await conn.execute(query)).fetchall()]

    async def sanction(
        self,
        miner: str,
        kind: str,
        factor: float,
        reason: str,
        period_s: float,
        evidence_id: int | None,
    ) -> None:
        now = time.time_ns()
        async with self.engine.begin() as conn:
            await conn.execute(
                miner_sanctions.insert().values(
                    miner_hotkey=miner,
                    kind=kind,
                    factor=factor,
                    reason=reason[:1000],
                    evidence_id=evidence_id,
                    created_ns=now,
                    until_ns=now + int(period_s * 1e9),
                )
            )
        metrics.SANCTIONS.labels(kind).inc()


# ------------------------------------------------------------------------- trusted instance


@dataclass(frozen=True)
class Replayed:
    body: bytes
    receipt: receipts_pb2.StreamReceipt


@dataclass
class TrustedRun:
    """A job on the trusted miner: its stream, what came back, and how to end it."""

    job_uuid: str
    outbox: asyncio.Queue[miner_pb2.RunJobRequest | None]
    ready: asyncio.Future[miner_pb2.StreamingReady]
    result: asyncio.Future[job_pb2.JobResult]
    outputs: dict[str, bytearray] = field(default_factory=dict)
    certificate: receipts_pb2.JobCertificate | None = None


class TrustedMinerClient:
    """Runs jobs on the trusted miner through its MinerService, the validator as the gateway."""

    def __init__(self, signer: Signer, trusted: TrustedMiner, tls: TLSSettings | None) -> None:
        self._signer = signer
        self.trusted = trusted
        self.identity = str(Identity.parse(trusted.identity))
        self._channel = open_channel(
            trusted.address,
            signer=signer,
            callee=self.identity,
            tls=tls if tls is not None and tls.ca_file else None,
        )
        self._stub = miner_pb2_grpc.MinerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @contextlib.asynccontextmanager
    async def run(
        self, spec: job_pb2.JobSpec, kind: str, image_digest: str = ""
    ) -> AsyncIterator[TrustedRun]:
        """The job runs while the block does; leaving it cancels the job and waits for its end
        (so the trusted instance is torn down before the caller goes on)."""
        loop = asyncio.get_running_loop()
        run = TrustedRun(
            job_uuid=str(uuid.uuid4()),
            outbox=asyncio.Queue(),
            ready=loop.create_future(),
            result=loop.create_future(),
        )
        run.outbox.put_nowait(
            miner_pb2.RunJobRequest(
                start=miner_pb2.RunJobStart(
                    job_uuid=run.job_uuid,
                    spec=spec,
                    job_kind=kind,
                    gateway_identity=str(self._signer.identity),
                    image_digest=image_digest,
                )
            )
        )

        async def requests() -> AsyncIterator[miner_pb2.RunJobRequest]:
            while (msg := await run.outbox.get()) is not None:
                yield msg

        call = self._stub.RunJob(requests())
        pump = asyncio.create_task(self._pump(call, run, image_digest))
        try:
            yield run
        finally:
            if not run.result.done():
                run.outbox.put_nowait(miner_pb2.RunJobRequest(cancel=True))
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    async with asyncio.timeout(TEARDOWN_WAIT_S):
                        await asyncio.shield(run.result)
            run.outbox.put_nowait(None)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            call.cancel()
            for fut in (run.ready, run.result):
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: no "never retrieved" warning

    async def _pump(self, call: Any, run: TrustedRun, image_digest: str) -> None:
        def end(res: job_pb2.JobResult) -> None:
            if not run.result.done():
                run.result.set_result(res)
            if not run.ready.done():
                run.ready.set_exception(
                    SpotCheckError(
                        f"the trusted instance ended before it was ready: "
                        f"{common_pb2.JobState.Name(res.state)} "
                        f"{common_pb2.FailureReason.Name(res.reason)}: {res.detail}"
                    )
                )

        try:
            async for msg in call:
                kind = msg.WhichOneof("payload")
                if kind == "receipt":
                    receipt = msg.receipt
                    if lifecycle.verify(receipt, require_validator=False) is None:
                        run.outbox.put_nowait(
                            miner_pb2.RunJobRequest(
                                countersigned_receipt=lifecycle.countersign(receipt, self._signer)
                            )
                        )
                elif kind == "streaming_ready":
                    ready = msg.streaming_ready
                    problem = self._check_ready(run, ready, image_digest)
                    if problem is not None and not run.ready.done():
                        run.ready.set_exception(SpotCheckError(problem))
                    elif not run.ready.done():
                        run.certificate = ready.certificate
                        run.ready.set_result(ready)
                elif kind == "output_chunk":
                    chunk = msg.output_chunk
                    run.outputs.setdefault(chunk.path, bytearray()).extend(chunk.data)
                elif kind == "result":
                    end(msg.result)
                    return
            end(
                job_pb2.JobResult(
                    job_uuid=run.job_uuid,
                    state=common_pb2.JOB_STATE_HORDE_FAILED,
                    reason=common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
                    detail="the trusted miner closed the job stream without a result",
                )
            )
        except grpc.aio.AioRpcError as exc:
            end(
                job_pb2.JobResult(
                    job_uuid=run.job_uuid,
                    state=common_pb2.JOB_STATE_HORDE_FAILED,
                    reason=common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
                    detail=f"trusted miner: {exc.code().name}: {exc.details()}",
                )
            )

    def _check_ready(
        self, run: TrustedRun, ready: miner_pb2.StreamingReady, image_digest: str
    ) -> str | None:
        try:
            payload = verify_certificate(
                ready.certificate, miner=self.identity, job_uuid=run.job_uuid
            )
        except CertificateError as exc:
            return f"the trusted miner's certificate: {exc}"
        if payload.validator_hotkey != str(self._signer.identity):
            return "the trusted miner's certificate names another validator"
        if image_digest and payload.image_digest != image_digest:
            return f"the trusted instance runs {payload.image_digest}, not {image_digest}"
        return None

    async def replay(
        self, ready: miner_pb2.StreamingReady, job_uuid: str, requests: Sequence[bytes]
    ) -> list[Replayed]:
        """Send the requests to the trusted instance's job proxy in order; check each receipt."""
        payload = verify_certificate(ready.certificate, miner=self.identity, job_uuid=job_uuid)
        out: list[Replayed] = []
        try:
            link = await ProxyLink.connect(
                ready.proxy_endpoint,
                signer=self._signer,
                callee=ready.proxy_identity,
                job_uuid=job_uuid,
            )
        except ProxyError as exc:
            raise SpotCheckError(f"trusted job proxy: {exc}") from None
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT_S + 2 * len(requests)):
                for seq, body in enumerate(requests, start=1):
                    frame = streaming_pb2.StreamRequestFrame(
                        seq=seq, client_timestamp_ns=time.time_ns(), body=body, last=True
                    )
                    await link.write(frame)
                    parts: list[bytes] = []
                    while True:
                        answer_frame = await link.read()
                        if answer_frame is None:
                            raise SpotCheckError(f"the trusted job proxy ended at request {seq}")
                        if answer_frame.error:
                            raise SpotCheckError(
                                f"the trusted instance gave request {seq} no answer: "
                                f"{answer_frame.error[:500]}"
                            )
                        parts.append(answer_frame.body)
                        if answer_frame.last:
                            receipt = answer_frame.receipt
                            break
                    answer = b"".join(parts)
                    _check_trusted_receipt(receipt, payload, seq, body, answer)
                    out.append(Replayed(answer, receipt))
                link.done_writing()
        except ProxyError as exc:
            raise SpotCheckError(f"trusted job proxy: {exc}") from None
        except TimeoutError:
            raise SpotCheckError("the trusted job proxy did not answer in time") from None
        finally:
            await link.aclose()
        return out


def _check_trusted_receipt(
    receipt: receipts_pb2.StreamReceipt,
    payload: receipts_pb2.JobCertificatePayload,
    seq: int,
    request: bytes,
    answer: bytes,
) -> None:
    try:
        r = StreamReceipt.from_proto(receipt)
        r.verify()
    except ReceiptError as exc:
        raise SpotCheckError(f"trusted receipt {seq}: {exc}") from None
    if (
        r.job_public_key != payload.job_public_key
        or r.seq != seq
        or r.input_sha256 != hashlib.sha256(request).digest()
        or r.output_sha256 != hashlib.sha256(answer).digest()
    ):
        raise SpotCheckError(f"trusted receipt {seq} does not cover the replayed exchange")


# ------------------------------------------------------------------------------- the checker


def _replay_spec(
    record: job_pb2.JobRecord | None, sample: gateway_pb2.Sample, time_limit_s: int, klass: str
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec()
    if record is not None:
        src = record.spec
        spec.image = src.image
        spec.command.extend(src.command)
        spec.env.update(src.env)
        spec.executor_class = src.executor_class
        spec.streaming.CopyFrom(src.streaming)
    else:
        spec.image = sample.image
        spec.streaming.CopyFrom(sample.streaming)
    if klass:
        spec.executor_class = klass
    for name, value in INSTANCE_TIMEOUTS.items():
        setattr(spec.timeouts, name, value)
    spec.timeouts.execution_s = time_limit_s
    spec.labels["horde.spotcheck"] = "1"
    return spec


def _spec_key(spec: job_pb2.JobSpec) -> bytes:
    return spec.SerializeToString(deterministic=True)


class SpotChecker:
    def __init__(
        self,
        signer: Signer,
        engine: AsyncEngine,
        jobs_store: JobStore,
        reports: SyntheticStore,
        settings: SpotCheckSettings,
        gateways: dict[str, str],
        trusted: TrustedMiner | None,
        tls: TLSSettings | None = None,
        default_class: str = "cpu-small",
    ) -> None:
        self._signer = signer
        self.identity = str(signer.identity)
        self.store = SpotStore(engine)
        self._jobs = jobs_store
        self._reports = reports
        self.settings = settings
        self._tls = tls if tls is not None and tls.ca_file else None
        self._gateways = {str(Identity.parse(k)): v for k, v in gateways.items()}
        self._trusted = TrustedMinerClient(signer, trusted, tls) if trusted is not None else None
        self._default_class = default_class
        self._lock = asyncio.Lock()
        self._rng = random.SystemRandom()

    @property
    def has_trusted(self) -> bool:
        return self._trusted is not None

    @property
    def configured(self) -> bool:
        return bool(self._gateways) or self._trusted is not None

    async def close(self) -> None:
        if self._trusted is not None:
            await self._trusted.close()

    # ---- samples

    async def pull(self) -> tuple[int, list[str]]:
        """Pull new samples from every gateway; (samples kept, problems)."""
        kept = 0
        problems: list[str] = []
        for identity, address in self._gateways.items():
            try:
                kept += await self._pull_one(identity, address)
            except grpc.aio.AioRpcError as exc:
                problems.append(f"gateway {address}: {exc.code().name}: {exc.details()}")
                log.warning("samples_pull_failed", gateway=address, code=exc.code().name)
        return kept, problems

    async def _pull_one(self, identity: str, address: str) -> int:
        kept = 0
        async with open_channel(
            address, signer=self._signer, callee=identity, tls=self._tls
        ) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            cursor = await self.store.cursor(identity)
            while True:
                resp = await stub.ListSamples(
                    gateway_pb2.ListSamplesRequest(cursor=cursor, limit=PULL_PAGE),
                    timeout=PULL_TIMEOUT_S,
                )
                rows = []
                for sample in resp.samples:
                    try:
                        rows.append((sample, verify_sample(sample, self.identity)))
                    except ValueError as exc:
                        log.warning(
                            "sample_dropped",
                            gateway=address,
                            job_uuid=sample.job_uuid,
                            seq=sample.receipt.seq,
                            why=str(exc),
                        )
                kept += await self.store.add_samples(identity, rows)
                if resp.next_cursor and resp.next_cursor != cursor:
                    cursor = resp.next_cursor
                    await self.store.set_cursor(identity, cursor)
                if len(resp.samples) < PULL_PAGE:
                    return kept

    # ---- checks

    async def run(self, *, force: bool, image_digest: str = "") -> SpotCheckReport:
        """Pull samples, then check every due batch (every batch when forced)."""
        async with self._lock:
            report = SpotCheckReport()
            report.pulled, report.pull_errors = await self.pull()
            if self._trusted is None:
                return report
            now = time.time_ns()
            s = self.settings
            for digest, count, oldest in await self.store.batches():
                if image_digest and digest != image_digest:
                    continue
                due = force or count >= s.batch_size or (now - oldest) / 1e9 >= s.max_age_s
                if due:
                    report.checks += await self._check_digest(digest)
            if s.organic_share > 0:
                report.checks += await self._organic()
            return report

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            report = await self.run(force=False)
            if report.pulled or report.checks:
                log.info(
                    "spotcheck_round",
                    pulled=report.pulled,
                    checks=len(report.checks),
                    mismatches=sum(c.mismatches for c in report.checks),
                )

    async def _check_digest(self, digest: str) -> list[CheckReport]:
        assert self._trusted is not None
        samples = await self.store.unchecked(digest, self.settings.max_pairs)
        groups: dict[bytes, tuple[job_pb2.JobSpec, list[StoredSample]]] = {}
        for stored in samples:
            record = await self._jobs.get(stored.sample.job_uuid)
            spec = _replay_spec(
                record,
                stored.sample,
                self.settings.instance_time_limit_s,
                self._trusted.trusted.executor_class,
            )
            if not spec.executor_class:
                spec.executor_class = self._default_class
            groups.setdefault(_spec_key(spec), (spec, []))[1].append(stored)
        return [await self._check_group(spec, digest, group) for spec, group in groups.values()]

    async def _check_group(
        self, spec: job_pb2.JobSpec, digest: str, samples: list[StoredSample]
    ) -> CheckReport:
        assert self._trusted is not None
        trusted = self._trusted
        check_id = await self.store.new_check("streaming", spec.image, digest, trusted.identity)
        report = CheckReport(check_id, "streaming", spec.image, digest, "")
        t0 = time.monotonic()
        bound = log.bind(check_id=check_id, image=spec.image, pairs=len(samples))
        bound.info("spotcheck_started")
        try:
            async with trusted.run(spec, "streaming", digest) as run:
                report.trusted_job_uuid = run.job_uuid
                try:
                    async with asyncio.timeout(self.settings.startup_timeout_s):
                        ready = await run.ready
                except TimeoutError:
                    raise SpotCheckError(
                        f"the trusted instance was not ready within "
                        f"{self.settings.startup_timeout_s:.0f}s"
                    ) from None
                replies = await trusted.replay(
                    ready, run.job_uuid, [s.sample.request for s in samples]
                )
                certificate = run.certificate
        except SpotCheckError as exc:
            report.error = str(exc)
        except grpc.aio.AioRpcError as exc:
            report.error = f"trusted miner: {exc.code().name}: {exc.details()}"
        if not report.error:
            comparator = for_image(self.settings.comparators, spec.image, digest)
            wrong: dict[str, list[PairVerdict]] = defaultdict(list)
            for stored, reply in zip(samples, replies, strict=True):
                sample = stored.sample
                verdict = comparator.compare(sample.response, reply.body)
                metrics.SPOTCHECK_PAIRS.labels("matched" if verdict.matched else "mismatched").inc()
                evidence_id = None
                if not verdict.matched:
                    evidence_id = await self._evidence(
                        sample, reply, comparator.name, verdict.detail, certificate
                    )
                v = PairVerdict(
                    stored.miner,
                    sample.job_uuid,
                    sample.receipt.seq,
                    verdict.matched,
                    comparator.name,
                    verdict.detail,
                    evidence_id,
                )
                report.verdicts.append(v)
                if not v.passed and evidence_id is not None:
                    wrong[v.miner].append(v)
            for miner, bad in wrong.items():
                await self._penalise(
                    check_id, miner, bad, len([s for s in samples if s.miner == miner])
                )
        report.duration_s = time.monotonic() - t0
        await self.store.finish_check(report, [s.id for s in samples])
        bound.info(
            "spotcheck_finished",
            mismatches=report.mismatches,
            error=report.error,
            duration_s=round(report.duration_s, 3),
        )
        return report

    async def _evidence(
        self,
        sample: gateway_pb2.Sample,
        reply: Replayed,
        comparator: str,
        detail: str,
        certificate: receipts_pb2.JobCertificate | None,
    ) -> int | None:
        if certificate is None:  # nothing would vouch for the trusted output
            log.error("evidence_without_trusted_certificate", job_uuid=sample.job_uuid)
            return None
        record = build_record(
            sample,
            validator_hotkey=self.identity,
            trusted_output=reply.body,
            comparator=comparator,
            detail=detail,
            created_ns=time.time_ns(),
            trusted_certificate=certificate,
            trusted_receipt=reply.receipt,
        )
        try:
            verify_record(record)  # only evidence a third party would accept costs the miner
        except EvidenceError as exc:
            log.error("evidence_does_not_verify", job_uuid=sample.job_uuid, why=str(exc))
            return None
        return await self.store.add_evidence(record)

    async def _penalise(
        self, check_id: int, miner: str, bad: list[PairVerdict], checked: int
    ) -> None:
        s = self.settings
        first = bad[0]
        reason = (
            f"spot check {check_id}: {len(bad)} of {checked} replayed responses differ from the "
            f"trusted instance (job {first.job_uuid} seq {first.seq}: {first.detail}); "
            f"evidence {', '.join(str(v.evidence_id) for v in bad[:5])}"
        )
        await self.store.sanction(
            miner,
            "spotcheck_mismatch",
            s.weight_factor,
            reason,
            s.penalty_period_s,
            first.evidence_id,
        )
        await add_penalty(
            self._reports,
            miner,
            "spotcheck_mismatch",
            s.penalty_amount,
            reason,
            json.dumps([v.evidence_id for v in bad]).encode(),
        )
        log.warning("spotcheck_mismatch", miner=miner, mismatches=len(bad), checked=checked)

    # ---- organic cross-checks

    async def _organic(self) -> list[CheckReport]:
        assert self._trusted is not None
        cursor = int(await self.store.cursor(ORGANIC_CURSOR) or 0)
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(jobs.c.job_uuid, jobs.c.seq, jobs.c.miner_hotkey)
                    .where(
                        jobs.c.kind == "organic",
                        jobs.c.state == common_pb2.JOB_STATE_COMPLETED,
                        jobs.c.seq > cursor,
                    )
                    .order_by(jobs.c.seq)
                    .limit(100)
                )
            ).fetchall()
        out = []
        for job_uuid, seq, miner in rows:
            await self.store.set_cursor(ORGANIC_CURSOR, str(seq))
            if not miner or miner == self._trusted.identity:
                continue
            if self._rng.random() >= self.settings.organic_share:
                continue
            record = await self._jobs.get(job_uuid)
            if (
                record is None
                or any(v.WhichOneof("source") != "url" for v in record.spec.inputs)
                or record.spec.output.WhichOneof("target") == "upload"
            ):
                continue  # inline inputs are not kept; uploaded outputs are not seen
            stored = await self._jobs.outputs(job_uuid)
            if len(record.result.outputs) and not stored:
                continue  # its files are no longer kept (output_retention_days): nothing to check
            out.append(await self._organic_one(record, miner, stored))
        return out

    async def _organic_one(
        self, record: job_pb2.JobRecord, miner: str, stored: list[tuple[str, bytes]]
    ) -> CheckReport:
        assert self._trusted is not None
        trusted = self._trusted
        spec = job_pb2.JobSpec()
        spec.CopyFrom(record.spec)
        if trusted.trusted.executor_class:
            spec.executor_class = trusted.trusted.executor_class
        check_id = await self.store.new_check("organic", spec.image, "", trusted.identity)
        report = CheckReport(check_id, "organic", spec.image, "", "")
        t0 = time.monotonic()
        ours: dict[str, str] = {}
        async with trusted.run(spec, "organic") as run:
            report.trusted_job_uuid = run.job_uuid
            try:
                limit = sum(getattr(spec.timeouts, n) for n in (*INSTANCE_TIMEOUTS, "execution_s"))
                async with asyncio.timeout(limit or 3600):
                    res = await asyncio.shield(run.result)
            except TimeoutError:
                res = None
                report.error = "the trusted re-run did not finish in time"
            ours = {p: hashlib.sha256(bytes(d)).hexdigest() for p, d in run.outputs.items()}
        if res is not None and res.state != common_pb2.JOB_STATE_COMPLETED:
            report.error = (
                f"the trusted re-run ended {common_pb2.JobState.Name(res.state)}: {res.detail}"
            )
        if not report.error and res is not None:
            theirs = {p: hashlib.sha256(d).hexdigest() for p, d in stored}
            diff = sorted(p for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p))
            exit_same = res.exit_code == record.result.exit_code
            passed = not diff and exit_same
            detail = (
                f"{len(theirs)} output file(s) and the exit code match"
                if passed
                else (
                    f"output files differ: {', '.join(diff[:5])}"
                    if diff
                    else f"exit code {record.result.exit_code}, trusted {res.exit_code}"
                )
            )
            report.verdicts.append(
                PairVerdict(miner, record.job_uuid, 0, passed, "sha256-files", detail)
            )
            if not passed:
                await add_penalty(
                    self._reports,
                    miner,
                    "organic_crosscheck_mismatch",
                    self.settings.organic_penalty_amount,
                    f"organic job {record.job_uuid}: {detail} (check {check_id})",
                )
        report.duration_s = time.monotonic() - t0
        await self.store.finish_check(report, [])
        return report
