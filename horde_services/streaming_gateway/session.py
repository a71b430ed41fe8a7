"""One streaming session: open a job through the validator, relay requests to its job proxy and
responses back, check every receipt, end with a reason.

Three tasks feed one session: the validator's StartStreamingJob stream (start-up events, ready,
the job's end), the client's requests, and the job proxy's responses. Whichever sees the end first
settles `_end`; the session then tears everything down (proxy stream, job, extra-data uploads),
makes sure its receipts are stored and tells the client why it ended (SessionClosed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf.message import DecodeError
from horde.v1 import (
    common_pb2,
    gateway_pb2,
    job_pb2,
    receipts_pb2,
    streaming_pb2,
    validator_pb2,
)

from horde_services.core import metrics
from horde_services.core.auth import wrong_callee
from horde_services.core.errors import (
    FailedPrecondition,
    HordeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from horde_services.core.proto_util import (
    PLAIN_NAME_RULE,
    TERMINAL_STATES,
    event,
    plain_file_name,
    reason_name,
    state_name,
)
from horde_services.core.proxy_wire import ProxyError, ProxyLink
from horde_services.streaming_gateway.checks import (
    BadReceipt,
    CertificateError,
    ClockSkew,
    ReceiptChecker,
    check_certificate,
    check_client_clock,
)
from horde_services.streaming_gateway.store import ReceiptWriter, SampleRecord

log = structlog.get_logger("horde.gateway.session")
# Label children looked up once, not per receipt.
_RECEIPTS_VERIFIED = metrics.RECEIPTS.labels("verified")
_RECEIPTS_REJECTED = metrics.RECEIPTS.labels("rejected")

# Requests a session may have in flight (sent, not yet answered), and their bytes beyond the
# first: a client that sends on without reading the answers is refused past this (held in
# memory here and at the job proxy otherwise). StreamClient.pipeline's window is capped to fit.
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
# Extra-data uploads a session may have under way at once, and the bytes of one held for the
# validator at most (its default cap on one upload: a client sending faster than the validator
# takes them is never held back, as its requests share the stream).
MAX_EXTRA_UPLOADS = 4
EXTRA_BUFFER_BYTES = 256 * 1024 * 1024
# A failed request's reason is passed on to the client cut to this many characters.
MAX_ERROR_CHARS = 4096
# Bodies larger than this are relayed and hashed but not kept for sampling.
MAX_SAMPLE_BYTES = 16 * 1024 * 1024
# Deadline slack on the long-lived calls, beyond the session's own limits.
CALL_SLACK_S = 60.0
# Deadline of the short calls made while a session ends.
END_CALL_TIMEOUT_S = 10.0
# How long a session whose proxy stream broke waits for the job's result (its real reason).
VERDICT_GRACE_S = 5.0


@dataclass(frozen=True)
class SessionConfig:
    gateway_identity: str
    validator_identity: str
    skew_ns: int
    sample_rate: float
    default_time_limit_s: int
    max_time_limit_s: int
    startup_timeout_s: float


class ValidatorLink(Protocol):
    """The gateway's calls to its validator (a stub in production, anything alike in tests)."""

    def StartStreamingJob(self, request: Any, *, timeout: float) -> Any: ...
    def StopStreamingJob(self, request: Any, *, timeout: float) -> Any: ...
    def AddExtraData(self, request_iterator: Any, *, timeout: float) -> Any: ...
    def ReportBadReceipt(self, request: Any, *, timeout: float) -> Any: ...


# Opens a proxy stream (horde_services/core/proxy_wire.py): (endpoint, proxy identity, job uuid).
ProxyDialer = Callable[[str, str, str], Awaitable[ProxyLink]]
# Why a miner may not serve sessions (None: it may).
MinerCheck = Callable[[str], Awaitable[str | None]]


@dataclass
class GatewayDeps:
    config: SessionConfig
    validator: ValidatorLink
    dial_proxy: ProxyDialer
    writer: ReceiptWriter
    miner_check: MinerCheck | None = None
    rng: random.Random = field(default_factory=random.SystemRandom)
    clock_ns: Callable[[], int] = time.time_ns


@dataclass
class _Ending:
    reason: str
    how: str  # the `ending` label of horde_gateway_sessions_total (a small fixed set)
    result: job_pb2.JobResult | None = None
    bad_receipt: BadReceipt | None = None
    error: HordeError | None = None  # ends the RPC with this status after SessionClosed
    client_gone: bool = False


