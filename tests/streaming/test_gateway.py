"""The streaming gateway against a fake validator and job proxy (real gRPC, keys, signatures)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy.exc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, job_pb2, streaming_pb2
from streaming_support import WHITELIST, Behaviour, Harness, answer

from horde_services.core import metrics
from horde_services.core.app import ServiceApp
from horde_services.core.auth import (
    H_CALLEE,
    H_CALLER,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    signing_message,
)
from horde_services.core.db import open_database
from horde_services.core.receipts import verify_lines
from horde_services.core.server import open_channel
from horde_services.streaming_gateway import client as client_module
from horde_services.streaming_gateway import session as session_module
from horde_services.streaming_gateway import store as store_module
from horde_services.streaming_gateway.checks import CertificateError
from horde_services.streaming_gateway.client import (
    ExtraDataError,
    RequestFailed,
    Response,
    SessionEnded,
    StreamClient,
)
from horde_services.streaming_gateway.store import SqlStore


def channel_to(h: Harness, app: ServiceApp, signer: object = None) -> grpc.aio.Channel:
    return open_channel(
        f"127.0.0.1:{app.port}",
        signer=signer or h.client,  # type: ignore[arg-type]
        callee=app.identity,
    )


async def wait_until(predicate: Any, what: str, within: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def open_session(
    h: Harness, app: ServiceApp, image: str = WHITELIST, **kw: object
) -> tuple[StreamClient, grpc.aio.Channel]:
    channel = channel_to(h, app)
    client = StreamClient(channel, validator_identity=str(h.validator_signer.identity), **kw)  # type: ignore[arg-type]
    await client.open(image)
    return client, channel


async def stored_receipts(h: Harness, job_uuid: str) -> list[str]:
    store = SqlStore(await open_database(f"sqlite+aiosqlite:///{h.root / 'gateway.db'}"))
    try:
        return [r.to_json() for r in await store.receipts(job_uuid)]
    finally:
        await store.close()


async def test_n_requests_give_n_receipts_that_verify_offline(harness: Harness) -> None:
    app = await harness.start_gateway()
    verified = metrics.RECEIPTS.labels("verified")._value.get()
    closed_sessions = metrics.GATEWAY_SESSIONS.labels("client_closed")._value.get()
    client, channel = await open_session(harness, app)
    bodies = [f"request {i} ".encode() * 30 for i in range(20)]
    receipts = []
    for body in bodies:
        res = await client.request(body)
        assert res.body == answer(body)
        assert res.http_status == 200
        receipts.append(res.receipt.to_json())
    closed = await client.close("done")
    await channel.close()
    assert closed is not None and not closed.bad_receipt
    assert closed.result.state == common_pb2.JOB_STATE_CANCELLED
    checks = verify_lines(receipts)
    assert [c.error for c in checks] == [None] * 20
    assert [c.receipt.seq for c in checks if c.receipt] == list(range(1, 21))
    assert metrics.RECEIPTS.labels("verified")._value.get() - verified == 20
    assert metrics.GATEWAY_SESSIONS.labels("client_closed")._value.get() - closed_sessions == 1
    # Stored before SessionClosed was sent.
    assert await stored_receipts(harness, client.job_uuid) == receipts
    assert await harness.fake_validator.wait_ended(client.job_uuid)
    start = harness.fake_validator.starts[0]
    assert start.spec.image == WHITELIST
    assert start.client_identity == str(harness.client.identity)


async def test_a_request_the_service_leaves_unanswered_fails_alone(harness: Harness) -> None:
    """The proxy's `error` frame reaches the client as RequestFailed for that request only:
    no receipt is stored for it, and the session goes on, by request() and in a pipeline."""
    harness.fake_validator.next_behaviour = Behaviour(fail_seqs=frozenset({2, 4}))
    app = await harness.start_gateway()
    failed_before = metrics.GATEWAY_REQUESTS_FAILED._value.get()
    client, channel = await open_session(harness, app)
    first = await client.request(b"one")
    with pytest.raises(RequestFailed) as failed:
        await client.request(b"two")
    assert failed.value.seq == 2
    assert "did not answer request 2" in failed.value.reason
    third = await client.request(b"three")
    assert third.body == answer(b"three") and third.receipt.seq == 3
    got = [r async for r in client.pipeline([b"four", b"five"], window=2, return_failures=True)]
    assert isinstance(got[0], RequestFailed) and got[0].seq == 4
    assert isinstance(got[1], Response) and got[1].body == answer(b"five")
    closed = await client.close("done")
    await channel.close()
    assert closed is not None and not closed.bad_receipt
    receipts = [first.receipt.to_json(), third.receipt.to_json(), got[1].receipt.to_json()]
    assert await stored_receipts(harness, client.job_uuid) == receipts
    assert metrics.GATEWAY_REQUESTS_FAILED._value.get() - failed_before == 2


async def test_a_failed_request_in_a_pipeline_raises_by_default(harness: Harness) -> None:
    harness.fake_validator.next_behaviour = Behaviour(fail_seqs=frozenset({1}))
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    with pytest.raises(RequestFailed):
        async for _ in client.pipeline([b"one", b"two"]):
            pass
    # The session is still there for what comes next.
    assert (await client.request(b"three")).body == answer(b"three")
    await client.close()
    await channel.close()


async def test_chunked_response_is_relayed_as_it_comes_and_covered_by_one_receipt(
    harness: Harness,
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(chunks=5)
    app = await harness.start_gateway()
    chunks: list[bytes] = []
    client, channel = await open_session(harness, app, on_chunk=lambda _s, b: chunks.append(b))
    body = b"tokens please " * 20
    res = await client.request(body)
    assert len(chunks) == 5
    assert b"".join(chunks) == res.body == answer(body)
    await client.close()
    await channel.close()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("output", "output hash does not match"),
        ("input", "input hash does not match"),
        ("seq", "carries seq 3"),
        ("key", "key other than the certified job key"),
        ("job", "for job"),
        ("backwards", "run backwards"),
        ("missing", "missing"),
    ],
)
async def test_a_bad_receipt_ends_the_session_and_is_reported(
    harness: Harness, tamper: str, reason: str
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(tamper=tamper, tamper_seq=2)
    app = await harness.start_gateway()
    rejected = metrics.RECEIPTS.labels("rejected")._value.get()
    bad_sessions = metrics.GATEWAY_SESSIONS.labels("bad_receipt")._value.get()
    client, channel = await open_session(harness, app)
    await client.request(b"first")
    with pytest.raises(SessionEnded) as info:
        await client.request(b"second")
    await channel.close()
    closed = info.value.closed
    assert closed is not None and closed.bad_receipt
    assert closed.reason.startswith("receipt 2: ") and reason in closed.reason
    assert metrics.RECEIPTS.labels("rejected")._value.get() - rejected == 1
    assert metrics.GATEWAY_SESSIONS.labels("bad_receipt")._value.get() - bad_sessions == 1
    (report,) = harness.fake_validator.reports
    assert report.job_uuid == client.job_uuid and report.reason == closed.reason
    assert report.certificate.payload
    if tamper != "missing":
        assert report.receipt.seq in (2, 3)
    assert "stopped" in await harness.fake_validator.wait_ended(client.job_uuid)
    # Only the good receipt was kept.
    assert len(await stored_receipts(harness, client.job_uuid)) == 1


async def test_a_bad_receipt_in_a_pipeline_ends_it_after_the_good_answers(
    harness: Harness,
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(tamper="output", tamper_seq=5)
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    answered: list[int] = []
    with pytest.raises(SessionEnded) as info:
        async for res in client.pipeline([f"r{i}".encode() for i in range(1, 21)], window=4):
            res.receipt.verify()
            answered.append(res.seq)
    await channel.close()
    assert answered == [1, 2, 3, 4]  # in order; the fifth's receipt ended the session
    closed = info.value.closed
    assert closed is not None and closed.bad_receipt and closed.reason.startswith("receipt 5: ")
    assert len(await stored_receipts(harness, client.job_uuid)) == 4


async def test_a_pipeline_holds_back_on_bytes_in_flight(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window of large bodies stays under the gateway's bound on bytes in flight (it ended the
    session RESOURCE_EXHAUSTED): the pipeline waits for answers first."""
    monkeypatch.setattr(session_module, "MAX_IN_FLIGHT_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(client_module, "MAX_WINDOW_BYTES", 2 * 1024 * 1024)
    gate = asyncio.Event()  # answers are held (after their first chunk) until it is set
    harness.fake_validator.next_behaviour = Behaviour(chunks=2, gate=gate)
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    session = _session_of(app)
    bodies = [bytes([i]) * (900 * 1024) for i in range(6)]

    async def run() -> list[Any]:
        return [r async for r in client.pipeline(bodies, window=8)]

    pipeline = asyncio.ensure_future(run())
    await wait_until(lambda: len(session._pending) == 2, "two requests in flight")
    gate.set()
    got = await asyncio.wait_for(pipeline, 30)
    assert [r.body for r in got] == [answer(b) for b in bodies]
    await client.close()
    await channel.close()


async def test_a_pipeline_window_must_be_positive(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    for window in (0, 65):  # 65: more than a gateway lets a session have in flight
        with pytest.raises(ValueError, match="window must be 1 to 64"):
            async for _ in client.pipeline([b"x"], window=window):
                pass
    assert (await client.request(b"still fine")).seq == 1
    await client.close()
    await channel.close()


@pytest.mark.parametrize("what", ["requests", "bytes"])
async def test_a_client_that_sends_on_without_reading_is_refused(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Requests in flight are bounded per session, by count and by bytes (a client sending
    without reading the answers grew the gateway and the executor by gigabytes): past the bound
    the session ends RESOURCE_EXHAUSTED, saying so."""
    if what == "bytes":
        monkeypatch.setattr(session_module, "MAX_IN_FLIGHT_BYTES", 1024 * 1024)
    harness.fake_validator.next_behaviour = Behaviour(answer_in_batches_of=10_000)  # no answers
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    # Exactly one request too many (a write after the refusal could race the call's end, and
    # grpc.aio then reports INTERNAL in place of the gateway's status).
    if what == "bytes":
        bodies = [b"x" * (400 * 1024)] * 3  # the third would make 1.2 MiB
    else:
        bodies = [b"x"] * (session_module.MAX_IN_FLIGHT + 1)
    for body in bodies:
        await client._send_request(body)
    ending = await client.wait_ended()
    assert ending.code is grpc.StatusCode.RESOURCE_EXHAUSTED, ending
    if what == "bytes":
        assert ending.reason.startswith("request 3: the requests in flight would pass 1048576")
    else:
        assert ending.reason.startswith("request 65: 64 requests are already in flight")
    client.cancel()
    await channel.close()


@pytest.mark.parametrize("offset_s", [5.0, -5.0])
async def test_a_job_proxy_with_a_skewed_clock_refuses_requests(
    harness: Harness, offset_s: float
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(clock_offset_ns=int(offset_s * 1e9))
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    with pytest.raises(SessionEnded) as info:
        await client.request(b"hello")
    await channel.close()
    closed = info.value.closed
    assert closed is not None and not closed.bad_receipt
    assert closed.reason.startswith("job proxy refused the request: ")
    assert "off the proxy's clock" in closed.reason
    assert await harness.fake_validator.wait_ended(client.job_uuid)


@pytest.mark.parametrize(("offset_s", "word"), [(5.0, "after"), (-5.0, "before")])
async def test_receipt_timestamps_from_a_skewed_job_clock_are_rejected(
    harness: Harness, offset_s: float, word: str
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(
        clock_offset_ns=int(offset_s * 1e9), check_client_clock=False
    )
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    with pytest.raises(SessionEnded) as info:
        await client.request(b"hello")
    await channel.close()
    closed = info.value.closed
    assert closed is not None and closed.bad_receipt
    assert f"s {word} the re" in closed.reason  # "... s before the request was sent" / "after"
    assert harness.fake_validator.reports


async def _ready_raw_session(harness: Harness) -> tuple[grpc.aio.Channel, Any]:
    """A Session call on the raw stub (no StreamClient checks), opened and ready."""
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    call = gateway_pb2_grpc.GatewayServiceStub(channel).Session(timeout=30)
    await call.write(gateway_pb2.SessionRequest(open=gateway_pb2.SessionOpen(image=WHITELIST)))
    while (await call.read()).WhichOneof("payload") != "ready":
        pass
    return channel, call


def _first_request(
    body: bytes, *, last: bool = True, offset_s: float = 0.0
) -> gateway_pb2.SessionRequest:
    """Request 1, stamped with this clock shifted by `offset_s`."""
    frame = gateway_pb2.SessionRequest()
    frame.request.seq = 1
    frame.request.client_timestamp_ns = time.time_ns() + int(offset_s * 1e9)
    frame.request.body = body
    frame.request.last = last
    return frame


@pytest.mark.parametrize("offset_s", [3.0, -5.0])
async def test_a_client_whose_clock_disagrees_is_refused_before_a_job_starts(
    harness: Harness, offset_s: float
) -> None:
    """The session's call is signed with the client's clock: off by more than the skew (but
    within what authentication allows), the open is refused at once, before a job is started
    for requests that would all be refused. (Behind, it is allowed 2 s more: the time a far
    connection takes to set up after the call was signed.)"""
    app = await harness.start_gateway()
    method = "/horde.v1.GatewayService/Session"
    ts = time.time_ns() + int(offset_s * 1e9)
    nonce = "ab" * 16
    signature = harness.client.sign(signing_message(method, app.identity, ts, nonce))
    metadata = [
        (H_CALLER, str(harness.client.identity)),
        (H_CALLEE, app.identity),
        (H_TIMESTAMP, str(ts)),
        (H_NONCE, nonce),
        (H_SIGNATURE, signature.hex()),
    ]
    async with open_channel(f"127.0.0.1:{app.port}") as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Session(timeout=30, metadata=metadata)
        await call.write(gateway_pb2.SessionRequest(open=gateway_pb2.SessionOpen(image=WHITELIST)))
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = await call.details()
    direction = "ahead of" if offset_s > 0 else "behind"
    assert details.startswith("session refused: client clock is "), details
    assert abs(offset_s) - 0.5 < float(details.split()[5]) < abs(offset_s) + 0.5, details
    allowed = 2 if offset_s > 0 else 4
    assert details.endswith(f"s {direction} the gateway's (allowed skew {allowed} s)"), details
    assert harness.fake_validator.starts == []


@pytest.mark.parametrize("offset_s", [3.0, -3.0])
async def test_a_client_whose_clock_disagrees_with_the_gateway_is_refused(
    harness: Harness, offset_s: float
) -> None:
    channel, call = await _ready_raw_session(harness)
    await call.write(_first_request(b"hi", offset_s=offset_s))
    msg = await call.read()
    assert msg.WhichOneof("payload") == "closed"
    assert msg.closed.reason.startswith("request 1 refused: client clock is ")
    assert "(allowed skew 2 s)" in msg.closed.reason
    assert ("ahead of" if offset_s > 0 else "behind") in msg.closed.reason
    # A status a client tells apart without parsing the reason: fix the clock, then retry.
    assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await call.details() == msg.closed.reason
    await channel.close()
    # Nothing reached the job.
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 0


@pytest.mark.parametrize(
    ("stamp", "hint"),
    [
        (lambda: 0, "(it is 0: not set; unix time in nanoseconds is required)"),
        (lambda: time.time_ns() // 10**6, "(it reads as unix milliseconds: nanoseconds are"),
    ],
    ids=["unset", "milliseconds"],
)
async def test_a_request_timestamp_in_the_wrong_unit_says_so(
    harness: Harness, stamp: Callable[[], int], hint: str
) -> None:
    """A client_timestamp_ns left unset, or in milliseconds, is refused as any clock skew, and
    the reason says what is wrong with it rather than only "53 years behind"."""
    channel, call = await _ready_raw_session(harness)
    frame = _first_request(b"hi")
    frame.request.client_timestamp_ns = stamp()
    await call.write(frame)
    msg = await call.read()
    assert msg.WhichOneof("payload") == "closed"
    assert msg.closed.reason.startswith("request 1 refused: client clock is "), msg.closed.reason
    assert hint in msg.closed.reason, msg.closed.reason
    assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
    await channel.close()


@pytest.mark.parametrize("end", ["close", "end_of_stream"])
async def test_a_request_left_unfinished_ends_the_session_at_once(
    harness: Harness, end: str
) -> None:
    """A close (or the end of the client's stream) in the middle of a request, its last frame
    never sent, would hold the session and its job until the time limit: it is refused."""
    channel, call = await _ready_raw_session(harness)
    await call.write(_first_request(b"half of a request", last=False))
    if end == "close":
        await call.write(gateway_pb2.SessionRequest(close=gateway_pb2.SessionClose(reason="bye")))
    else:
        await call.done_writing()
    msg = await call.read()
    assert msg.WhichOneof("payload") == "closed", msg
    assert "in the middle of request 1 (its last frame never came)" in msg.closed.reason
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


async def test_an_image_off_the_whitelist_is_refused(harness: Harness) -> None:
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel)
    with pytest.raises(SessionEnded) as info:
        await client.open("horde/not-whitelisted:latest")
    await channel.close()
    closed = info.value.closed
    assert closed is not None
    assert closed.result.state == common_pb2.JOB_STATE_REJECTED
    assert closed.result.reason == common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED
    assert closed.reason.startswith("job did not start: rejected image_not_allowed")


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (common_pb2.FAILURE_REASON_BUSY, grpc.StatusCode.UNAVAILABLE),
        (common_pb2.FAILURE_REASON_MINER_UNREACHABLE, grpc.StatusCode.UNAVAILABLE),
        (common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS, grpc.StatusCode.FAILED_PRECONDITION),
        (common_pb2.FAILURE_REASON_INVALID_SPEC, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_a_job_that_did_not_start_ends_with_a_status_to_act_on(
    harness: Harness, refusal: int, code: grpc.StatusCode
) -> None:
    """Busy or lost: UNAVAILABLE (try again later); no executor of the class: FAILED_PRECONDITION;
    a spec the validator found invalid (the client's error): INVALID_ARGUMENT. The SessionClosed
    with the job's result and the reason still comes first. (An image off the whitelist stays
    OK, as the test above says.)"""
    harness.fake_validator.refuse_with = refusal  # type: ignore[assignment]
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel)
    with pytest.raises(SessionEnded) as info:
        await client.open(WHITELIST)
    await channel.close()
    assert info.value.code == code, info.value.reason
    assert info.value.closed is not None and info.value.closed.result.reason == refusal
    assert info.value.reason.startswith("job did not start: rejected "), info.value.reason


async def test_a_validator_that_refuses_the_gateway_is_the_operators_to_mend(
    harness: Harness,
) -> None:
    """A gateway given another validator's identity: its health goes NOT_SERVING (a balancer
    sends clients elsewhere) and a session is refused FAILED_PRECONDITION, "misconfigured" (not
    UNAVAILABLE, which clients retry, nor the identities, which are the operator's to read in
    the gateway's log)."""
    from horde_services.core.identity import HotkeySigner

    app = await harness.start_gateway(validator_identity=str(HotkeySigner.generate().identity))
    app.start_background()  # (the validator watch)
    async with open_channel(f"127.0.0.1:{app.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async with asyncio.timeout(30):
            async for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
        watch.cancel()
    with pytest.raises(SessionEnded) as ended:
        await open_session(harness, app)
    assert ended.value.code is grpc.StatusCode.FAILED_PRECONDITION, ended.value
    assert ended.value.reason.startswith("the gateway is misconfigured: its validator refuses it")
    assert "sr25519:" not in ended.value.reason
    assert harness.fake_validator.starts == []


async def test_a_validator_refusing_for_now_ends_the_session_unavailable(
    harness: Harness,
) -> None:
    """A validator that cannot start the job now (shutting down, say) answers UNAVAILABLE: the
    client gets that status, to retry on (the session ended OK, saying so only in words)."""
    harness.fake_validator.unavailable = "the validator is shutting down and takes no new job"
    app = await harness.start_gateway()
    with pytest.raises(SessionEnded) as ended:
        await open_session(harness, app)
    assert ended.value.code is grpc.StatusCode.UNAVAILABLE, ended.value
    assert "shutting down" in ended.value.reason


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("validator", "issued for validator"),
        ("endpoint", "names endpoint 10.9.9.9:1"),
        ("unregistered", "is not registered on the subnet"),
    ],
)
async def test_a_bad_certificate_stops_the_job_before_anything_is_sent(
    harness: Harness, setup: str, reason: str
) -> None:
    fv = harness.fake_validator
    if setup == "validator":
        fv.certificate_validator = "ed25519:" + "11" * 32
    elif setup == "endpoint":
        fv.certificate_endpoint = "10.9.9.9:1"
    else:
        from horde_services.core.identity import HotkeySigner

        fv.miner = HotkeySigner.generate()
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel)
    with pytest.raises(SessionEnded) as info:
        await client.open(WHITELIST)
    await channel.close()
    closed = info.value.closed
    assert closed is not None
    assert closed.reason.startswith("job certificate rejected: ") and reason in closed.reason
    (job_uuid,) = harness.fake_proxy.jobs
    assert "stopped" in await fv.wait_ended(job_uuid)


async def test_a_session_on_a_signing_channel_leaves_no_task_behind(harness: Harness) -> None:
    """With a channel that signs its calls (interceptors), grpc feeds the call's writes through
    a task of its own: close() ends it, so nothing is left pending (a "Task was destroyed but it
    is pending" at exit, and errors from its generator)."""
    app = await harness.start_gateway()
    channel = channel_to(harness, app)  # signs every call: the client itself has no signer
    client = StreamClient(channel, validator_identity=str(harness.validator_signer.identity))
    await client.open(WHITELIST)
    assert (await client.request(b"one")).body == answer(b"one")
    feeders = [t for t in asyncio.all_tasks() if "_consume_request_iterator" in repr(t)]
    assert feeders, "expected grpc's request feeder task on an intercepted call"
    await client.close()
    _, pending = await asyncio.wait(feeders, timeout=5)
    assert not pending, pending
    await channel.close()


async def test_a_certificate_the_client_refuses_ends_the_session_at_once(
    harness: Harness,
) -> None:
    """The client's own check of the job certificate fails (it expects another validator): open()
    raises, and the session and its job end then, not when the caller closes the channel."""
    fv = harness.fake_validator
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel, validator_identity="ed25519:" + "22" * 32)
    with pytest.raises(CertificateError, match="issued for validator"):
        await client.open(WHITELIST)
    (job_uuid,) = harness.fake_proxy.jobs
    async with asyncio.timeout(10):
        assert await fv.wait_ended(job_uuid)
    await channel.close()


async def test_a_session_ended_by_the_gateway_keeps_its_reason_through_close(
    harness: Harness,
) -> None:
    """The job ends (its time limit) just as the client closes: close(), the ending and any later
    request all give the same reason, never "cancelled"."""
    harness.fake_validator.end_job_after_ready = True
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    closed = await client.close()
    # Which end reached the gateway first is a race; either way every view agrees.
    assert closed is not None
    assert closed.reason in (
        "job ended: failed timeout: session time limit reached",
        "closed by the client",
    )
    ending = await client.wait_ended()
    assert ending.reason == closed.reason and ending.code == grpc.StatusCode.OK
    with pytest.raises(SessionEnded) as late:
        await client.request(b"late")
    assert late.value.reason == closed.reason
    await channel.close()


async def test_a_client_that_does_not_read_holds_the_gateway_back(harness: Harness) -> None:
    """A large answer the caller does not read yet: the client buffers a bounded amount (the
    rest waits in gRPC's flow control, back to the job proxy), then delivers it whole."""
    size = 48 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)
    harness.fake_validator.next_behaviour = Behaviour(chunks=48, respond=lambda _b: body)
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    blocked = asyncio.Event()  # set when the reader starts waiting for the caller
    room = client._inbox_room
    clear = room.clear

    def clear_and_tell() -> None:
        clear()
        blocked.set()

    room.clear = clear_and_tell  # type: ignore[method-assign]
    sent = await client._send_request(b"a big one")
    async with asyncio.timeout(30):
        await blocked.wait()
    held = client._inbox_bytes
    assert client_module.INBOX_BYTES < held <= client_module.INBOX_BYTES + 1024 * 1024, held
    res = await client._receive(sent)
    assert res.body == body and res.receipt.is_valid()
    await client.close()
    await channel.close()


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (gateway_pb2.SessionRequest(close=gateway_pb2.SessionClose()), "must be SessionOpen"),
        (gateway_pb2.SessionRequest(open=gateway_pb2.SessionOpen()), "image is required"),
        (
            gateway_pb2.SessionRequest(
                open=gateway_pb2.SessionOpen(image=WHITELIST, time_limit_s=10**9)
            ),
            "exceeds this gateway's maximum",
        ),
    ],
)
async def test_a_session_refused_at_open_is_invalid_and_counted(
    harness: Harness, first: gateway_pb2.SessionRequest, reason: str
) -> None:
    app = await harness.start_gateway()
    refused = metrics.GATEWAY_SESSIONS.labels("refused")._value.get()
    channel = channel_to(harness, app)
    call = gateway_pb2_grpc.GatewayServiceStub(channel).Session(timeout=30)
    await call.write(first)
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in await call.details()
    await channel.close()
    assert metrics.GATEWAY_SESSIONS.labels("refused")._value.get() - refused == 1
    assert harness.fake_validator.starts == []


