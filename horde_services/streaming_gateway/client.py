"""A client's side of a gateway session: open, requests one after another or pipelined (each
receipt checked here too, against the certificate the session announced), extra data, close.

Used by `horde stream`, the benchmark, the demo and the tests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, Literal, overload

import grpc
from horde.v1 import gateway_pb2, gateway_pb2_grpc, job_pb2, receipts_pb2, streaming_pb2

from horde_services.core.auth import sign_call
from horde_services.core.identity import Signer
from horde_services.core.receipts import StreamReceipt
from horde_services.streaming_gateway.checks import ReceiptChecker, check_certificate

# A session's call deadline: its time limit plus the gateway's start-up allowance (600 s) and
# some slack. Without a limit the gateway applies its own, which an operator may raise: the
# deadline then allows the longest one a gateway permits by default (a day); the gateway ends
# the session at its limit anyway.
SESSION_DEADLINE_SLACK_S = 600 + 120
DEFAULT_SESSION_DEADLINE_S = 86400 + SESSION_DEADLINE_SLACK_S
EXTRA_CHUNK = 1024 * 1024
# A request body larger than this goes as several frames (a gRPC message is capped at 8 MiB; the
# job proxy's own limit on a whole request, 64 MiB by default, is what bounds a body).
REQUEST_FRAME_BYTES = 1024 * 1024
SESSION_METHOD = "/horde.v1.GatewayService/Session"
# How long a write that failed waits for the reader to learn why the session ended.
END_READ_TIMEOUT_S = 5.0
# Requests a pipeline keeps in flight at most, and their bytes (unless one request alone is
# more): a gateway refuses a session more (its MAX_IN_FLIGHT and MAX_IN_FLIGHT_BYTES).
MAX_WINDOW = 64
MAX_WINDOW_BYTES = 120 * 1024 * 1024
# Response bytes read ahead of the caller before the reader waits for it to catch up.
INBOX_BYTES = 8 * 1024 * 1024


class SessionEnded(Exception):
    """The session ended (SessionClosed, or the RPC failed); `reason` says why."""

    def __init__(
        self,
        reason: str,
        closed: gateway_pb2.SessionClosed | None = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.closed = closed
        self.code = code


class RequestFailed(Exception):
    """The job's service gave request `seq` no answer (the job proxy's `reason`): no receipt
    comes for it, and the session goes on."""

    def __init__(self, seq: int, reason: str, latency_s: float) -> None:
        super().__init__(f"request {seq} failed: {reason}")
        self.seq = seq
        self.reason = reason
        self.latency_s = latency_s


class ExtraDataError(Exception):
    """An extra-data file was not placed, or not as sent; `placed` is the gateway's word."""

    def __init__(self, message: str, placed: streaming_pb2.ExtraDataPlaced | None = None) -> None:
        super().__init__(message)
        self.placed = placed


