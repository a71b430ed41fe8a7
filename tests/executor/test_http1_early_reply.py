"""A job's service that answers a request before reading all of its body, and closes (demo-llm's
413 for a body over 16 MiB): the job proxy's HTTP client returns that answer instead of the reset
it then meets under the rest of the body, and the job proxy relays it with a receipt and goes on.

Real sockets: an asyncio HTTP/1.1 service on 127.0.0.1 port 0, a real ProxyServer with a real
Authenticator for the proxy-level tests. Each test runs on asyncio's loop and on uvloop (what the
executor runs on): the reset reaches the client through each loop's own transport code.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
import nacl.signing
import pytest
import uvloop
from horde.v1 import streaming_pb2

from horde_services.core.auth import Authenticator
from horde_services.core.identity import Ed25519Signer
from horde_services.core.proxy_wire import ProxyError, ProxyLink, ProxyServer
from horde_services.core.receipts import StreamReceipt
from horde_services.executor import proxy as proxy_module
from horde_services.executor.http1 import Http1Client, HttpError, RequestCutOff
from horde_services.executor.proxy import JobProxy, LiveStream, StreamSessions

T = TypeVar("T")

LIMIT = 16 * 1024 * 1024  # demo-llm's MAX_BODY
TOO_LARGE = b"request too large\n"
ANSWER_413 = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
    % (len(TOO_LARGE), TOO_LARGE)
)
# Far more than the socket buffers hold: the client is still writing when the reset comes.
HUGE = 32 * 1024 * 1024


class Service:
    """HTTP/1.1 on 127.0.0.1: a body over `limit` is answered with `answer` (b"": nothing) after
    reading only its first `read_first` bytes, then the connection is closed with the rest unread
    (which makes it a reset); `stray` follows that answer, as demo-llm's 414 for the body it then
    takes for a request line. Other bodies are read whole and answered 200 "<length> bytes" on a
    keep-alive connection."""

    def __init__(
        self,
        answer: bytes = ANSWER_413,
        read_first: int = 64 * 1024,
        stray: bytes = b"",
        limit: int = LIMIT,
    ) -> None:
        self.limit = limit
        self.answer = answer
        self.read_first = read_first
        self.stray = stray
        self.connections = 0
        self.gate: asyncio.Event | None = None  # when set: small bodies are answered once set
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if length > self.limit:
                    await reader.readexactly(self.read_first)
                    writer.write(self.answer + self.stray)
                    await writer.drain()
                    return
                body = await reader.readexactly(length)
                if self.gate is not None:
                    await self.gate.wait()
                answer = b"%d bytes" % len(body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def run(main: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(60):
                return await main

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


async def with_client(service: Service, use: Callable[[Http1Client], Coroutine[Any, Any, T]]) -> T:
    port = await service.start()
    client = Http1Client(lambda: asyncio.open_connection("127.0.0.1", port))
    try:
        return await use(client)
    finally:
        await client.close()
        await service.stop()


async def post(client: Http1Client, body: bytes) -> tuple[int, bytes]:
    resp = await client.post("/", body, b"text/plain")
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


# ----------------------------------------------------------------------------- the HTTP client


def test_an_answer_sent_before_the_body_was_read_is_returned(run: Callable[..., Any]) -> None:
    service = Service()

    async def use(client: Http1Client) -> list[tuple[int, bytes]]:
        return [await post(client, b"x" * HUGE), await post(client, b"hello")]

    assert run(with_client(service, use)) == [(413, TOO_LARGE), (200, b"5 bytes")]
    assert service.connections == 2  # the broken connection was not used again


def test_a_stray_answer_after_an_early_one_never_answers_the_next_request(
    run: Callable[..., Any],
) -> None:
    """Like demo-llm, which answers 413, reads on into the body as if it were the next request and
    answers that 414: the 414 must not become the next request's answer, with a body small enough
    for the sockets to take it whole (no reset under it) or not."""
    stray = b"HTTP/1.1 414 Request-URI Too Long\r\nContent-Length: 0\r\n\r\n"
    service = Service(stray=stray, limit=64 * 1024)

    async def use(client: Http1Client) -> list[tuple[int, bytes]]:
        answers = []
        for size in (100 * 1024, HUGE):
            answers += [await post(client, b"x" * size), await post(client, b"hi")]
        return answers

    assert run(with_client(service, use)) == [(413, TOO_LARGE), (200, b"2 bytes")] * 2
    # Each 413 left its connection behind: 100 KiB, "hi" (fresh), HUGE (on hi's), "hi" (fresh).
    assert service.connections == 3


def test_no_answer_before_the_reset_says_the_request_was_cut_off(run: Callable[..., Any]) -> None:
    service = Service(answer=b"")

    async def use(client: Http1Client) -> tuple[RequestCutOff, tuple[int, bytes]]:
        with pytest.raises(RequestCutOff) as info:
            await client.post("/", b"x" * HUGE, b"text/plain")
        return info.value, await post(client, b"hello")

    err, after = run(with_client(service, use))
    assert isinstance(err.cause, (ConnectionResetError, BrokenPipeError))
    assert str(err).startswith("the service closed the connection while the request was being sent")
    assert "did not answer" not in str(err)
    assert after == (200, b"5 bytes")


def test_an_early_answer_without_a_length_is_not_trusted(run: Callable[..., Any]) -> None:
    """It runs to the end of the connection, which a reset ends too: it may be cut short."""
    service = Service(
        answer=b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n\r\ntoo large"
    )

    async def use(client: Http1Client) -> RequestCutOff:
        with pytest.raises(RequestCutOff) as info:
            await client.post("/", b"x" * HUGE, b"text/plain")
        return info.value

    err = run(with_client(service, use))
    assert "its answer (HTTP 413) has no length, so it may be cut short" in str(err)


def test_an_early_answer_cut_short_by_the_reset_fails(run: Callable[..., Any]) -> None:
    service = Service(answer=b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 100\r\n\r\ntoo")

    async def use(client: Http1Client) -> HttpError:
        resp = await client.post("/", b"x" * HUGE, b"text/plain")
        assert resp.status == 413
        with pytest.raises(HttpError) as info:
            await resp.read()
        return info.value

    assert "the service closed the connection mid-body" in str(run(with_client(service, use)))


def test_large_bodies_answered_in_full_keep_the_connection(run: Callable[..., Any]) -> None:
    service = Service()
    body = b"y" * (2 * 1024 * 1024)

    async def use(client: Http1Client) -> list[tuple[int, bytes]]:
        return [await post(client, body), await post(client, b"z"), await post(client, body)]

    expected = [(200, b"%d bytes" % len(body)), (200, b"1 bytes"), (200, b"%d bytes" % len(body))]
    assert run(with_client(service, use)) == expected
    assert service.connections == 1


# ------------------------------------------------------------------------------- the job proxy


class Proxy:
    """A JobProxy serving one streaming session whose job is `service`, behind a ProxyServer."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.gateway = Ed25519Signer.generate()
        self.identity = Ed25519Signer.generate().identity
        self.sessions = StreamSessions()
        self.server = ProxyServer(
            JobProxy(self.sessions), Authenticator(self.identity, self.sessions)
        )
        self.live: LiveStream | None = None
        self.endpoint = ""

    async def __aenter__(self) -> Proxy:
        port = await self.service.start()
        self.live = LiveStream(
            job_uuid=str(uuid.uuid4()),
            gateway=str(self.gateway.identity),
            key=nacl.signing.SigningKey.generate(),
            client=Http1Client(lambda: asyncio.open_connection("127.0.0.1", port)),
            request_path="/",
        )
        self.sessions.add(self.live)
        self.endpoint = f"127.0.0.1:{await self.server.start('127.0.0.1:0')}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        assert self.live is not None
        self.sessions.remove(self.live.job_uuid, "the test ended")
        await self.live.client.close()
        await self.service.stop()

    async def link(self) -> ProxyLink:
        assert self.live is not None
        return await ProxyLink.connect(
            self.endpoint,
            signer=self.gateway,
            callee=str(self.identity),
            job_uuid=self.live.job_uuid,
        )