async def test_many_sessions_at_once(harness: Harness) -> None:
    app = await harness.start_gateway()

    async def one(i: int) -> list[str]:
        client, channel = await open_session(harness, app)
        out = []
        for j in range(10):
            body = f"session {i} request {j}".encode()
            res = await client.request(body)
            assert res.body == answer(body)
            out.append(res.receipt.to_json())
        await client.close()
        await channel.close()
        return out

    results = await asyncio.gather(*(one(i) for i in range(12)))
    assert len({r for rs in results for r in rs}) == 120
    assert all(c.error is None for c in verify_lines([r for rs in results for r in rs]))


async def test_receipts_survive_a_gateway_restart(harness: Harness) -> None:
    app = await harness.start_gateway(sample_rate=1.0)
    client, channel = await open_session(harness, app)
    receipts = [(await client.request(f"r{i}".encode())).receipt.to_json() for i in range(5)]
    await client.close()
    await channel.close()
    await harness.stop_gateway(app)
    again = await harness.start_gateway()
    assert await stored_receipts(harness, client.job_uuid) == receipts
    # The samples kept before the restart are served after it.
    validator_channel = channel_to(harness, again, harness.validator_signer)
    stub = gateway_pb2_grpc.GatewayServiceStub(validator_channel)
    page = await stub.ListSamples(gateway_pb2.ListSamplesRequest(), timeout=10)
    assert [s.request for s in page.samples] == [f"r{i}".encode() for i in range(5)]
    await validator_channel.close()


