"""The job proxy's framed stream protocol (horde_services/core/proxy_wire.py): a real ProxyServer on
port 0 with a real Authenticator, real signatures, real sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import grpc
import pytest
from horde.v1 import job_proxy_pb2, streaming_pb2

from horde_services.core.auth import Authenticator, StaticPolicy
from horde_services.core.errors import InvalidArgument
from horde_services.core.identity import Ed25519Signer, Identity
from horde_services.core.metrics import REGISTRY
from horde_services.core.proxy_wire import (
    MAX_FRAME_BYTES,
    MAX_OPEN_BYTES,
    PROXY_METHOD,
    ProxyError,
    ProxyLink,
    ProxyServer,
    ResponseWriter,
    encode,
    read_message,
    signed_open,
)

JOB = "0c6f7a52-93d4-4b8e-a1f0-5d2e8c9b7a61"


class Echo:
    """Answers every request frame with its body reversed; `fail_on` ends the stream instead."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.fail_on = fail_on
        self.callers: list[str] = []

    async def __call__(
        self,
        caller: Identity,
        opened: job_proxy_pb2.StreamOpen,
        requests: AsyncIterator[streaming_pb2.StreamRequestFrame],
        out: ResponseWriter,
    ) -> None:
        self.callers.append(str(caller))
        async for frame in requests:
            if frame.body == self.fail_on:
                raise InvalidArgument(f"request {frame.seq} is not welcome")
            await out.write(
                streaming_pb2.StreamResponseFrame(
                    seq=frame.seq, body=frame.body[::-1] + opened.job_uuid.encode(), last=True
                )
            )


class Net:
    def __init__(self) -> None:
        self.proxy = Ed25519Signer.generate()
        self.gateway = Ed25519Signer.generate()
        self.stranger = Ed25519Signer.generate()
        self.handler = Echo(fail_on=b"boom")
        self.server = ProxyServer(
            self.handler,
            Authenticator(
                self.proxy.identity, StaticPolicy({str(self.gateway.identity)}, "the gateway")
            ),
            open_timeout_s=0.5,
        )
        self.endpoint = ""

    async def link(self, signer: Ed25519Signer | None = None, callee: str = "") -> ProxyLink:
        return await ProxyLink.connect(
            self.endpoint,
            signer=signer or self.gateway,
            callee=callee or str(self.proxy.identity),
            job_uuid=JOB,
        )

    async def raw(self, data: bytes, eof: bool = True) -> job_proxy_pb2.StreamResponse | None:
        """Send raw bytes (then half-close); return the proxy's first message."""
        host, port = self.endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        if eof:
            writer.write_eof()
        try:
            return await read_message(reader, job_proxy_pb2.StreamResponse)
        finally:
            writer.close()


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    n.endpoint = f"127.0.0.1:{await n.server.start('127.0.0.1:0')}"
    try:
        yield n
    finally:
        await n.server.stop()


def request(seq: int, body: bytes) -> streaming_pb2.StreamRequestFrame:
    return streaming_pb2.StreamRequestFrame(seq=seq, client_timestamp_ns=1, body=body, last=True)


async def refusal(link: ProxyLink) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        async with asyncio.timeout(10):
            while True:
                await link.read()
    await link.aclose()
    return info.value


async def test_requests_and_responses_flow_and_a_half_close_ends_with_ok(net: Net) -> None:
    link = await net.link()
    for seq in range(1, 51):  # written ahead of the answers: the proxy reads them in order
        await link.write(request(seq, f"hello {seq}".encode()))
    link.done_writing()
    answers = [frame async for frame in link]
    assert [a.seq for a in answers] == list(range(1, 51))
    assert answers[6].body == b"7 olleh" + JOB.encode()
    assert link.done and await link.read() is None
    assert net.handler.callers == [str(net.gateway.identity)] * 1
    await link.aclose()


async def test_large_frames_pass_whole(net: Net) -> None:
    link = await net.link()
    body = bytes(range(256)) * (4 * 1024)  # 1 MiB, several socket writes
    await link.write(request(1, body))
    answer = await link.read()
    assert answer is not None and answer.body == body[::-1] + JOB.encode()
    await link.aclose()


@pytest.mark.parametrize("tamper", ["signature", "callee", "replay"])
async def test_a_badly_signed_open_is_unauthenticated(net: Net, tamper: str) -> None:
    opened = signed_open(net.gateway, str(net.proxy.identity), JOB)
    if tamper == "signature":
        opened.signature = bytes(64)
    elif tamper == "callee":
        opened.callee = str(net.stranger.identity)
    else:
        first = await net.raw(encode(job_proxy_pb2.StreamRequest(open=opened)))
        assert first is not None and first.WhichOneof("payload") == "end"
        assert first.end.code == 0  # accepted (and ended: nothing followed)
    reply = await net.raw(encode(job_proxy_pb2.StreamRequest(open=opened)))
    assert reply is not None and reply.WhichOneof("payload") == "end"
    assert reply.end.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    expected = {"signature": "bad signature", "callee": "another callee", "replay": "replayed"}
    assert expected[tamper] in reply.end.message


def counted(code: str) -> float:
    value = REGISTRY.get_sample_value(
        "horde_rpcs_total", {"service": "job-proxy", "method": PROXY_METHOD, "code": code}
    )
    return value or 0.0


async def test_a_stranger_is_denied_and_counted(net: Net) -> None:
    before = counted("PERMISSION_DENIED")
    err = await refusal(await net.link(net.stranger))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "is not the gateway" in err.details()
    assert net.handler.callers == []
    assert counted("PERMISSION_DENIED") == before + 1


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (encode(job_proxy_pb2.StreamRequest(request=request(1, b"x"))), "must be `open`"),
        (struct.pack(">I", MAX_FRAME_BYTES + 1), "exceeds the limit"),
        # Before the caller is known, no frame bigger than an `open` is taken (a stranger's
        # 8 MiB frames held 8 MiB each, unauthenticated).
        (struct.pack(">I", MAX_OPEN_BYTES + 1), f"exceeds the limit of {MAX_OPEN_BYTES}"),
        (struct.pack(">I", 3) + b"\xff\xff\xff", "not a valid StreamRequest"),
        (b"", "no `open` within"),
    ],
    ids=["request-first", "oversized", "oversized-open", "garbage", "silence"],
)
async def test_malformed_streams_get_invalid_argument(net: Net, data: bytes, fragment: str) -> None:
    reply = await net.raw(data, eof=bool(data))
    assert reply is not None and reply.WhichOneof("payload") == "end"
    assert reply.end.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert fragment in reply.end.message


async def test_an_error_reaches_the_caller_even_with_requests_unread(net: Net) -> None:
    link = await net.link()
    await link.write(request(1, b"boom"))
    for seq in range(2, 200):  # the proxy never reads these: its close must not reset the end
        await link.write(request(seq, b"y" * 4096))
    err = await refusal(link)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "request 1 is not welcome"


async def test_stopping_the_proxy_ends_open_streams_as_unavailable(net: Net) -> None:
    """...and quietly: nothing reaches the loop's exception handler (asyncio's stream server
    logged "Exception in callback ... CancelledError" for each stream a stop cancelled)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        link = await net.link()
        await link.write(request(1, b"one"))
        assert await link.read() is not None
        await net.server.stop()
        err = await refusal(link)
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.details()
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ProxyError) as info:
            await ProxyLink.connect(
                f"127.0.0.1:{port}",
                signer=Ed25519Signer.generate(),
                callee="ed25519:" + "00" * 32,
                job_uuid=JOB,
            )
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{port}" in info.value.details()
