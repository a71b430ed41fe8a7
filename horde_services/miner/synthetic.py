"""The miner's side of a synthetic round: hand every named executor its challenge at the same
moment, and stream the answers back as they arrive.

The miner keeps no clock of its own on the round: the validator does. It stops relaying when
every executor answered, when the latest challenge deadline (plus a little slack) has passed by
its own clock, or when the validator goes away.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator

import structlog
from horde.v1 import executor_pb2, miner_pb2, synthetic_pb2

from horde_services.core.errors import InvalidArgument
from horde_services.miner.pool import ExecutorConn, ExecutorPool

log = structlog.get_logger("horde.miner.synthetic")

# Time past the latest deadline the miner keeps relaying (clock differences between hosts).
DEADLINE_SLACK_S = 5.0
MAX_CHALLENGES = 100_000
MAX_BATCH = 500

Answer = tuple[str, synthetic_pb2.SyntheticAnswer]


class SyntheticCollector:
    """Routes executors' answers to the round waiting for them (one collector per pool)."""

    _by_pool: weakref.WeakKeyDictionary[ExecutorPool, SyntheticCollector] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        # challenge id -> (executor id expected to answer, the round's queue)
        self._waiting: dict[str, tuple[str, asyncio.Queue[Answer]]] = {}

    @classmethod
    def for_pool(cls, pool: ExecutorPool) -> SyntheticCollector:
        """The collector shared by the pool's link servicer and MinerService."""
        collector = cls._by_pool.get(pool)
        if collector is None:
            collector = cls._by_pool[pool] = cls()
        return collector

    def deliver(self, conn: ExecutorConn, answer: synthetic_pb2.SyntheticAnswer) -> None:
        waiting = self._waiting.get(answer.challenge_id)
        if waiting is None or waiting[0] != conn.executor_id:
            # Late (round over) or sent by an executor the challenge was not for.
            log.info(
                "synthetic_answer_dropped",
                executor_id=conn.executor_id,
                challenge_id=answer.challenge_id,
            )
            return
        del self._waiting[answer.challenge_id]
        waiting[1].put_nowait((conn.executor_id, answer))

    async def run(
        self, pool: ExecutorPool, request: miner_pb2.RunSyntheticRoundRequest
    ) -> AsyncIterator[miner_pb2.RunSyntheticRoundResponse]:
        _validate(request)
        queue: asyncio.Queue[Answer] = asyncio.Queue()
        targets: list[tuple[ExecutorConn, synthetic_pb2.SyntheticChallenge]] = []
        immediate: list[Answer] = []
        for item in request.challenges:
            conn = pool.get(item.executor_id)
            if conn is None or conn.closed:
                immediate.append(
                    (
                        item.executor_id,
                        synthetic_pb2.SyntheticAnswer(
                            challenge_id=item.challenge.challenge_id,
                            error="executor not connected to this miner",
                        ),
                    )
                )
                continue
            self._waiting[item.challenge.challenge_id] = (conn.executor_id, queue)
            targets.append((conn, item.challenge))
        # The same moment for every executor: all sends are queued before any await.
        for conn, challenge in targets:
            conn.send(executor_pb2.ConnectResponse(synthetic_challenge=challenge))
        log.info(
            "synthetic_round_started",
            round=request.round,
            sent=len(targets),
            unknown=len(immediate),
        )
        latest_ns = max(c.challenge.deadline_ns for c in request.challenges)
        budget = max(0.0, (latest_ns - time.time_ns()) / 1e9) + DEADLINE_SLACK_S
        try:
            for executor_id, answer in immediate:
                yield miner_pb2.RunSyntheticRoundResponse(executor_id=executor_id, answer=answer)
            remaining = len(targets)
            async with asyncio.timeout(budget):
                while remaining:
                    executor_id, answer = await queue.get()
                    resp = miner_pb2.RunSyntheticRoundResponse(
                        executor_id=executor_id, answer=answer
                    )
                    # Whatever else is already waiting goes in the same message.
                    while not queue.empty() and len(resp.more_answers) < MAX_BATCH:
                        more_id, more = queue.get_nowait()
                        resp.more_answers.add(executor_id=more_id, answer=more)
                    remaining -= 1 + len(resp.more_answers)
                    yield resp
        except TimeoutError:
            log.info("synthetic_round_expired", round=request.round)
        finally:
            for _, challenge in targets:
                self._waiting.pop(challenge.challenge_id, None)


def _validate(request: miner_pb2.RunSyntheticRoundRequest) -> None:
    if not request.challenges:
        raise InvalidArgument("challenges: at least one executor challenge is required")
    if len(request.challenges) > MAX_CHALLENGES:
        raise InvalidArgument(f"challenges: at most {MAX_CHALLENGES} per round")
    seen_executors: set[str] = set()
    seen_ids: set[str] = set()
    for index, item in enumerate(request.challenges):
        where = f"challenges[{index}]"
        if not item.executor_id:
            raise InvalidArgument(f"{where}.executor_id is required")
        if not item.challenge.challenge_id:
            raise InvalidArgument(f"{where}.challenge.challenge_id is required")
        if item.executor_id in seen_executors:
            raise InvalidArgument(f"{where}: executor {item.executor_id} is named twice")
        if item.challenge.challenge_id in seen_ids:
            raise InvalidArgument(f"{where}: challenge id {item.challenge.challenge_id} repeats")
        seen_executors.add(item.executor_id)
        seen_ids.add(item.challenge.challenge_id)
