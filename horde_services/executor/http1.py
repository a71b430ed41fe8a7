"""A minimal HTTP/1.1 client for the job proxy's hot path: one persistent keep-alive connection
over the job's relay socket, plain asyncio streams, no per-request session machinery.

The proxy answers a job's requests one after another, so one connection is enough; a second
request while one is in flight simply opens another. Responses are read as they arrive, whether
framed by Content-Length, chunked, or ended by the connection closing; a connection is reused only
when its response was read to the end and did not ask to close. A request that finds its reused
connection closed by the service before any byte of the response came back is sent once more on
a fresh connection (what browsers and urllib3 do for idle keep-alive connections).

A service may answer before it has read the whole request (a 413 for a body over its limit) and
close, resetting the connection under the rest of a large body. The answer that came back is still
the request's answer: while a large body goes out, `_ResetGuard` keeps what was received readable
(asyncio would otherwise hand the reader the reset and drop it), and an answer whose framing says
it came whole is returned like any other. Its connection is not reused, nor is one whose large
body got an error answer (the service may not have read the rest, and may even take it for a
request and answer it). With no answer, `RequestCutOff` says the service closed the connection
while the request was being sent. Small bodies leave with their head in one write, as before, and
take none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

MAX_HEAD_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
SMALL_BODY_BYTES = 64 * 1024  # a smaller body leaves with its head in one write


class HttpError(Exception):
    """The service's answer could not be read as HTTP/1.1 (or the connection broke)."""


class RequestCutOff(HttpError):
    """The service closed the connection while the request was still being sent, and no answer
    that can be trusted whole came back: `cause` is the error the connection ended with, `detail`
    what came back (empty: nothing)."""

    def __init__(self, cause: BaseException, detail: str = "") -> None:
        self.cause = cause
        self.detail = detail
        super().__init__(
            f"the service closed the connection while the request was being sent{detail}: {cause!r}"
        )


class _ResetGuard(asyncio.Protocol):
    """Stands in front of a connection's stream protocol while a large request goes out.

    When the connection breaks (the service answered early and closed: a reset under the rest of
    the body), asyncio gives the reader the error, and the reader then refuses even the bytes it
    already holds. The guard gives it an end of stream instead, so the answer received before the
    reset can be read to its end, and keeps the error. Everything else passes straight through.
    """

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner = cast(asyncio.Protocol, transport.get_protocol())
        self.error: BaseException | None = None
        self.sent = False  # the request was handed over whole (drained)
        self.while_sending = False  # the connection broke before it was
        transport.set_protocol(self)

    def remove(self) -> None:
        self.transport.set_protocol(self.inner)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = exc
            self.while_sending = not self.sent
        self.inner.connection_lost(None)  # the reader sees the end, its bytes still readable


class Response:
    """Status and headers of a response whose body is still on the wire."""

    def __init__(
        self,
        client: Http1Client,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        status: int,
        headers: dict[bytes, bytes],
    ) -> None:
        self._client = client
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = conn
        self.status = status
        self.headers = headers
        length = headers.get(b"content-length")
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.content_length: int | None = None
        if not self.chunked and length is not None:
            try:
                self.content_length = int(length)
            except ValueError:
                raise HttpError(f"malformed Content-Length {length!r}") from None
            if self.content_length < 0:
                raise HttpError(f"malformed Content-Length {length!r}")
        self._keep = headers.get(b"connection", b"").lower() != b"close"

    async def iter_body(self, piece: int) -> AsyncIterator[bytes]:
        """The body in pieces of at most `piece` bytes, as they arrive."""
        assert self._conn is not None, "the body was already read"
        reader = self._conn[0]
        try:
            if self.chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise HttpError(f"malformed chunk size line {line[:40]!r}") from None
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass  # trailers: ignored
                        break
                    while size:
                        data = await reader.read(min(size, piece))
                        if not data:
                            raise HttpError("the service closed the connection mid-chunk")
                        size -= len(data)
                        yield data
                    if await reader.readexactly(2) != b"\r\n":
                        raise HttpError("a chunk did not end with CRLF")
            elif self.content_length is not None:
                left = self.content_length
                while left:
                    data = await reader.read(min(left, piece))
                    if not data:
                        raise HttpError("the service closed the connection mid-body")
                    left -= len(data)
                    yield data
            else:
                self._keep = False  # the body ends when the connection does
                while data := await reader.read(piece):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            self._drop()
            raise HttpError(f"reading the response: {exc!r}") from None
        except BaseException:
            self._drop()
            raise
        conn, self._conn = self._conn, None
        if self._keep:
            self._client._release(conn)
        else:
            _close(conn)

    async def read(self, limit: int = 1 << 62) -> bytes:
        parts = [data async for data in self.iter_body(1 << 20)]
        return b"".join(parts)[:limit]

    def _drop(self) -> None:
        if self._conn is not None:
            _close(self._conn)
            self._conn = None

    def close(self) -> None:
        """Give up on the rest of the body (the connection is not reused)."""
        self._drop()