async def test_sampled_pairs_are_served_to_the_validator_by_cursor(harness: Harness) -> None:
    app = await harness.start_gateway(sample_rate=1.0)
    client, channel = await open_session(harness, app)
    for i in range(7):
        await client.request(f"q{i}".encode())
    await client.close()
    await channel.close()
    validator_channel = channel_to(harness, app, harness.validator_signer)
    stub = gateway_pb2_grpc.GatewayServiceStub(validator_channel)
    seen: list[gateway_pb2.Sample] = []
    cursor = ""
    while True:
        page = await stub.ListSamples(
            gateway_pb2.ListSamplesRequest(cursor=cursor, limit=3), timeout=10
        )
        if not page.samples:
            break
        seen.extend(page.samples)
        cursor = page.next_cursor
    assert [s.request for s in seen] == [f"q{i}".encode() for i in range(7)]
    for sample in seen:
        assert sample.response == answer(sample.request)
        assert sample.job_uuid == client.job_uuid and sample.image == WHITELIST
        assert sample.image_digest.startswith("sha256:")
        assert sample.certificate.payload and len(sample.receipt.signature) == 64
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListSamples(gateway_pb2.ListSamplesRequest(cursor="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await validator_channel.close()
    # Clients may not read samples.
    client_stub = gateway_pb2_grpc.GatewayServiceStub(channel_to(harness, app))
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await client_stub.ListSamples(gateway_pb2.ListSamplesRequest(), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_no_sampling_at_rate_zero(harness: Harness) -> None:
    app = await harness.start_gateway(sample_rate=0.0)
    client, channel = await open_session(harness, app)
    for i in range(5):
        await client.request(f"q{i}".encode())
    await client.close()
    await channel.close()
    stub = gateway_pb2_grpc.GatewayServiceStub(channel_to(harness, app, harness.validator_signer))
    assert not (await stub.ListSamples(gateway_pb2.ListSamplesRequest(), timeout=10)).samples


async def test_extra_data_goes_through_the_validator(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    data = bytes(range(256)) * 5000  # more than one chunk
    await client.send_extra("weights.bin", data)
    event = await client.next_event()
    assert event.message == "extra data placed: weights.bin"
    (job,) = harness.fake_proxy.jobs.values()
    assert job.extra["weights.bin"] == data
    # Requests keep working after it.
    assert (await client.request(b"after")).body == answer(b"after")
    await client.close()
    await channel.close()


async def _extra_chunk(client: StreamClient, name: str, offset: int, last: bool = False) -> None:
    await client._send(
        gateway_pb2.SessionRequest(
            extra_data=streaming_pb2.ExtraData(
                file_name=name, offset=offset, data=b"x" * 65536, last=last
            )
        )
    )


def _session_of(app: ServiceApp) -> Any:
    [servicer] = [d.__self__ for d in app.drainers]  # type: ignore[attr-defined]
    [session] = servicer._sessions
    return session


async def test_chunks_of_a_refused_upload_are_dropped_not_held(harness: Harness) -> None:
    """An upload the validator refused mid-way (over its cap): the chunks the client goes on
    sending for it are dropped (they piled up in the gateway, a GiB for a GiB sent). A retry
    under the name works after `last`."""
    harness.fake_validator.extra_cap = 256 * 1024
    app = await harness.start_gateway()
    events: list[str] = []
    client, channel = await open_session(harness, app, on_event=lambda e: events.append(e.message))
    session = _session_of(app)
    for i in range(8):
        await _extra_chunk(client, "big.bin", i * 65536)
    await wait_until(lambda: "big.bin" in session._extra, "the upload to begin")
    upload = session._extra["big.bin"]
    await wait_until(lambda: upload.over, "the validator's refusal")
    for i in range(8, 200):
        await _extra_chunk(client, "big.bin", i * 65536)
    # The session goes on, reads its client, and held none of those chunks.
    assert (await client.request(b"after")).body == answer(b"after")
    assert upload.queue.empty() and upload.queued_bytes == 0
    assert any("cap of 262144" in e for e in events), events  # told, once
    await _extra_chunk(client, "big.bin", 200 * 65536, last=True)
    harness.fake_validator.extra_cap = None
    placed = await client.add_extra("big.bin", b"small")
    assert placed.size_bytes == 5 and not placed.error
    await client.close()
    await channel.close()


async def test_a_slow_upload_neither_holds_requests_back_nor_grows_without_bound(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validator takes no chunk (stuck): requests sent meanwhile are answered at once (a
    gateway waiting on the upload left them to age past the clock skew and refused the
    client's clock), and an upload past EXTRA_BUFFER_BYTES ahead of the validator is refused,
    alone, saying why."""
    monkeypatch.setattr(session_module, "EXTRA_BUFFER_BYTES", 4 * 65536)
    harness.fake_validator.extra_hangs = True
    app = await harness.start_gateway()
    events: list[str] = []
    client, channel = await open_session(harness, app, on_event=lambda e: events.append(e.message))
    for i in range(4):
        await _extra_chunk(client, "slow.bin", i * 65536)
    assert (await client.request(b"meanwhile")).body == answer(b"meanwhile")
    upload = _session_of(app)._extra["slow.bin"]
    # gRPC takes chunks into its own window to the validator, a few MiB, before the rest wait
    # at the gateway: send until the gateway holds more than it may.
    for i in range(4, 2000):
        await _extra_chunk(client, "slow.bin", i * 65536)
        if upload.over:
            break
    assert upload.over, "128 MiB sent, never refused"
    refused = await client.next_event()
    assert refused.message.startswith("extra data slow.bin refused: more than 262144 bytes")
    assert upload.queued_bytes == 0  # let go
    assert (await client.request(b"after")).body == answer(b"after")
    await client.close()
    await channel.close()


async def test_close_while_a_request_is_in_flight_delivers_its_whole_response(
    harness: Harness,
) -> None:
    """close() while a response is coming: the gateway answers what is in flight before its
    SessionClosed, and the caller waiting for that response gets all of it, with its receipt
    checked (close() read and dropped its frames, and the receipt then failed as if the miner had
    cheated)."""
    gate = asyncio.Event()
    harness.fake_validator.next_behaviour = Behaviour(chunks=4, gate=gate)
    app = await harness.start_gateway()
    chunks: list[bytes] = []
    events: list[str] = []
    client, channel = await open_session(
        harness,
        app,
        on_chunk=lambda _seq, body: chunks.append(body),
        on_event=lambda e: events.append(e.message),
    )
    sent_close = asyncio.Event()
    send = client._send

    async def watched_send(msg: gateway_pb2.SessionRequest) -> None:
        await send(msg)
        if msg.HasField("close"):
            sent_close.set()

    client._send = watched_send  # type: ignore[method-assign]
    request = asyncio.ensure_future(client.request(b"slow one"))
    await wait_until(lambda: bool(chunks), "the first chunk")
    closing = asyncio.ensure_future(client.close("bye"))
    async with asyncio.timeout(10):
        await sent_close.wait()
    gate.set()  # the rest of the response comes now, after the close
    async with asyncio.timeout(10):
        res = await request
        closed = await closing
    assert res.body == answer(b"slow one") and res.receipt.is_valid()
    assert b"".join(chunks) == res.body
    assert closed is not None and closed.reason == "closed by the client: bye"
    await channel.close()


class FailingStore(SqlStore):
    """A real SQLite store that refuses every write while `failing` is set (a full disk)."""

    failing = False

    async def add(self, receipts: Any, samples: Any) -> None:
        if self.failing:
            raise sqlalchemy.exc.OperationalError(
                "INSERT", {}, Exception("database or disk is full")
            )
        await super().add(receipts, samples)


async def test_receipts_that_cannot_be_stored_end_their_session_and_the_health(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is served that could not be proven later: a session whose receipts the database
    refused ends with the reason, and the gateway reports NOT_SERVING until a write succeeds."""
    monkeypatch.setattr(store_module, "RETRY_UNSTORED_S", 0.2)
    store = FailingStore(await open_database(f"sqlite+aiosqlite:///{harness.root / 'g.db'}"))
    app = await harness.start_gateway(store=store)
    client, channel = await open_session(harness, app)
    assert (await client.request(b"stored")).body == answer(b"stored")
    assert await gateway_health(harness, app) == health_pb2.HealthCheckResponse.SERVING
    store.failing = True
    await client.request(b"lost")  # answered; its receipt cannot be stored
    async with asyncio.timeout(20):  # the writer's retries take about 3 s
        ended = await client.wait_ended()
    assert ended.closed is not None, ended.reason
    assert ended.reason.startswith("the gateway could not store the session's receipts ("), ended
    assert "database or disk is full" in ended.reason
    assert ended.code == grpc.StatusCode.UNAVAILABLE  # the gateway's failure: try another
    assert await gateway_health(harness, app) == health_pb2.HealthCheckResponse.NOT_SERVING
    await channel.close()
    # The database takes writes again: with no session at all (a balancer sends none to a
    # gateway that is NOT_SERVING), the refused receipts are written and it serves again.
    store.failing = False
    deadline = time.monotonic() + 10
    while await gateway_health(harness, app) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the gateway stayed NOT_SERVING"
        await asyncio.sleep(0.05)
    assert [r.seq for r in await store.receipts(client.job_uuid)] == [1, 2]  # nothing lost


async def gateway_health(harness: Harness, app: ServiceApp) -> int:
    async with open_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


async def test_close_while_a_large_request_is_being_sent_waits_for_its_last_frame(
    harness: Harness,
) -> None:
    """A body of several frames goes out whole, with no close (or other request) written in
    between: the gateway would end the session as the client's error, a request cut in half."""
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    # The request's first frame goes out, then its writer waits until the close is underway.
    first_frame = asyncio.Event()
    go_on = asyncio.Event()
    write = client._call.write

    async def paused_write(msg: gateway_pb2.SessionRequest) -> None:
        await write(msg)
        if msg.HasField("request") and not msg.request.last and not first_frame.is_set():
            first_frame.set()
            await go_on.wait()

    client._call.write = paused_write
    body = b"x" * (client_module.REQUEST_FRAME_BYTES * 6)
    request = asyncio.ensure_future(client.request(body))
    async with asyncio.timeout(10):
        await first_frame.wait()
    closing = asyncio.ensure_future(client.close("bye"))
    await wait_until(lambda: client._closing, "the close to begin")
    go_on.set()
    async with asyncio.timeout(10):
        closed = await closing
    assert closed is not None and closed.reason == "closed by the client: bye", closed
    assert (await request).body == answer(body)
    await channel.close()


async def test_open_twice_and_calls_before_open_are_refused_at_once(harness: Harness) -> None:
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel)
    for call in (
        lambda: client.request(b"x"),
        lambda: client.send_extra("a", b"x"),
        lambda: client.add_extra("a", b"x"),
        lambda: client.next_event(),
    ):
        with pytest.raises(RuntimeError, match=r"open\(\) the session first"):
            await call()
    with pytest.raises(RuntimeError, match=r"open\(\) the session first"):
        await anext(aiter(client.pipeline([b"x"])))
    await client.open(WHITELIST)
    with pytest.raises(RuntimeError, match="opened its session already"):
        await client.open(WHITELIST)
    assert (await client.request(b"still")).body == answer(b"still")  # the first goes on
    await client.close()
    assert len(harness.fake_proxy.jobs) == 1  # no second job was started
    await channel.close()


async def test_add_extra_waits_for_the_placement_and_checks_it(harness: Harness) -> None:
    app = await harness.start_gateway()
    events: list[str] = []
    client, channel = await open_session(harness, app, on_event=lambda e: events.append(e.message))
    data = b"context " * 300_000  # more than one chunk
    placed = await client.add_extra("notes.txt", data)
    assert (placed.file_name, placed.size_bytes, placed.sha256, placed.error) == (
        "notes.txt",
        len(data),
        hashlib.sha256(data).hexdigest(),
        "",
    )
    (job,) = harness.fake_proxy.jobs.values()
    assert job.extra["notes.txt"] == data
    # Refused by the executor: the client learns why, and the session goes on.
    harness.fake_validator.extra_refused["big.bin"] = "the job's extra-data space is full"
    with pytest.raises(ExtraDataError) as refused:
        await client.add_extra("big.bin", b"x" * 10)
    assert refused.value.placed is not None and refused.value.placed.file_name == "big.bin"
    assert "the job's extra-data space is full" in str(refused.value)
    assert str(refused.value).startswith("extra data big.bin failed: FAILED_PRECONDITION")
    # Placed, but not as sent: caught here.
    harness.fake_validator.extra_misplaced = True
    with pytest.raises(ExtraDataError) as differs:
        await client.add_extra("notes2.txt", b"abc")
    assert str(differs.value) == (
        f"extra data 'notes2.txt' was placed as 4 bytes with sha256 "
        f"{hashlib.sha256(b'abc!').hexdigest()}; 3 bytes with sha256 "
        f"{hashlib.sha256(b'abc').hexdigest()} were sent"
    )
    assert (await client.request(b"after")).body == answer(b"after")
    # Events in words still come, for people (and send_extra's callers).
    assert "extra data placed: notes.txt" in events
    await client.close()
    await channel.close()


async def test_add_extra_raises_when_the_session_ends_first(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    await client.close("done")
    with pytest.raises(SessionEnded):
        await client.add_extra("late.txt", b"x")
    await channel.close()


@pytest.mark.parametrize("name", ["", "..", "a/b", "a\\b", "nul\x00name", "x" * 256])
async def test_extra_data_with_a_name_that_is_not_a_plain_file_name_is_refused_here(
    harness: Harness, name: str
) -> None:
    """Refused by the gateway itself, with the rule, before anything reaches the validator; that
    upload only: the session goes on."""
    app = await harness.start_gateway()
    events: list[str] = []
    client, channel = await open_session(harness, app, on_event=lambda e: events.append(e.message))
    with pytest.raises(ExtraDataError) as refused:
        await client.add_extra(name, b"data" * 300_000)  # more than one chunk
    rule = f"extra data file name {name!r}: a plain file name is required"
    assert str(refused.value).startswith(rule), refused.value
    assert "at most 255 bytes" in str(refused.value)
    assert refused.value.placed is not None and refused.value.placed.file_name == name
    assert (await client.request(b"after")).body == answer(b"after")
    (job,) = harness.fake_proxy.jobs.values()
    assert job.extra == {}
    assert [e for e in events if e.startswith("extra data")] == [str(refused.value)]
    await client.close()
    await channel.close()


async def test_the_job_ending_ends_the_session_with_its_result(harness: Harness) -> None:
    harness.fake_validator.end_job_after_ready = True
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    client = StreamClient(channel)
    try:
        await client.open(WHITELIST)
        await client.request(b"x")
    except SessionEnded as exc:
        closed = exc.closed
    await channel.close()
    assert closed is not None
    assert closed.result.state == common_pb2.JOB_STATE_FAILED
    assert closed.reason == "job ended: failed timeout: session time limit reached"


async def test_a_write_that_loses_the_race_with_the_end_reads_the_gateways_reason() -> None:
    """The session ended while the client sent nothing (its time limit, say): the client's next
    write fails with gRPC's generic "INTERNAL: Internal error from Core", but the gateway's
    SessionClosed is still waiting to be read, and that is what the client reports. (A stand-in
    for the finished gRPC call: the race cannot be timed through a real one.)"""

    class FinishedCall:
        def __init__(self) -> None:
            self.written = asyncio.Event()
            self.left: list[object] = [
                gateway_pb2.SessionResponse(
                    closed=gateway_pb2.SessionClosed(reason="the session reached its time limit")
                ),
                grpc.aio.EOF,
            ]

        async def write(self, msg: object) -> None:
            self.written.set()
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="Internal error from Core",
            )

        async def read(self) -> object:
            await self.written.wait()  # the closing message is read only after the write failed
            return self.left.pop(0)

        async def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.OK

        def cancel(self) -> None:
            pass

    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never dialled
    try:
        client = StreamClient(channel)
        client._call = FinishedCall()
        client._pump_task = asyncio.ensure_future(client._pump())
        with pytest.raises(SessionEnded) as info:
            await client._send(gateway_pb2.SessionRequest(close=gateway_pb2.SessionClose()))
        client.cancel()
    finally:
        await channel.close()
    assert info.value.closed is not None
    assert info.value.closed.reason == "the session reached its time limit"
    assert client.closed is not None


async def test_events_reach_on_event_in_order_across_close() -> None:
    """An event queued while the client was idle reaches on_event before those the gateway sends
    during close() (they came the other way round). (A stand-in call again: the timing of a
    gateway's events cannot be arranged through a real one.)"""

    def ev(message: str) -> gateway_pb2.SessionResponse:
        return gateway_pb2.SessionResponse(event=job_pb2.JobEvent(message=message))

    class ClosingCall:
        def __init__(self) -> None:
            self.incoming: asyncio.Queue[object] = asyncio.Queue()
            self.incoming.put_nowait(ev("queued before close"))

        async def write(self, msg: gateway_pb2.SessionRequest) -> None:
            if msg.HasField("close"):  # the gateway says more while it closes
                self.incoming.put_nowait(ev("sent during close"))
                closed = gateway_pb2.SessionClosed(reason="closed by the client")
                self.incoming.put_nowait(gateway_pb2.SessionResponse(closed=closed))
                self.incoming.put_nowait(grpc.aio.EOF)

        async def read(self) -> object:
            return await self.incoming.get()

        async def done_writing(self) -> None:
            pass

        async def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.OK

        def cancel(self) -> None:
            pass

    events: list[str] = []
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never dialled
    try:
        client = StreamClient(channel, on_event=lambda e: events.append(e.message))
        call = ClosingCall()
        client._call = call
        client._pump_task = asyncio.ensure_future(client._pump())
        await wait_until(lambda: call.incoming.empty(), "the first event to be read")
        closed = await client.close()
    finally:
        await channel.close()
    assert closed is not None and closed.reason == "closed by the client"
    assert events == ["queued before close", "sent during close"]


async def test_a_crashed_job_proxy_ends_the_session_with_a_clear_reason(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy is gone and the validator says nothing of the job within the grace period:
    the session ends with the proxy's reason, and the job is stopped."""
    monkeypatch.setattr(session_module, "VERDICT_GRACE_S", 0.2)
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    await client.request(b"one")
    assert harness.proxy_server is not None
    await harness.proxy_server.stop()  # the executor (and its proxy) is gone
    with pytest.raises(SessionEnded) as info:
        await client.request(b"two")
    await channel.close()
    assert info.value.closed is not None
    assert info.value.closed.reason.startswith("job proxy: ")
    assert "stopped" in await harness.fake_validator.wait_ended(client.job_uuid)


async def test_a_crashed_gateway_ends_the_session_and_the_job(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    await client.request(b"one")
    # A crash, not a graceful stop (that ends sessions in words, see the next test): the gRPC
    # server goes away at once, cancelling its calls.
    await app.servers[0].server.stop(None)
    with pytest.raises(SessionEnded) as info:
        await client.request(b"two")
    await channel.close()
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert await harness.fake_validator.wait_ended(client.job_uuid)
    await harness.stop_gateway(app)


async def test_a_client_that_closes_then_cancels_at_once_still_stops_the_job(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half-closed (the end of a session's requests), then cancelled while the gateway was
    tearing the session down: the job is stopped all the same. It ran on to its time limit,
    holding its executor, as the teardown was cut off before it cancelled the job's call."""
    tearing_down, go_on = asyncio.Event(), asyncio.Event()
    stop_job = session_module.Session._stop_job

    async def slow_stop_job(self: Any, reason: str) -> Any:
        tearing_down.set()
        await go_on.wait()
        return await stop_job(self, reason)

    monkeypatch.setattr(session_module.Session, "_stop_job", slow_stop_job)
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    await client.request(b"one")
    await client._call.done_writing()
    async with asyncio.timeout(10):
        await tearing_down.wait()
    client._call.cancel()
    async with asyncio.timeout(10):
        how = await harness.fake_validator.wait_ended(client.job_uuid)
    assert how == "cancelled", how  # its call cancelled: the validator's word for "stop it"
    go_on.set()
    client.cancel()
    await channel.close()


async def test_a_client_that_goes_away_stops_the_job(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    await client.request(b"one")
    client.cancel()
    assert await harness.fake_validator.wait_ended(client.job_uuid) == "cancelled"
    await channel.close()


async def test_protocol_errors_have_clear_status_codes(harness: Harness) -> None:
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    call = stub.Session(timeout=30)
    await call.write(gateway_pb2.SessionRequest(close=gateway_pb2.SessionClose()))
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be SessionOpen" in await call.details()
    # A request with the wrong seq.
    call = stub.Session(timeout=30)
    await call.write(gateway_pb2.SessionRequest(open=gateway_pb2.SessionOpen(image=WHITELIST)))
    while (await call.read()).WhichOneof("payload") != "ready":
        pass
    bad = gateway_pb2.SessionRequest()
    bad.request.seq = 7
    bad.request.client_timestamp_ns = time.time_ns()
    bad.request.last = True
    await call.write(bad)
    msg = await call.read()
    assert msg.closed.reason == "request seq 7: expected 1"
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Bytes that are no SessionRequest: the caller's error (it was INTERNAL, with a traceback).
    raw = channel.stream_stream(
        "/horde.v1.GatewayService/Session",
        request_serializer=lambda b: b,
        response_deserializer=gateway_pb2.SessionResponse.FromString,
    )(timeout=30)
    await raw.write(b"\xff\xff\xff\xff\x0f")
    assert await raw.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be parsed" in await raw.details()
    await channel.close()
    # An unenrolled client.
    from horde_services.core.identity import Ed25519Signer

    stranger = channel_to(harness, app, Ed25519Signer.generate())
    call = gateway_pb2_grpc.GatewayServiceStub(stranger).Session(timeout=30)
    # Refused on its metadata alone: nothing written (a write racing the refusal reads as
    # grpc.aio's "INTERNAL: Internal error from Core"; StreamClient waits for the gateway's
    # initial metadata before writing for that reason).
    assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
    await stranger.close()


async def test_half_close_answers_what_is_in_flight_then_ends(harness: Harness) -> None:
    app = await harness.start_gateway()
    channel = channel_to(harness, app)
    call = gateway_pb2_grpc.GatewayServiceStub(channel).Session(timeout=30)
    await call.write(gateway_pb2.SessionRequest(open=gateway_pb2.SessionOpen(image=WHITELIST)))
    while (await call.read()).WhichOneof("payload") != "ready":
        pass
    for seq in (1, 2, 3):
        req = gateway_pb2.SessionRequest()
        req.request.seq = seq
        req.request.client_timestamp_ns = time.time_ns()
        req.request.body = b"b%d" % seq
        req.request.last = True
        await call.write(req)
    await call.done_writing()
    kinds = [m.WhichOneof("payload") async for m in call]
    assert kinds == ["response", "response", "response", "closed"]
    assert await call.code() == grpc.StatusCode.OK
    await channel.close()


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_a_refused_client_always_learns_the_gateway_s_reason(harness: Harness) -> None:
    # The client waits for the gateway's initial metadata before its first write: a write racing
    # the refusal would otherwise fail, and grpc.aio would report INTERNAL instead of the reason.
    from horde_services.core.identity import Ed25519Signer

    app = await harness.start_gateway()
    codes = []
    for _ in range(20):
        stranger = Ed25519Signer.generate()
        channel = open_channel(f"127.0.0.1:{app.port}")
        client = StreamClient(channel, signer=stranger, callee=app.identity)
        with pytest.raises(SessionEnded) as ended:
            await client.open(WHITELIST)
        codes.append(ended.value.code)
        assert "not an enrolled client" in ended.value.reason
        # The client knows it ended, and closing it is immediate (nothing to wait for).
        async with asyncio.timeout(2):
            assert (await client.wait_ended()).code == grpc.StatusCode.PERMISSION_DENIED
            assert await client.close() is None
        await channel.close()
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}


async def test_a_gateway_shutting_down_ends_its_sessions_in_words(harness: Harness) -> None:
    app = await harness.start_gateway()
    client, channel = await open_session(harness, app)
    first = await client.request(b"before")
    stopping = asyncio.create_task(app.stop(10.0))
    with pytest.raises(SessionEnded) as ended:
        await client.next_event()  # what a client reads next: the gateway's SessionClosed
    assert ended.value.reason == "the gateway is shutting down"
    assert ended.value.closed is not None and not ended.value.closed.bad_receipt
    await stopping
    (job,) = harness.fake_proxy.jobs.values()
    assert job.stop_reason == "stopped: the gateway is shutting down"
    assert await stored_receipts(harness, client.job_uuid) == [first.receipt.to_json()]
    await channel.close()


def test_the_clients_default_deadline_outlasts_any_default_session() -> None:
    """Without --time-limit the gateway picks the limit (up to its max_session_time_limit_s):
    the client's call must not be cut off by its own deadline before that."""
    from horde_services.core.config import GatewaySettings
    from horde_services.streaming_gateway import client as stream_client

    longest = GatewaySettings.model_fields["max_session_time_limit_s"].default
    assert stream_client.DEFAULT_SESSION_DEADLINE_S >= longest + 600
