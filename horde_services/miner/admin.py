"""MinerAdminService: the miner operator's read-only view of the jobs it relays (`horde miner
jobs`, and the job of each busy executor in `horde miner executors`).

Two sources, both already at hand: the jobs in flight and those that ended since the miner
started are in memory (`RelayedJobs`, bounded); the lifecycle receipts the miner stores for
validators (JOB_STARTED, JOB_FINISHED) give the history across restarts. A listing reads the
newest started receipts by primary key and the finished ones after the oldest of them: two
range reads, no table scan, whatever the table's size. Authentication lets only the miner's own
key and its `admins` call (horde_services/miner/app.py)."""

from __future__ import annotations

import grpc
from horde.v1 import miner_pb2, miner_pb2_grpc

from horde_services.miner.relayed import RelayedJobs
from horde_services.miner.service import ReceiptStore

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
# Extra started receipts read, so that jobs found in flight and dropped from the history do not
# leave the page short.
SLACK = 16


class MinerAdminServicer(miner_pb2_grpc.MinerAdminServiceServicer):
    def __init__(self, jobs: RelayedJobs, receipts: ReceiptStore) -> None:
        self._jobs = jobs
        self._receipts = receipts

    async def ListRelayedJobs(
        self, request: miner_pb2.ListRelayedJobsRequest, context: grpc.aio.ServicerContext
    ) -> miner_pb2.ListRelayedJobsResponse:
        if request.in_flight_only:
            return miner_pb2.ListRelayedJobsResponse(
                jobs=[r.to_proto(True) for r in self._jobs.in_flight()]
            )
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        rows = await self._receipts.recent_jobs(limit + len(self._jobs) + SLACK)
        # In flight as of now, after the read: a job that started meanwhile is listed here and
        # not in the history; one that ended meanwhile is in memory with its result.
        live = self._jobs.in_flight()
        out = [r.to_proto(True) for r in live]
        live_uuids = {r.job_uuid for r in live}
        history = [row for row in rows if row.started.job_uuid not in live_uuids][:limit]
        for row in history:
            started, finished = row.started, row.finished
            known = self._jobs.ended(started.job_uuid)
            job = miner_pb2.RelayedJob(
                job_uuid=started.job_uuid,
                validator_hotkey=started.validator_hotkey,
                executor_id=known.executor_id if known else "",
                executor_class=started.executor_class,
                job_kind=started.job_kind,
                in_flight=False,
                started_ns=started.timestamp_ns,
                countersigned=row.countersigned,
            )
            if finished is not None:
                job.state, job.reason, job.ended_ns = (
                    finished.state,
                    finished.reason,
                    finished.timestamp_ns,
                )
            elif known is not None:
                job.state, job.reason, job.ended_ns = known.state, known.reason, known.ended_ns
            if known is not None:
                job.detail = known.detail
            out.append(job)
        return miner_pb2.ListRelayedJobsResponse(jobs=out)