class Http1Client:
    def __init__(self, connect: Connect, host: str = "job") -> None:
        self._connect = connect
        self._host = host.encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._closed = False

    async def post(self, path: str, body: bytes | bytearray, content_type: bytes) -> Response:
        head = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                self._host,
                b"\r\nContent-Type: ",
                content_type,
                b"\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
            )
        )
        if len(body) >= SMALL_BODY_BYTES:
            return await self._post_large(head, body)
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._open()
            reader, writer = conn
            try:
                writer.write(head + body)
                await writer.drain()
                status, headers = await self._read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                _close(conn)
                nothing_came = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if reused and nothing_came:
                    continue  # the service closed an idle connection: once more, fresh
                raise HttpError(f"the service did not answer: {exc!r}") from None
            except (OSError, asyncio.LimitOverrunError, HttpError) as exc:
                _close(conn)
                if isinstance(exc, HttpError):
                    raise
                raise HttpError(f"the service did not answer: {exc!r}") from None
            except BaseException:
                _close(conn)
                raise
            return Response(self, conn, status, headers)

    async def _post_large(self, head: bytes, body: bytes | bytearray) -> Response:
        """`post` for a body of SMALL_BODY_BYTES or more: head and body in two writes, under a
        `_ResetGuard`, so that an answer sent before the service closed the connection under the
        body is still returned. The guard goes once a 2xx answer's head is in with the connection
        whole (which is then kept as usual); it stays under a framed answer on a connection that
        broke or that got an error answer (not reused), so a reset cannot spoil it."""
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._open()
            reader, writer = conn
            guard = _ResetGuard(writer.transport)
            try:
                writer.write(head)
                writer.write(body)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()  # broken under the body: an answer may be there
                guard.sent = True
                status, headers = await self._read_head(reader)
                resp = Response(self, conn, status, headers)
                if guard.error is None and status < 300:
                    guard.remove()  # from here on, like any connection
                    return resp
                # The connection broke under the request, or an error answer may have come before
                # the service read the whole body (what it would make of the rest is anyone's
                # guess): the connection is not reused.
                resp._keep = False
                if resp.chunked or resp.content_length is not None:
                    # Under the guard, a reset cannot spoil an answer already in; its framing
                    # tells whether all of it came.
                    return resp
                # Its body runs to the end of the connection: a reset must stay an error.
                if guard.error is None:
                    guard.remove()
                    return resp
                if guard.while_sending:
                    raise RequestCutOff(
                        guard.error,
                        f"; its answer (HTTP {status}) has no length, so it may be cut short",
                    )
                raise HttpError(f"reading the response: {guard.error!r}")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                _close(conn)
                nothing_came = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if reused and nothing_came:
                    continue  # the service closed an idle connection: once more, fresh
                if guard.error is not None and guard.while_sending:
                    raise RequestCutOff(guard.error) from None
                raise HttpError(f"the service did not answer: {guard.error or exc!r}") from None
            except (OSError, asyncio.LimitOverrunError, HttpError) as exc:
                _close(conn)
                if isinstance(exc, HttpError):
                    raise
                raise HttpError(f"the service did not answer: {exc!r}") from None
            except BaseException:
                _close(conn)
                raise

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._closed:
            raise HttpError("the client is closed")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await self._connect()
        except (OSError, TimeoutError) as exc:
            raise HttpError(f"cannot connect to the service: {exc!r}") from None

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD_BYTES:
                raise HttpError("response head too large")
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise HttpError(f"malformed status line {lines[0][:60]!r}")
            try:
                status = int(parts[1])
            except ValueError:
                raise HttpError(f"malformed status line {lines[0][:60]!r}") from None
            if 100 <= status < 200:
                continue  # informational (100 Continue): the real answer follows
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                if not line:
                    continue
                name, sep, value = line.partition(b":")
                if not sep:
                    raise HttpError(f"malformed header line {line[:60]!r}")
                headers[name.strip().lower()] = value.strip()
            return status, headers

    def _release(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        if self._closed or conn[0].at_eof():
            _close(conn)
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)
            with contextlib.suppress(Exception):
                await conn[1].wait_closed()


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    with contextlib.suppress(Exception):
        conn[1].close()
