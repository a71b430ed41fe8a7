"""URL inputs connect only to public addresses: the address policy, the guarded resolver, every
redirect hop, and the job failure a refused URL input ends with."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from horde.v1 import common_pb2, job_pb2

from horde_services.executor.jobs import JobFailure, OrganicJobRunner
from horde_services.executor.sandbox import DockerRuntime, SandboxLimits
from horde_services.executor.urlguard import (
    GuardedResolver,
    IPAddress,
    NonPublicAddressError,
    allow_all,
    guarded_get,
    is_public,
    parse_address,
)

pytestmark = pytest.mark.timeout(60)

NOT_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "::ffff:127.0.0.1",  # IPv4-mapped forms
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:100.64.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:db8::1",
    "2001::1",  # Teredo
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.1",
    "172.32.0.1",
    "2001:4860:4860::8888",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_refused(address: str) -> None:
    parsed = parse_address(address)
    assert parsed is not None
    assert not is_public(parsed)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_allowed(address: str) -> None:
    assert is_public(ip_address(address))


def test_parse_address() -> None:
    assert parse_address("[::1]") == ip_address("::1")
    assert parse_address("example.com") is None
    assert parse_address("127.1") is None  # not an IP to ipaddress; the resolver sees it


class FakeResolver(AbstractResolver):
    """Answers names from a table; a stand-in for DNS (including a rebinding one)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_drops_non_public_addresses() -> None:
    inner = FakeResolver({"mixed.test": ["10.0.0.1", "8.8.8.8", "::1", "2606:4700::1111"]})
    resolver = GuardedResolver(inner)
    got = await resolver.resolve("mixed.test", 80, socket.AF_UNSPEC)
    assert [r["host"] for r in got] == ["8.8.8.8", "2606:4700::1111"]
    await resolver.close()
    assert inner.closed


@pytest.mark.parametrize(
    "addresses", [["127.0.0.1"], ["169.254.169.254", "fe80::1"], ["not-an-address"]]
)
async def test_resolver_fails_when_no_address_is_public(addresses: list[str]) -> None:
    resolver = GuardedResolver(FakeResolver({"inside.test": addresses}))
    with pytest.raises(NonPublicAddressError) as err:
        await resolver.resolve("inside.test", 80)
    assert (err.value.host, err.value.address) == ("inside.test", None)


async def test_resolver_allow_all_keeps_private_addresses() -> None:
    resolver = GuardedResolver(FakeResolver({"inside.test": ["10.0.0.1"]}), allow_all)
    got = await resolver.resolve("inside.test", 80)
    assert [r["host"] for r in got] == ["10.0.0.1"]


# ------------------------------------------------------------------ redirects, through a server


def only_127_0_0_1(address: IPAddress) -> bool:
    """A policy that allows just the test server's address (127.0.0.1), like a public origin."""
    return address == IPv4Address("127.0.0.1")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[str], dict[str, str]]]:
    """A local server: GET /go/<name> redirects to redirects[name]; GET /files/x answers 'x'."""
    seen: list[str] = []
    redirects: dict[str, str] = {}

    async def go(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        raise web.HTTPFound(redirects[request.match_info["name"]])

    async def files(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.Response(body=b"x")

    app = web.Application()
    app.router.add_get("/go/{name}", go)
    app.router.add_get("/files/x", files)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}", seen, redirects
    finally:
        await runner.cleanup()


async def test_redirect_within_allowed_origin_followed(
    server: tuple[str, list[str], dict[str, str]],
) -> None:
    origin, seen, redirects = server
    redirects["a"] = "/go/b"
    redirects["b"] = f"http://{origin}/files/x"
    async with guarded_get(f"http://{origin}/go/a", only_127_0_0_1) as resp:
        assert resp.status == 200
        assert await resp.read() == b"x"
    assert seen == ["/go/a", "/go/b", "/files/x"]


@pytest.mark.parametrize("target", ["127.0.0.2", "[::1]", "169.254.169.254", "10.0.0.1"])
async def test_redirect_to_literal_non_public_address_refused(
    server: tuple[str, list[str], dict[str, str]], target: str
) -> None:
    origin, seen, redirects = server
    port = origin.rsplit(":", 1)[1]
    redirects["a"] = f"http://{target}:{port}/files/x?secret=1"
    with pytest.raises(NonPublicAddressError) as err:
        async with guarded_get(f"http://{origin}/go/a", only_127_0_0_1):
            pass
    assert err.value.address == str(parse_address(target))
    assert err.value.url is not None and err.value.url.raw_host == target.strip("[]")
    assert seen == ["/go/a"]  # the first hop only


async def test_redirect_to_name_resolving_to_non_public_address_refused(
    server: tuple[str, list[str], dict[str, str]],
) -> None:
    """The origin's name resolves to the allowed address; the redirect's name (DNS rebinding,
    or an internal name) resolves to a refused one: the resolver refuses it at connect time."""
    origin, seen, redirects = server
    port = origin.rsplit(":", 1)[1]
    dns = FakeResolver({"origin.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"]})
    redirects["a"] = f"http://inside.test:{port}/files/x"
    with pytest.raises(NonPublicAddressError) as err:
        async with guarded_get(f"http://origin.test:{port}/go/a", only_127_0_0_1, dns):
            pass
    assert (err.value.host, err.value.address) == ("inside.test", None)
    assert err.value.url is not None and err.value.url.host == "inside.test"
    assert dns.asked == ["origin.test", "inside.test"]
    assert seen == ["/go/a"]
    assert dns.closed


