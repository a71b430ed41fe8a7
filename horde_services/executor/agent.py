"""The executor's link to its miner: dial out, send the manifest, heartbeat, run what comes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog
from horde.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    job_pb2,
    manifest_pb2,
    miner_pb2,
    synthetic_pb2,
)

from horde_services.core.auth import wrong_callee
from horde_services.core.config import TLSSettings
from horde_services.core.identity import Signer
from horde_services.core.proto_util import result
from horde_services.core.server import open_channel
from horde_services.executor.jobs import JobContext, OrganicJobRunner, Send
from horde_services.executor.streaming import StreamingJobRunner
from horde_services.executor.synthetic import InProcessSolver, SyntheticSolver, answer

log = structlog.get_logger("horde.executor.agent")
# How long a link waits for the miner to accept it (its initial metadata) before it sends the
# manifest anyway.
LINK_ACCEPT_WAIT_S = 5.0


def _report_crash(task: asyncio.Task[None]) -> None:
    """A job task that died of an error its runner did not turn into a result: say so in the
    log (as a JSON line), not as asyncio's "exception was never retrieved" on stderr."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("job_task_failed", error=repr(exc), exc_info=exc)


class ExecutorAgent:
    def __init__(
        self,
        signer: Signer,
        miner_address: str,
        miner_identity: str,
        manifest: manifest_pb2.ExecutorManifest,
        runner: OrganicJobRunner,
        synthetic: SyntheticSolver | None = None,
        tls: TLSSettings | None = None,
        streaming: StreamingJobRunner | None = None,
        on_link: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._streaming = streaming
        # Told when the link to the miner comes up (True) or goes down (False): health.
        self._on_link = on_link
        # TLS towards the miner when it serves TLS (tls.ca_file names the CA to trust).
        self._tls = tls if tls is not None and tls.ca_file else None
        self._signer = signer
        self._synthetic = synthetic or InProcessSolver()
        self._synthetic_tasks: set[asyncio.Task[None]] = set()
        self._address = miner_address
        self._miner = miner_identity
        self._manifest = manifest
        self._runner = runner
        self._job: asyncio.Task[None] | None = None
        self._job_uuid = ""
        self._inputs: asyncio.Queue[job_pb2.InputChunk] = asyncio.Queue()
        # What goes to the miner on the live link (None while the link is down).
        self._outbox: asyncio.Queue[executor_pb2.ConnectRequest | None] | None = None
        self.draining = False
        self.connected = asyncio.Event()
        self.executor_id = ""

    @property
    def proxy_endpoint(self) -> str:
        """Where gateways reach this executor's job proxy ("" without streaming)."""
        return self._streaming.proxy_endpoint if self._streaming is not None else ""

    async def run_forever(self) -> None:
        """Keep the link up, reconnecting with jittered backoff."""
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                await self._session()
                reason = "miner closed the link"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                wrong = wrong_callee(exc.details() or "")
                if exc.code() is grpc.StatusCode.UNAUTHENTICATED and wrong is not None:
                    # Not the link's trouble but this executor's setting: say which.
                    log.error(
                        "miner_identity_mismatch",
                        miner=self._address,
                        miner_identity=wrong[0],
                        answering=wrong[1],
                        hint="the miner at miner_address is not the miner_identity set: fix "
                        "either setting",
                    )
            self.connected.clear()
            await self._link_changed(False)
            await self._abort_job("link to the miner lost")
            if time.monotonic() - started > 10:
                backoff = 0.2
            log.warning(
                "link_down", miner=self._address, reason=reason, retry_in_s=round(backoff, 2)
            )
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 10.0)

    async def drain(self, timeout_s: float) -> None:
        """Shutting down: take no new job, tell the miner (the manifest says draining, so it
        routes jobs elsewhere), and give the running job up to `timeout_s` to end on its own and
        its last messages to reach the miner. A job still running after that is stopped by the
        shutdown (the miner reports it as executor_lost)."""
        self.draining = True
        self._manifest.draining = True
        outbox = self._outbox
        if outbox is not None:
            outbox.put_nowait(executor_pb2.ConnectRequest(manifest=self._manifest))
        job = self._job
        if job is None or job.done():
            return
        if timeout_s <= 0:
            log.warning("drain_skipped", job_uuid=self._job_uuid, reason="drain_timeout_s is 0")
            return
        log.info("draining", job_uuid=self._job_uuid, timeout_s=timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        done, _ = await asyncio.wait({job}, timeout=timeout_s)
        if not done:
            log.warning("drain_timed_out", job_uuid=self._job_uuid, timeout_s=timeout_s)
            return
        # The job's result is queued for the link: wait until it has been handed to gRPC.
        outbox = self._outbox
        if outbox is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(max(deadline, loop.time() + 1.0)):
                    await outbox.join()
        log.info("drained", job_uuid=self._job_uuid)

    async def stop_job(self, reason: str) -> None:
        """Shutting down (past the drain): stop the running job, as a cancel would, before its
        container is swept: killed under it, the job would end "failed: exited with status 137",
        the job's own fault, in the logs and metrics."""
        await self._abort_job(reason)

    async def _link_changed(self, up: bool) -> None:
        if up and self.draining:
            return  # shutting down: health stays NOT_SERVING whatever the link does
        if self._on_link is not None:
            try:
                await self._on_link(up)
            except Exception as exc:  # health is a report: never let it break the link
                log.warning("link_report_failed", error=repr(exc))

    async def _abort_job(self, reason: str, *, asked: bool = False) -> None:
        """Stop the running job: a warning, unless its validator `asked` for it (a client's
        cancel, the normal end of a streaming session)."""
        if self._job is not None and not self._job.done():
            level = log.info if asked else log.warning
            level("job_aborted", job_uuid=self._job_uuid, reason=reason)
            self._job.cancel()
            try:
                await self._job
            except asyncio.CancelledError:
                # The job's own cancellation is expected; ours (the executor shutting down
                # while the job cleans up) must go on, or the shutdown waits for the link.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:
                pass
        self._job = None

    async def _session(self) -> None:
        # None ends the request stream (the session is over): gRPC's own task that feeds the
        # call from it then ends too, instead of waiting on the queue until the process exits.
        outbox: asyncio.Queue[executor_pb2.ConnectRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[executor_pb2.ConnectRequest]:
            while (msg := await outbox.get()) is not None:
                yield msg
                # gRPC asks for the next message once it has written this one: done.
                outbox.task_done()
            outbox.task_done()

        async def send(msg: executor_pb2.ConnectRequest) -> None:
            outbox.put_nowait(msg)

        async with open_channel(
            self._address, signer=self._signer, callee=self._miner, tls=self._tls
        ) as channel:
            stub = executor_pb2_grpc.ExecutorLinkServiceStub(channel)
            call = stub.Connect(requests())
            heartbeat: asyncio.Task[None] | None = None
            self._outbox = outbox
            try:
                # The miner sends its initial metadata once it accepted the link; a refusal
                # (say, a key it does not enrol) then ends the call with its own status, with no
                # write racing it. (A miner that sends none in time gets the manifest anyway.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LINK_ACCEPT_WAIT_S):
                        await call.initial_metadata()
                outbox.put_nowait(executor_pb2.ConnectRequest(manifest=self._manifest))
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "accepted":
                        self.executor_id = msg.accepted.executor_id
                        interval = msg.accepted.heartbeat_interval_s or 5.0
                        heartbeat = asyncio.create_task(self._heartbeat(send, interval))
                        self.connected.set()
                        log.info("link_up", miner=self._address, executor_id=self.executor_id)
                        await self._link_changed(True)
                    elif kind == "run_job":
                        await self._start_job(msg.run_job, send)
                    elif kind == "input_chunk":
                        self._inputs.put_nowait(msg.input_chunk)
                    elif kind == "extra_data" and self._streaming is not None:
                        self._streaming.extra_data(msg.extra_data, send)
                    elif kind == "cancel":
                        if msg.cancel.job_uuid == self._job_uuid:
                            await self._abort_job(msg.cancel.reason, asked=True)
                    elif kind == "synthetic_challenge":
                        self._start_synthetic(msg.synthetic_challenge, send)
            finally:
                self._outbox = None
                outbox.put_nowait(None)
                for task in self._synthetic_tasks:
                    task.cancel()
                if heartbeat is not None:
                    heartbeat.cancel()
                call.cancel()

    async def _heartbeat(self, send: Send, interval: float) -> None:
        while True:
            await send(
                executor_pb2.ConnectRequest(
                    heartbeat=executor_pb2.Heartbeat(
                        timestamp_ns=time.time_ns(), job_uuid=self._job_uuid
                    )
                )
            )
            await asyncio.sleep(interval)

    async def _start_job(self, start: miner_pb2.RunJobStart, send: Send) -> None:
        refusal = ""
        if self.draining:
            refusal = "executor is shutting down"
        elif self._job is not None and not self._job.done():
            refusal = "executor is already running a job"
        if refusal:
            await send(
                executor_pb2.ConnectRequest(
                    result=result(
                        start.job_uuid,
                        common_pb2.JOB_STATE_REJECTED,
                        common_pb2.FAILURE_REASON_BUSY,
                        common_pb2.STAGE_RESERVATION,
                        refusal,
                    )
                )
            )
            return
        streaming = start.job_kind == "streaming"
        if streaming and self._streaming is None:
            await send(
                executor_pb2.ConnectRequest(
                    result=result(
                        start.job_uuid,
                        common_pb2.JOB_STATE_REJECTED,
                        common_pb2.FAILURE_REASON_INVALID_SPEC,
                        common_pb2.STAGE_RESERVATION,
                        "this executor does not run streaming jobs",
                    )
                )
            )
            return
        self._inputs = asyncio.Queue()
        self._job_uuid = start.job_uuid
        ctx = JobContext(start=start, inputs=self._inputs, send=send)
        log.info(
            "job_started", job_uuid=start.job_uuid, image=start.spec.image, kind=start.job_kind
        )
        runner = self._streaming if streaming and self._streaming else self._runner
        self._job = asyncio.create_task(runner.run(ctx))
        self._job.add_done_callback(_report_crash)

    def _start_synthetic(
        self,
        challenge: synthetic_pb2.SyntheticChallenge,
        send: Callable[[executor_pb2.ConnectRequest], Awaitable[None]],
    ) -> None:
        """Solve beside any running job (the validator keeps the clock) and send the answer."""

        async def run() -> None:
            reply = await answer(self._synthetic, challenge)
            log.info(
                "synthetic_answered",
                challenge_id=challenge.challenge_id,
                ok=not reply.error,
                seconds=round((reply.finished_ns - reply.started_ns) / 1e9, 3),
            )
            await send(executor_pb2.ConnectRequest(synthetic_answer=reply))

        task = asyncio.create_task(run())
        self._synthetic_tasks.add(task)
        task.add_done_callback(self._synthetic_tasks.discard)
