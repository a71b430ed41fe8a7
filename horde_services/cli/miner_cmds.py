"""`horde miner executors|jobs`: the miner operator's read-only view of the executors linked to
the miner and the jobs it relays.

Both are signed with --key, which must be the miner's own key (the key file it runs with: then
--miner-identity may be left out) or an identity in the miner's `admins`; anyone else is refused
with PERMISSION_DENIED. `executors` reads MinerService.GetManifest (which validators may call
too) and the jobs in flight from MinerAdminService.ListRelayedJobs (the operator's alone);
`jobs` reads only the latter. Exit status, as for `horde validator ...`: 0 done, 1 refused or
failed, 2 usage and connection problems, 130 interrupted (Ctrl-C), 141 when the output was
closed early (e.g. `| head -1`). Text output is rich on a terminal and, into a pipe or file,
every value in full with no wrapping, one line per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from horde.v1 import common_pb2, manifest_pb2, miner_pb2, miner_pb2_grpc
from rich.markup import escape
from rich.table import Table

from horde_services.cli.args import bounded_int
from horde_services.cli.validator_cmds import console, run_command
from horde_services.core.proto_util import reason_name, state_name

if TYPE_CHECKING:
    from horde_services.cli.client import Target

CALL_TIMEOUT_S = 30.0
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
# The state of an ended job that has no result (no finished receipt): the validator went away or
# the miner stopped while relaying it.
INTERRUPTED = "interrupted"

MinerCall = Callable[[grpc.aio.Channel], Awaitable[int]]


def register(actions: Any) -> None:
    """Add `executors` and `jobs` to the `horde miner` sub-commands."""
    executors = actions.add_parser(
        "executors",
        help="the executors linked to the miner: class, state, hardware, job",
        description="The executors linked to the miner: id, identity, class, state (idle, busy, "
        "draining), hardware, and the job each busy one runs.",
    )
    client_args(executors)
    executors.set_defaults(func=_executors)
    jobs = actions.add_parser(
        "jobs",
        help="the jobs the miner relays now and the recent ones it relayed",
        description="The jobs the miner relays now (all of them) and the most recent ones it "
        "relayed (from its lifecycle receipts, so across restarts), newest first.",
    )
    client_args(jobs)
    jobs.add_argument(
        "--limit",
        type=bounded_int(1, MAX_LIMIT, "--limit"),
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"most recent ended jobs to list besides those in flight (default {DEFAULT_LIMIT})",
    )
    jobs.set_defaults(func=_jobs)


def client_args(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Exit status: 0 done, 1 refused or failed, 2 usage and connection problems, "
        "130 interrupted, 141 output closed early."
    )
    p.add_argument(
        "--dev",
        type=Path,
        help="state dir of a `horde dev up` network (fills in whichever of --miner, "
        "--miner-identity and --key are not given, with the dev miner's own key)",
    )
    p.add_argument("--miner", metavar="HOST:PORT", help="the miner's address")
    p.add_argument(
        "--miner-identity",
        metavar="ID",
        help="the miner's identity (sr25519:<hex> or ed25519:<hex>; default: the identity of "
        "--key, which is right when --key is the miner's own key)",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the miner's own key file, or a key listed in the miner's admins",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")


def miner_target(
    dev: Path | None, address: str | None, identity: str | None, key: Path | None
) -> tuple[Target, bool]:
    """The miner named by --dev or --miner/--miner-identity/--key, checked, and whether its
    identity was taken from the key (CliError for usage problems)."""
    from horde_services.cli.args import checked_target, client_tls, service_address
    from horde_services.cli.client import CliError, Target
    from horde_services.cli.devenv import DevEnv, DevEnvError
    from horde_services.core.identity import load_key_file

    if dev is not None:
        # The dev miner's endpoint and its own key, unless given explicitly as well.
        try:
            env = DevEnv.load(dev)
            address = address or env.address("miner")
            identity = identity or env.identity("miner")
            key = key or env.client_key.with_name("miner.json")
        except DevEnvError as exc:
            raise CliError(str(exc)) from None
        except (KeyError, TypeError) as exc:
            raise CliError(f"{dev}: no miner in the dev network's endpoints ({exc!r})") from None
    if not (address and key):
        raise CliError(
            "give --dev DIR, or --miner HOST:PORT with --key FILE (and --miner-identity ID "
            "unless FILE is the miner's own key)"
        )
    from_key = identity is None
    if identity is None:
        try:
            service_address(address, "--miner")  # the address first, as checked_target does
            identity = str(load_key_file(key).identity)
        except (ValueError, OSError) as exc:  # a KeyFileError is a ValueError
            raise CliError(str(exc)) from None
    try:
        target = Target(*checked_target(address, identity, key, "miner"), tls=client_tls())
        return target, from_key
    except ValueError as exc:
        raise CliError(str(exc)) from None


def miner_call(args: argparse.Namespace, name: str, fn: MinerCall) -> int:
    """Run `fn` on a channel to the miner named by the options; usage and connection problems
    exit 2, refused or failed calls exit 1 with the status and its reason."""
    from horde_services.cli.client import CliError, unreachable

    prog = f"horde miner {name}"

    def body() -> int:
        try:
            target, from_key = miner_target(args.dev, args.miner, args.miner_identity, args.key)
        except CliError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2

        async def go() -> int:
            async with target.channel() as channel:
                return await fn(channel)

        try:
            return asyncio.run(go())
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            where = unreachable("miner", target.address, exc)
            if where is not None:
                print(f"{prog}: {where}: {details}", file=sys.stderr)
                return 2
            line = f"{prog}: {code.name}: {details}"
            if code is grpc.StatusCode.PERMISSION_DENIED:
                line += " (use the miner's own key file, or a key listed in its `admins`)"
            elif code is grpc.StatusCode.UNAUTHENTICATED and from_key:
                line += (
                    " (--key is not the miner's own key: give --miner-identity, the miner's "
                    "identity, too)"
                )
            print(line, file=sys.stderr)
            return 1

    return run_command(prog, body)


# --- horde miner executors ---------------------------------------------------------------------


def executor_state(e: manifest_pb2.ExecutorManifest) -> str:
    """As the miner counts them (horde_miner_executors): draining first, then busy, then idle."""
    return "draining" if e.draining else "busy" if e.busy else "idle"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def hardware_summary(hw: manifest_pb2.HardwareInfo) -> str:
    """One line: GPUs (grouped by model), CPUs, memory and free disk."""
    parts = []
    models: dict[tuple[str, int], int] = {}
    for gpu in hw.gpus:
        key = (gpu.name or "GPU", gpu.memory_bytes)
        models[key] = models.get(key, 0) + 1
    for (model, memory), count in models.items():
        parts.append(f"{count}x {model}" + (f" ({_gib(memory)})" if memory else ""))
    if not hw.gpus:
        parts.append("no GPU")
    if hw.cpu_count:
        parts.append(f"{hw.cpu_count} CPU" + (f" {hw.cpu_model}" if hw.cpu_model else ""))
    if hw.memory_bytes:
        parts.append(f"{_gib(hw.memory_bytes)} RAM")
    if hw.disk_free_bytes:
        parts.append(f"{_gib(hw.disk_free_bytes)} disk free")
    return ", ".join(parts)


def executors_to_dict(
    manifest: manifest_pb2.MinerManifest, in_flight: list[miner_pb2.RelayedJob]
) -> dict[str, Any]:
    jobs = {j.executor_id: j for j in in_flight}
    out = []
    for e in sorted(manifest.executors, key=lambda e: (e.executor_class, e.executor_id)):
        job = jobs.get(e.executor_id) if e.busy else None
        hw = e.hardware
        out.append(
            {
                "executor_id": e.executor_id,
                "executor_identity": e.executor_identity,
                "executor_class": e.executor_class,
                "state": executor_state(e),
                "busy": e.busy,
                "draining": e.draining,
                "version": e.version,
                "hardware_summary": hardware_summary(hw),
                "hardware": {
                    "gpus": [
                        {"name": g.name, "memory_bytes": g.memory_bytes, "uuid": g.uuid}
                        for g in hw.gpus
                    ],
                    "driver_version": hw.driver_version,
                    "cuda_version": hw.cuda_version,
                    "cpu_model": hw.cpu_model,
                    "cpu_count": hw.cpu_count,
                    "memory_bytes": hw.memory_bytes,
                    "disk_free_bytes": hw.disk_free_bytes,
                },
                "cached_images": list(e.cached_images),
                # The job a busy executor runs (null when idle, or when the job ended between
                # the two reads).
                "job": _job_dict(job) if job is not None else None,
            }
        )
    counts = {s: sum(1 for e in out if e["state"] == s) for s in ("idle", "busy", "draining")}
    return {
        "miner": manifest.miner_hotkey,
        "timestamp_ns": manifest.timestamp_ns,
        "counts": counts,
        "executors": out,
    }


def _executors(args: argparse.Namespace) -> int:
    async def fn(channel: grpc.aio.Channel) -> int:
        # The operator-only call first: a key that is not the operator's is refused by it, in
        # one reason, before the manifest (which validators may read) is asked for.
        jobs = await miner_pb2_grpc.MinerAdminServiceStub(channel).ListRelayedJobs(
            miner_pb2.ListRelayedJobsRequest(in_flight_only=True), timeout=CALL_TIMEOUT_S
        )
        resp = await miner_pb2_grpc.MinerServiceStub(channel).GetManifest(
            miner_pb2.GetManifestRequest(), timeout=CALL_TIMEOUT_S
        )
        _print_executors(executors_to_dict(resp.manifest, list(jobs.jobs)), args.json)
        return 0

    return miner_call(args, "executors", fn)


def _print_executors(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    out = console()
    terminal = sys.stdout.isatty()
    text = _text(terminal)
    short = _short if terminal else str
    counts = doc["counts"]
    out.print(
        f"miner {text(doc['miner'])}: {len(doc['executors'])} executor(s), "
        f"{counts['idle']} idle, {counts['busy']} busy, {counts['draining']} draining",
        highlight=False,
    )
    if not doc["executors"]:
        out.print("no executor is linked to this miner", highlight=False)
        return
    table = Table()
    # Everything folds rather than vanishes on a narrow terminal (ids then span two lines); into
    # a pipe every value is whole.
    table.add_column("executor", overflow="fold")
    table.add_column("identity", overflow="fold")
    table.add_column("class", overflow="fold", min_width=5)
    table.add_column("state", no_wrap=True, min_width=8)
    table.add_column("hardware", ratio=1, min_width=10)
    table.add_column("job", overflow="fold")
    for e in doc["executors"]:
        colour = {"idle": "green", "busy": "yellow", "draining": "red"}[e["state"]]
        job = e["job"]
        table.add_row(
            text(e["executor_id"]),
            text(short(e["executor_identity"])),
            text(e["executor_class"]),
            f"[{colour}]{e['state']}[/{colour}]",
            text(e["hardware_summary"]),
            text(job["job_uuid"]) if job else ("?" if e["busy"] else "-"),
        )
    out.print(table)


# --- horde miner jobs --------------------------------------------------------------------------


def _iso(ns: int) -> str:
    if not ns:
        return ""
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _when(ns: int, terminal: bool) -> str:
    """For the table: UTC to the second (on a terminal, the year left out)."""
    shape = "%m-%d %H:%M:%S" if terminal else "%Y-%m-%d %H:%M:%SZ"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime(shape) if ns else ""


def _job_state(j: miner_pb2.RelayedJob) -> str:
    if not j.in_flight and j.state == common_pb2.JOB_STATE_UNSPECIFIED:
        return INTERRUPTED
    return state_name(j.state)


def _job_dict(j: miner_pb2.RelayedJob) -> dict[str, Any]:
    return {
        "job_uuid": j.job_uuid,
        "validator": j.validator_hotkey,
        "executor_id": j.executor_id,
        "executor_class": j.executor_class,
        "job_kind": j.job_kind,
        "in_flight": j.in_flight,
        "state": _job_state(j),
        "reason": reason_name(j.reason),
        "detail": j.detail,
        "started_ns": j.started_ns,
        "ended_ns": j.ended_ns,
        "started": _iso(j.started_ns),
        "ended": _iso(j.ended_ns),
        "duration_s": round((j.ended_ns - j.started_ns) / 1e9, 3) if j.ended_ns else None,
        "countersigned": j.countersigned,
    }


def jobs_to_dict(resp: miner_pb2.ListRelayedJobsResponse) -> dict[str, Any]:
    jobs = [_job_dict(j) for j in resp.jobs]
    return {
        "in_flight": sum(1 for j in jobs if j["in_flight"]),
        "jobs": jobs,
    }


def _jobs(args: argparse.Namespace) -> int:
    async def fn(channel: grpc.aio.Channel) -> int:
        resp = await miner_pb2_grpc.MinerAdminServiceStub(channel).ListRelayedJobs(
            miner_pb2.ListRelayedJobsRequest(limit=args.limit), timeout=CALL_TIMEOUT_S
        )
        _print_jobs(jobs_to_dict(resp), args.json)
        return 0

    return miner_call(args, "jobs", fn)


def _print_jobs(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    out = console()
    terminal = sys.stdout.isatty()
    text = _text(terminal)
    jobs = doc["jobs"]
    ended = len(jobs) - doc["in_flight"]
    out.print(f"{doc['in_flight']} in flight, {ended} ended (newest first)", highlight=False)
    if not jobs:
        out.print("no job relayed yet", highlight=False)
        return
    table = Table()
    # Every column folds rather than vanishes on a narrow terminal (ids then span lines); into a
    # pipe every value is whole. The class and the duration are in --json; the note starts
    # with the kind of a job that is not organic. Below WIDE_NOTES terminal columns the note
    # had no room left (at 80 it vanished): the validator and the executor then share a
    # column, and the table marks each note [n] and prints it whole below.
    narrow = terminal and out.width < WIDE_NOTES
    footnotes: list[str] | None = [] if narrow else None
    if narrow:
        # Fixed widths (rich's own fitting left the note out): 80 columns in all, the ids
        # shortened to fit theirs ("5Fabcdefghi...", "ed25519:abc...").
        table.add_column("job", overflow="fold", width=18)
        table.add_column("validator\nexecutor", overflow="fold", width=14)
        table.add_column("state", overflow="fold", width=9)
        table.add_column("started (UTC)", overflow="fold", width=8)
        table.add_column("ended (UTC)", overflow="fold", width=8)
        table.add_column("note", overflow="fold", width=4)
    else:
        table.add_column("job", overflow="fold", min_width=18)
        table.add_column("validator", overflow="fold", min_width=8)
        table.add_column("executor", overflow="fold", min_width=8)
        table.add_column("state", overflow="fold", min_width=9)
        table.add_column("started (UTC)", min_width=8)
        table.add_column("ended (UTC)", min_width=8)
        table.add_column("note", ratio=1)
    for j in jobs:
        # "cancelled: cancelled" says it once; a cancel (a streaming session the client closed,
        # say) is no failure of the miner's: not red.
        reason = j["reason"] if j["reason"] and j["reason"] != j["state"] else ""
        state = j["state"] + (f": {reason}" if reason else "")
        if j["in_flight"]:
            state = f"[yellow]{text(state)}[/yellow]"
        elif j["state"] == "completed":
            state = f"[green]{text(state)}[/green]"
        elif j["state"] == "cancelled":
            state = text(state)
        else:
            state = f"[red]{text(state)}[/red]"
        # Organic is the usual kind; a streaming session says so first in its note.
        notes = [] if j["job_kind"] in ("organic", "") else [j["job_kind"]]
        if not j["in_flight"] and not j["countersigned"]:
            notes.append("not countersigned")
        if j["detail"]:
            notes.append(j["detail"])
        keep = (11, 11) if narrow else (12, 16)  # the ids' characters that fit their columns
        validator = text(_short(j["validator"], keep[0]) if terminal else j["validator"])
        executor = text(
            _short(j["executor_id"] or "?", keep[1]) if terminal else j["executor_id"] or "?"
        )
        table.add_row(
            text(j["job_uuid"]),
            *([f"{validator}\n{executor}"] if narrow else [validator, executor]),
            state,
            _when(j["started_ns"], terminal),
            "in flight" if j["in_flight"] else _when(j["ended_ns"], terminal) or "?",
            _note(text("; ".join(notes)), footnotes),
        )
    out.print(table)
    for n, note in enumerate(footnotes or [], 1):
        out.print(f"[{n}] {note}", highlight=False)


WIDE_NOTES = 140  # terminal columns from which notes fit in the jobs table


def _note(note: str, footnotes: list[str] | None) -> str:
    """The note cell: the note itself, or its footnote mark when notes go below the table."""
    if footnotes is None or not note:
        return note
    footnotes.append(note)
    return f"[{len(footnotes)}]"


def _text(terminal: bool) -> Callable[[str], str]:
    """Text from the miner or its executors as printed: rich markup escaped, and on a terminal
    control characters too."""
    from horde_services.cli.client import shown

    return lambda value: escape(shown(value, terminal))


def _short(identity: str, keep: int = 20) -> str:
    return identity if len(identity) <= keep + 4 else identity[:keep] + "..."