async def send(link: ProxyLink, seq: int, body: bytes) -> None:
    piece = 1024 * 1024  # as the gateway splits a large body
    for start in range(0, max(len(body), 1), piece):
        await link.write(
            streaming_pb2.StreamRequestFrame(
                seq=seq,
                client_timestamp_ns=time.time_ns(),
                body=body[start : start + piece],
                last=start + piece >= len(body),
            )
        )


async def answer_of(link: ProxyLink) -> tuple[int, bytes, StreamReceipt]:
    body = b""
    while True:
        frame = await link.read()
        assert frame is not None
        body += frame.body
        if frame.last:
            return frame.http_status, body, StreamReceipt.from_proto(frame.receipt)


def test_the_proxy_relays_an_early_answer_with_a_receipt_and_goes_on(
    run: Callable[..., Any],
) -> None:
    service = Service()
    large = b"x" * (LIMIT + 4 * 1024 * 1024)  # over demo-llm's limit, under the proxy's 64 MiB

    async def main() -> tuple[Any, ...]:
        async with Proxy(service) as proxy:
            assert proxy.live is not None
            key = proxy.live.public_key
            link = await proxy.link()
            await send(link, 1, large)
            await send(link, 2, b"hello")
            link.done_writing()
            first, second = await answer_of(link), await answer_of(link)
            end = await link.read()
            await link.aclose()
            return key, first, second, end

    key, (status1, body1, receipt1), (status2, body2, receipt2), end = run(main())
    assert (status1, body1) == (413, TOO_LARGE)
    assert (status2, body2) == (200, b"5 bytes")
    assert end is None  # the stream ended OK: every request was answered
    for seq, receipt, request, response in (
        (1, receipt1, large, body1),
        (2, receipt2, b"hello", body2),
    ):
        receipt.verify()
        assert receipt.seq == seq and receipt.job_public_key == key
        assert receipt.input_sha256 == hashlib.sha256(request).digest()
        assert receipt.output_sha256 == hashlib.sha256(response).digest()
    assert service.connections == 2


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"", "the job's service closed the connection while request 1 was being sent: "),
        (
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 100\r\n\r\ntoo",
            "the job's service broke off its answer to request 1 (HTTP 413): "
            "the service closed the connection mid-body",
        ),
    ],
    ids=["no-answer", "answer-cut-short"],
)
def test_a_request_left_without_an_answer_fails_alone_saying_how(
    run: Callable[..., Any], answer: bytes, reason: str
) -> None:
    """A request the service leaves without a (whole) answer gets one last frame with `error`,
    saying how, and no body or receipt (no frame of the unfinished answer either); the stream
    goes on, and the next request is answered and signed as usual, on a fresh connection."""

    async def main() -> tuple[Any, ...]:
        service = Service(answer=answer)
        async with Proxy(service) as proxy:
            link = await proxy.link()
            await send(link, 1, b"x" * (LIMIT + 4 * 1024 * 1024))
            await send(link, 2, b"hello")
            link.done_writing()
            failed = await link.read()
            second = await answer_of(link)
            end = await link.read()
            await link.aclose()
            return failed, second, end, service.connections

    failed, (status2, body2, receipt2), end, connections = run(main())
    assert failed is not None and failed.seq == 1 and failed.last
    assert failed.error.startswith(reason), failed.error
    assert "did not answer" not in failed.error
    assert failed.body == b"" and not failed.HasField("receipt")
    assert (status2, body2) == (200, b"5 bytes")
    receipt2.verify()
    assert receipt2.seq == 2 and receipt2.input_sha256 == hashlib.sha256(b"hello").digest()
    assert end is None  # the stream ended OK: the caller was done
    assert connections == 2