@dataclass
class _Pending:
    """A request in flight: what the receipt will be checked against."""

    seq: int
    arrived_ns: int  # gateway clock when the client's first frame arrived (and went on)
    request_hash: Any = field(default_factory=hashlib.sha256)
    response_hash: Any = field(default_factory=hashlib.sha256)
    request_parts: list[bytes] | None = field(default_factory=list)
    response_parts: list[bytes] | None = field(default_factory=list)
    request_size: int = 0
    response_size: int = 0
    input_sha256: bytes | None = None  # set once the last request frame went out

    def add_request(self, body: bytes) -> None:
        self.request_hash.update(body)
        self.request_size += len(body)
        self.request_parts = _keep(self.request_parts, body, self.request_size)

    def add_response(self, body: bytes) -> None:
        self.response_hash.update(body)
        self.response_size += len(body)
        self.response_parts = _keep(self.response_parts, body, self.response_size)


@dataclass
class _Upload:
    """An extra-data file on its way to the validator."""

    queue: asyncio.Queue[streaming_pb2.ExtraData | None] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0  # sent by the client, not yet taken by the validator's call
    over: bool = False  # the upload ended (placed, refused or failed): later chunks are dropped
    task: asyncio.Task[None] | None = None
    refused: str = ""  # why the gateway itself stopped it


def _keep(parts: list[bytes] | None, body: bytes, total: int) -> list[bytes] | None:
    if parts is None or total > MAX_SAMPLE_BYTES:
        return None
    if body:
        parts.append(body)
    return parts


def _result_reason(result: job_pb2.JobResult) -> str:
    words = [state_name(result.state)]
    if result.reason:
        words.append(reason_name(result.reason))
    text = " ".join(words)
    return f"{text}: {result.detail}" if result.detail else text


# What connecting may add between a client signing its session's call and the call arriving.
OPEN_LATENCY_ALLOWANCE_NS = 2_000_000_000


def validator_refuses_gateway(exc: grpc.aio.AioRpcError) -> str | None:
    """Why the validator refuses this gateway itself, when it does (a setting of the gateway's
    or the validator's to mend: the identity it was given is another's, or it is not enrolled
    as a client there); None for any other failure."""
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
        wrong = wrong_callee(details)
        if wrong is not None:
            return (
                f"validator_identity is {wrong[0]}, but the validator at validator_address is "
                f"{wrong[1]}"
            )
    if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
        return (
            f"the validator does not enrol this gateway ({details}): add the gateway's identity "
            "to the validator's clients"
        )
    return None


