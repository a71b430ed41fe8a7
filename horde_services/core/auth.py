"""RPC authentication: every call is signed by its caller for one callee.

The caller signs `DOMAIN || method || 0 || callee || 0 || timestamp_ns || 0 || nonce` and sends
the identity, timestamp, nonce and signature as metadata. Binding the callee's identity means a
signed call cannot be relayed to another service; the timestamp window and the nonce cache mean it
cannot be replayed. The callee then asks its allow policy whether that identity may call at all.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc.aio import ClientCallDetails

from horde_services.core.identity import Identity, Signer

DOMAIN = b"horde.rpc-auth.v1\x00"
H_CALLER = "x-horde-caller"
H_CALLEE = "x-horde-callee"
H_TIMESTAMP = "x-horde-timestamp-ns"
H_NONCE = "x-horde-nonce"
H_SIGNATURE = "x-horde-signature"

# Methods anyone may call: health checks for load balancers and reflection for grpcurl.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def signing_message(method: str, callee: str, timestamp_ns: int, nonce: str) -> bytes:
    return DOMAIN + b"\x00".join(
        [method.encode(), callee.encode(), str(timestamp_ns).encode(), nonce.encode()]
    )


def call_signature(signer: Signer, method: str, callee: str) -> tuple[int, str, bytes]:
    """A fresh (timestamp_ns, nonce, signature) authenticating one call of `method` on `callee`."""
    ts = time.time_ns()
    nonce = secrets.token_hex(16)
    return ts, nonce, signer.sign(signing_message(method, callee, ts, nonce))


def sign_call(signer: Signer, method: str, callee: str) -> list[tuple[str, str]]:
    """Metadata authenticating one call of `method` on `callee`."""
    ts, nonce, sig = call_signature(signer, method, callee)
    return [
        (H_CALLER, str(signer.identity)),
        (H_CALLEE, callee),
        (H_TIMESTAMP, str(ts)),
        (H_NONCE, nonce),
        (H_SIGNATURE, sig.hex()),
    ]


class AuthFailure(Exception):
    """Authentication or authorisation failed; `code` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, reason: str, caller: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.caller = caller  # who was refused, when the signature proved it


class AllowPolicy(Protocol):
    """Decides whether an authenticated identity may call a method; returns a denial reason."""

    async def deny_reason(self, caller: Identity, method: str) -> str | None: ...


@dataclass
class StaticPolicy:
    """Allow a fixed set of identities (optionally per method prefix)."""

    allowed: set[str]
    # Who the allowed callers are, for the denial message ("an enrolled client").
    label: str = "an enrolled caller"

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        if str(caller) in self.allowed or caller.ss58 in self.allowed:
            return None
        return f"{caller} is not {self.label}"


@dataclass
class AnyOfPolicy:
    """Allow when any of the policies allows; the denial names every reason."""

    policies: Sequence[AllowPolicy]

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        reasons = []
        for policy in self.policies:
            reason = await policy.deny_reason(caller, method)
            if reason is None:
                return None
            reasons.append(reason)
        return "; ".join(reasons) or f"{caller} is not allowed"


@dataclass
class MethodPolicy:
    """Route a method to the policy of its service (the first matching prefix wins)."""

    routes: Sequence[tuple[str, AllowPolicy]]

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        for prefix, policy in self.routes:
            if method.startswith(prefix):
                return await policy.deny_reason(caller, method)
        return f"method {method} is not open to {caller}"


class AllowAll:
    """Any authenticated caller (used where the transport already restricts who connects)."""

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        return None


class NonceCache:
    """Remembers nonces for as long as their timestamps could still be accepted."""

    def __init__(self, ttl_ns: int, max_entries: int = 1_000_000) -> None:
        self._ttl_ns = ttl_ns
        self._max = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()

    def check_and_add(self, key: str, now_ns: int) -> bool:
        """False when the nonce was seen already (a replay)."""
        while self._seen:
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > now_ns and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now_ns + self._ttl_ns
        return True


WRONG_CALLEE = "call was signed for another callee"
_WRONG_CALLEE = re.compile(re.escape(WRONG_CALLEE) + r" \((?P<signed_for>[^)]*)\), not (?P<me>\S+)")


def wrong_callee(details: str) -> tuple[str, str] | None:
    """From a refusal's details, (the identity the call was signed for, the identity of the
    service that refused it) when the caller named the wrong service; else None. Lets a caller
    say which of its settings is wrong rather than pass the refusal on."""
    found = _WRONG_CALLEE.search(details)
    return (found["signed_for"], found["me"]) if found else None


