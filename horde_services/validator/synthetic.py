"""Synthetic rounds: known-answer challenges for every executor a miner claims, all at once.

Challenge: find each secret ``s`` in ``[range_start, range_end)`` with
``sha256(salt || s as u64 big-endian)`` equal to one of the challenge's digests. The salt is
``sha256("horde.synthetic.v1\\0" || validator || "\\0" || miner || "\\0" || round || nonce)``: an
answer is bound to one miner and one round, and the random nonce makes every challenge fresh, so
answers from another miner or round (or a table of precomputed hashes) are worthless. Checking an
answer costs the validator one hash per digest.

Calibration (the defaults in ``horde_services.core.config.SyntheticSettings.classes``). The CPU
solver (``deploy/images/synthetic/solver.py``, also
``horde_services.executor.synthetic.solve_cpu``) scans the range with ``hashlib``:
``python -m horde_services.executor.synthetic --calibrate`` measured 1.46 M hashes/s on one core
of the development host (AMD EPYC, 2 vCPUs, no GPU). The secrets are uniform in the range, so
the last one is found near its end: a challenge costs about ``range_size`` hashes, plus the
``horde/synthetic`` container's start.

=========  ===========  =======  ==========  ==============================================
class      range_size   digests  deadline_s  genuine executor, measured on that host
=========  ===========  =======  ==========  ==============================================
cpu-small  2,000,000    8        20          1.67 s in the container, start included (the
                                             executor's own figure in `make demo`): 8%
cpu-large  8,000,000    8        20          ~5.5 s on one core at 1.46 M/s (27%); the
                                             solver splits the range over the cores the
                                             sandbox grants (``cpu_limit``)
=========  ===========  =======  ==========  ==============================================

The deadline leaves a genuine executor several times its need (a loaded host, a slow container
start), while one machine claiming two cpu-small executors must scan both ranges and a claim of
a class it is not is caught by the range being several times its rate. GPU classes are not in the
defaults: no GPU was available where these numbers were measured, so an operator adds
``[synthetic.classes.gpu-<model>]`` after timing the CUDA path of the image on that model (size
``range_size`` so the GPU needs about 15% of ``deadline_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import sqlalchemy as sa
import structlog
from horde.v1 import manifest_pb2, miner_pb2, synthetic_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import metrics
from horde_services.core.config import SyntheticClass, SyntheticSettings
from horde_services.core.db import synthetic_results, synthetic_rounds
from horde_services.core.identity import Identity
from horde_services.core.latency import gc_paused
from horde_services.validator.miners import MinerDirectory, MinerRef

log = structlog.get_logger("horde.validator.synthetic")

SALT_DOMAIN = b"horde.synthetic.v1\x00"
DIGEST_BYTES = 32
MAX_SECRET = 2**64


def make_salt(validator: str, miner: str, round_: int, nonce: bytes) -> bytes:
    """The challenge salt, bound to validator, miner and round, fresh by its nonce."""
    return hashlib.sha256(
        SALT_DOMAIN
        + validator.encode()
        + b"\x00"
        + miner.encode()
        + b"\x00"
        + round_.to_bytes(8, "big")
        + nonce
    ).digest()


def secret_digest(salt: bytes, secret: int) -> bytes:
    return hashlib.sha256(salt + secret.to_bytes(8, "big")).digest()


def build_challenge(
    *,
    validator: str,
    miner: str,
    round_: int,
    executor_class: str,
    difficulty: SyntheticClass,
    deadline_ns: int,
    rng: random.Random | secrets.SystemRandom | None = None,
) -> synthetic_pb2.SyntheticChallenge:
    """A fresh challenge for one executor; the validator keeps nothing but the challenge itself
    (the answer is checked by hashing)."""
    rng = rng or secrets.SystemRandom()
    size = difficulty.range_size
    count = min(difficulty.digests, size)
    # A random start: a table of precomputed hashes for a fixed range would be useless anyway
    # (the salt is fresh), but a random start also keeps ranges from lining up between executors.
    start = rng.randrange(0, MAX_SECRET - size)
    chosen = rng.sample(range(start, start + size), count)
    salt = make_salt(validator, miner, round_, rng.getrandbits(128).to_bytes(16, "big"))
    return synthetic_pb2.SyntheticChallenge(
        challenge_id=uuid.uuid4().hex,
        salt=salt,
        range_start=start,
        range_end=start + size,
        digests=[secret_digest(salt, s) for s in chosen],
        deadline_ns=deadline_ns,
        round=round_,
        executor_class=executor_class,
    )


def check_answer(
    challenge: synthetic_pb2.SyntheticChallenge, answer: synthetic_pb2.SyntheticAnswer
) -> str | None:
    """None when every secret is right; otherwise why not (a few hashes, no search)."""
    if answer.error:
        return f"executor error: {answer.error[:200]}"
    if answer.challenge_id != challenge.challenge_id:
        return "answer for another challenge"
    if len(answer.secrets) != len(challenge.digests):
        return f"wrong answer: {len(answer.secrets)} secrets for {len(challenge.digests)} digests"
    for index, (secret, digest) in enumerate(zip(answer.secrets, challenge.digests, strict=True)):
        if not challenge.range_start <= secret < challenge.range_end:
            return f"wrong answer: secret {index} is outside the range"
        if secret_digest(challenge.salt, secret) != digest:
            return f"wrong answer: secret {index} does not match its digest"
    return None


@dataclass(frozen=True)
class ExecutorVerdict:
    """The validator's judgement of one claimed executor in one round."""

    executor_id: str
    executor_class: str
    challenge_id: str
    passed: bool
    reason: str
    duration_s: float  # by the validator's clock, from sending the round to the answer
    executor_duration_s: float = 0.0  # what the executor reported (finished - started)

    def to_proto(self) -> synthetic_pb2.SyntheticVerdict:
        return synthetic_pb2.SyntheticVerdict(
            challenge_id=self.challenge_id,
            executor_id=self.executor_id,
            passed=self.passed,
            reason=self.reason,
            duration_s=self.duration_s,
            executor_duration_s=self.executor_duration_s,
        )


