"""`horde stream`: a streaming session from the command line.

    horde stream [--dev DIR] [--gateway ADDR --gateway-identity ID --key FILE] --image IMG
                 [--input FILE|-] [--receipts OUT.jsonl] [--class C] [--json] [--window N]
                 [--env KEY=VALUE ...] [--extra [NAME=]FILE ...]

Each line of --input (or of stdin, also with `--input -`; on a terminal, typed interactively) is
one request body, sent byte for byte without its line ending (LF or CRLF); a body over 1 MiB
travels as several frames (the job proxy's limit per request, 64 MiB by default, applies). Each
response is printed as one line (newlines inside it escaped as \\n), or with --json as one JSON
object. A request the job's service gave no answer to prints an empty line (with --json, an
object with "error"), says why on stderr, and the session goes on. Every receipt is
checked here as well against the session's certificate; --receipts writes them in DESIGN.md's
JSON form, one a line, as they arrive (the file is created once the session is ready), which
`horde receipts verify` accepts. --window N keeps up to N requests in flight (answers still
arrive in order). --dev DIR fills in whichever of --gateway, --gateway-identity and --key are
not given. --env sets the job's environment; each --extra file is fed to the job once the session
is ready, and placed read-only as /volume/extra/NAME (its own name unless NAME= is given) before
the first request is sent; the size and sha256 the executor reports are checked against the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import IO, Any

from horde_services.cli.args import bounded_int, checked_target, client_tls, key_values
from horde_services.core.loop import run as run_loop

EPILOG = """exit status: 0 when every request got a response with a verified receipt; 1 when the
session could not be opened (the gateway unreachable or refusing included) or ended early, or a
receipt failed its checks, or a request failed (the job's service gave it no answer), or an
--extra file was not placed, or the receipts file could not be written; 2 for usage problems
(bad options, unreadable input, key or --extra files); 130 when interrupted (Ctrl-C): the
session is cancelled and the receipts received so far stay in --receipts; 141 when the output
was closed early (e.g. piped into `head`)."""

MAX_TIME_LIMIT_S = 2**32 - 1  # SessionOpen.time_limit_s is a uint32
# How long an --extra file may take to be uploaded and placed (a gateway that never says, an
# older one, would otherwise hold the command until the session's end).
EXTRA_WAIT_S = 600.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "stream",
        help="open a streaming session and send requests",
        description="Open a streaming session at a gateway, send each input line as one "
        "request, print each response and check every receipt.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--dev",
        type=Path,
        help="state dir of a `horde dev up` network (fills in whichever of --gateway, "
        "--gateway-identity and --key are not given)",
    )
    p.add_argument("--gateway", help="gateway host:port")
    p.add_argument("--gateway-identity", help="gateway identity (ed25519:<hex>)")
    p.add_argument("--key", type=Path, help="client key file (`horde keys new`)")
    p.add_argument("--image", required=True, help="image on the validator's streaming whitelist")
    p.add_argument("--class", dest="executor_class", default="", help="executor class")
    p.add_argument(
        "--time-limit",
        type=bounded_int(0, MAX_TIME_LIMIT_S, "--time-limit"),
        default=0,
        help="session time limit in seconds (default 0: the gateway's default, 3600 unless "
        "its operator changed it)",
    )
    p.add_argument(
        "--input", type=Path, help="file of requests, one a line (default, or `-`: stdin)"
    )
    p.add_argument("--receipts", type=Path, help="write receipts here, one JSON line each")
    p.add_argument("--json", action="store_true", help="one JSON object per response")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a file fed to the job once it is ready, placed read-only as /volume/extra/NAME "
        "before the first request (repeatable)",
    )
    p.add_argument(
        "--window",
        type=bounded_int(1, 64, "--window"),
        default=1,
        help="requests in flight at once, 1 to 64 (default 1: each waits for the answer before "
        "it); more raises throughput, answers still come in order (lines typed on a terminal go "
        "one at a time); fewer while 120 MiB are in flight",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return run_loop(_run(args))
    except _UsageError as exc:
        print(f"horde stream: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class _UsageError(Exception):
    pass


class _OutputClosed(Exception):
    """stdout went away (a closed pipe): stop quietly."""


def _strip_eol(line: bytes) -> bytes:
    return line.removesuffix(b"\n").removesuffix(b"\r")


def _lines_of_file(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"--input {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line, it does not start another
    return [line.removesuffix(b"\r") for line in lines]


async def _stdin_lines(prompt: bool) -> AsyncIterator[bytes]:
    """Lines of standard input, read by a daemon thread: a blocking read must not keep the
    process alive once the session is over or Ctrl-C ends it (asyncio's own worker threads are
    waited for at exit). The thread reads the file descriptor itself, not sys.stdin, whose
    lock a thread blocked in a read would still hold while the interpreter shuts down."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    wanted = threading.Semaphore(0)  # one line read per line asked for
    fd = sys.stdin.fileno()

    def reader() -> None:
        pending = b""
        ended = False  # a read found the end of input (on a terminal: Ctrl-D)
        while True:
            wanted.acquire()
            while b"\n" not in pending and not ended:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                ended = not chunk
                pending += chunk
            line, sep, pending = pending.partition(b"\n")
            line += sep  # b"" only at the end of input
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is gone: nobody wants more
                return
            if not line:
                return

    threading.Thread(target=reader, name="horde-stdin", daemon=True).start()
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        wanted.release()
        line = await lines.get()
        if not line:
            return
        yield _strip_eol(line)


async def _file_lines(lines: list[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


def _check_receipts_path(path: Path) -> None:
    """Refuse a --receipts path that cannot be written before a session starts for nothing; the
    file itself is created only once the session is ready (a failed start leaves an existing
    file as it was)."""
    if path.is_dir():
        raise _UsageError(f"--receipts {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise _UsageError(f"--receipts {path}: no such directory {parent}")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise _UsageError(f"--receipts {path}: permission denied")


def _extra_files(items: list[str]) -> list[tuple[str, bytes]]:
    """Each --extra [NAME=]FILE as (name, bytes), read now: a missing file is a usage error
    before any session opens."""
    from horde_services.core.proto_util import PLAIN_NAME_RULE, plain_file_name

    files: list[tuple[str, bytes]] = []
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            name, path = Path(item).name, item
        if not plain_file_name(name):
            raise _UsageError(f"--extra {item!r}: {name!r}: {PLAIN_NAME_RULE}")
        if name in (n for n, _ in files):
            raise _UsageError(f"--extra {item!r}: the name {name!r} is given twice")
        try:
            files.append((name, Path(path).read_bytes()))
        except OSError as exc:
            raise _UsageError(f"--extra {item!r}: {exc.strerror or exc}") from None
    return files


def _count(n: int) -> str:
    return f"{n} response" if n == 1 else f"{n} responses"


def _one_line(body: bytes) -> str:
    return body.decode(errors="replace").replace("\\", "\\\\").replace("\n", "\\n")


async def _run(args: argparse.Namespace) -> int:
    from horde_services.cli.client import shown
    from horde_services.cli.devenv import DevEnv, DevEnvError
    from horde_services.core.server import open_channel
    from horde_services.streaming_gateway.checks import BadReceipt, CertificateError
    from horde_services.streaming_gateway.client import (
        ExtraDataError,
        RequestFailed,
        SessionEnded,
        StreamClient,
    )

    address, identity, key = args.gateway, args.gateway_identity, args.key
    validator_identity: str | None = None
    if args.dev is not None:
        try:
            env = DevEnv.load(args.dev)
        except DevEnvError as exc:
            raise _UsageError(str(exc)) from None
        address = address or env.address("gateway")
        identity = identity or env.identity("gateway")
        key = key or env.client_key
        validator_identity = env.identity("validator")
    if not (address and identity and key):
        raise _UsageError(
            "give --dev DIR, or --gateway ADDR with --gateway-identity ID and --key FILE"
        )
    try:
        address, identity, signer = checked_target(address, identity, key, "gateway")
        tls = client_tls()
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if args.receipts is not None:
        _check_receipts_path(args.receipts)
    if args.input is not None and str(args.input) == "-":
        args.input = None  # standard input, read as it comes
    try:
        job_env = key_values("--env", args.env)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    extras = _extra_files(args.extra)
    interactive = args.input is None and sys.stdin.isatty()
    requests = (
        _file_lines(_lines_of_file(args.input))
        if args.input is not None
        else _stdin_lines(prompt=interactive)
    )
    live = sys.stdout.isatty() and not args.json and args.input is None
    out = sys.stdout
    # The job's words (responses, and the events and reasons on stderr) are shown with their
    # control characters escaped on a terminal, where they could retitle the window or clear it;
    # into a pipe or file they go verbatim.
    out_tty, err_tty = sys.stdout.isatty(), sys.stderr.isatty()

    def one_line(body: bytes) -> str:
        return shown(_one_line(body), out_tty)

    def write_out(text: str, end: str = "\n") -> None:
        try:
            out.write(text + end)
            out.flush()
        except BrokenPipeError:
            raise _OutputClosed from None

    def on_event(event: Any) -> None:
        print(f"[{event.job_uuid[:8]}] {shown(event.message, err_tty)}", file=sys.stderr)

    def on_chunk(_seq: int, body: bytes) -> None:
        if live:
            write_out(one_line(body), end="")

    receipts_file: IO[str] | None = None
    saved = 0
    channel = open_channel(address, tls=tls)  # the session signs its own call
    client = StreamClient(
        channel,
        signer=signer,
        callee=identity,
        validator_identity=validator_identity,
        on_event=on_event,
        on_chunk=on_chunk,
    )
    latencies: list[float] = []
    failed = 0  # requests the job's service gave no answer to
    status = 0

    async def answers() -> AsyncGenerator[Any, None]:
        # Typed by hand too: the pipeline takes the next line (and prompts for it) only once
        # the answer before it is printed, and a session that ends while it waits for a line
        # (its time limit, say) ends this at once, with the gateway's reason.
        window = 1 if interactive else args.window  # typed lines: one answer, one prompt
        pipeline = client.pipeline(requests, window=window, return_failures=True)
        async with contextlib.aclosing(pipeline) as rs:
            async for res in rs:
                yield res

    try:
        try:
            ready = await client.open(
                args.image,
                executor_class=args.executor_class,
                time_limit_s=args.time_limit,
                env=job_env,
            )
            cert = client.certificate
            miner = cert.miner_hotkey if cert else "?"
            job_key = cert.job_public_key.hex() if cert else "?"
            # The job key is what `horde receipts verify --job-key` pins the receipts to.
            print(
                f"session ready: job {ready.job_uuid} (miner {miner}; job key {job_key})",
                file=sys.stderr,
            )
            for name, data in extras:
                try:
                    placed = await client.add_extra(name, data, timeout_s=EXTRA_WAIT_S)
                except TimeoutError:
                    raise ExtraDataError(
                        f"extra data {name}: no word of its placement within {EXTRA_WAIT_S:g}s"
                    ) from None
                digest = f", sha256 {placed.sha256}" if placed.sha256 else ""
                print(
                    f"extra data placed: /volume/extra/{name} ({placed.size_bytes} bytes{digest})",
                    file=sys.stderr,
                )
            if args.receipts is not None:
                try:
                    receipts_file = args.receipts.open("w")
                except OSError as exc:
                    raise _UsageError(
                        f"--receipts {args.receipts}: {exc.strerror or exc}"
                    ) from None
            async with contextlib.aclosing(answers()) as responses:
                async for res in responses:
                    if isinstance(res, RequestFailed):
                        failed += 1
                        if args.json:
                            write_out(
                                json.dumps(
                                    {
                                        "seq": res.seq,
                                        "error": res.reason,
                                        "latency_ms": round(res.latency_s * 1000, 3),
                                    }
                                )
                            )
                        elif not live:
                            write_out("")  # one line per request still
                        lead = "\n" if live else ""  # after chunks printed on the line
                        print(
                            f"{lead}horde stream: request {res.seq} failed, no receipt: "
                            f"{shown(res.reason, err_tty)}",
                            file=sys.stderr,
                        )
                        continue
                    latencies.append(res.latency_s)
                    if args.json:
                        doc = {
                            "seq": res.seq,
                            "http_status": res.http_status,
                            "response": res.body.decode(errors="replace"),
                            "latency_ms": round(res.latency_s * 1000, 3),
                            "receipt": res.receipt.to_json_dict(),
                        }
                        write_out(json.dumps(doc))
                    elif live:
                        write_out("")
                    else:
                        write_out(one_line(res.body))
                    if receipts_file is not None:
                        try:
                            receipts_file.write(res.receipt.to_json() + "\n")
                            receipts_file.flush()
                        except OSError as exc:
                            print(
                                f"horde stream: cannot write receipts to {args.receipts}: "
                                f"{exc.strerror or exc}; ending the session",
                                file=sys.stderr,
                            )
                            status = 1
                            break
                        saved += 1
            closed = await client.close("client done" if status == 0 else "client failed")
            if closed is not None:
                print(f"session closed: {shown(closed.reason, err_tty)}", file=sys.stderr)
            elif (ending := client.ending) is not None:
                # No SessionClosed: the call failed instead (a gateway error, say).
                print(
                    f"horde stream: session ended: {shown(ending.reason, err_tty)}",
                    file=sys.stderr,
                )
                status = 1
        except SessionEnded as exc:
            # On a terminal the prompt for the next line may be showing: start a line of its own.
            lead = "\n" if interactive else ""
            print(
                f"{lead}horde stream: session ended: {shown(exc.reason, err_tty)}", file=sys.stderr
            )
            status = 1
        except (BadReceipt, CertificateError) as exc:
            print(f"horde stream: refusing the job's answer: {exc}", file=sys.stderr)
            client.cancel()
            status = 1
        except ExtraDataError as exc:
            print(f"horde stream: {shown(str(exc), err_tty)}; closing the session", file=sys.stderr)
            closed = await client.close("an extra-data file was not placed")
            if closed is not None:
                print(f"session closed: {shown(closed.reason, err_tty)}", file=sys.stderr)
            status = 1
        except _OutputClosed:
            client.cancel()
            status = 141
        except asyncio.CancelledError:  # Ctrl-C: asyncio cancels this task, then raises it
            kept = f"; {saved} receipts kept in {args.receipts}" if receipts_file else ""
            print(
                f"\nhorde stream: interrupted after {_count(len(latencies))}; session "
                f"cancelled{kept}",
                file=sys.stderr,
            )
            raise
    finally:
        client.cancel()
        await channel.close()
        if receipts_file is not None:
            try:
                receipts_file.close()
            except OSError:
                pass  # already reported when writing failed
    if status == 141:
        # Nothing more can reach the closed pipe; keep the interpreter's final flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return status
    if latencies:
        ordered = sorted(latencies)
        p50 = ordered[len(ordered) // 2] * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        print(
            f"{_count(len(latencies))}, receipts verified; latency p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms",
            file=sys.stderr,
        )
    if failed:
        print(f"horde stream: {failed} request(s) failed (no answer, no receipt)", file=sys.stderr)
        status = status or 1
    return status
