"""`horde stream`: a streaming session from the command line.

    horde stream [--dev DIR | --gateway ADDR --gateway-identity ID --key FILE] --image IMG
                 [--input FILE] [--receipts OUT.jsonl] [--class C] [--json] [--window N]

Each line of --input (or of stdin; on a terminal, typed interactively) is one request body, sent
byte for byte without its line ending; each response is printed as one line (newlines inside it
escaped as \\n), or with --json as one JSON object. Every receipt is checked here as well against
the session's certificate; --receipts writes them in DESIGN.md's JSON form, one a line, which
`horde receipts verify` accepts. --window N keeps up to N requests in flight (answers still
arrive in order). Exit status: 0 when every request got a verified response, 1
when the session ended early or a receipt failed, 2 for usage or connection problems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from services.core.loop import run as run_loop


def register(sub: Any) -> None:
    p = sub.add_parser("stream", help="open a streaming session and send requests")
    p.add_argument("--dev", type=Path, help="state dir of a `horde dev up` network")
    p.add_argument("--gateway", help="gateway host:port")
    p.add_argument("--gateway-identity", help="gateway identity (ed25519:<hex>)")
    p.add_argument("--key", type=Path, help="client key file (`horde keys new`)")
    p.add_argument("--image", required=True, help="image on the validator's streaming whitelist")
    p.add_argument("--class", dest="executor_class", default="", help="executor class")
    p.add_argument("--time-limit", type=int, default=0, help="session time limit in seconds")
    p.add_argument("--input", type=Path, help="file of requests, one a line (default: stdin)")
    p.add_argument("--receipts", type=Path, help="write receipts here, one JSON line each")
    p.add_argument("--json", action="store_true", help="one JSON object per response")
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="requests in flight at once (default 1: each waits for the answer before it); "
        "more raises throughput, answers still come in order",
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


def _lines_of_file(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"--input {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line, it does not start another
    return lines


async def _stdin_lines(prompt: bool) -> AsyncIterator[bytes]:
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = await asyncio.to_thread(sys.stdin.buffer.readline)
        if not line:
            return
        yield line.removesuffix(b"\n")


async def _file_lines(lines: list[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


def _one_line(body: bytes) -> str:
    return body.decode(errors="replace").replace("\\", "\\\\").replace("\n", "\\n")


async def _run(args: argparse.Namespace) -> int:
    if args.window < 1:
        raise _UsageError("--window must be at least 1")
    from services.cli.devenv import DevEnv
    from services.core.identity import KeyFileError, load_key_file
    from services.core.server import open_channel
    from services.streaming_gateway.checks import BadReceipt, CertificateError
    from services.streaming_gateway.client import SessionEnded, StreamClient

    validator_identity: str | None = None
    if args.dev is not None:
        try:
            env = DevEnv.load(args.dev)
        except FileNotFoundError as exc:
            raise _UsageError(str(exc)) from None
        address, identity, key = env.address("gateway"), env.identity("gateway"), env.client_key
        validator_identity = env.identity("validator")
    elif args.gateway and args.gateway_identity and args.key:
        address, identity, key = args.gateway, args.gateway_identity, args.key
    else:
        raise _UsageError(
            "give --dev DIR, or --gateway ADDR with --gateway-identity ID and --key FILE"
        )
    try:
        signer = load_key_file(key)
    except (KeyFileError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    requests = (
        _file_lines(_lines_of_file(args.input))
        if args.input is not None
        else _stdin_lines(prompt=sys.stdin.isatty())
    )
    live = sys.stdout.isatty() and not args.json and args.input is None
    out = sys.stdout

    def on_event(event: Any) -> None:
        print(f"[{event.job_uuid[:8]}] {event.message}", file=sys.stderr)

    def on_chunk(_seq: int, body: bytes) -> None:
        if live:
            out.write(_one_line(body))
            out.flush()

    receipts_file: IO[str] | None = None
    if args.receipts is not None:
        try:
            receipts_file = args.receipts.open("w")
        except OSError as exc:
            raise _UsageError(f"--receipts {args.receipts}: {exc.strerror or exc}") from None
    channel = open_channel(address)  # the session signs its own call
    client = StreamClient(
        channel,
        signer=signer,
        callee=identity,
        validator_identity=validator_identity,
        on_event=on_event,
        on_chunk=on_chunk,
    )
    latencies: list[float] = []
    status = 0
    try:
        try:
            ready = await client.open(
                args.image, executor_class=args.executor_class, time_limit_s=args.time_limit
            )
            miner = client.certificate.miner_hotkey if client.certificate else "?"
            print(f"session ready: job {ready.job_uuid} (miner {miner})", file=sys.stderr)
            async for res in client.pipeline(requests, window=args.window):
                latencies.append(res.latency_s)
                if args.json:
                    doc = {
                        "seq": res.seq,
                        "http_status": res.http_status,
                        "response": res.body.decode(errors="replace"),
                        "latency_ms": round(res.latency_s * 1000, 3),
                        "receipt": res.receipt.to_json_dict(),
                    }
                    print(json.dumps(doc), file=out, flush=True)
                elif live:
                    print(file=out, flush=True)
                else:
                    print(_one_line(res.body), file=out, flush=True)
                if receipts_file is not None:
                    receipts_file.write(res.receipt.to_json() + "\n")
                    receipts_file.flush()
            closed = await client.close("client done")
            if closed is not None:
                print(f"session closed: {closed.reason}", file=sys.stderr)
        except SessionEnded as exc:
            print(f"horde stream: session ended: {exc.reason}", file=sys.stderr)
            status = 1
        except (BadReceipt, CertificateError) as exc:
            print(f"horde stream: refusing the job's answer: {exc}", file=sys.stderr)
            client.cancel()
            status = 1
    finally:
        client.cancel()
        await channel.close()
        if receipts_file is not None:
            receipts_file.close()
    if latencies:
        ordered = sorted(latencies)
        p50 = ordered[len(ordered) // 2] * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        print(
            f"{len(latencies)} responses, receipts verified; latency p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms",
            file=sys.stderr,
        )
    return status
