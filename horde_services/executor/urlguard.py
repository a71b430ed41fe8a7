"""Where the executor may download URL inputs from: public addresses only (no SSRF).

A job's URL inputs are fetched on the miner's host, so without a policy a client could make the
executor GET cloud metadata (169.254.169.254), services on the host's loopback or anything on the
miner's private network, and learn from the job's error what is reachable. The policy is enforced
on the addresses actually connected to: names are resolved through `GuardedResolver` (which drops
non-public addresses, so DNS rebinding gains nothing), literal IP hosts are checked before each
request, and redirects are followed one hop at a time so every hop is checked the same way.
`job_urls_allow_private` (ExecutorSettings) turns the policy off.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = IPv4Address | IPv6Address
Policy = Callable[[IPAddress], bool]

MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CGNAT = IPv4Network("100.64.0.0/10")
_NAT64 = IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: the IPv4 address it embeds counts


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address; False for loopback, private (RFC 1918,
    fc00::/7), link-local, CGNAT (100.64/10), multicast, unspecified, reserved and documentation
    ranges, and for IPv6 forms (IPv4-mapped, NAT64, 6to4) that embed such an IPv4 address."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in _NAT64:
            return is_public(IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and not is_public(address.sixtofour):
            return False
        if address.teredo is not None or address.is_site_local:
            return False
    elif address in _CGNAT:
        return False
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    )


def allow_all(address: IPAddress) -> bool:
    return True


def parse_address(host: str) -> IPAddress | None:
    """The IP address a host string spells (brackets and an IPv6 zone allowed), else None."""
    try:
        return ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


class NonPublicAddressError(aiohttp.ClientError):
    """A download (or one of its redirects) would connect to an address the policy refuses.

    `address` is set only for a literal IP host: for a name the addresses it resolved to are
    not told (they could reveal the miner's private DNS)."""

    def __init__(self, host: str, address: str | None, url: URL | None = None) -> None:
        super().__init__(f"{host} is not a public address")
        self.host, self.address, self.url = host, address, url


class GuardedResolver(AbstractResolver):
    """Resolves through another resolver and drops the addresses the policy refuses; a name
    with no allowed address fails with NonPublicAddressError."""

    def __init__(self, inner: AbstractResolver, allowed: Policy = is_public) -> None:
        self._inner = inner
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if self._permits(r["host"])]
        if results and not kept:
            raise NonPublicAddressError(host, None)
        return kept

    def _permits(self, host: str) -> bool:
        address = parse_address(host)
        return address is not None and self._allowed(address)

    async def close(self) -> None:
        await self._inner.close()


def check_url(url: URL, allowed: Policy) -> None:
    """Raise NonPublicAddressError when the URL's host is a literal IP the policy refuses
    (names are checked when resolved, by GuardedResolver)."""
    host = url.raw_host or ""
    address = parse_address(host)
    if address is not None and not allowed(address):
        raise NonPublicAddressError(host, str(address), url)


@asynccontextmanager
async def guarded_get(
    url: str,
    allowed: Policy = is_public,
    resolver: AbstractResolver | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET `url`, following up to MAX_REDIRECTS redirects, connecting only to addresses
    `allowed` accepts (`resolver` is the underlying one, aiohttp's default when None).

    Raises NonPublicAddressError for a refused hop, aiohttp.ClientError for other failures."""
    guarded = GuardedResolver(resolver or DefaultResolver(), allowed)
    try:
        connector = aiohttp.TCPConnector(resolver=guarded)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                target = URL(url)
            except ValueError as exc:
                raise aiohttp.InvalidURL(url) from exc
            for _ in range(MAX_REDIRECTS + 1):
                check_url(target, allowed)
                try:
                    resp = await session.get(target, allow_redirects=False)
                except NonPublicAddressError as exc:
                    # The resolver only knows the name; report the URL being fetched.
                    raise NonPublicAddressError(exc.host, None, target) from None
                location = resp.headers.get("Location")
                if resp.status not in REDIRECT_STATUSES or not location:
                    try:
                        yield resp
                    finally:
                        resp.release()
                    return
                resp.release()
                try:
                    target = resp.url.join(URL(location))
                except ValueError as exc:
                    raise aiohttp.InvalidURL(location) from exc
                if target.scheme not in ("http", "https"):
                    raise aiohttp.ClientError(
                        f"{resp.url.with_query(None)} redirected to a non-HTTP URL"
                    )
            raise aiohttp.ClientError(f"more than {MAX_REDIRECTS} redirects")
    finally:
        await guarded.close()