def timestamp_hint(ts_ns: int, now_ns: int) -> str:
    """A hint for a timestamp far off the clock because of its unit, not the clock: "" unless
    it is 0 (never set) or reads as seconds, milliseconds or microseconds of about now."""
    if ts_ns == 0:
        return " (it is 0: not set; unix time in nanoseconds is required)"
    for unit, scale in (("seconds", 10**9), ("milliseconds", 10**6), ("microseconds", 10**3)):
        if abs(ts_ns * scale - now_ns) < 86400 * 10**9:
            return f" (it reads as unix {unit}: nanoseconds are required)"
    return ""


class Authenticator:
    """Server side: checks a call's metadata and returns the caller's identity."""

    def __init__(
        self,
        me: Identity,
        policy: AllowPolicy,
        *,
        max_skew_s: float = 30.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.me = me
        self.policy = policy
        self._skew_ns = int(max_skew_s * 1e9)
        self._clock_ns = clock_ns
        # A nonce must be remembered for the whole window on either side of now.
        self._nonces = NonceCache(ttl_ns=2 * self._skew_ns + 1)

    async def authenticate(self, method: str, metadata: Iterable[tuple[str, Any]]) -> Identity:
        md: dict[str, str] = {}
        for key, value in metadata:
            md[key] = value if isinstance(value, str) else bytes(value).decode(errors="replace")
        missing = [
            h for h in (H_CALLER, H_CALLEE, H_TIMESTAMP, H_NONCE, H_SIGNATURE) if h not in md
        ]
        if missing:
            raise self._unauth(f"missing authentication metadata: {', '.join(missing)}")
        try:
            caller = Identity.parse(md[H_CALLER])
        except ValueError as exc:
            raise self._unauth(f"malformed caller identity: {exc}") from None
        if md[H_CALLEE] != str(self.me):
            raise self._unauth(f"{WRONG_CALLEE} ({md[H_CALLEE]}), not {self.me}")
        raw_ts = md[H_TIMESTAMP]
        if not (raw_ts.isascii() and raw_ts.isdigit() and len(raw_ts) <= 19):
            raise self._unauth(
                f"malformed {H_TIMESTAMP}: unix nanoseconds in decimal digits are required"
            )
        ts = int(raw_ts)
        try:
            signature = bytes.fromhex(md[H_SIGNATURE])
        except ValueError:
            raise self._unauth(f"malformed {H_SIGNATURE}: hex digits are required") from None
        nonce = md[H_NONCE]
        if not 16 <= len(nonce) <= 128:
            raise self._unauth(f"malformed {H_NONCE}: 16 to 128 characters are required")
        now = self._clock_ns()
        if ts > now + self._skew_ns:
            ahead = (ts - now) / 1e9
            shown = f"{ahead:.1f}s" if ahead < 86400 * 365 else "more than a year"
            raise self._unauth(f"timestamp is {shown} in the future")
        if ts < now - self._skew_ns:
            raise self._unauth(
                f"timestamp expired ({(now - ts) / 1e9:.1f}s old){timestamp_hint(ts, now)}"
            )
        if not caller.verify(signing_message(method, md[H_CALLEE], ts, nonce), signature):
            raise self._unauth("bad signature")
        if not self._nonces.check_and_add(f"{caller}/{nonce}", now):
            raise self._unauth("replayed nonce")
        reason = await self.policy.deny_reason(caller, method)
        if reason is not None:
            raise AuthFailure(grpc.StatusCode.PERMISSION_DENIED, reason, str(caller))
        return caller

    @staticmethod
    def _unauth(reason: str) -> AuthFailure:
        return AuthFailure(grpc.StatusCode.UNAUTHENTICATED, reason)


class _SigningInterceptor:
    def __init__(self, signer: Signer, callee: str) -> None:
        self._signer = signer
        self._callee = callee

    def _details(self, details: ClientCallDetails) -> ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in sign_call(self._signer, method, self._callee):
            metadata.add(key, value)
        return ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class SigningUnaryUnary(_SigningInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class SigningUnaryStream(_SigningInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class SigningStreamUnary(_SigningInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: ClientCallDetails, it: Any
    ) -> Any:
        return await continuation(self._details(details), it)


class SigningStreamStream(_SigningInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: ClientCallDetails, it: Any
    ) -> Any:
        return await continuation(self._details(details), it)


def client_interceptors(signer: Signer, callee: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that sign every call made on a channel to `callee`."""
    return [
        SigningUnaryUnary(signer, callee),
        SigningUnaryStream(signer, callee),
        SigningStreamUnary(signer, callee),
        SigningStreamStream(signer, callee),
    ]