def test_a_caller_that_sends_on_without_reading_is_refused_past_the_read_ahead(
    run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests read ahead of the answers are bounded (they were held without bound: a client
    sending without reading grew the executor by gigabytes): past the bound the proxy reads no
    more, answers what it took, then ends the stream RESOURCE_EXHAUSTED naming the request."""
    monkeypatch.setattr(proxy_module, "READ_AHEAD_REQUESTS", 2)
    service = Service()
    service.gate = asyncio.Event()

    async def main() -> tuple[Any, ...]:
        async with Proxy(service) as proxy:
            assert proxy.live is not None
            link = await proxy.link()

            async def until(check: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 10
                while not check():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.01)

            await send(link, 1, b"r1")
            await until(lambda: service.connections == 1, "request 1 to reach the service")
            for seq in range(2, 5):
                await send(link, seq, b"r%d" % seq)
            # Request 1 is with the service; 2 and 3 wait; 4 was refused (the error queued).
            stream = proxy.live.stream
            assert stream is not None
            await until(lambda: stream.pending.qsize() == 3, "the read-ahead to fill")
            assert service.gate is not None
            service.gate.set()
            answers = [await answer_of(link) for _ in range(3)]
            with pytest.raises(ProxyError) as ended:
                await link.read()
            await link.aclose()
            return answers, ended.value

    answers, ended = run(main())
    assert [body for _, body, _ in answers] == [b"2 bytes"] * 3
    assert [receipt.seq for _, _, receipt in answers] == [1, 2, 3]
    assert ended.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ended.details().startswith("request 4: 2 requests"), ended.details()
