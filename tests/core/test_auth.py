"""Signed RPCs end to end: real servers, real signatures, every way a call can be refused."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from horde.v1 import miner_pb2

from horde_services.core.auth import (
    H_CALLEE,
    H_CALLER,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    AllowAll,
    AnyOfPolicy,
    Authenticator,
    AuthFailure,
    MethodPolicy,
    NonceCache,
    StaticPolicy,
    sign_call,
    signing_message,
    timestamp_hint,
)
from horde_services.core.identity import Ed25519Signer, HotkeySigner, Signer

if TYPE_CHECKING:  # fixtures come from conftest.py; these are only their types
    from conftest import Callers, Served, StartServer

SERVICE = "horde.v1.MinerService"
GET_MANIFEST = f"/{SERVICE}/GetManifest"
LIST_RECEIPTS = f"/{SERVICE}/ListReceipts"
SKEW_NS = 30 * 10**9

Metadata = list[tuple[str, str]]


def signed(
    signer: Signer,
    method: str,
    callee: str,
    *,
    ts: int | None = None,
    nonce: str | None = None,
) -> Metadata:
    """Authentication metadata built by hand, so tests can pick the timestamp and nonce."""
    ts = time.time_ns() if ts is None else ts
    nonce = nonce or secrets.token_hex(16)
    sig = signer.sign(signing_message(method, callee, ts, nonce))
    return [
        (H_CALLER, str(signer.identity)),
        (H_CALLEE, callee),
        (H_TIMESTAMP, str(ts)),
        (H_NONCE, nonce),
        (H_SIGNATURE, sig.hex()),
    ]


def replace(md: Metadata, key: str, value: str | None) -> Metadata:
    """`md` with header `key` set to `value` (removed when None)."""
    out = [(k, v) for k, v in md if k != key]
    if value is not None:
        out.append((key, value))
    return out


def flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


async def expect_error(
    awaitable: object, code: grpc.StatusCode, fragment: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    err = info.value
    assert err.code() is code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()
    return err


async def assert_still_serving(served: Served, callers: Callers) -> None:
    resp = await served.stub(callers.ed25519).GetManifest(miner_pb2.GetManifestRequest())
    assert resp.manifest.miner_hotkey == str(callers.ed25519.identity)


async def drain(call: grpc.aio.UnaryStreamCall) -> list[miner_pb2.RunSyntheticRoundResponse]:
    return [r async for r in call]


# ---- happy paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["hotkey", "ed25519"])
async def test_signed_unary_and_stream_calls_reach_servicer_as_caller(
    served: Served, callers: Callers, who: str
) -> None:
    signer: Signer = getattr(callers, who)
    stub = served.stub(signer)

    manifest = await stub.GetManifest(miner_pb2.GetManifestRequest())
    assert manifest.manifest.miner_hotkey == str(signer.identity)
    receipts = await stub.ListReceipts(miner_pb2.ListReceiptsRequest(cursor=""))
    assert receipts.next_cursor == str(signer.identity)

    responses = await drain(stub.RunSyntheticRound(miner_pb2.RunSyntheticRoundRequest(round=1)))
    assert [r.executor_id for r in responses] == [
        f"first:{signer.identity}",
        f"second:{signer.identity}",
    ]
    assert served.servicer.stream_outcome == "completed"


async def test_many_calls_on_one_channel_each_get_a_fresh_nonce(
    served: Served, callers: Callers
) -> None:
    stub = served.stub(callers.hotkey)
    for _ in range(5):
        resp = await stub.GetManifest(miner_pb2.GetManifestRequest())
        assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)


async def test_ss58_in_allow_list_admits_the_hotkey(
    start_server: StartServer, callers: Callers
) -> None:
    served = await start_server(policy=StaticPolicy({callers.hotkey.identity.ss58}))
    resp = await served.stub(callers.hotkey).GetManifest(miner_pb2.GetManifestRequest())
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)
    await expect_error(
        served.stub(callers.ed25519).GetManifest(miner_pb2.GetManifestRequest()),
        grpc.StatusCode.PERMISSION_DENIED,
        f"{callers.ed25519.identity} is not an enrolled caller",
    )


async def test_raw_sign_call_metadata_is_accepted(served: Served, callers: Callers) -> None:
    md = sign_call(callers.hotkey, GET_MANIFEST, served.callee)
    resp = await served.stub().GetManifest(miner_pb2.GetManifestRequest(), metadata=md)
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)


# ---- refusals ----------------------------------------------------------------------------------

U = grpc.StatusCode.UNAUTHENTICATED
P = grpc.StatusCode.PERMISSION_DENIED
Builder = Callable[["Served", "Callers"], Metadata]


def _bad_signature(s: Served, c: Callers) -> Metadata:
    md = sign_call(c.hotkey, GET_MANIFEST, s.callee)
    return replace(md, H_SIGNATURE, flip_hex(dict(md)[H_SIGNATURE]))


def _tampered_timestamp(s: Served, c: Callers) -> Metadata:
    md = sign_call(c.ed25519, GET_MANIFEST, s.callee)
    return replace(md, H_TIMESTAMP, str(int(dict(md)[H_TIMESTAMP]) - 1))


def _tampered_nonce(s: Served, c: Callers) -> Metadata:
    md = sign_call(c.ed25519, GET_MANIFEST, s.callee)
    return replace(md, H_NONCE, flip_hex(dict(md)[H_NONCE]))


def _signed_for_other_method(s: Served, c: Callers) -> Metadata:
    return sign_call(c.hotkey, LIST_RECEIPTS, s.callee)


def _impersonation(s: Served, c: Callers) -> Metadata:
    # The stranger signs, but claims to be the enrolled client.
    md = sign_call(c.stranger, GET_MANIFEST, s.callee)
    return replace(md, H_CALLER, str(c.ed25519.identity))


def _scheme_swap(s: Served, c: Callers) -> Metadata:
    # The hotkey's sr25519 signature presented under the same bytes as an ed25519 identity.
    md = sign_call(c.hotkey, GET_MANIFEST, s.callee)
    return replace(md, H_CALLER, "ed25519:" + c.hotkey.identity.public_key.hex())


def _expired(s: Served, c: Callers) -> Metadata:
    return signed(c.hotkey, GET_MANIFEST, s.callee, ts=time.time_ns() - SKEW_NS - 5 * 10**9)


def _milliseconds(s: Served, c: Callers) -> Metadata:
    return signed(c.hotkey, GET_MANIFEST, s.callee, ts=time.time_ns() // 10**6)


def _future(s: Served, c: Callers) -> Metadata:
    return signed(c.hotkey, GET_MANIFEST, s.callee, ts=time.time_ns() + SKEW_NS + 5 * 10**9)


def _wrong_callee(s: Served, c: Callers) -> Metadata:
    other = str(HotkeySigner.generate("sr25519").identity)
    return sign_call(c.hotkey, GET_MANIFEST, other)


def _missing_all(s: Served, c: Callers) -> Metadata:
    return []


def _missing_signature(s: Served, c: Callers) -> Metadata:
    return replace(sign_call(c.hotkey, GET_MANIFEST, s.callee), H_SIGNATURE, None)


def _malformed_identity(s: Served, c: Callers) -> Metadata:
    return replace(sign_call(c.hotkey, GET_MANIFEST, s.callee), H_CALLER, "sr25519:not-a-key")


def _uppercase_identity(s: Served, c: Callers) -> Metadata:
    md = sign_call(c.ed25519, GET_MANIFEST, s.callee)
    return replace(md, H_CALLER, str(c.ed25519.identity).upper())


def _malformed_signature(s: Served, c: Callers) -> Metadata:
    return replace(sign_call(c.hotkey, GET_MANIFEST, s.callee), H_SIGNATURE, "zz" * 64)


def _malformed_timestamp(s: Served, c: Callers) -> Metadata:
    return replace(sign_call(c.hotkey, GET_MANIFEST, s.callee), H_TIMESTAMP, "yesterday")


def _short_nonce(s: Served, c: Callers) -> Metadata:
    return signed(c.hotkey, GET_MANIFEST, s.callee, nonce="abc")


def _unknown_caller(s: Served, c: Callers) -> Metadata:
    return sign_call(c.stranger, GET_MANIFEST, s.callee)


REFUSALS: dict[str, tuple[Builder, grpc.StatusCode, str]] = {
    "bad-signature": (_bad_signature, U, "bad signature"),
    "tampered-timestamp": (_tampered_timestamp, U, "bad signature"),
    "tampered-nonce": (_tampered_nonce, U, "bad signature"),
    "signed-for-other-method": (_signed_for_other_method, U, "bad signature"),
    "impersonation": (_impersonation, U, "bad signature"),
    "scheme-swap": (_scheme_swap, U, "bad signature"),
    "expired": (_expired, U, "timestamp expired"),
    "milliseconds": (_milliseconds, U, "(it reads as unix milliseconds: nanoseconds are required)"),
    "future": (_future, U, "in the future"),
    "wrong-callee": (_wrong_callee, U, "signed for another callee"),
    "missing-all": (
        _missing_all,
        U,
        "missing authentication metadata: x-horde-caller, x-horde-callee, "
        "x-horde-timestamp-ns, x-horde-nonce, x-horde-signature",
    ),
    "missing-signature": (
        _missing_signature,
        U,
        "missing authentication metadata: x-horde-signature",
    ),
    "malformed-identity": (_malformed_identity, U, "malformed caller identity"),
    "uppercase-identity": (_uppercase_identity, U, "malformed caller identity"),
    "malformed-signature": (_malformed_signature, U, "malformed x-horde-signature: hex"),
    "malformed-timestamp": (_malformed_timestamp, U, "malformed x-horde-timestamp-ns: unix"),
    "short-nonce": (_short_nonce, U, "malformed x-horde-nonce: 16 to 128"),
    "unknown-caller": (_unknown_caller, P, "is not an enrolled caller"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_unary_call(served: Served, callers: Callers, case: str) -> None:
    build, code, fragment = REFUSALS[case]
    md = build(served, callers)
    await expect_error(
        served.stub().GetManifest(miner_pb2.GetManifestRequest(), metadata=md), code, fragment
    )
    await assert_still_serving(served, callers)


async def test_unknown_caller_denial_names_the_identity(served: Served, callers: Callers) -> None:
    await expect_error(
        served.stub(callers.stranger).GetManifest(miner_pb2.GetManifestRequest()),
        grpc.StatusCode.PERMISSION_DENIED,
        f"{callers.stranger.identity} is not an enrolled caller",
    )


async def test_a_refused_callers_rpc_line_names_it(
    served: Served, callers: Callers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RPC summary line of a call refused PERMISSION_DENIED names the caller (its signature
    held: it is who it says), so an operator can enrol it or find it; UNAUTHENTICATED ones, whose
    claim proved nothing, name none."""
    from log_support import record_log

    from horde_services.core import server

    logged = record_log(monkeypatch, server, ("warning",))
    with pytest.raises(grpc.aio.AioRpcError):
        await served.stub(callers.stranger).GetManifest(miner_pb2.GetManifestRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        md = _bad_signature(served, callers)
        await served.stub().GetManifest(miner_pb2.GetManifestRequest(), metadata=md)
    denied, unauthenticated = [fields for _, event, fields in logged if event == "rpc"]
    assert (denied["code"], denied["caller"]) == (
        "PERMISSION_DENIED",
        str(callers.stranger.identity),
    )
    assert (unauthenticated["code"], unauthenticated["caller"]) == ("UNAUTHENTICATED", "")


async def test_refused_streaming_call(served: Served, callers: Callers) -> None:
    await expect_error(
        drain(
            served.stub(callers.stranger).RunSyntheticRound(miner_pb2.RunSyntheticRoundRequest())
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "is not an enrolled caller",
    )
    method = f"/{SERVICE}/RunSyntheticRound"
    md = sign_call(callers.hotkey, method, served.callee)
    md = replace(md, H_SIGNATURE, flip_hex(dict(md)[H_SIGNATURE]))
    await expect_error(
        drain(served.stub().RunSyntheticRound(miner_pb2.RunSyntheticRoundRequest(), metadata=md)),
        grpc.StatusCode.UNAUTHENTICATED,
        "bad signature",
    )
    assert served.servicer.stream_outcome is None  # the servicer never ran
    await assert_still_serving(served, callers)


async def test_replayed_nonce_is_refused(served: Served, callers: Callers) -> None:
    md = sign_call(callers.hotkey, GET_MANIFEST, served.callee)
    stub = served.stub()
    first = await stub.GetManifest(miner_pb2.GetManifestRequest(), metadata=md)
    assert first.manifest.miner_hotkey == str(callers.hotkey.identity)
    await expect_error(
        stub.GetManifest(miner_pb2.GetManifestRequest(), metadata=md),
        grpc.StatusCode.UNAUTHENTICATED,
        "replayed nonce",
    )
    # Another server (another callee) would refuse it too: it was signed for this one.
    await assert_still_serving(served, callers)


async def test_refused_call_does_not_burn_the_nonce(served: Served, callers: Callers) -> None:
    """A forged copy with a bad signature must not let an attacker block the genuine call."""
    md = sign_call(callers.hotkey, GET_MANIFEST, served.callee)
    forged = replace(md, H_SIGNATURE, flip_hex(dict(md)[H_SIGNATURE]))
    stub = served.stub()
    await expect_error(
        stub.GetManifest(miner_pb2.GetManifestRequest(), metadata=forged),
        grpc.StatusCode.UNAUTHENTICATED,
        "bad signature",
    )
    resp = await stub.GetManifest(miner_pb2.GetManifestRequest(), metadata=md)
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)


async def test_call_relayed_to_another_server_is_refused(
    start_server: StartServer, callers: Callers
) -> None:
    a, b = await start_server(), await start_server()
    md = sign_call(callers.hotkey, GET_MANIFEST, a.callee)
    await expect_error(
        b.stub().GetManifest(miner_pb2.GetManifestRequest(), metadata=md),
        grpc.StatusCode.UNAUTHENTICATED,
        f"signed for another callee ({a.callee}), not {b.callee}",
    )
    # ...and was not consumed there: the intended server still accepts it.
    resp = await a.stub().GetManifest(miner_pb2.GetManifestRequest(), metadata=md)
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)