@dataclass(frozen=True)
class _Sent:
    """A request on its way: what its response and receipt are checked against."""

    seq: int
    input_sha256: bytes
    sent_ns: int  # wall clock, for the receipt's timestamps
    started: float  # perf_counter, for the latency
    size: int = 0  # body bytes


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Done-callback: a shielded write's error is read by its caller, or by nobody once the
    caller was cancelled (and then means the session ended, which the reader reports)."""
    if not task.cancelled():
        task.exception()


async def _aiter(items: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


@dataclass(frozen=True)
class Response:
    seq: int
    body: bytes
    http_status: int
    receipt: StreamReceipt
    latency_s: float


class StreamClient:
    """With `signer` and `callee`, the session call carries its own signed metadata, so `channel`
    can be a plain one (a signing interceptor puts every write of the stream through an extra
    queue and task); without them, `channel` must sign its calls itself."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        signer: Signer | None = None,
        callee: str | None = None,
        skew_s: float = 2.0,
        validator_identity: str | None = None,
        on_event: Callable[[job_pb2.JobEvent], None] | None = None,
        on_chunk: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self._stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self._signer = signer
        self._callee = callee
        self._skew_s = skew_s
        self._validator = validator_identity
        self._on_event = on_event
        self._on_chunk = on_chunk
        self._call: Any = None
        # Everything the gateway sends is read at once by one task (`_pump`), also while no
        # request is in flight: a session that ends while the client is idle (its time limit,
        # say) is known here at once, with the gateway's reason.
        # Bounded by bytes: a caller that stops reading makes the pump wait, and gRPC's flow
        # control then holds the gateway (and the job proxy) back instead of this process
        # buffering everything.
        self._inbox: asyncio.Queue[gateway_pb2.SessionResponse | None] = asyncio.Queue()
        self._inbox_bytes = 0
        self._inbox_room = asyncio.Event()
        self._inbox_room.set()
        self._pump_task: asyncio.Task[None] | None = None
        # One write at a time on the call (a pipeline's sender, an upload and close() may
        # write at once; grpc.aio fails overlapping writes with a generic INTERNAL error).
        self._write_lock = asyncio.Lock()
        # Set by close(): from then on the reader hands events to on_event itself and reads on
        # without waiting for the caller, until SessionClosed; responses to requests in flight
        # still reach their callers. `_receiving` counts the callers waiting for a response.
        self._closing = False
        self._receiving = 0
        self._ending: SessionEnded | None = None
        self._ended = asyncio.Event()
        self._checker: ReceiptChecker | None = None
        # Extra-data files being placed, by name: their outcomes, read by the pump.
        self._placements: dict[str, asyncio.Future[streaming_pb2.ExtraDataPlaced]] = {}
        self._seq = 0
        self.job_uuid = ""
        self.certificate: receipts_pb2.JobCertificatePayload | None = None
        self.closed: gateway_pb2.SessionClosed | None = None

    async def open(
        self,
        image: str,
        *,
        executor_class: str = "",
        time_limit_s: int = 0,
        env: dict[str, str] | None = None,
    ) -> gateway_pb2.SessionReady:
        if self._call is not None:
            raise RuntimeError("this StreamClient has opened its session already: one per client")
        deadline = (
            time_limit_s + SESSION_DEADLINE_SLACK_S if time_limit_s else DEFAULT_SESSION_DEADLINE_S
        )
        metadata = None
        if self._signer is not None and self._callee is not None:
            metadata = sign_call(self._signer, SESSION_METHOD, self._callee)
        self._call = self._stub.Session(timeout=deadline, metadata=metadata)
        try:
            return await self._open(image, executor_class, time_limit_s, env)
        except BaseException:
            # Refused, a certificate that does not check, or the caller gave up: the session
            # (and the job behind it) must not outlive this.
            self.cancel()
            raise

    async def _open(
        self, image: str, executor_class: str, time_limit_s: int, env: dict[str, str] | None
    ) -> gateway_pb2.SessionReady:
        # The gateway sends its initial metadata once it has accepted the call. Waiting for it
        # before the first write means a refusal (authentication, enrolment) is read as the
        # gateway's own status; a write racing the refusal would fail instead, and grpc.aio then
        # reports a generic INTERNAL error in place of the gateway's reason.
        await self._call.initial_metadata()
        if self._call.done():
            code = await self._call.code()
            self._end_with(SessionEnded(f"{code.name}: {await self._call.details()}", code=code))
            raise self._raised()
        self._pump_task = asyncio.ensure_future(self._pump())
        await self._send(
            gateway_pb2.SessionRequest(
                open=gateway_pb2.SessionOpen(
                    image=image,
                    executor_class=executor_class,
                    time_limit_s=time_limit_s,
                    env=env or {},
                )
            )
        )
        while True:
            msg = await self._read()
            kind = msg.WhichOneof("payload")
            if kind == "event":
                self._event(msg.event)
            elif kind == "ready":
                payload = check_certificate(
                    msg.ready.certificate,
                    job_uuid=msg.ready.job_uuid,
                    validator_identity=self._validator,
                )
                self.job_uuid = msg.ready.job_uuid
                self.certificate = payload
                self._checker = ReceiptChecker.for_certificate(payload, self._skew_s)
                return msg.ready
            else:
                raise SessionEnded(f"unexpected {kind} before the session was ready")

    def _opened(self) -> None:
        """Requests, uploads and events need a session that open() made ready."""
        if self._checker is None:
            raise RuntimeError("open() the session first")

    async def request(self, body: bytes) -> Response:
        """Send one request and wait for its whole response; check its receipt. RequestFailed
        when the job's service gave it no answer (the session goes on)."""
        self._opened()
        return await self._receive(await self._send_request(body))

    @overload
    def pipeline(
        self,
        bodies: AsyncIterable[bytes] | Iterable[bytes],
        *,
        window: int = 1,
        return_failures: Literal[False] = False,
    ) -> AsyncGenerator[Response, None]: ...

    @overload
    def pipeline(
        self,
        bodies: AsyncIterable[bytes] | Iterable[bytes],
        *,
        window: int = 1,
        return_failures: Literal[True],
    ) -> AsyncGenerator[Response | RequestFailed, None]: ...

    async def pipeline(
        self,
        bodies: AsyncIterable[bytes] | Iterable[bytes],
        *,
        window: int = 1,
        return_failures: bool = False,
    ) -> AsyncGenerator[Response | RequestFailed, None]:
        """Send the requests with up to `window` of them in flight (the job proxy answers them in
        order), yielding each response, receipt checked, in order. `window` 1 is one request
        after another; more keeps the session busy while answers travel back (a response's
        latency then includes its wait behind the ones before it). A request the job's service
        gave no answer to raises RequestFailed, or with `return_failures` is yielded as one in
        its place and the requests go on (as asyncio.gather's return_exceptions)."""
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1 to {MAX_WINDOW}")
        in_flight: collections.deque[_Sent] = collections.deque()
        slots = asyncio.Semaphore(window)
        sent_more = asyncio.Event()
        answered = asyncio.Event()

        async def send_all() -> None:
            try:
                requests = aiter(_aiter(bodies))
                while True:
                    await slots.acquire()
                    body = await anext(requests, None)
                    if body is None:
                        return
                    # Bytes in flight are bounded too (a gateway refuses a session more).
                    while in_flight and (
                        sum(s.size for s in in_flight) + len(body) > MAX_WINDOW_BYTES
                    ):
                        answered.clear()
                        await answered.wait()
                    in_flight.append(await self._send_request(body))
                    sent_more.set()
            finally:
                sent_more.set()

        sender = asyncio.ensure_future(send_all())
        try:
            while True:
                while not in_flight and not sender.done():
                    # Waiting for the caller's next request: a session that ends meanwhile
                    # ends this at once, not at the next request.
                    sent_more.clear()
                    more = asyncio.ensure_future(sent_more.wait())
                    ended = asyncio.ensure_future(self._ended.wait())
                    try:
                        await asyncio.wait({more, ended}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        more.cancel()
                        ended.cancel()
                    if not in_flight and self._ending is not None:
                        self._pass_events()  # what the gateway said before it ended
                        raise self._raised()
                if not in_flight:
                    sender.result()  # the requests ran out (or sending failed: raise why)
                    return
                response: Response | RequestFailed
                try:
                    response = await self._receive(in_flight[0])
                except RequestFailed as failed:
                    if not return_failures:
                        raise
                    response = failed
                in_flight.popleft()
                answered.set()
                yield response
                # Only now is the next request taken from `bodies`: with `window` 1 a prompt
                # for it comes after this answer was handled.
                slots.release()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, SessionEnded):
                await sender

    async def _send_request(self, body: bytes) -> _Sent:
        """Send one request: one frame, or REQUEST_FRAME_BYTES pieces when the body is larger."""
        self._opened()
        self._seq += 1
        sent = _Sent(
            self._seq, hashlib.sha256(body).digest(), time.time_ns(), time.perf_counter(), len(body)
        )
        if len(body) <= REQUEST_FRAME_BYTES:
            await self._send(
                gateway_pb2.SessionRequest(
                    request=streaming_pb2.StreamRequestFrame(
                        seq=sent.seq, client_timestamp_ns=sent.sent_ns, body=body, last=True
                    )
                )
            )
            return sent

        def frames() -> Iterator[gateway_pb2.SessionRequest]:
            view = memoryview(body)
            for offset in range(0, len(body), REQUEST_FRAME_BYTES):
                yield gateway_pb2.SessionRequest(
                    request=streaming_pb2.StreamRequestFrame(
                        seq=sent.seq,
                        client_timestamp_ns=time.time_ns(),
                        body=bytes(view[offset : offset + REQUEST_FRAME_BYTES]),
                        last=offset + REQUEST_FRAME_BYTES >= len(body),
                    )
                )

        # All its frames in a row (nothing else is written between them: a close, another
        # request), and to the end even when the caller stops waiting: half a request would end
        # the session as the client's error.
        writing = asyncio.ensure_future(self._send_all(frames()))
        writing.add_done_callback(_retrieved)
        await asyncio.shield(writing)
        return sent

    async def _receive(self, sent: _Sent) -> Response:
        """Read the response to `sent` (events may come between its frames); check its receipt."""
        assert self._checker is not None
        seq = sent.seq
        parts: list[bytes] = []
        self._receiving += 1  # close() leaves the inbox to those waiting for a response
        try:
            while True:
                msg = await self._read()
                kind = msg.WhichOneof("payload")
                if kind == "event":
                    self._event(msg.event)
                    continue
                if kind != "response":
                    raise SessionEnded(f"unexpected {kind} while waiting for response {seq}")
                frame = msg.response
                if frame.seq < seq:
                    continue  # the rest of a request whose caller stopped waiting for it
                if frame.seq != seq:
                    raise SessionEnded(f"response for request {frame.seq} while waiting for {seq}")
                if frame.error:
                    if not frame.last or frame.HasField("receipt"):
                        raise SessionEnded(f"malformed failure of request {seq} from the gateway")
                    raise RequestFailed(seq, frame.error, time.perf_counter() - sent.started)
                parts.append(frame.body)
                if self._on_chunk is not None and frame.body:
                    self._on_chunk(seq, frame.body)
                if frame.last:
                    break
        finally:
            self._receiving -= 1
        latency = time.perf_counter() - sent.started
        received_ns = time.time_ns()
        output = b"".join(parts)
        receipt = self._checker.check(
            frame.receipt if frame.HasField("receipt") else None,
            seq=seq,
            input_sha256=sent.input_sha256,
            output_sha256=hashlib.sha256(output).digest(),
            sent_ns=sent.sent_ns,
            received_ns=received_ns,
        )
        return Response(seq, output, frame.http_status, receipt, latency)

    async def add_extra(
        self, file_name: str, data: bytes, *, timeout_s: float | None = None
    ) -> streaming_pb2.ExtraDataPlaced:
        """Feed a file to the job and wait until the executor placed it read-only under
        /volume/extra/; returns the placement (size, sha256), checked against `data`. Raises
        ExtraDataError when it was not placed (or not as sent: the session goes on), ValueError
        when a file of that name is still being placed by this client, SessionEnded when the
        session ends first, TimeoutError after `timeout_s`."""
        self._opened()
        pending = self._placements.get(file_name)
        if pending is not None and not pending.done():
            raise ValueError(f"extra data {file_name!r} is still being placed")
        outcome: asyncio.Future[streaming_pb2.ExtraDataPlaced] = (
            asyncio.get_running_loop().create_future()
        )
        self._placements[file_name] = outcome
        try:
            await self.send_extra(file_name, data)
            ended: asyncio.Future[Any] = asyncio.ensure_future(self._ended.wait())
            waits: set[asyncio.Future[Any]] = {outcome, ended}
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            if not outcome.done():
                raise self._raised()
            placed = outcome.result()
        finally:
            if self._placements.get(file_name) is outcome:
                del self._placements[file_name]
        if placed.error:
            raise ExtraDataError(placed.error, placed)
        digest = hashlib.sha256(data).hexdigest()
        if placed.sha256 and (placed.sha256, placed.size_bytes) != (digest, len(data)):
            raise ExtraDataError(
                f"extra data {file_name!r} was placed as {placed.size_bytes} bytes with sha256 "
                f"{placed.sha256}; {len(data)} bytes with sha256 {digest} were sent",
                placed,
            )
        return placed

    async def send_extra(self, file_name: str, data: bytes) -> None:
        """Feed a file to the job (placed read-only under /volume/extra/) without waiting for
        it to be placed; the gateway says when it is, with an event (`add_extra` waits)."""
        self._opened()
        offsets = range(0, max(len(data), 1), EXTRA_CHUNK)
        for offset in offsets:
            chunk = data[offset : offset + EXTRA_CHUNK]
            await self._send(
                gateway_pb2.SessionRequest(
                    extra_data=streaming_pb2.ExtraData(
                        file_name=file_name,
                        offset=offset,
                        data=chunk,
                        last=offset + EXTRA_CHUNK >= len(data),
                    )
                )
            )

    async def next_event(self) -> job_pb2.JobEvent:
        if self._call is None:
            raise RuntimeError("open() the session first")
        msg = await self._read()
        if msg.WhichOneof("payload") != "event":
            raise SessionEnded(f"unexpected {msg.WhichOneof('payload')} while waiting for an event")
        return msg.event

    async def close(self, reason: str = "") -> gateway_pb2.SessionClosed | None:
        """Ask the gateway to end the session; returns its SessionClosed."""
        if self._call is None:
            return None
        if self._ending is None:
            # The gateway answers the requests in flight, then sends SessionClosed. The reader
            # takes it all: responses still reach the callers waiting for them (this reads
            # none of them), events go to on_event, and it no longer waits for a caller. The
            # events queued so far go first, so on_event sees them all in order.
            self._pass_events()
            self._closing = True
            self._inbox_room.set()
            try:
                await self._send(
                    gateway_pb2.SessionRequest(close=gateway_pb2.SessionClose(reason=reason))
                )
            except SessionEnded:
                pass
            await self._ended.wait()
        self._pass_events()  # queued before the end, with nobody left to read them
        # Our side ends too: on a channel with interceptors (one that signs its calls) the call
        # feeds its writes through a task of grpc's own, which ends only with the writes.
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
            await self._call.done_writing()
        self.cancel()
        return self.closed

    def cancel(self) -> None:
        """End the session now (the gateway stops its job)."""
        if self._call is not None:
            self._call.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        if self.closed is not None:  # it had ended already, in the gateway's words
            self._end_with(SessionEnded(self.closed.reason, self.closed))
        else:
            self._end_with(
                SessionEnded("the session was cancelled", code=grpc.StatusCode.CANCELLED)
            )

    @property
    def ending(self) -> SessionEnded | None:
        """Why the session ended, once it has (None while it lives)."""
        return self._ending

    async def wait_ended(self) -> SessionEnded:
        """Wait until the session ends (the gateway's SessionClosed, or the call's end) and
        return why; it may end at any time, also while no request is in flight."""
        await self._ended.wait()
        assert self._ending is not None
        return self._ending

    # --- plumbing -----------------------------------------------------------------------

    def _event(self, event: job_pb2.JobEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def _send(self, msg: gateway_pb2.SessionRequest) -> None:
        await self._send_all((msg,))

    async def _send_all(self, msgs: Iterable[gateway_pb2.SessionRequest]) -> None:
        """Write the messages in a row: one write at a time on the call (grpc.aio fails
        overlapping writes), and nothing of another writer's between these."""
        if self._ending is not None:
            raise self._raised()
        try:
            async with self._write_lock:
                for msg in msgs:
                    await self._call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError):
            # The write lost a race with the session's end (e.g. its time limit while the
            # client was idle): the reader has, or soon will have, the gateway's reason.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(END_READ_TIMEOUT_S):
                    await self._ended.wait()
            if self._ending is None:
                raise
            raise self._raised() from None

    async def _read(self) -> gateway_pb2.SessionResponse:
        msg = await self._inbox.get()
        if msg is None:
            self._inbox.put_nowait(None)  # for whoever reads next
            raise self._raised()
        if msg.HasField("response"):
            self._inbox_bytes -= len(msg.response.body)
            if self._inbox_bytes <= INBOX_BYTES:
                self._inbox_room.set()
        return msg

    def _pass_events(self) -> None:
        """Hand the events queued so far to `on_event` (close(), or the session has ended);
        responses stay queued, in order, for the callers waiting for them."""
        kept: list[gateway_pb2.SessionResponse | None] = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                break
            if msg is not None and msg.HasField("event"):
                self._event(msg.event)
            else:
                kept.append(msg)
        for msg in kept:
            self._inbox.put_nowait(msg)

    def _end_with(self, ending: SessionEnded) -> None:
        """The session ended (the first reason found stands): wake every reader."""
        if self._ending is not None:
            return
        self._ending = ending
        self._ended.set()
        self._inbox.put_nowait(None)

    def _raised(self) -> SessionEnded:
        """A fresh exception for why the session ended (each raise gets its own traceback)."""
        assert self._ending is not None
        e = self._ending
        return SessionEnded(e.reason, e.closed, e.code)

    async def _final_code(self) -> grpc.StatusCode | None:
        """After SessionClosed: the call's status, which follows at once (OK, or the error the
        session ended with, e.g. INVALID_ARGUMENT for a client's mistake)."""
        try:
            async with asyncio.timeout(END_READ_TIMEOUT_S):
                while await self._call.read() is not grpc.aio.EOF:
                    pass  # nothing is sent after SessionClosed
                code: grpc.StatusCode = await self._call.code()
                return code
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except TimeoutError:
            return None

    async def _pump(self) -> None:
        """Read everything the gateway sends into the inbox until the session ends."""
        ending: SessionEnded | None = None
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    code = await self._call.code()
                    if code is not grpc.StatusCode.OK:
                        details = await self._call.details()
                        ending = SessionEnded(f"{code.name}: {details}", code=code)
                    else:
                        ending = SessionEnded("the gateway ended the session without a reason")
                    return
                kind = msg.WhichOneof("payload")
                if kind is None:
                    continue  # a payload kind this client does not know (a newer gateway's)
                if kind == "closed":
                    self.closed = msg.closed
                    ending = SessionEnded(msg.closed.reason, msg.closed, await self._final_code())
                    return
                if kind == "extra_data_placed":
                    outcome = self._placements.get(msg.extra_data_placed.file_name)
                    if outcome is not None and not outcome.done():
                        outcome.set_result(msg.extra_data_placed)
                    continue
                if self._closing and kind == "event":
                    self._event(msg.event)
                    continue
                self._inbox.put_nowait(msg)
                if kind == "response":
                    self._inbox_bytes += len(msg.response.body)
                    if self._inbox_bytes > INBOX_BYTES and not self._closing:
                        self._inbox_room.clear()
                        await self._inbox_room.wait()
        except grpc.aio.AioRpcError as exc:
            ending = self._from_rpc_error(exc)
        except asyncio.CancelledError:
            if self.closed is not None:  # cancelled while reading the status after SessionClosed
                ending = SessionEnded(self.closed.reason, self.closed)
            else:
                ending = SessionEnded("the session was cancelled", code=grpc.StatusCode.CANCELLED)
            raise
        finally:
            self._end_with(ending or SessionEnded("the session's reader failed"))

    @staticmethod
    def _from_rpc_error(exc: grpc.aio.AioRpcError) -> SessionEnded:
        return SessionEnded(f"{exc.code().name}: {exc.details()}", code=exc.code())
