"""The job proxy: one stream per running session, on the executor's proxy port, in the framed
protocol of horde_services/core/proxy_wire.py (horde/v1/job_proxy.proto's messages over TCP).

Only the gateway named when the session started may connect (`StreamSessions` is the proxy
port's allow policy, so every other caller is refused before a handler runs). For each request
the proxy checks the client's timestamp against its own clock, POSTs the body to the service in
the job's container (over the unix socket of the job's relay, see
horde_services/executor/streaming.py; with the keep-alive client of
horde_services/executor/http1.py), relays the response as it arrives and signs a receipt with
the job's key over exactly the bytes it forwarded and returned (DESIGN.md's 128-byte blob).

Requests are answered one after another in seq order, while the next ones are already read (and
their arrival time taken for `timestamp_from_ns`): receipts then never run backwards. A response
with a Content-Length goes back whole in one frame (split at 1 MiB) carrying the receipt; a chunked
response is relayed chunk by chunk as it arrives and ended by an empty frame with the receipt.

An answer the service sends before reading the whole request (a 413 for a body over its limit,
then a reset under the rest) is that request's answer, relayed and signed like any other, and the
session goes on. A request the service gives no answer to (it closes the connection, or breaks
its answer off) gets a last frame with `error` saying how and no receipt: a made-up HTTP answer
signed with the job's key would be a receipt for bytes the service never produced. The session
goes on with the next request, on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property

import grpc
import nacl.signing
import structlog
from horde.v1 import job_proxy_pb2, streaming_pb2

from horde_services.core.auth import timestamp_hint
from horde_services.core.errors import (
    FailedPrecondition,
    HordeError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from horde_services.core.identity import Identity
from horde_services.core.proxy_wire import ResponseWriter
from horde_services.core.receipts import sign_receipt
from horde_services.executor.http1 import Http1Client, HttpError, RequestCutOff

log = structlog.get_logger("horde.executor.proxy")

FRAME_BYTES = 1024 * 1024
# Requests read ahead of the one being answered, at most (and their bytes, beyond one request):
# twice what a gateway lets a session have in flight (streaming_gateway/session.py).
READ_AHEAD_REQUESTS = 128
READ_AHEAD_BYTES = 256 * 1024 * 1024

Clock = Callable[[], int]


class JobEnded(HordeError):
    code = grpc.StatusCode.UNAVAILABLE


@dataclass(eq=False)
class LiveStream:
    """What the proxy knows of one running streaming job. The key lives only here and is dropped
    by `close()`."""

    job_uuid: str
    gateway: str
    key: nacl.signing.SigningKey | None
    client: Http1Client  # keep-alive connection(s) to the job's relay socket
    request_path: str
    next_seq: int = 1
    closed_reason: str = ""
    stream: _ProxyStream | None = None  # the open proxy stream (one at a time)

    @cached_property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(self.job_uuid)

    @property
    def public_key(self) -> bytes:
        assert self.key is not None
        return bytes(self.key.verify_key)

    def close(self, reason: str) -> None:
        """The job ended: forget the key, end every open proxy stream with `reason`."""
        if self.closed_reason:
            return
        self.closed_reason = reason
        self.key = None
        if self.stream is not None:
            self.stream.end(self.ended())

    def ended(self) -> JobEnded:
        return JobEnded(f"the streaming job ended: {self.closed_reason}")


# What ends a proxy stream: an error ending the call, or None (done).
_Out = HordeError | None


class _ProxyStream:
    """One open proxy stream: the handler's task answers requests and writes to the call."""

    def __init__(
        self,
        pending: asyncio.Queue[_Request | _Out],
        task: asyncio.Task[object] | None,
        out: ResponseWriter,
    ) -> None:
        self.pending = pending
        self.task = task
        self.out = out
        self.ended: HordeError | None = None
        self.writing = False
        # Requests read ahead and not yet taken, and their bytes (bounded: see queue()).
        self.queued = 0
        self.queued_bytes = 0

    def queue(self, request: _Request) -> None:
        """Queue a request read ahead of the answers. A caller that sends on without reading
        them is refused past READ_AHEAD_REQUESTS or READ_AHEAD_BYTES (a gateway keeps its
        sessions under half of that), rather than held in memory without bound."""
        if self.queued >= READ_AHEAD_REQUESTS or (
            self.queued and self.queued_bytes + len(request.body) > READ_AHEAD_BYTES
        ):
            raise ResourceExhausted(
                f"request {request.seq}: {self.queued} requests ({self.queued_bytes} bytes) "
                f"are already waiting for their answers; the job proxy reads at most "
                f"{READ_AHEAD_REQUESTS} ({READ_AHEAD_BYTES} bytes) ahead"
            )
        self.queued += 1
        self.queued_bytes += len(request.body)
        self.pending.put_nowait(request)

    def taken(self, request: _Request) -> None:
        self.queued -= 1
        self.queued_bytes -= len(request.body)

    def end(self, exc: HordeError) -> None:
        """End the stream with `exc` now, even while a request waits on the job's service."""
        if self.ended is not None:
            return
        self.ended = exc
        self.pending.put_nowait(exc)
        if self.task is not None and not self.writing:
            self.task.cancel()

    async def write(self, frame: streaming_pb2.StreamResponseFrame) -> None:
        self.writing = True
        try:
            await self.out.write(frame)
        finally:
            self.writing = False
        if self.ended is not None:
            raise self.ended


