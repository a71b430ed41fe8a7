"""The job proxy's stream protocol: length-framed protobuf messages over one TCP connection.

A streaming job answers many small requests, each crossing client -> gateway -> job proxy -> job
and back; a gRPC message costs a few hundred microseconds of CPU on each side, so the hop between
the gateway and the job proxy carries the same messages (horde/v1/job_proxy.proto) framed by hand
on a plain socket instead: a 4-byte big-endian length, then the serialized message.

* The caller (the session's gateway, or a validator replaying samples) opens with `StreamOpen`,
  signed like the x-horde-* metadata of a gRPC call (horde_services/core/auth.py) for method
  `PROXY_METHOD`; the proxy checks it with the executor's Authenticator (timestamp, nonce, policy).
* Then request frames go one way and response frames the other, as on the old gRPC stream.
* The proxy ends every stream with one `StreamEnd` (a gRPC status code and a message) and closes.
  The caller ends its side by half-closing (EOF); the proxy then answers what is in flight, sends
  `StreamEnd` with code OK and closes.

Integrity does not rest on the transport: every response's receipt is signed with the job's key,
certified by the miner, and checked by the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError, Message
from horde.v1 import job_proxy_pb2, streaming_pb2

from horde_services.core import metrics
from horde_services.core.auth import (
    H_CALLEE,
    H_CALLER,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    Authenticator,
    AuthFailure,
    call_signature,
)
from horde_services.core.errors import ConfigError, HordeError, InvalidArgument
from horde_services.core.identity import Identity, Signer
from horde_services.core.server import MAX_MESSAGE_BYTES

log = structlog.get_logger("horde.proxy_wire")

# The method name the open's signature covers (the job proxy's name since it was a gRPC service).
PROXY_METHOD = "/horde.v1.JobProxyService/Stream"
# A frame carries what one gRPC message brought the gateway, plus a few bytes of wrapping.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
OPEN_TIMEOUT_S = 10.0
# The `open` message (a job uuid, two identities, a nonce and a signature) is far smaller.
MAX_OPEN_BYTES = 4096
# How long a proxy waits for the caller to close after the end of a stream.
LINGER_S = 2.0
# Above this many unsent bytes a writer waits for the peer to read.
HIGH_WATER = 256 * 1024

_LEN = struct.Struct(">I")
M = TypeVar("M", bound=Message)


class ProxyError(Exception):
    """A proxy stream ended with a status other than OK (sent by the proxy, or the connection
    broke: UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    return _BY_VALUE.get(number, grpc.StatusCode.UNKNOWN)


def encode(msg: Message) -> bytes:
    data = msg.SerializeToString()
    return _LEN.pack(len(data)) + data


async def read_message(
    reader: asyncio.StreamReader, cls: type[M], limit: int = MAX_FRAME_BYTES
) -> M | None:
    """The next message (of at most `limit` bytes), or None at a clean end of stream (EOF
    between frames)."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise InvalidArgument("the stream ended inside a frame header") from None
        return None
    (size,) = _LEN.unpack(head)
    if size > limit:
        raise InvalidArgument(f"a frame of {size} bytes exceeds the limit of {limit}")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise InvalidArgument("the stream ended inside a frame") from None
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise InvalidArgument(f"a frame is not a valid {cls.DESCRIPTOR.name}") from None
    return msg


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"job proxy endpoint {endpoint!r}: expected host:port")
    return host.strip("[]"), int(port)


def signed_open(signer: Signer, callee: str, job_uuid: str) -> job_proxy_pb2.StreamOpen:
    ts, nonce, signature = call_signature(signer, PROXY_METHOD, callee)
    return job_proxy_pb2.StreamOpen(
        job_uuid=job_uuid,
        caller=str(signer.identity),
        callee=callee,
        timestamp_ns=ts,
        nonce=nonce,
        signature=signature,
    )


# ----------------------------------------------------------------------------------- the caller


class ProxyLink:
    """The caller's end of one proxy stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ended: ProxyError | None = None
        self.done = False  # the proxy ended the stream (OK or not)

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        *,
        signer: Signer,
        callee: str,
        job_uuid: str,
        timeout_s: float = OPEN_TIMEOUT_S,
    ) -> ProxyLink:
        """Connect and send the signed open (a refusal comes back on the first read)."""
        host, port = split_endpoint(endpoint)
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=MAX_FRAME_BYTES + 4
                )
        except (OSError, TimeoutError) as exc:
            raise ProxyError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to the job proxy at {endpoint}: {exc}"
            ) from None
        link = cls(reader, writer)
        link._writer.write(
            encode(job_proxy_pb2.StreamRequest(open=signed_open(signer, callee, job_uuid)))
        )
        return link

    async def write(self, frame: streaming_pb2.StreamRequestFrame) -> None:
        """Queue one request frame; waits only while the proxy is not reading."""
        if self._writer.is_closing():
            raise ProxyError(grpc.StatusCode.UNAVAILABLE, "the proxy stream is closed")
        self._writer.write(encode(job_proxy_pb2.StreamRequest(request=frame)))
        if self._writer.transport.get_write_buffer_size() > HIGH_WATER:
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                raise ProxyError(grpc.StatusCode.UNAVAILABLE, f"job proxy: {exc}") from None

    def done_writing(self) -> None:
        """No more requests: the proxy answers what is in flight, then ends the stream."""
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()

    async def read(self) -> streaming_pb2.StreamResponseFrame | None:
        """The next response frame; None once the proxy ended the stream with OK. Raises
        ProxyError when it ended otherwise (or the connection broke)."""
        if self._ended is not None:
            raise self._ended
        if self.done:
            return None
        try:
            msg = await read_message(self._reader, job_proxy_pb2.StreamResponse)
        except (InvalidArgument, ConnectionError) as exc:
            self._ended = ProxyError(grpc.StatusCode.UNAVAILABLE, f"job proxy stream broke: {exc}")
        else:
            if msg is None:
                self._ended = ProxyError(
                    grpc.StatusCode.UNAVAILABLE, "the job proxy closed the connection"
                )
            elif msg.WhichOneof("payload") == "response":
                return msg.response
            else:
                self.done = True
                self.close()
                code = status_code(msg.end.code)
                if code is grpc.StatusCode.OK:
                    return None
                self._ended = ProxyError(code, msg.end.message)
        self.done = True
        self.close()
        raise self._ended

    def __aiter__(self) -> AsyncIterator[streaming_pb2.StreamResponseFrame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[streaming_pb2.StreamResponseFrame]:
        while (frame := await self.read()) is not None:
            yield frame

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


# ------------------------------------------------------------------------------------ the proxy


class ResponseWriter:
    """The proxy's end: writes response frames to the caller."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, frame: streaming_pb2.StreamResponseFrame) -> None:
        self._writer.write(encode(job_proxy_pb2.StreamResponse(response=frame)))
        if self._writer.transport.get_write_buffer_size() > HIGH_WATER:
            await self._writer.drain()

    def end(self, code: grpc.StatusCode, message: str) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            end = job_proxy_pb2.StreamEnd(code=code.value[0], message=message)
            self._writer.write(encode(job_proxy_pb2.StreamResponse(end=end)))


# What serves one authenticated stream: caller, its open, its request frames, where to answer.
# Raising a HordeError ends the stream with that status; returning ends it with OK.
StreamHandler = Callable[
    [
        Identity,
        job_proxy_pb2.StreamOpen,
        AsyncIterator[streaming_pb2.StreamRequestFrame],
        ResponseWriter,
    ],
    Awaitable[None],
]


async def _request_frames(
    reader: asyncio.StreamReader,
) -> AsyncIterator[streaming_pb2.StreamRequestFrame]:
    while True:
        try:
            msg = await read_message(reader, job_proxy_pb2.StreamRequest)
        except ConnectionError:
            return  # the caller went away: the stream simply ends
        if msg is None:
            return
        if msg.WhichOneof("payload") != "request":
            raise InvalidArgument("only request frames may follow `open`")
        yield msg.request


class ProxyServer:
    """Serves proxy streams on a TCP port: authenticates each open, then runs the handler."""

    def __init__(
        self,
        handler: StreamHandler,
        authenticator: Authenticator,
        *,
        label: str = "job-proxy",
        open_timeout_s: float = OPEN_TIMEOUT_S,
    ) -> None:
        self._handler = handler
        self._auth = authenticator
        self._label = label
        self._open_timeout_s = open_timeout_s
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, listen: str) -> int:
        host, port = split_endpoint(listen)
        try:
            self._server = await asyncio.start_server(
                self._serve, host or None, port, limit=MAX_FRAME_BYTES + 4, backlog=1024
            )
        except OSError as exc:
            # Busy, or not an address of this machine: a restart cannot mend it.
            why = {
                errno.EADDRINUSE: "the address is in use",
                errno.EADDRNOTAVAIL: "the address is not one of this machine's",
            }.get(exc.errno or 0, exc.strerror or str(exc))
            raise ConfigError(
                f"invalid setting 'proxy_listen': the job proxy cannot listen on {listen}: {why}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("proxy_listening", service=self._label, host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        out = ResponseWriter(writer)
        code, message = grpc.StatusCode.OK, ""
        peer = writer.get_extra_info("peername")
        caller: Identity | None = None
        linger = True
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self._open_timeout_s):
                    # Small: nothing of size is read before the caller is known.
                    first = await read_message(reader, job_proxy_pb2.StreamRequest, MAX_OPEN_BYTES)
            except TimeoutError:
                raise InvalidArgument("no `open` within the time allowed") from None
            if first is None or first.WhichOneof("payload") != "open":
                raise InvalidArgument("the first message of a proxy stream must be `open`")
            opened = first.open
            caller = await self._auth.authenticate(
                PROXY_METHOD,
                [
                    (H_CALLER, opened.caller),
                    (H_CALLEE, opened.callee),
                    (H_TIMESTAMP, str(opened.timestamp_ns)),
                    (H_NONCE, opened.nonce),
                    (H_SIGNATURE, opened.signature.hex()),
                ],
            )
            await self._handler(caller, opened, _request_frames(reader), out)
        except AuthFailure as exc:
            code, message = exc.code, exc.reason
            metrics.AUTH_FAILURES.labels(self._label, code.name).inc()
        except HordeError as exc:
            code, message = exc.code, exc.message
        except ConnectionError:
            code, message = grpc.StatusCode.CANCELLED, "the caller went away"
        except asyncio.CancelledError:
            # Only stop() cancels a stream (the proxy is shutting down): it ends with the
            # reason, and its task returns. asyncio's stream server reads the task's outcome
            # with task.exception(), which raises for a cancelled task: a "CancelledError"
            # traceback in the log for every stream open at shutdown.
            code, message = grpc.StatusCode.UNAVAILABLE, "the job proxy is shutting down"
            linger = False
        except Exception as exc:
            log.exception("proxy_stream_failed", service=self._label)
            code, message = grpc.StatusCode.INTERNAL, f"job proxy error: {exc!r}"
        finally:
            self._conns.discard(task)
            out.end(code, message)
            # Counted as an RPC of the method the open is signed for (dashboards need no change).
            metrics.RPCS.labels(self._label, PROXY_METHOD, code.name).inc()
            metrics.RPC_SECONDS.labels(self._label, PROXY_METHOD).observe(
                time.perf_counter() - started
            )
            log.info(
                "proxy_stream",
                service=self._label,
                peer=str(peer),
                caller=str(caller) if caller else None,
                code=code.name,
                detail=message or None,
            )
            if linger:
                await _linger(reader, writer)
            writer.close()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read (and drop) until the caller closes too, for a little while: closing
    a socket with unread bytes sends a reset, which can destroy the `end` frame in flight."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass
