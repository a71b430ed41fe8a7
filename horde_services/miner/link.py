"""ExecutorLinkService: executors dial in and keep one bidirectional stream open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from horde.v1 import executor_pb2, executor_pb2_grpc

from horde_services.core.errors import Aborted, InvalidArgument
from horde_services.core.server import current_caller
from horde_services.miner.pool import ExecutorConn, ExecutorPool
from horde_services.miner.synthetic import SyntheticCollector

log = structlog.get_logger("horde.miner.link")


class ExecutorLinkServicer(executor_pb2_grpc.ExecutorLinkServiceServicer):
    def __init__(self, pool: ExecutorPool, heartbeat_interval_s: float) -> None:
        self._pool = pool
        self._heartbeat_s = heartbeat_interval_s

    async def Connect(
        self,
        request_iterator: AsyncIterator[executor_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[executor_pb2.ConnectResponse]:
        identity = current_caller()
        # Accepted (authenticated and enrolled): say so at once. The executor writes its
        # manifest only then, so a refusal never races its first write (grpc.aio then reports a
        # generic INTERNAL error in place of the miner's reason).
        await context.send_initial_metadata(())
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "manifest":
            raise InvalidArgument("the first message on a link must be the executor's manifest")
        conn = ExecutorConn(
            executor_id=self._pool.executor_id_for(identity),
            identity=identity,
            manifest=first.manifest,
            peer=context.peer() or "",
        )
        self._pool.register(conn)
        reader = asyncio.create_task(self._read(conn, request_iterator))
        try:
            yield executor_pb2.ConnectResponse(
                accepted=executor_pb2.LinkAccepted(
                    executor_id=conn.executor_id, heartbeat_interval_s=self._heartbeat_s
                )
            )
            while True:
                msg = await conn.outbox.get()
                if msg is None:
                    if conn.replaced:
                        # The executor's log says why its link ended, not just that it did.
                        raise Aborted(conn.close_reason)
                    break
                yield msg
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._pool.unregister(conn, "link closed")

    async def _read(
        self, conn: ExecutorConn, requests: AsyncIterator[executor_pb2.ConnectRequest]
    ) -> None:
        reason, trouble = "executor closed the link", False
        try:
            async for msg in requests:
                conn.last_seen = time.monotonic()
                kind = msg.WhichOneof("payload")
                if kind == "manifest":
                    if msg.manifest.draining and not conn.manifest.draining:
                        log.info("executor_draining", executor_id=conn.executor_id)
                    conn.manifest = msg.manifest
                    self._pool.report()
                elif kind == "heartbeat":
                    continue
                elif kind == "synthetic_answer":
                    SyntheticCollector.for_pool(self._pool).deliver(conn, msg.synthetic_answer)
                elif conn.job is not None:
                    conn.job.inbox.put_nowait(msg)
                else:
                    log.warning("message_without_job", executor_id=conn.executor_id, kind=kind)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            reason, trouble = f"link broke: {exc}", True
        except asyncio.CancelledError:
            return
        conn.close(reason, trouble=trouble)
