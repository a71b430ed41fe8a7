"""`horde validator weights|round`: the operator's view of scores and weights, and a round now.

Both call the validator's ValidatorAdminService, signed with the given key, which must be in
the validator's `admins` (`horde dev up` enrols its client key there). Exit status: 0 done,
1 refused or failed, 2 usage and connection problems, 130 interrupted (Ctrl-C), 141 when the
output was closed early (e.g. `| head -1`). Text output is rich on a terminal and, into a pipe
or file, every value in full with no wrapping, one line per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from horde.v1 import validator_admin_pb2, validator_admin_pb2_grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROUND_TIMEOUT_S = 600.0
WEIGHTS_TIMEOUT_S = 30.0


def register(actions: Any) -> None:
    """Add `weights` and `round` to the `horde validator` sub-commands."""
    weights = actions.add_parser("weights", help="scores and weights, with the reason for each")
    client_args(weights)
    weights.set_defaults(func=_run)
    rnd = actions.add_parser("round", help="run a synthetic round now and print its results")
    client_args(rnd)
    rnd.add_argument(
        "--set-weights",
        action="store_true",
        help="set weights right after the round (exit status 1 when they could not be)",
    )
    rnd.set_defaults(func=_run)


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dev",
        type=Path,
        help="state dir of a `horde dev up` network (fills in whichever of --validator, "
        "--validator-identity and --key are not given)",
    )
    p.add_argument("--validator", help="validator host:port")
    p.add_argument("--validator-identity", help="validator identity (sr25519:<hex>)")
    p.add_argument("--key", type=Path, help="admin key file (listed in the validator's admins)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


AdminCall = Callable[[validator_admin_pb2_grpc.ValidatorAdminServiceStub], Awaitable[int]]

# Into a pipe or file no line is wrapped or cut: rich's default there is 80 columns.
_UNWRAPPED_WIDTH = 1_000_000


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1; the command's own handler makes it the quiet 141 of a closed pipe.
        self.quiet = True
        raise BrokenPipeError


def console() -> Console:
    """rich for the commands' text: sized to a terminal, unwrapped and uncut elsewhere."""
    if sys.stdout.isatty():
        return _Console()
    return _Console(width=_UNWRAPPED_WIDTH, soft_wrap=True)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: Ctrl-C ends it with one line and 130, a closed stdout (`| head`)
    quietly with 141, as `horde job` and `horde stream` do."""
    try:
        status = body()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""  # past the terminal's ^C
        print(f"{lead}{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Nothing more can reach the closed pipe; keep the interpreter's final flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def admin_call(args: argparse.Namespace, name: str, fn: AdminCall) -> int:
    """Run `fn` against the validator's admin service named by --dev or --validator/--key;
    usage and connection problems exit 2 (as `horde job` does), refused or failed calls exit 1
    with the status and its reason."""
    from horde_services.cli.client import CliError, misaddressed, unreachable, validator_target

    prog = f"horde validator {name}"

    def body() -> int:
        try:
            target = validator_target(args.dev, args.validator, args.validator_identity, args.key)
        except CliError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2

        async def go() -> int:
            async with target.channel() as channel:
                return await fn(validator_admin_pb2_grpc.ValidatorAdminServiceStub(channel))

        try:
            return asyncio.run(go())
        except grpc.aio.AioRpcError as exc:
            where = unreachable("validator", target.address, exc)
            if where is not None:
                print(f"{prog}: {where}: {exc.details()}", file=sys.stderr)
                return 2
            wrong = misaddressed("validator", target.address, exc)
            if wrong is not None:
                print(f"{prog}: {wrong}", file=sys.stderr)
                return 2
            print(f"{prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1

    return run_command(prog, body)


def _run(args: argparse.Namespace) -> int:
    async def fn(stub: validator_admin_pb2_grpc.ValidatorAdminServiceStub) -> int:
        if args.action == "round":
            resp = await stub.RunRound(
                validator_admin_pb2.RunRoundRequest(set_weights=args.set_weights),
                timeout=ROUND_TIMEOUT_S,
            )
            _print_round(resp, args.json)
            if args.set_weights and not resp.weights_reference:
                return 1  # asked to set weights, and they were not (the output says why)
        else:
            weights = await stub.GetWeights(
                validator_admin_pb2.GetWeightsRequest(), timeout=WEIGHTS_TIMEOUT_S
            )
            _print_weights(weights, args.json)
        return 0

    return admin_call(args, args.action, fn)


def round_to_dict(resp: validator_admin_pb2.RunRoundResponse) -> dict[str, Any]:
    return {
        "round": resp.round,
        "duration_s": round(resp.duration_s, 3),
        "weights_reference": resp.weights_reference,
        "weights_error": resp.weights_error,
        "miners": [
            {
                "miner": m.miner_hotkey,
                "error": m.error,
                "executors": [
                    {
                        "executor_id": v.executor_id,
                        "executor_class": klass,
                        "passed": v.passed,
                        "reason": v.reason,
                        "duration_s": round(v.duration_s, 4),
                        "executor_duration_s": round(v.executor_duration_s, 4),
                    }
                    for v, klass in zip(m.verdicts, m.executor_classes, strict=False)
                ],
            }
            for m in resp.miners
        ],
    }


def weights_to_dict(resp: validator_admin_pb2.GetWeightsResponse) -> dict[str, Any]:
    return {
        "window_s": resp.window_s,
        "rounds": resp.rounds,
        "last_weights_reference": resp.last_weights_reference,
        "last_weights_ns": resp.last_weights_ns,
        "miners": [
            {
                "miner": m.miner_hotkey,
                "ss58": m.ss58,
                "score": m.score,
                "weight": m.weight,
                "synthetic": m.synthetic_score,
                "organic": m.organic_score,
                "penalty": m.penalty,
                "reason": m.reason,
            }
            for m in resp.miners
        ],
    }


def _print_round(resp: validator_admin_pb2.RunRoundResponse, as_json: bool) -> None:
    doc = round_to_dict(resp)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    out = console()
    # Identities shortened on a terminal only: a pipe gets them whole.
    short = _short if sys.stdout.isatty() else str
    table = Table("miner", "executor", "class", "result", "validator s", "executor s")
    for m in doc["miners"]:
        if m["error"]:
            table.add_row(short(m["miner"]), "-", "-", f"[red]{escape(m['error'])}[/red]", "", "")
        for e in m["executors"]:
            mark = "[green]passed[/green]" if e["passed"] else f"[red]{escape(e['reason'])}[/red]"
            table.add_row(
                short(m["miner"]),
                escape(e["executor_id"]),
                escape(e["executor_class"]),
                mark,
                f"{e['duration_s']:.3f}",
                f"{e['executor_duration_s']:.3f}",
            )
    out.print(f"round {doc['round']} took {doc['duration_s']:.2f}s")
    out.print(table)
    if doc["weights_reference"]:
        out.print(f"weights set: {escape(doc['weights_reference'])}")
    elif doc["weights_error"]:
        out.print(f"[yellow]weights not set:[/yellow] {escape(doc['weights_error'])}")


def _print_weights(resp: validator_admin_pb2.GetWeightsResponse, as_json: bool) -> None:
    doc = weights_to_dict(resp)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    out = console()
    out.print(
        f"{doc['rounds']} round(s) in the last {doc['window_s']:.0f}s; "
        f"last weights set: {escape(doc['last_weights_reference'] or 'never')}",
        highlight=False,
    )
    for m in doc["miners"]:
        out.print(
            f"[bold]{escape(m['ss58'] or m['miner'])}[/bold]  score {m['score']:.3f}  "
            f"weight {m['weight']:.4f}",
            highlight=False,
        )
        out.print(f"    {escape(m['reason'])}", highlight=False)


def _short(identity: str) -> str:
    return identity if len(identity) <= 24 else identity[:20] + "..."