@pytest.mark.parametrize(
    ("offset_s", "fragment"), [(+45, "timestamp expired"), (-45, "in the future")]
)
async def test_server_clock_skew_refuses_signed_channel(
    served: Served, callers: Callers, offset_s: int, fragment: str
) -> None:
    served.clock.offset_ns = offset_s * 10**9
    stub = served.stub(callers.hotkey)
    await expect_error(
        stub.GetManifest(miner_pb2.GetManifestRequest()), grpc.StatusCode.UNAUTHENTICATED, fragment
    )
    await expect_error(
        drain(stub.RunSyntheticRound(miner_pb2.RunSyntheticRoundRequest())),
        grpc.StatusCode.UNAUTHENTICATED,
        fragment,
    )
    # Within the window the same channel works again.
    served.clock.offset_ns = (offset_s // abs(offset_s)) * 20 * 10**9
    resp = await stub.GetManifest(miner_pb2.GetManifestRequest())
    assert resp.manifest.miner_hotkey == str(callers.hotkey.identity)


# ---- public services ---------------------------------------------------------------------------


async def test_health_check_needs_no_authentication(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel())
    for service in ("", SERVICE):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    await expect_error(
        health.Check(health_pb2.HealthCheckRequest(service="horde.v1.Nope")),
        grpc.StatusCode.NOT_FOUND,
        "",
    )


async def test_reflection_lists_the_service_without_authentication(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel())

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)

    responses = [r async for r in stub.ServerReflectionInfo(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto
    # The v1 name, which current tools (grpcurl, Postman) ask for first, answers the same.
    v1 = served.channel().stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    again = [r async for r in v1(requests())]
    assert {s.name for s in again[0].list_services_response.service} == names
    assert again[1].file_descriptor_response == responses[1].file_descriptor_response


# ---- error mapping -----------------------------------------------------------------------------


async def test_horde_error_maps_to_its_status_code(served: Served, callers: Callers) -> None:
    await expect_error(
        served.stub(callers.hotkey).ListReceipts(miner_pb2.ListReceiptsRequest(cursor="missing")),
        grpc.StatusCode.NOT_FOUND,
        "no such cursor",
    )
    await expect_error(
        drain(
            served.stub(callers.hotkey).RunSyntheticRound(
                miner_pb2.RunSyntheticRoundRequest(round=served.servicer.ROUND_NOT_FOUND)
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        f"no round {served.servicer.ROUND_NOT_FOUND}",
    )


async def test_unexpected_exception_is_internal_without_leaking(
    served: Served, callers: Callers
) -> None:
    err = await expect_error(
        served.stub(callers.hotkey).ListReceipts(miner_pb2.ListReceiptsRequest(cursor="boom")),
        grpc.StatusCode.INTERNAL,
        "internal error",
    )
    details = err.details() or ""
    assert "hunter2" not in details and "Traceback" not in details
    assert "RuntimeError" not in details
    await assert_still_serving(served, callers)


async def test_a_database_that_refuses_is_unavailable_with_its_words_only(
    served: Served, callers: Callers
) -> None:
    """A full disk is no internal error: the caller may try again later, and learns why, but
    not the statement or its values."""
    err = await expect_error(
        served.stub(callers.hotkey).ListReceipts(miner_pb2.ListReceiptsRequest(cursor="disk-full")),
        grpc.StatusCode.UNAVAILABLE,
        "the service cannot use its database right now (database or disk is full): try again later",
    )
    details = err.details() or ""
    assert "hunter2" not in details and "secret_table" not in details
    # A statement in error is a bug, not a reason to try again later: internal, as before.
    await expect_error(
        served.stub(callers.hotkey).ListReceipts(miner_pb2.ListReceiptsRequest(cursor="sql-bug")),
        grpc.StatusCode.INTERNAL,
        "internal error",
    )
    await assert_still_serving(served, callers)


async def test_exception_mid_stream_is_internal_after_the_first_message(
    served: Served, callers: Callers
) -> None:
    call = served.stub(callers.ed25519).RunSyntheticRound(
        miner_pb2.RunSyntheticRoundRequest(round=served.servicer.ROUND_CRASH_MID_STREAM)
    )
    first = await call.read()
    assert first.executor_id == f"first:{callers.ed25519.identity}"
    err = await expect_error(call.read(), grpc.StatusCode.INTERNAL, "internal error")
    assert "secret" not in (err.details() or "")
    assert await call.code() is grpc.StatusCode.INTERNAL


async def test_method_the_servicer_lacks_is_unimplemented(served: Served, callers: Callers) -> None:
    # MinerTestServicer does not override RunJob: the generated base raises NotImplementedError.
    call = served.stub(callers.hotkey).RunJob(iter([miner_pb2.RunJobRequest(cancel=True)]))
    await expect_error(call.read(), grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
    await assert_still_serving(served, callers)


# ---- Authenticator and policies in-process ------------------------------------------------------


async def test_authenticator_accepts_bytes_metadata_values(callers: Callers) -> None:
    me = Ed25519Signer.generate().identity
    auth = Authenticator(me, AllowAll())
    md = [(k, v.encode()) for k, v in sign_call(callers.hotkey, GET_MANIFEST, str(me))]
    assert await auth.authenticate(GET_MANIFEST, md) == callers.hotkey.identity


async def test_authenticator_window_edges(callers: Callers) -> None:
    me = Ed25519Signer.generate().identity
    now = 1_700_000_000 * 10**9
    auth = Authenticator(me, AllowAll(), max_skew_s=30, clock_ns=lambda: now)
    for ts in (now - SKEW_NS, now + SKEW_NS):
        md = signed(callers.ed25519, GET_MANIFEST, str(me), ts=ts)
        assert await auth.authenticate(GET_MANIFEST, md) == callers.ed25519.identity
    for ts, fragment in ((now - SKEW_NS - 1, "expired"), (now + SKEW_NS + 1, "future")):
        md = signed(callers.ed25519, GET_MANIFEST, str(me), ts=ts)
        with pytest.raises(AuthFailure, match=fragment) as info:
            await auth.authenticate(GET_MANIFEST, md)
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


async def test_replay_is_caught_for_the_whole_window(callers: Callers) -> None:
    """A nonce accepted at the far future edge must still be remembered when that timestamp is
    about to expire at the past edge (2 x skew later)."""
    me = Ed25519Signer.generate().identity
    clock = [1_700_000_000 * 10**9]
    auth = Authenticator(me, AllowAll(), max_skew_s=30, clock_ns=lambda: clock[0])
    md = signed(callers.ed25519, GET_MANIFEST, str(me), ts=clock[0] + SKEW_NS)
    await auth.authenticate(GET_MANIFEST, md)
    clock[0] += 2 * SKEW_NS  # the timestamp is now exactly at the past edge: still acceptable
    with pytest.raises(AuthFailure, match="replayed nonce"):
        await auth.authenticate(GET_MANIFEST, md)


async def test_policies_compose(callers: Callers) -> None:
    a, b = str(callers.hotkey.identity), str(callers.ed25519.identity)
    any_of = AnyOfPolicy([StaticPolicy({a}, "a validator"), StaticPolicy({b}, "a client")])
    assert await any_of.deny_reason(callers.hotkey.identity, GET_MANIFEST) is None
    assert await any_of.deny_reason(callers.ed25519.identity, GET_MANIFEST) is None
    reason = await any_of.deny_reason(callers.stranger.identity, GET_MANIFEST)
    assert reason == (
        f"{callers.stranger.identity} is not a validator; "
        f"{callers.stranger.identity} is not a client"
    )
    routed = MethodPolicy([(f"/{SERVICE}/", StaticPolicy({a}, "a validator"))])
    assert await routed.deny_reason(callers.hotkey.identity, GET_MANIFEST) is None
    assert await routed.deny_reason(callers.ed25519.identity, GET_MANIFEST) == (
        f"{callers.ed25519.identity} is not a validator"
    )
    assert await routed.deny_reason(callers.hotkey.identity, "/other.Svc/M") == (
        f"method /other.Svc/M is not open to {callers.hotkey.identity}"
    )


# ---- NonceCache --------------------------------------------------------------------------------


def test_nonce_cache_rejects_repeats_until_expiry() -> None:
    cache = NonceCache(ttl_ns=100)
    assert cache.check_and_add("a", now_ns=1_000)
    assert not cache.check_and_add("a", now_ns=1_000)
    assert not cache.check_and_add("a", now_ns=1_099)  # still remembered just before expiry
    assert cache.check_and_add("a", now_ns=1_100)  # expired, accepted (and remembered again)
    assert not cache.check_and_add("a", now_ns=1_150)


def test_nonce_cache_forgets_old_entries() -> None:
    cache = NonceCache(ttl_ns=100)
    for i in range(50):
        assert cache.check_and_add(f"n{i}", now_ns=1_000 + i)
    assert len(cache._seen) == 50
    assert cache.check_and_add("late", now_ns=1_125)  # entries added before 1_026 expire
    assert len(cache._seen) == 50 - 26 + 1
    assert not cache.check_and_add("n30", now_ns=1_125)
    assert cache.check_and_add("n10", now_ns=1_125)


def test_nonce_cache_is_bounded() -> None:
    cache = NonceCache(ttl_ns=10**12, max_entries=3)
    for key in "abcd":
        assert cache.check_and_add(key, now_ns=0)
    assert len(cache._seen) <= 3
    assert not cache.check_and_add("d", now_ns=0)


def test_a_timestamp_hint_names_only_a_unit_mistake() -> None:
    now = time.time_ns()
    assert timestamp_hint(now - 3 * 10**9, now) == ""  # a clock 3 s behind: no unit mistake
    assert timestamp_hint(now - 400 * 86400 * 10**9, now) == ""
    assert "it is 0" in timestamp_hint(0, now)
    assert "unix seconds" in timestamp_hint(now // 10**9, now)
    assert "unix milliseconds" in timestamp_hint(now // 10**6, now)
    assert "unix microseconds" in timestamp_hint(now // 10**3, now)
