"""`horde health ADDRESS`: one gRPC health check (grpc.health.v1 Check) of any Horde service, for
systemd (ExecStartPost), load balancers and monitoring. Health calls need no signature, so no key
is needed; TLS as every `horde` command speaks it (HORDE_TLS_CA_FILE, and HORDE_TLS_CERT_FILE
with HORDE_TLS_KEY_FILE for a service that requires client certificates)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

PROG = "horde health"
DEFAULT_TIMEOUT_S = 5.0

EPILOG = """exit status: 0 when the service answers SERVING; 1 when it answers anything else
(NOT_SERVING, e.g. while it drains or cannot use its database; SERVICE_UNKNOWN for a --service it
does not serve; no health service at all); 2 when it cannot be reached or does not answer within
--timeout, and for usage problems (a bad ADDRESS, an unreadable HORDE_TLS_* file); 130 when
interrupted."""


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{value:g}: --timeout must be above 0 and at most 3600")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check a service's gRPC health (SERVING or not)",
        description="Ask the service at ADDRESS for its health (grpc.health.v1 Check; no key "
        "needed) and print SERVING, NOT_SERVING or SERVICE_UNKNOWN. Plaintext, or TLS when "
        "HORDE_TLS_CA_FILE names the CA that signed the service's certificate (with "
        "HORDE_TLS_CERT_FILE and HORDE_TLS_KEY_FILE for one that requires client certificates).",
        epilog=EPILOG,
    )
    p.add_argument("address", metavar="ADDRESS", help="the service's host:port (its `listen`)")
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="the gRPC service to ask about, e.g. horde.v1.ValidatorService (default: the "
        "server as a whole)",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: address, service, status (and detail when the call failed)",
    )
    p.set_defaults(func=main)


class _NoAnswer(Exception):
    """The service could not be reached or did not answer in time (exit status 2)."""


def main(args: argparse.Namespace) -> int:
    from horde_services.cli.args import client_tls, service_address

    try:
        address = service_address(args.address, "ADDRESS")
        tls = client_tls()
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        status, detail = asyncio.run(_check(address, args.service, args.timeout, tls))
    except _NoAnswer as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a HORDE_TLS_* file that went away since it was checked
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""  # past the terminal's ^C
        print(f"{lead}{PROG}: interrupted", file=sys.stderr)
        return 130
    try:
        if args.json:
            doc = {"address": address, "service": args.service, "status": status}
            print(json.dumps({**doc, "detail": detail} if detail else doc))
        else:
            print(status)
            if detail:
                print(f"{PROG}: {detail}", file=sys.stderr)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:  # stdout closed early: stop quietly, as other commands do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    return 0 if status == "SERVING" else 1


async def _check(address: str, service: str, wait_s: float, tls: Any) -> tuple[str, str]:
    """The service's answer: its status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN for a
    service it does not know, ...) and what else it said; _NoAnswer when none came."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from horde_services.cli.args import tls_hint
    from horde_services.core.channel import open_channel

    async with open_channel(address, tls=tls) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=wait_s
            )
        except grpc.aio.AioRpcError as exc:
            code, said = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.DEADLINE_EXCEEDED or (
                # (a listener that never answers: gRPC's connect may give up first)
                code is grpc.StatusCode.UNAVAILABLE and "timed out" in said.lower()
            ):
                raise _NoAnswer(f"no answer in time from {address} ({wait_s:g}s)") from None
            if code is grpc.StatusCode.UNAVAILABLE:
                hint = tls_hint(said) if tls is None else ""  # ("Socket closed": TLS there)
                raise _NoAnswer(f"cannot reach {address}: UNAVAILABLE: {said}{hint}") from None
            if code is grpc.StatusCode.NOT_FOUND:  # the server does not serve --service
                return "SERVICE_UNKNOWN", ""
            if code is grpc.StatusCode.UNIMPLEMENTED:
                return "UNIMPLEMENTED", f"{address} serves no grpc.health.v1 ({said})"
            return code.name, said
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status), ""
