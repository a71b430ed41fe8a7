"""The miner's pool of connected executors: enrolment, reservation, liveness."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from horde.v1 import executor_pb2, manifest_pb2

from horde_services.core import metrics
from horde_services.core.errors import ResourceExhausted
from horde_services.core.identity import Identity

log = structlog.get_logger("horde.miner.pool")


class ExecutorLost:
    """Put in a job's inbox when its executor disconnects or stops heartbeating."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


JobMessage = executor_pb2.ConnectRequest | ExecutorLost


@dataclass
class JobChannel:
    """Messages from the executor about one job."""

    job_uuid: str
    inbox: asyncio.Queue[JobMessage] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class ExecutorConn:
    """One executor's live link."""

    executor_id: str
    identity: Identity
    manifest: manifest_pb2.ExecutorManifest
    outbox: asyncio.Queue[executor_pb2.ConnectResponse | None] = field(
        default_factory=asyncio.Queue
    )
    last_seen: float = field(default_factory=time.monotonic)
    job: JobChannel | None = None
    closed: bool = False
    peer: str = ""  # where the link comes from (gRPC's peer string)
    close_reason: str = ""
    replaced: bool = False  # closed because a newer link came with the same key
    trouble: bool = False  # closed for a fault (silence, a broken link), not an orderly end

    @property
    def busy(self) -> bool:
        return self.job is not None

    def send(self, msg: executor_pb2.ConnectResponse) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def close(self, reason: str, *, trouble: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.trouble = trouble
        self.outbox.put_nowait(None)
        if self.job is not None:
            self.job.inbox.put_nowait(ExecutorLost(reason))


class NoExecutorOfClass(ResourceExhausted):
    pass


class AllBusy(ResourceExhausted):
    pass


class MinerDraining(AllBusy):
    """The miner is shutting down: it takes no new job (validators are told to try elsewhere)."""


class ExecutorPool:
    def __init__(self) -> None:
        self._conns: dict[str, ExecutorConn] = {}
        self._reported: set[tuple[str, str]] = set()  # gauge labels set so far
        # The miner is shutting down: no new job is reserved, and the manifest lists every
        # executor as draining (validators count none of them free, synthetic rounds skip them).
        self.draining = False

    def drain(self) -> None:
        """Reserve nothing from now on (the jobs already reserved go on)."""
        if not self.draining:
            self.draining = True
            self.report()

    def executor_id_for(self, identity: Identity) -> str:
        # Stable across reconnects and unique per key.
        return "ex-" + identity.public_key.hex()[:16]

    def register(self, conn: ExecutorConn) -> None:
        old = self._conns.get(conn.executor_id)
        if old is not None and old is not conn:
            # A restarted executor whose old link is not yet known dead, or two executors
            # sharing one key (they then replace each other on every reconnect): say which.
            log.warning(
                "executor_replaced",
                executor_id=conn.executor_id,
                old_peer=old.peer,
                new_peer=conn.peer,
                old_had_job=old.job.job_uuid if old.job is not None else None,
                hint="two executors with one key replace each other: give each its own key",
            )
            old.replaced = True
            old.close(
                f"replaced by a newer link with this executor's key (from {conn.peer})",
                trouble=True,
            )
        self._conns[conn.executor_id] = conn
        log.info(
            "executor_connected",
            executor_id=conn.executor_id,
            executor_class=conn.manifest.executor_class,
        )
        self.report()

    def unregister(self, conn: ExecutorConn, reason: str, *, trouble: bool = False) -> None:
        conn.close(reason, trouble=trouble)
        if self._conns.get(conn.executor_id) is conn:
            del self._conns[conn.executor_id]
            why = conn.close_reason or reason  # the first reason given, e.g. "no heartbeat"
            # An orderly end is news; a link that went silent or broke is a warning.
            (log.warning if conn.trouble else log.info)(
                "executor_disconnected", executor_id=conn.executor_id, reason=why
            )
            self.report()

    def get(self, executor_id: str) -> ExecutorConn | None:
        return self._conns.get(executor_id)

    def all(self) -> list[ExecutorConn]:
        return list(self._conns.values())

    def reserve(self, executor_class: str, job_uuid: str) -> tuple[ExecutorConn, JobChannel]:
        if self.draining:
            raise MinerDraining("the miner is shutting down: it takes no new job")
        same_class = [
            c for c in self._conns.values() if c.manifest.executor_class == executor_class
        ]
        if not same_class:
            raise NoExecutorOfClass(f"no executor of class {executor_class!r} is connected")
        for conn in same_class:
            if not conn.busy and not conn.closed and not conn.manifest.draining:
                conn.job = JobChannel(job_uuid)
                self.report()
                return conn, conn.job
        draining = sum(1 for c in same_class if c.manifest.draining)
        raise AllBusy(
            f"all {len(same_class)} executor(s) of class {executor_class!r} are busy"
            + (f" ({draining} shutting down)" if draining else "")
        )

    def release(self, conn: ExecutorConn, job: JobChannel) -> None:
        if conn.job is job:
            conn.job = None
            self.report()

    def report(self) -> None:
        """Set the executors gauge from the links as they are now (after every change)."""
        counts: dict[tuple[str, str], int] = {}
        for conn in self._conns.values():
            draining = self.draining or conn.manifest.draining
            state = "draining" if draining else "busy" if conn.busy else "idle"
            key = (conn.manifest.executor_class, state)
            counts[key] = counts.get(key, 0) + 1
        for klass, state in list(self._reported):
            if (klass, state) not in counts:
                metrics.MINER_EXECUTORS.labels(klass, state).set(0)
        for (klass, state), n in counts.items():
            metrics.MINER_EXECUTORS.labels(klass, state).set(n)
        self._reported = set(counts) | self._reported

    def manifests(self) -> list[manifest_pb2.ExecutorManifest]:
        out = []
        for conn in self._conns.values():
            m = manifest_pb2.ExecutorManifest()
            m.CopyFrom(conn.manifest)
            m.executor_id = conn.executor_id
            m.busy = conn.busy
            m.draining = m.draining or self.draining
            m.executor_identity = str(conn.identity)
            out.append(m)
        return out

    def expire(self, timeout_s: float) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if now - conn.last_seen > timeout_s:
                self.unregister(conn, f"no heartbeat for {timeout_s:.0f}s", trouble=True)