class StreamSessions:
    """Running streaming jobs by uuid; also the executor listener's allow policy: a caller may
    connect while it is the gateway of a running session."""

    def __init__(self) -> None:
        self._jobs: dict[str, LiveStream] = {}

    def add(self, live: LiveStream) -> None:
        self._jobs[live.job_uuid] = live

    def remove(self, job_uuid: str, reason: str) -> None:
        live = self._jobs.pop(job_uuid, None)
        if live is not None:
            live.close(reason)

    def get(self, job_uuid: str) -> LiveStream | None:
        return self._jobs.get(job_uuid)

    def __contains__(self, job_uuid: object) -> bool:
        return job_uuid in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        who = str(caller)
        if any(live.gateway == who for live in self._jobs.values()):
            return None
        return f"{who} is not the gateway of a streaming session running on this executor"


@dataclass
class _Request:
    seq: int
    received_ns: int
    body: bytearray = field(default_factory=bytearray)


class JobProxy:
    """Serves the proxy streams of the running streaming jobs (a proxy_wire StreamHandler)."""

    def __init__(
        self,
        sessions: StreamSessions,
        *,
        skew_s: float = 2.0,
        max_request_bytes: int = 64 * 1024 * 1024,
        clock_ns: Clock = time.time_ns,
    ) -> None:
        self._sessions = sessions
        self._skew_ns = int(skew_s * 1e9)
        self._max_request = max_request_bytes
        self._clock = clock_ns

    async def __call__(
        self,
        caller_identity: Identity,
        opened: job_proxy_pb2.StreamOpen,
        requests: AsyncIterator[streaming_pb2.StreamRequestFrame],
        out: ResponseWriter,
    ) -> None:
        caller = str(caller_identity)
        job_uuid = opened.job_uuid
        live = self._sessions.get(job_uuid)
        if live is None:
            raise NotFound(f"no streaming job {job_uuid} is running on this executor")
        if caller != live.gateway:
            raise PermissionDenied(f"{caller} is not the gateway of streaming job {job_uuid}")
        if live.stream is not None:
            raise FailedPrecondition(f"streaming job {job_uuid} already has an open proxy stream")
        # Requests read ahead of the one being answered; an error (or None: done) ends the call.
        pending: asyncio.Queue[_Request | _Out] = asyncio.Queue()
        stream = _ProxyStream(pending, asyncio.current_task(), out)
        live.stream = stream
        reader = asyncio.create_task(self._read(live, requests, stream))
        try:
            try:
                if live.closed_reason:
                    raise live.ended()
                # Answered here, in the handler's own task, written straight to the call.
                while isinstance(item := await pending.get(), _Request):
                    stream.taken(item)
                    await self._forward(live, item, stream)
                if item is None:
                    return
                raise item
            except asyncio.CancelledError:
                # `LiveStream.close()` cancels a stream waiting on its job: end it with the reason.
                task = stream.task
                if stream.ended is None or task is None or task.uncancel() > 0:
                    raise
                raise stream.ended from None
            except HordeError as exc:
                log.info("proxy_stream_ended", job_uuid=job_uuid, reason=exc.message)
                raise
            except Exception as exc:
                log.exception("proxy_error", job_uuid=live.job_uuid)
                raise Unavailable(f"job proxy error: {exc!r}") from None
        finally:
            stream.task = None
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            live.stream = None

    async def _read(
        self,
        live: LiveStream,
        requests: AsyncIterator[streaming_pb2.StreamRequestFrame],
        stream: _ProxyStream,
    ) -> None:
        pending = stream.pending
        current: _Request | None = None
        try:
            async for frame in requests:
                now = self._clock()
                off = frame.client_timestamp_ns - now
                if abs(off) > self._skew_ns:
                    direction = "ahead of" if off > 0 else "behind"
                    raise FailedPrecondition(
                        f"request {frame.seq}: the client clock is {abs(off) / 1e9:.3f} s "
                        f"{direction} the job proxy's (allowed skew {self._skew_ns / 1e9:g} s)"
                        f"{timestamp_hint(frame.client_timestamp_ns, now)}"
                    )
                if current is None:
                    if frame.seq != live.next_seq:
                        raise InvalidArgument(f"request seq {frame.seq}: expected {live.next_seq}")
                    current = _Request(seq=frame.seq, received_ns=now)
                elif frame.seq != current.seq:
                    raise InvalidArgument(
                        f"request seq {frame.seq} started before request {current.seq} ended"
                    )
                if len(current.body) + len(frame.body) > self._max_request:
                    raise ResourceExhausted(
                        f"request {frame.seq} exceeds the job proxy's limit of "
                        f"{self._max_request} bytes"
                    )
                current.body += frame.body
                if frame.last:
                    live.next_seq += 1
                    stream.queue(current)
                    current = None
            if current is not None:
                raise InvalidArgument(f"the stream ended in the middle of request {current.seq}")
            pending.put_nowait(None)
        except HordeError as exc:
            pending.put_nowait(exc)

    async def _forward(
        self,
        live: LiveStream,
        request: _Request,
        stream: _ProxyStream,
    ) -> None:
        seq = request.seq
        digest = hashlib.sha256()

        async def emit(body: bytes, last: bool, status: int) -> None:
            frame = streaming_pb2.StreamResponseFrame(
                seq=seq, body=body, last=last, http_status=status
            )
            if last:
                key = live.key
                if key is None:
                    raise live.ended()
                receipt = sign_receipt(
                    key,
                    live.uuid,
                    seq,
                    request.received_ns,
                    self._clock(),
                    hashlib.sha256(request.body).digest(),
                    digest.digest(),
                )
                frame.receipt.CopyFrom(receipt.to_proto())
            await stream.write(frame)

        try:
            resp = await live.client.post(
                live.request_path, request.body, b"application/octet-stream"
            )
        except HttpError as exc:
            if live.closed_reason:
                raise live.ended() from None
            if isinstance(exc, RequestCutOff):
                why = (
                    f"the job's service closed the connection while request {seq} was being "
                    f"sent{exc.detail}: {exc.cause!r}"
                )
            else:
                why = f"the job's service did not answer request {seq}: {exc}"
            await self._failed(live, stream, seq, why)
            return
        try:
            status = resp.status
            held: bytes | None = None  # one piece held back: the last goes with the receipt
            async for piece in resp.iter_body(FRAME_BYTES):
                digest.update(piece)
                if held is not None:
                    await emit(held, False, status)
                held = piece
                if resp.chunked:  # token streaming: relay each chunk as it comes
                    await emit(held, False, status)
                    held = None
            await emit(held or b"", True, status)
        except HttpError as exc:
            if live.closed_reason:
                raise live.ended() from None
            await self._failed(
                live,
                stream,
                seq,
                f"the job's service broke off its answer to request {seq} (HTTP {resp.status}): "
                f"{exc}",
            )
        finally:
            resp.close()

    async def _failed(self, live: LiveStream, stream: _ProxyStream, seq: int, why: str) -> None:
        """The service gave request `seq` no (whole) answer: say so in that request's last
        frame, with no receipt (there is nothing to sign for: a made-up answer signed with the
        job's key would be a receipt for bytes the service never produced). The session goes
        on; if the service is gone for good, the job's end ends it."""
        log.info("request_failed", job_uuid=live.job_uuid, seq=seq, error=why)
        await stream.write(streaming_pb2.StreamResponseFrame(seq=seq, last=True, error=why))
