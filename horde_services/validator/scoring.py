"""Scores and weights: synthetic results, organic outcomes and penalties over one epoch.

A miner's score over the window (the last epoch):

* synthetic: for each round in the window, the class weights of its executors that passed;
  summed and divided by the number of rounds in the window (a round the miner missed counts as
  zero), so the score is the hardware it proved, on average per round;
* organic: ``organic_completed_weight`` per organic job it completed, minus
  ``organic_failed_weight`` per job that ended ``horde_failed`` on it (the network's fault: the
  miner or its executor; a job's own failure is not the miner's). A job is on a miner once the
  miner took it (reserved an executor: its job-started receipt); the results the validator makes
  for it from then on name the miner as the miner's own results do (``executor_lost``), e.g.
  ``miner_unreachable`` when the miner went away mid-job or ``deadline_missed``. A job no miner
  took (busy, or unreachable at reservation) or that failed on the validator's side
  (``validator_restarted``, its own ``internal_error``) names no miner and counts against none;
* penalties: the sum of the amounts in the ``penalties`` table (the streaming checks add them);

floored at zero, then multiplied by the smallest factor of the miner's active sanctions (a spot
check that proves a wrong response cuts or zeroes the weight for a period; see
horde_services/validator/spotcheck.py). Weights are the scores normalised over registered miners,
set through the chain adapter every epoch (the local roster appends them to its ledger).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from horde.v1 import common_pb2

from horde_services.core import metrics
from horde_services.core.chain import ChainAdapter, normalise_weights
from horde_services.core.config import SyntheticSettings
from horde_services.core.db import (
    jobs,
    miner_sanctions,
    penalties,
    synthetic_results,
    synthetic_rounds,
    weight_settings,
)
from horde_services.core.identity import Identity
from horde_services.validator.synthetic import SyntheticStore

log = structlog.get_logger("horde.validator.scoring")


@dataclass(frozen=True)
class MinerScore:
    miner: str  # identity string
    ss58: str
    synthetic: float
    organic: float
    penalty: float
    reason: str
    weight: float = 0.0
    factor: float = 1.0  # smallest factor of the active sanctions (1: none)

    @property
    def score(self) -> float:
        return max(0.0, self.synthetic + self.organic - self.penalty) * self.factor


@dataclass(frozen=True)
class Scores:
    miners: tuple[MinerScore, ...]
    window_s: float
    rounds: int
    weights_error: str = ""  # why no weights could be derived ("" when they could)


@dataclass(frozen=True)
class WeightsSet:
    reference: str
    created_ns: int


def _ss58(identity: str) -> str:
    try:
        return Identity.parse(identity).ss58
    except Exception:
        return ""


async def add_penalty(
    store: SyntheticStore, miner: str, kind: str, amount: float, reason: str, evidence: bytes = b""
) -> None:
    """Record a penalty against a miner (the hook the streaming checks use)."""
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"penalty amount must be finite and >= 0, got {amount!r}")
    async with store.engine.begin() as conn:
        await conn.execute(
            penalties.insert().values(
                miner_hotkey=miner,
                kind=kind,
                amount=amount,
                reason=reason[:1000],
                evidence=evidence or None,
                created_ns=time.time_ns(),
            )
        )


class Scorer:
    def __init__(
        self, store: SyntheticStore, chain: ChainAdapter, settings: SyntheticSettings
    ) -> None:
        self._store = store
        self._chain = chain
        self._settings = settings

    async def scores(self, now_ns: int | None = None) -> Scores:
        """Every miner seen in the window, with its score, weight and the reason for both."""
        window_s = self._settings.epoch_s
        since = (now_ns or time.time_ns()) - int(window_s * 1e9)
        engine = self._store.engine
        # Rows of executors a round did not challenge (busy, shutting down, an unscored class)
        # and of miners it could not reach at all (no executor named).
        unchallenged = (synthetic_results.c.challenge_id == "").label("unchallenged")
        unreachable = (synthetic_results.c.executor_id == "").label("unreachable")
        async with engine.connect() as conn:
            rounds = int(
                (
                    await conn.execute(
                        sa.select(sa.func.count()).where(synthetic_rounds.c.started_ns >= since)
                    )
                ).scalar()
                or 0
            )
            results = (
                await conn.execute(
                    sa.select(
                        synthetic_results.c.miner_hotkey,
                        synthetic_results.c.executor_class,
                        synthetic_results.c.passed,
                        unchallenged,
                        unreachable,
                        sa.func.count(),
                    )
                    .join(synthetic_rounds, synthetic_rounds.c.round == synthetic_results.c.round)
                    .where(synthetic_rounds.c.started_ns >= since)
                    .group_by(
                        synthetic_results.c.miner_hotkey,
                        synthetic_results.c.executor_class,
                        synthetic_results.c.passed,
                        unchallenged,
                        unreachable,
                    )
                )
            ).fetchall()
            organic = (
                await conn.execute(
                    sa.select(jobs.c.miner_hotkey, jobs.c.state, sa.func.count())
                    .where(
                        jobs.c.updated_ns >= since,
                        jobs.c.miner_hotkey.is_not(None),
                        jobs.c.state.in_(
                            [common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_HORDE_FAILED]
                        ),
                    )
                    .group_by(jobs.c.miner_hotkey, jobs.c.state)
                )
            ).fetchall()
            penalty_rows = (
                await conn.execute(
                    sa.select(
                        penalties.c.miner_hotkey, sa.func.sum(penalties.c.amount), sa.func.count()
                    )
                    .where(penalties.c.created_ns >= since)
                    .group_by(penalties.c.miner_hotkey)
                )
            ).fetchall()
            sanction_rows = (
                await conn.execute(
                    sa.select(
                        miner_sanctions.c.miner_hotkey,
                        miner_sanctions.c.factor,
                        miner_sanctions.c.until_ns,
                        miner_sanctions.c.reason,
                    )
                    .where(miner_sanctions.c.until_ns > (now_ns or time.time_ns()))
                    .order_by(miner_sanctions.c.factor, miner_sanctions.c.id.desc())
                )
            ).fetchall()

        classes = self._settings.classes
        passed: dict[str, dict[str, int]] = defaultdict(dict)
        failed: dict[str, int] = defaultdict(int)
        skipped: dict[str, int] = defaultdict(int)
        missed: dict[str, int] = defaultdict(int)
        for miner, klass, ok, not_challenged, not_reached, count in results:
            if ok:
                passed[miner][klass] = int(count)
            elif not_reached:
                missed[miner] += int(count)
            elif not_challenged:
                skipped[miner] += int(count)
            else:
                failed[miner] += int(count)
        completed: dict[str, int] = defaultdict(int)
        horde_failed: dict[str, int] = defaultdict(int)
        for miner, state, count in organic:
            target = completed if state == common_pb2.JOB_STATE_COMPLETED else horde_failed
            target[miner] += int(count)
        pen = {m: (float(total or 0.0), int(n)) for m, total, n in penalty_rows}
        sanctions: dict[str, tuple[float, int, str]] = {}
        for miner, factor, until_ns, why in sanction_rows:
            sanctions.setdefault(miner, (float(factor), int(until_ns), str(why)))

        miners = sorted(
            {*passed, *failed, *skipped, *missed, *completed, *horde_failed, *pen, *sanctions}
        )
        out = []
        for miner in miners:
            by_class = passed.get(miner, {})
            synthetic = (
                sum(n * classes[k].weight for k, n in by_class.items() if k in classes) / rounds
                if rounds
                else 0.0
            )
            organic_score = (
                completed[miner] * self._settings.organic_completed_weight
                - horde_failed[miner] * self._settings.organic_failed_weight
            )
            penalty, n_pen = pen.get(miner, (0.0, 0))
            proved = ", ".join(
                f"{n}x {k} @{classes[k].weight:g}" if k in classes else f"{n}x {k} (unscored)"
                for k, n in sorted(by_class.items())
            )
            reason = (
                f"synthetic {synthetic:.3f}: {sum(by_class.values())} passed"
                f"{' (' + proved + ')' if proved else ''}, {failed[miner]} failed"
                + (
                    f", {skipped[miner]} not challenged (busy or unscored)"
                    if skipped[miner]
                    else ""
                )
                + (f", unreachable in {missed[miner]} round(s)" if missed[miner] else "")
                + f" over {rounds} round(s); organic {organic_score:+.3f}: "
                f"{completed[miner]} completed, {horde_failed[miner]} horde_failed; "
                f"penalties {_subtracted(penalty)} ({n_pen})"
            )
            factor = 1.0
            if miner in sanctions:
                factor, until_ns, why = sanctions[miner]
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until_ns / 1e9))
                reason += f"; weight x{factor:g} until {until}: {why}"
            out.append(
                MinerScore(
                    miner, _ss58(miner), synthetic, organic_score, penalty, reason, factor=factor
                )
            )
        weighted, error = await self._weigh(out)
        weighted.sort(key=lambda s: (-s.weight, -s.score, s.miner))
        for s in weighted:
            metrics.MINER_SCORE.labels(s.ss58 or s.miner).set(s.score)
            metrics.MINER_WEIGHT.labels(s.ss58 or s.miner).set(s.weight)
        return Scores(tuple(weighted), window_s, rounds, error)

    async def _weigh(self, scores: Sequence[MinerScore]) -> tuple[list[MinerScore], str]:
        raw = {s.ss58: s.score for s in scores if s.ss58}
        try:
            normalised = normalise_weights(raw, await self._chain.neurons())
        except ValueError as exc:
            return [_with(s, 0.0, s.reason) for s in scores], str(exc)
        out = []
        for s in scores:
            if s.ss58 in normalised.dropped:
                out.append(_with(s, 0.0, s.reason + "; not registered: no weight"))
            else:
                out.append(_with(s, normalised.by_hotkey.get(s.ss58, 0.0), s.reason))
        return out, ""

    async def set_weights(self) -> WeightsSet:
        """Score the epoch and set the weights through the chain adapter (raises ValueError when
        no registered miner has a positive score)."""
        scores = await self.scores()
        if scores.weights_error:
            raise ValueError(scores.weights_error)
        weights = {s.ss58: s.score for s in scores.miners if s.ss58 and s.weight > 0}
        reference = await self._chain.set_weights(weights)
        now = time.time_ns()
        async with self._store.engine.begin() as conn:
            await conn.execute(
                weight_settings.insert().values(
                    reference=reference,
                    weights_json=json.dumps(weights, sort_keys=True),
                    created_ns=now,
                )
            )
        log.info("weights_set", reference=reference, miners=len(weights))
        return WeightsSet(reference, now)

    async def last_weights(self) -> WeightsSet | None:
        async with self._store.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(weight_settings.c.reference, weight_settings.c.created_ns)
                    .order_by(weight_settings.c.id.desc())
                    .limit(1)
                )
            ).first()
        return WeightsSet(row.reference, row.created_ns) if row is not None else None

    async def run_forever(self) -> None:
        """Background loop: set weights once per epoch."""
        while True:
            await asyncio.sleep(self._settings.epoch_s)
            try:
                await self.set_weights()
            except ValueError as exc:
                log.warning("weights_not_set", reason=str(exc))


def _subtracted(amount: float) -> str:
    """A penalty total as the reason shows it: "-1.250", or "0" for one that rounds to nothing
    (zero-amount penalties, spotcheck.penalty_amount's default, are counted, not charged)."""
    text = f"{amount:.3f}"
    return "0" if float(text) == 0 else f"-{text}"


def _with(s: MinerScore, weight: float, reason: str) -> MinerScore:
    return MinerScore(s.miner, s.ss58, s.synthetic, s.organic, s.penalty, reason, weight, s.factor)