async def test_redirect_loop_and_non_http_redirect_fail(
    server: tuple[str, list[str], dict[str, str]],
) -> None:
    origin, _seen, redirects = server
    redirects["loop"] = "/go/loop"
    with pytest.raises(aiohttp.ClientError, match="redirects"):
        async with guarded_get(f"http://{origin}/go/loop", only_127_0_0_1):
            pass
    redirects["file"] = "file:///etc/passwd"
    with pytest.raises(aiohttp.ClientError, match="non-HTTP"):
        async with guarded_get(f"http://{origin}/go/file", only_127_0_0_1):
            pass


# ------------------------------------------------------------------------ the job's failure


def runner(tmp_path: Path, **kwargs: Any) -> OrganicJobRunner:
    limits = SandboxLimits(memory_bytes=2**28, nano_cpus=10**9, pids_limit=64, output_bytes=2**20)
    return OrganicJobRunner(cast(DockerRuntime, None), set(), limits, tmp_path, **kwargs)


async def download_failure(job_runner: OrganicJobRunner, url: str, tmp_path: Path) -> JobFailure:
    with pytest.raises(JobFailure) as err:
        await job_runner._download(1, job_pb2.UrlInput(url=url), tmp_path / "spool")
    failure = err.value
    assert (failure.state, failure.reason, failure.stage) == (
        common_pb2.JOB_STATE_FAILED,
        common_pb2.FAILURE_REASON_DOWNLOAD_FAILED,
        common_pb2.STAGE_VOLUME_DOWNLOAD,
    )
    return failure


SUFFIX = "(executor setting job_urls_allow_private)"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8000/x?token=secret", "127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::ffff:127.0.0.1]:8000/x", "::ffff:7f00:1"),
        ("https://[fd00::5]/x", "fd00::5"),
    ],
)
async def test_default_runner_refuses_literal_non_public_url(
    tmp_path: Path, url: str, address: str
) -> None:
    failure = await download_failure(runner(tmp_path), url, tmp_path)
    shown = url.split("?", 1)[0]
    assert failure.detail == (
        f"input 1: {shown} resolves to {address}, which is not a public address {SUFFIX}"
    )
    assert not (tmp_path / "spool").exists()


async def test_default_runner_refuses_name_on_loopback_without_telling_its_address(
    tmp_path: Path,
) -> None:
    failure = await download_failure(runner(tmp_path), "http://localhost:9/x", tmp_path)
    assert failure.detail == f"input 1: http://localhost:9/x resolves to no public address {SUFFIX}"


async def test_refused_redirect_names_the_hop(
    tmp_path: Path, server: tuple[str, list[str], dict[str, str]]
) -> None:
    origin, seen, redirects = server
    port = origin.rsplit(":", 1)[1]
    redirects["a"] = f"http://127.0.0.2:{port}/files/x?secret=1"
    job_runner = runner(tmp_path)
    job_runner._url_policy = only_127_0_0_1
    failure = await download_failure(job_runner, f"http://{origin}/go/a?q=1", tmp_path)
    assert failure.detail == (
        f"input 1: http://{origin}/go/a (redirected to http://127.0.0.2:{port}/files/x) "
        f"resolves to 127.0.0.2, which is not a public address {SUFFIX}"
    )
    assert seen == ["/go/a"]


async def test_runner_allowing_private_downloads_from_loopback(
    tmp_path: Path, server: tuple[str, list[str], dict[str, str]]
) -> None:
    origin, seen, redirects = server
    redirects["a"] = "/files/x"
    job_runner = runner(tmp_path, job_urls_allow_private=True)
    await job_runner._download(0, job_pb2.UrlInput(url=f"http://{origin}/go/a"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"x"
    assert seen == ["/go/a", "/files/x"]


async def test_malformed_url_is_a_download_failure(tmp_path: Path) -> None:
    failure = await download_failure(runner(tmp_path), "http://[::1/x", tmp_path)
    assert failure.detail.startswith("download failed: ")
