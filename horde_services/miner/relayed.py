"""The jobs a miner relays now and those that ended since it started, in memory (bounded): what
`horde miner jobs` shows beside the lifecycle receipts (horde_services/miner/admin.py)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from horde.v1 import common_pb2, miner_pb2, receipts_pb2

# Ended jobs the miner remembers (executor, result detail) besides what its receipts say.
REMEMBERED = 10_000

STARTED = receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED


@dataclass(eq=False)
class JobRecord:
    """One job the miner relays (or relayed, since it started)."""

    job_uuid: str
    validator: str
    executor_id: str
    executor_class: str
    job_kind: str
    started_ns: int = field(default_factory=time.time_ns)
    # In flight: the last state the executor reported; ended: the result's (unspecified when the
    # job ended without one: the validator went away, or the miner stopped).
    state: common_pb2.JobState.ValueType = common_pb2.JOB_STATE_ACCEPTED
    reason: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED
    detail: str = ""
    ended_ns: int = 0
    # Kinds of this job's receipts the validator countersigned (as relayed to the miner).
    countersigned: set[int] = field(default_factory=set)

    def to_proto(self, in_flight: bool) -> miner_pb2.RelayedJob:
        return miner_pb2.RelayedJob(
            job_uuid=self.job_uuid,
            validator_hotkey=self.validator,
            executor_id=self.executor_id,
            executor_class=self.executor_class,
            job_kind=self.job_kind,
            in_flight=in_flight,
            state=self.state,
            reason=self.reason,
            detail=self.detail,
            started_ns=self.started_ns,
            ended_ns=0 if in_flight else self.ended_ns,
            countersigned=STARTED in self.countersigned,
        )


class RelayedJobs:
    """The jobs the miner relays now and, the most recent `remember` of them, those that ended."""

    def __init__(self, remember: int = REMEMBERED) -> None:
        self._remember = remember
        self._in_flight: dict[JobRecord, None] = {}  # insertion order: oldest first
        self._ended: OrderedDict[str, JobRecord] = OrderedDict()

    def begin(self, record: JobRecord) -> JobRecord:
        self._in_flight[record] = None
        return record

    def end(self, record: JobRecord) -> None:
        self._in_flight.pop(record, None)
        record.ended_ns = record.ended_ns or time.time_ns()
        self._ended[record.job_uuid] = record
        self._ended.move_to_end(record.job_uuid)
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)

    def __len__(self) -> int:
        """How many jobs are in flight."""
        return len(self._in_flight)

    def in_flight(self) -> list[JobRecord]:
        """Newest first."""
        return sorted(self._in_flight, key=lambda r: r.started_ns, reverse=True)

    def ended(self, job_uuid: str) -> JobRecord | None:
        return self._ended.get(job_uuid)