def _rpc_error(exc: grpc.aio.AioRpcError | ProxyError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")


class Session:
    def __init__(
        self,
        deps: GatewayDeps,
        client: str,
        write: Callable[[gateway_pb2.SessionResponse], Awaitable[None]],
        *,
        called_ns: int | None = None,
    ) -> None:
        self._deps = deps
        self._cfg = deps.config
        self._client = client
        # When the client signed the session's call, by its clock (its authentication), and
        # when the call reached this gateway, by ours.
        self._called_ns = called_ns
        self._arrived_ns = deps.clock_ns()
        self._write_raw = write
        self._write_lock = asyncio.Lock()
        self._end: asyncio.Future[_Ending] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._validator_task: asyncio.Task[None] | None = None
        self._start_call: Any = None
        self._job_uuid = ""
        self._seen_job = ""  # the job's id from its events, before it is ready
        self._job_ended = False
        self._open: gateway_pb2.SessionOpen | None = None
        self._spec: job_pb2.JobSpec | None = None
        self._certificate: receipts_pb2.JobCertificate | None = None
        self._payload: receipts_pb2.JobCertificatePayload | None = None
        self._checker: ReceiptChecker | None = None
        self._proxy: ProxyLink | None = None
        self._ready = False
        self._next_seq = 1
        self._current: _Pending | None = None  # request whose frames are still arriving
        self._pending: dict[int, _Pending] = {}
        self._in_flight_bytes = 0  # request bytes of `_pending`
        self._idle = asyncio.Event()
        self._idle.set()
        self._extra: dict[str, _Upload] = {}  # extra-data uploads under way, by file name
        self._log = log.bind(client=client)

    # --- entry point ----------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[gateway_pb2.SessionRequest]) -> None:
        try:
            first = await anext(aiter(requests), None)
        except DecodeError as exc:  # bytes that are no SessionRequest: the client's error
            metrics.GATEWAY_SESSIONS.labels("refused").inc()
            raise InvalidArgument(f"a session message could not be parsed: {exc}") from None
        try:
            limit = self._check_open(first)
        except HordeError:
            metrics.GATEWAY_SESSIONS.labels("refused").inc()
            raise
        assert first is not None
        self._spec = job_pb2.JobSpec(
            image=first.open.image,
            executor_class=first.open.executor_class,
            env=dict(first.open.env),
            timeouts=job_pb2.StageTimeouts(execution_s=limit),
            streaming=job_pb2.StreamingSpec(),
        )
        self._log = self._log.bind(image=first.open.image)
        self._start_call = self._deps.validator.StartStreamingJob(
            validator_pb2.StartStreamingJobRequest(
                spec=self._spec,
                gateway_identity=self._cfg.gateway_identity,
                client_identity=self._client,
            ),
            timeout=self._cfg.startup_timeout_s + limit + CALL_SLACK_S,
        )
        self._validator_task = self._spawn(self._follow_validator())
        self._spawn(self._read_client(requests))
        try:
            ending = await self._end
            # A call cancelled during the teardown too (a client that half-closed or sent
            # SessionClose, then cancelled at once): the job must not outlive the session.
            await self._teardown(ending)
        except asyncio.CancelledError:
            self._abandon()
            raise
        if ending.client_gone:
            return
        await self._send_closed(ending)
        if ending.error is not None:
            raise ending.error

    def _check_open(self, first: gateway_pb2.SessionRequest | None) -> int:
        """The session's time limit, once its first message is a SessionOpen this gateway can
        serve."""
        if first is None or first.WhichOneof("payload") != "open":
            raise InvalidArgument("the first message of a session must be SessionOpen")
        if not self._cfg.validator_identity:
            raise FailedPrecondition("this gateway has no validator configured")
        self._open = first.open
        if not first.open.image:
            raise InvalidArgument("SessionOpen.image is required")
        if self._called_ns is not None:
            # Its first request would be refused for it: say so before a job is started. The
            # call was signed before its connection was made (a TLS handshake far away takes a
            # while): a client seemingly behind gets that much more.
            off = self._called_ns - self._arrived_ns
            allowed = self._cfg.skew_ns + (OPEN_LATENCY_ALLOWANCE_NS if off < 0 else 0)
            try:
                check_client_clock(self._called_ns, self._arrived_ns, allowed)
            except ClockSkew as exc:
                raise FailedPrecondition(f"session refused: {exc}") from None
        limit = first.open.time_limit_s or self._cfg.default_time_limit_s
        if limit > self._cfg.max_time_limit_s:
            raise InvalidArgument(
                f"time_limit_s {limit} exceeds this gateway's maximum {self._cfg.max_time_limit_s}"
            )
        return limit

    @property
    def job_uuid(self) -> str:
        """The session's job ("" before it is ready)."""
        return self._job_uuid

    def receipts_lost(self, error: str) -> None:
        """Receipts of this session could not be stored: end it rather than serve on with
        answers nobody can prove later."""
        reason = f"the gateway could not store the session's receipts ({error})"
        # The gateway's own failure, not a normal end: UNAVAILABLE (another gateway may serve).
        self._finish(_Ending(reason, "receipts_lost", error=Unavailable(reason)))

    def shut_down(self, reason: str) -> None:
        """End the session now with `reason` (the gateway is stopping): the job is stopped, the
        receipts stored, and the client gets SessionClosed with the reason."""
        self._finish(_Ending(reason, "gateway_shutdown"))

    # --- the three feeds --------------------------------------------------------------------

    async def _follow_validator(self) -> None:
        call = self._start_call
        try:
            async for msg in call:
                kind = msg.WhichOneof("payload")
                if kind == "event":
                    # The job's id is known from its first event (for the logs), before ready.
                    self._seen_job = self._seen_job or msg.event.job_uuid
                    if not self._ready:
                        await self._write(gateway_pb2.SessionResponse(event=msg.event))
                elif kind == "ready":
                    if self._ready:
                        self._finish(
                            _Ending("validator sent a second ready message", "validator_error")
                        )
                        return
                    await self._on_ready(msg.ready)
                elif kind == "result":
                    self._job_ended = True
                    self._job_uuid = self._job_uuid or msg.result.job_uuid
                    prefix = "job ended" if self._ready else "job did not start"
                    reason = f"{prefix}: {_result_reason(msg.result)}"
                    self._finish(
                        _Ending(
                            reason,
                            "job_ended" if self._ready else "job_not_started",
                            result=msg.result,
                            error=None if self._ready else _not_started(msg.result, reason),
                        )
                    )
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED and self._end.done():
                return
            self._job_ended = True  # the validator stops the job when this call breaks
            refused = validator_refuses_gateway(exc)
            if refused is not None and not self._ready:
                # Not for the client to retry: the gateway's operator must mend a setting.
                self._log.error("validator_refuses_gateway", why=refused)
                message = "the gateway is misconfigured: its validator refuses it (its operator "
                message += "must fix it; see the gateway's log)"
                self._finish(
                    _Ending(message, "validator_refused", error=FailedPrecondition(message))
                )
                return
            self._finish(self._validator_lost(f"validator: {_rpc_error(exc)}"))
            return
        self._job_ended = True
        self._finish(self._validator_lost("validator closed the job stream without a result"))

    def _validator_lost(self, reason: str) -> _Ending:
        # Before the session is ready (the validator refusing for now, e.g. shutting down, or
        # unreachable): UNAVAILABLE, a status a client retries on.
        error = None if self._ready else Unavailable(reason)
        return _Ending(reason, "validator_lost", error=error)

    async def _on_ready(self, ready: validator_pb2.StreamingJobReady) -> None:
        self._job_uuid = ready.job_uuid
        self._log = self._log.bind(job_uuid=ready.job_uuid)
        try:
            payload = check_certificate(
                ready.certificate,
                job_uuid=ready.job_uuid,
                validator_identity=self._cfg.validator_identity,
                endpoint=ready.proxy_endpoint,
                now_ns=self._deps.clock_ns(),
            )
            if self._deps.miner_check is not None:
                denial = await self._deps.miner_check(payload.miner_hotkey)
                if denial is not None:
                    raise CertificateError(denial)
        except CertificateError as exc:
            self._log.warning("certificate_rejected", reason=str(exc))
            self._finish(_Ending(f"job certificate rejected: {exc}", "certificate_rejected"))
            return
        self._certificate = ready.certificate
        self._payload = payload
        self._checker = ReceiptChecker.for_certificate(payload, self._cfg.skew_ns / 1e9)
        try:
            self._proxy = await self._deps.dial_proxy(
                ready.proxy_endpoint, ready.proxy_identity, ready.job_uuid
            )
        except ProxyError as exc:
            self._finish(_Ending(f"job proxy: {_rpc_error(exc)}", "proxy_lost"))
            return
        self._spawn(self._read_proxy())
        self._ready = True
        self._log.info("session_ready", miner=payload.miner_hotkey, proxy=ready.proxy_endpoint)
        await self._write(
            gateway_pb2.SessionResponse(
                ready=gateway_pb2.SessionReady(
                    job_uuid=ready.job_uuid, certificate=ready.certificate
                )
            )
        )

    async def _read_client(self, requests: AsyncIterator[gateway_pb2.SessionRequest]) -> None:
        try:
            async for msg in requests:
                kind = msg.WhichOneof("payload")
                if kind == "request":
                    await self._on_request(msg.request)
                elif kind == "extra_data":
                    await self._on_extra(msg.extra_data)
                elif kind == "close":
                    self._refuse_partial("closed the session")
                    await self._idle.wait()
                    self._finish(
                        _Ending(
                            f"closed by the client: {msg.close.reason}".rstrip(": "),
                            "client_closed",
                        )
                    )
                    return
                else:
                    raise InvalidArgument(f"unexpected {kind or 'empty'} message in a session")
        except HordeError as exc:
            self._finish(_Ending(exc.message, "client_error", error=exc))
            return
        except DecodeError as exc:  # bytes that are no SessionRequest: the client's error
            message = f"a session message could not be parsed: {exc}"
            self._finish(_Ending(message, "client_error", error=InvalidArgument(message)))
            return
        except ClockSkew as exc:
            # The client's clock must be fixed before it tries again.
            message = f"request {self._next_seq} refused: {exc}"
            self._finish(_Ending(message, "client_clock", error=FailedPrecondition(message)))
            return
        # The client half-closed: answer what is in flight, then end.
        try:
            self._refuse_partial("ended its stream")
        except HordeError as exc:
            self._finish(_Ending(exc.message, "client_error", error=exc))
            return
        await self._idle.wait()
        self._finish(_Ending("closed by the client", "client_closed"))

    def _refuse_partial(self, what: str) -> None:
        """A request whose last frame never came would hold the session (and its job) until its
        time limit: a close or end of stream in the middle of one is the client's error."""
        if self._current is not None:
            raise InvalidArgument(
                f"the client {what} in the middle of request {self._current.seq} (its last "
                "frame never came)"
            )

    async def _read_proxy(self) -> None:
        assert self._proxy is not None
        try:
            async for frame in self._proxy:
                await self._on_response(frame)
                if self._end.done():
                    return
        except ProxyError as exc:
            if self._end.done():
                return
            code = exc.code()
            if code is grpc.StatusCode.FAILED_PRECONDITION:
                self._finish(
                    _Ending(f"job proxy refused the request: {exc.details()}", "proxy_refused")
                )
            else:
                await self._verdict_or(_Ending(f"job proxy: {_rpc_error(exc)}", "proxy_lost"))
            return
        await self._verdict_or(_Ending("job proxy closed the stream", "proxy_lost"))

    async def _verdict_or(self, ending: _Ending) -> None:
        """The proxy stream ended without the session asking: the job itself has most likely
        ended (its time limit, its service or relay died), and the executor's result, on its
        way through the validator, says why better than the broken stream can. Wait a little
        for it, then end with `ending`."""
        task = self._validator_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(VERDICT_GRACE_S):
                    await asyncio.shield(self._end)
        self._finish(ending)

    # --- requests and responses -----------------------------------------------------------

    async def _on_request(self, frame: streaming_pb2.StreamRequestFrame) -> None:
        if not self._ready:
            raise FailedPrecondition("request sent before SessionReady")
        now = self._deps.clock_ns()
        current = self._current
        if current is None:
            if frame.seq != self._next_seq:
                raise InvalidArgument(f"request seq {frame.seq}: expected {self._next_seq}")
            if len(self._pending) >= MAX_IN_FLIGHT:
                raise ResourceExhausted(
                    f"request {frame.seq}: {len(self._pending)} requests are already in flight, "
                    f"the most a session may have: read their answers before sending more"
                )
            check_client_clock(frame.client_timestamp_ns, now, self._cfg.skew_ns)
            sampling = self._cfg.sample_rate > 0  # else the bodies are never kept
            current = _Pending(
                seq=frame.seq,
                arrived_ns=now,
                request_parts=[] if sampling else None,
                response_parts=[] if sampling else None,
            )
            self._current = current
            self._pending[frame.seq] = current
            self._idle.clear()
        elif frame.seq != current.seq:
            raise InvalidArgument(
                f"request seq {frame.seq} started before request {current.seq} ended"
            )
        if len(self._pending) > 1 and (
            self._in_flight_bytes + len(frame.body) > MAX_IN_FLIGHT_BYTES
        ):
            raise ResourceExhausted(
                f"request {frame.seq}: the requests in flight would pass {MAX_IN_FLIGHT_BYTES} "
                f"bytes, the most a session may have: read their answers before sending more"
            )
        current.add_request(frame.body)
        self._in_flight_bytes += len(frame.body)
        if frame.last:
            current.input_sha256 = current.request_hash.digest()
            self._current = None
            self._next_seq += 1
        assert self._proxy is not None
        try:
            # The gateway's own clock goes on: the proxy checks it against its own.
            frame.client_timestamp_ns = now
            await self._proxy.write(frame)
        except ProxyError as exc:
            # The proxy stream broke; its reader reports why.
            self._log.debug("proxy_write_failed", error=repr(exc))

    async def _on_response(self, frame: streaming_pb2.StreamResponseFrame) -> None:
        pending = self._pending.get(frame.seq)
        if pending is None:
            self._finish(
                _Ending(
                    f"job proxy answered request {frame.seq}, which is not in flight",
                    "proxy_error",
                )
            )
            return
        if frame.error:
            await self._on_failed(pending, frame)
            return
        pending.add_response(frame.body)
        if not frame.last:
            await self._write(
                gateway_pb2.SessionResponse(
                    response=streaming_pb2.StreamResponseFrame(
                        seq=frame.seq, body=frame.body, http_status=frame.http_status
                    )
                )
            )
            return
        received = self._deps.clock_ns()
        assert self._checker is not None
        try:
            if pending.input_sha256 is None:
                raise BadReceipt(f"receipt {frame.seq}: response ended before its request did")
            receipt = self._checker.check(
                frame.receipt if frame.HasField("receipt") else None,
                seq=frame.seq,
                input_sha256=pending.input_sha256,
                output_sha256=pending.response_hash.digest(),
                sent_ns=pending.arrived_ns,
                received_ns=received,
            )
        except BadReceipt as exc:
            _RECEIPTS_REJECTED.inc()
            self._log.warning("bad_receipt", seq=frame.seq, reason=exc.reason)
            if exc.receipt is None and frame.HasField("receipt"):
                exc.receipt = frame.receipt
            self._finish(_Ending(exc.reason, "bad_receipt", bad_receipt=exc))
            return
        _RECEIPTS_VERIFIED.inc()
        metrics.GATEWAY_LATENCY.observe((received - pending.arrived_ns) / 1e9)
        self._deps.writer.submit(receipt, self._maybe_sample(pending, frame))
        self._answered(pending)
        await self._write(gateway_pb2.SessionResponse(response=frame))

    async def _on_failed(self, pending: _Pending, frame: streaming_pb2.StreamResponseFrame) -> None:
        """The job's service gave this request no answer (the proxy's word): the client is told,
        no receipt is due, and the session goes on."""
        if not frame.last or frame.HasField("receipt") or pending.input_sha256 is None:
            self._finish(
                _Ending(f"job proxy failed request {frame.seq} out of turn", "proxy_error")
            )
            return
        metrics.GATEWAY_REQUESTS_FAILED.inc()
        self._log.info("request_failed", seq=frame.seq, error=frame.error[:500])
        self._answered(pending)
        await self._write(
            gateway_pb2.SessionResponse(
                response=streaming_pb2.StreamResponseFrame(
                    seq=frame.seq, last=True, error=frame.error[:MAX_ERROR_CHARS]
                )
            )
        )

    def _answered(self, pending: _Pending) -> None:
        del self._pending[pending.seq]
        self._in_flight_bytes -= pending.request_size
        if not self._pending:
            self._idle.set()

    def _maybe_sample(
        self, pending: _Pending, frame: streaming_pb2.StreamResponseFrame
    ) -> SampleRecord | None:
        # Drawn only now, after the response: the miner cannot know which requests are kept.
        rate = self._cfg.sample_rate
        if rate <= 0 or self._deps.rng.random() >= rate:
            return None
        if pending.request_parts is None or pending.response_parts is None:
            return None
        assert self._open is not None and self._payload is not None and self._spec is not None
        sample = gateway_pb2.Sample(
            job_uuid=self._job_uuid,
            image=self._open.image,
            image_digest=self._payload.image_digest,
            request=b"".join(pending.request_parts),
            response=b"".join(pending.response_parts),
            receipt=frame.receipt,
            certificate=self._certificate,
            streaming=self._spec.streaming,
        )
        return SampleRecord(self._job_uuid, frame.seq, sample.SerializeToString())

    # --- extra data -------------------------------------------------------------------------

    async def _on_extra(self, data: streaming_pb2.ExtraData) -> None:
        if not self._ready:
            raise FailedPrecondition("extra data sent before SessionReady")
        name = data.file_name
        if not plain_file_name(name):
            # That upload is refused (once, at its last chunk); the session goes on.
            if data.last:
                message = f"extra data file name {name!r}: {PLAIN_NAME_RULE}"
                refused = streaming_pb2.ExtraDataPlaced(
                    job_uuid=self._job_uuid, file_name=name, error=message
                )
                await self._extra_outcome(name, [refused], message)
            return
        upload = self._extra.get(name)
        if upload is None:
            under_way = sum(1 for u in self._extra.values() if not u.over)
            upload = _Upload(over=under_way >= MAX_EXTRA_UPLOADS)
            self._extra[name] = upload
            if upload.over:  # refused, once; its chunks are dropped until its last
                message = (
                    f"extra data {name} refused: {under_way} uploads are under way in this "
                    f"session, the most it may have at once"
                )
                await self._extra_outcome(
                    name,
                    [
                        streaming_pb2.ExtraDataPlaced(
                            job_uuid=self._job_uuid, file_name=name, error=message
                        )
                    ],
                    message,
                )
            else:
                upload.task = self._spawn(self._upload_extra(name, upload))
        # Never waits (the client's requests come on the same stream, and their timestamps
        # must not age behind a slow upload): buffered up to EXTRA_BUFFER_BYTES, past which the
        # upload is refused; dropped once the upload has ended (its outcome was sent).
        if not upload.over:
            if upload.queued_bytes + len(data.data) > EXTRA_BUFFER_BYTES:
                upload.over = True
                upload.refused = (
                    f"more than {EXTRA_BUFFER_BYTES} bytes of it arrived ahead of what the "
                    f"validator took"
                )
                assert upload.task is not None
                upload.task.cancel()
            else:
                upload.queued_bytes += len(data.data)
                upload.queue.put_nowait(data)
        if data.last:
            if not upload.over:
                upload.queue.put_nowait(None)
            del self._extra[name]

    async def _upload_extra(self, name: str, upload: _Upload) -> None:
        job_uuid = self._job_uuid
        queue = upload.queue

        async def chunks() -> AsyncIterator[validator_pb2.AddExtraDataRequest]:
            while (item := await queue.get()) is not None:
                upload.queued_bytes -= len(item.data)
                yield validator_pb2.AddExtraDataRequest(job_uuid=job_uuid, data=item)

        try:
            await self._place_extra(name, chunks())
        except asyncio.CancelledError:
            if not upload.refused:
                raise
            # Stopped here (cancelling its call: nothing is placed); the session goes on.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            message = f"extra data {name} refused: {upload.refused}"
            await self._extra_outcome(
                name,
                [streaming_pb2.ExtraDataPlaced(job_uuid=job_uuid, file_name=name, error=message)],
                message,
            )
        finally:
            upload.over = True
            while not queue.empty():  # nobody reads them now
                queue.get_nowait()
            upload.queued_bytes = 0

    async def _place_extra(
        self, name: str, chunks: AsyncIterator[validator_pb2.AddExtraDataRequest]
    ) -> None:
        job_uuid = self._job_uuid
        try:
            reply = await self._deps.validator.AddExtraData(
                chunks, timeout=self._cfg.max_time_limit_s + CALL_SLACK_S
            )
            outcomes = list(reply.placed) or [
                streaming_pb2.ExtraDataPlaced(job_uuid=job_uuid, file_name=name)
            ]
            message = f"extra data placed: {', '.join(reply.file_names) or name}"
        except grpc.aio.AioRpcError as exc:
            message = f"extra data {name} failed: {_rpc_error(exc)}"
            outcomes = [
                streaming_pb2.ExtraDataPlaced(job_uuid=job_uuid, file_name=name, error=message)
            ]
        await self._extra_outcome(name, outcomes, message)

    async def _extra_outcome(
        self, name: str, outcomes: list[streaming_pb2.ExtraDataPlaced], message: str
    ) -> None:
        """Tell the client how an upload went: for programs, then in words."""
        self._log.info("extra_data", file=name, outcome=message)
        for outcome in outcomes:
            await self._write(gateway_pb2.SessionResponse(extra_data_placed=outcome))
        await self._write(
            gateway_pb2.SessionResponse(
                event=event(
                    self._job_uuid,
                    common_pb2.JOB_STATE_RUNNING,
                    common_pb2.STAGE_EXECUTION,
                    message,
                )
            )
        )

    # --- plumbing ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("session_task_failed", error=repr(exc), exc_info=exc)
            self._finish(_Ending("internal gateway error", "internal", error=_Internal()))

    def _finish(self, ending: _Ending) -> None:
        if not self._end.done():
            self._end.set_result(ending)

    async def _write(self, msg: gateway_pb2.SessionResponse) -> None:
        try:
            async with self._write_lock:
                await self._write_raw(msg)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            self._log.info("client_gone", error=repr(exc))
            self._finish(_Ending("client went away", "client_gone", client_gone=True))

    def _abandon(self) -> None:
        """The client's RPC was cancelled: stop everything without waiting for anything.
        Cancelling the StartStreamingJob call stops the job (the validator's contract)."""
        for task in self._tasks:
            task.cancel()
        if self._start_call is not None:
            self._start_call.cancel()
        if self._proxy is not None:
            self._proxy.close()
        metrics.GATEWAY_SESSIONS.labels("cancelled").inc()
        self._log.info(
            "session_ended",
            job_uuid=self._job_uuid or self._seen_job or None,
            ending="cancelled",
            reason="the session's call was cancelled (by the client, or a gateway stopping)",
        )

    async def _teardown(self, ending: _Ending) -> None:
        """Stop everything the session started, store its receipts."""
        reason = ending.reason
        # The validator call stays up until the job is stopped: cancelling it would stop the job
        # too, but without a result to report.
        for task in self._tasks:
            if task is not self._validator_task:
                task.cancel()
        if self._proxy is not None:
            self._proxy.close()
        if ending.bad_receipt is not None and self._job_uuid:
            await self._report(ending.bad_receipt)
        if self._job_uuid and not self._job_ended:
            result = await self._stop_job(reason)
            if result is not None and ending.result is None:
                ending.result = result
        if self._start_call is not None:
            self._start_call.cancel()
        if self._validator_task is not None:
            self._validator_task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._proxy is not None:
            await self._proxy.aclose()
        try:
            await self._deps.writer.flush()
        except RuntimeError as exc:  # the database refused them (logged as receipts_lost)
            ending.reason += f"; its last receipts could not be stored ({exc})"
            ending.how = "receipts_lost"
        metrics.GATEWAY_SESSIONS.labels(ending.how).inc()
        self._log.info(
            "session_ended",
            job_uuid=self._job_uuid
            or self._seen_job
            or None,  # also when the job ended before it was ready
            ending=ending.how,
            reason=reason,
            bad_receipt=ending.bad_receipt is not None,
            requests=self._next_seq - 1,
        )

    async def _stop_job(self, reason: str) -> job_pb2.JobResult | None:
        try:
            reply = await self._deps.validator.StopStreamingJob(
                validator_pb2.StopStreamingJobRequest(job_uuid=self._job_uuid, reason=reason),
                timeout=END_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            # Cancelling the start call stops the job as well; the result is then unknown.
            self._log.warning("stop_streaming_job_failed", error=_rpc_error(exc))
            return None
        result: job_pb2.JobResult = reply.result
        return result if result.state in TERMINAL_STATES else None

    async def _report(self, bad: BadReceipt) -> None:
        try:
            await self._deps.validator.ReportBadReceipt(
                validator_pb2.ReportBadReceiptRequest(
                    job_uuid=self._job_uuid,
                    receipt=bad.receipt,
                    certificate=self._certificate,
                    reason=bad.reason,
                ),
                timeout=END_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                self._log.warning("report_bad_receipt_failed", error=_rpc_error(exc))

    async def _send_closed(self, ending: _Ending) -> None:
        closed = gateway_pb2.SessionClosed(
            reason=ending.reason, bad_receipt=ending.bad_receipt is not None
        )
        if ending.result is not None:
            closed.result.CopyFrom(ending.result)
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._write_raw(gateway_pb2.SessionResponse(closed=closed))


def _not_started(res: job_pb2.JobResult, reason: str) -> HordeError | None:
    """The call's status for a job that did not start, when a client may act on it: try again
    later (no free executor, the miner lost), not here (no executor of the class), or mend the
    spec (the validator found it invalid: the client's error). A job refused for its image, or
    ended another way, leaves the session's normal OK."""
    if res.reason in _TRY_LATER:
        return Unavailable(reason)
    if res.reason == common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS:
        return FailedPrecondition(reason)
    if res.reason == common_pb2.FAILURE_REASON_INVALID_SPEC:
        return InvalidArgument(reason)
    return None


_TRY_LATER = frozenset(
    {
        common_pb2.FAILURE_REASON_BUSY,
        common_pb2.FAILURE_REASON_MINER_UNREACHABLE,
        common_pb2.FAILURE_REASON_EXECUTOR_LOST,
    }
)


class _Internal(HordeError):
    code = grpc.StatusCode.INTERNAL

    def __init__(self) -> None:
        super().__init__("internal gateway error (logged by the gateway)")