@dataclass(frozen=True)
class MinerOutcome:
    miner: str
    error: str = ""
    verdicts: tuple[ExecutorVerdict, ...] = ()

    @property
    def passed(self) -> int:
        return sum(1 for v in self.verdicts if v.passed)


@dataclass(frozen=True)
class RoundReport:
    round: int
    started_ns: int
    duration_s: float
    miners: tuple[MinerOutcome, ...] = field(default_factory=tuple)

    @property
    def executors(self) -> int:
        return sum(len(m.verdicts) for m in self.miners)


class SyntheticStore:
    """Rounds and per-executor results in the validator's database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def next_round(self) -> int:
        async with self.engine.connect() as conn:
            last = (await conn.execute(sa.select(sa.func.max(synthetic_rounds.c.round)))).scalar()
        return int(last or 0) + 1

    async def record(self, report: RoundReport) -> None:
        now = time.time_ns()
        rows = [
            {
                "round": report.round,
                "miner_hotkey": m.miner,
                "executor_id": v.executor_id,
                "executor_class": v.executor_class,
                "challenge_id": v.challenge_id,
                "passed": v.passed,
                "reason": v.reason[:500],
                "duration_s": v.duration_s,
                "executor_duration_s": v.executor_duration_s,
                "created_ns": now,
            }
            for m in report.miners
            for v in m.verdicts
        ]
        # A miner the round could not assess at all (unreachable, a bad manifest): one row with
        # no executor, so its score says why (a round without it counts as zero).
        rows += [
            {
                "round": report.round,
                "miner_hotkey": m.miner,
                "executor_id": "",
                "executor_class": "",
                "challenge_id": "",
                "passed": False,
                "reason": m.error[:500],
                "duration_s": 0.0,
                "executor_duration_s": 0.0,
                "created_ns": now,
            }
            for m in report.miners
            if m.error and not m.verdicts
        ]
        async with self.engine.begin() as conn:
            await conn.execute(
                synthetic_rounds.insert().values(
                    round=report.round,
                    started_ns=report.started_ns,
                    finished_ns=now,
                    miners=len(report.miners),
                    executors=report.executors,
                )
            )
            if rows:
                await conn.execute(synthetic_results.insert(), rows)


@dataclass
class _Pending:
    executor_class: str
    challenge: synthetic_pb2.SyntheticChallenge
    deadline_s: float


class RoundRunner:
    """Runs synthetic rounds: one at a time, on demand or on a jittered interval."""

    def __init__(
        self,
        validator: str,
        directory: MinerDirectory,
        store: SyntheticStore,
        settings: SyntheticSettings,
    ) -> None:
        self._validator = validator
        self._directory = directory
        self._store = store
        self._settings = settings
        self._lock = asyncio.Lock()

    async def run_forever(self) -> None:
        """Background loop: a round every interval_s +- jitter_s (the first after one interval,
        so restarts and short-lived test networks do not trigger rounds)."""
        while True:
            s = self._settings
            delay = max(1.0, s.interval_s + random.uniform(-s.jitter_s, s.jitter_s))
            await asyncio.sleep(delay)
            report = await self.run_round()
            log.info(
                "synthetic_round_done",
                round=report.round,
                miners=len(report.miners),
                executors=report.executors,
                passed=sum(m.passed for m in report.miners),
                duration_s=round(report.duration_s, 3),
            )

    async def run_round(self, miners: Sequence[MinerRef] | None = None) -> RoundReport:
        async with self._lock:
            round_ = await self._store.next_round()
            started_ns = time.time_ns()
            t0 = time.monotonic()
            refs = list(miners) if miners is not None else await self._directory.miners()
            # (Answers are timed by this clock: no collector pause among them; core/latency.py.)
            with gc_paused(collect_first=True):
                outcomes = await asyncio.gather(*(self._miner(ref, round_) for ref in refs))
            report = RoundReport(round_, started_ns, time.monotonic() - t0, tuple(outcomes))
            for outcome in report.miners:
                for v in outcome.verdicts:
                    outcome_label = "passed" if v.passed else "failed"
                    metrics.SYNTHETIC_VERDICTS.labels(v.executor_class, outcome_label).inc()
            await self._store.record(report)
            return report

    async def _miner(self, miner: MinerRef, round_: int) -> MinerOutcome:
        manifest, error = await self._directory.manifest_or_error(miner)
        if manifest is None:
            return MinerOutcome(miner.identity, error=f"manifest unavailable: {error}")
        if _canonical(manifest.miner_hotkey) != miner.identity:
            return MinerOutcome(
                miner.identity, error=f"manifest names another miner ({manifest.miner_hotkey})"
            )
        verdicts: dict[str, ExecutorVerdict] = {}
        pending: dict[str, _Pending] = {}
        now_ns = time.time_ns()
        for executor in manifest.executors:
            verdict = self._unchallenged(executor)
            if verdict is not None:
                verdicts[executor.executor_id] = verdict
                continue
            difficulty = self._settings.classes[executor.executor_class]
            pending[executor.executor_id] = _Pending(
                executor.executor_class,
                build_challenge(
                    validator=self._validator,
                    miner=miner.identity,
                    round_=round_,
                    executor_class=executor.executor_class,
                    difficulty=difficulty,
                    deadline_ns=now_ns + int(difficulty.deadline_s * 1e9),
                ),
                difficulty.deadline_s,
            )
        if pending:
            verdicts.update(await self._challenge(miner, round_, pending))
        ordered = tuple(verdicts[e.executor_id] for e in manifest.executors)
        return MinerOutcome(miner.identity, verdicts=ordered)

    def _unchallenged(self, executor: manifest_pb2.ExecutorManifest) -> ExecutorVerdict | None:
        """A verdict without a challenge for executors this round cannot assess."""
        reason = ""
        if executor.executor_class not in self._settings.classes:
            reason = f"class {executor.executor_class!r} is not scored by this validator"
        elif executor.busy:
            reason = "busy with a job (paid through organic outcomes)"
        elif executor.draining:
            reason = "shutting down"
        if not reason:
            return None
        return ExecutorVerdict(
            executor.executor_id, executor.executor_class, "", False, reason, 0.0
        )

    async def _challenge(
        self, miner: MinerRef, round_: int, pending: dict[str, _Pending]
    ) -> dict[str, ExecutorVerdict]:
        request = miner_pb2.RunSyntheticRoundRequest(
            round=round_,
            challenges=[
                miner_pb2.ExecutorChallenge(executor_id=eid, challenge=p.challenge)
                for eid, p in pending.items()
            ],
        )
        # The miner's whole stream lives under the longest class deadline (plus grace): a miner
        # that stalls or disconnects costs the round no more than that.
        budget = max(p.deadline_s for p in pending.values()) + self._settings.grace_s
        out: dict[str, ExecutorVerdict] = {}
        missing_reason = "missing: no answer before the deadline"
        sent = time.monotonic()
        call = self._directory.stub(miner).RunSyntheticRound(request, timeout=budget)
        try:
            async with asyncio.timeout(budget):
                async for resp in call:
                    arrived = time.monotonic() - sent
                    self._judge(resp.executor_id, resp.answer, arrived, pending, out)
                    for more in resp.more_answers:
                        self._judge(more.executor_id, more.answer, arrived, pending, out)
                    if len(out) == len(pending):
                        break
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                missing_reason = f"missing: miner stream ended ({exc.code().name})"
                log.info("synthetic_stream_failed", miner=miner.identity, code=exc.code().name)
        finally:
            call.cancel()
        elapsed = time.monotonic() - sent
        for eid, p in pending.items():
            if eid not in out:
                out[eid] = ExecutorVerdict(
                    eid, p.executor_class, p.challenge.challenge_id, False, missing_reason, elapsed
                )
        return out

    @staticmethod
    def _judge(
        executor_id: str,
        answer: synthetic_pb2.SyntheticAnswer,
        arrived: float,
        pending: dict[str, _Pending],
        out: dict[str, ExecutorVerdict],
    ) -> None:
        p = pending.get(executor_id)
        if p is None or executor_id in out:
            return  # not challenged, or a second answer: the first one counts
        executor_s = max(0.0, (answer.finished_ns - answer.started_ns) / 1e9)
        problem = check_answer(p.challenge, answer)
        if problem is None and arrived > p.deadline_s:
            problem = f"late: answered after {arrived:.3f}s, deadline {p.deadline_s:g}s"
        out[executor_id] = ExecutorVerdict(
            executor_id,
            p.executor_class,
            p.challenge.challenge_id,
            problem is None,
            problem or "passed",
            arrived,
            executor_s,
        )


def _canonical(identity: str) -> str:
    with contextlib.suppress(ValueError):
        return str(Identity.parse(identity))
    return identity
