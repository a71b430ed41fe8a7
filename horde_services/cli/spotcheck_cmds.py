"""`horde validator spotcheck`, `horde validator evidence export` and `horde evidence verify`.

The first two call the validator's ValidatorAdminService (the key must be in its `admins`;
`horde dev up` enrols its client key). `horde evidence verify FILE` needs no network: it checks
each record from signatures alone (horde_services/validator/evidence.py) and exits 0 only when every
record proves a mismatch; otherwise it prints the reason for each record that does not.
Exit statuses as in validator_cmds: 2 for usage problems, 130 interrupted, 141 output closed;
`horde validator spotcheck` exits 3 when its checks ran and found a mismatch (MISMATCH_EXIT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from horde.v1 import validator_admin_pb2, validator_admin_pb2_grpc
from rich.markup import escape

from horde_services.cli.validator_cmds import admin_call, client_args, console, run_command
from horde_services.core.identity import KEY_TYPES, Identity

SPOTCHECK_TIMEOUT_S = 1800.0
EXPORT_TIMEOUT_S = 60.0
# `horde validator spotcheck`: a check found outputs that differ (1, 2, 130 and 141 are taken).
MISMATCH_EXIT = 3


def register_validator(actions: Any) -> None:
    """Add `spotcheck` and `evidence export` to the `horde validator` sub-commands."""
    spot = actions.add_parser(
        "spotcheck",
        help="check the gathered streaming samples on the trusted miner now",
        description="Pull the gateways' samples and check them on the trusted miner now.",
        epilog="Exit status: 0 when every check ran and matched (or there was nothing to "
        f"check), {MISMATCH_EXIT} when a check found a mismatch, 1 when the call or a check "
        "failed or a gateway's samples could not be pulled (even if a check found a "
        "mismatch), 2 for usage problems, 130 "
        "interrupted, 141 output closed early.",
    )
    client_args(spot)
    spot.add_argument("--image-digest", default="", help="only this image digest")
    spot.set_defaults(func=_spotcheck)
    evidence = actions.add_parser("evidence", help="evidence of spot-check mismatches")
    sub = evidence.add_subparsers(dest="evidence_action", metavar="COMMAND", required=True)
    export = sub.add_parser("export", help="write the evidence records")
    client_args(export)
    export.add_argument(
        "--miner",
        default="",
        help="only records against this miner: its SS58 address or sr25519:<hex> (ed25519:<hex>)",
    )
    export.add_argument("--out", type=Path, help="write the records here, one JSON record a line")
    export.set_defaults(func=_export)


def register(sub: Any) -> None:
    """Add `horde evidence verify`."""
    evidence = sub.add_parser("evidence", help="spot-check evidence").add_subparsers(
        dest="action", metavar="COMMAND", required=True
    )
    verify = evidence.add_parser(
        "verify", help="check evidence records offline, from signatures alone"
    )
    verify.add_argument("file", type=Path)
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument(
        "--trusted-miner",
        action="append",
        default=[],
        metavar="ID",
        help="accept only records whose trusted instance is this miner (sr25519:<hex>, "
        "ed25519:<hex> or ss58; repeatable); without it any trusted instance is accepted and "
        "named in the output",
    )
    verify.set_defaults(func=_verify)


def spotcheck_to_dict(resp: validator_admin_pb2.RunSpotCheckResponse) -> dict[str, Any]:
    return {
        "samples_pulled": resp.samples_pulled,
        "pull_errors": list(resp.pull_errors),
        "error": resp.error,
        "checks": [
            {
                "check_id": c.check_id,
                "kind": c.kind,
                "image": c.image,
                "image_digest": c.image_digest,
                "trusted_job_uuid": c.trusted_job_uuid,
                "pairs": c.pairs,
                "mismatches": c.mismatches,
                "error": c.error,
                "duration_s": round(c.duration_s, 3),
                "verdicts": [
                    {
                        "miner": v.miner_hotkey,
                        "job_uuid": v.job_uuid,
                        "seq": v.seq,
                        "passed": v.passed,
                        "comparator": v.comparator,
                        "detail": v.detail,
                        "evidence_id": v.evidence_id,
                    }
                    for v in c.verdicts
                ],
            }
            for c in resp.checks
        ],
    }


def _spotcheck(args: argparse.Namespace) -> int:
    async def fn(stub: validator_admin_pb2_grpc.ValidatorAdminServiceStub) -> int:
        resp = await stub.RunSpotCheck(
            validator_admin_pb2.RunSpotCheckRequest(image_digest=args.image_digest),
            timeout=SPOTCHECK_TIMEOUT_S,
        )
        doc = spotcheck_to_dict(resp)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_spotcheck(doc)
        if doc["error"] or doc["pull_errors"] or any(c["error"] for c in doc["checks"]):
            return 1  # a gateway not answering is worth an alert too
        return MISMATCH_EXIT if any(c["mismatches"] for c in doc["checks"]) else 0

    return admin_call(args, "spotcheck", fn)


def _print_spotcheck(doc: dict[str, Any]) -> None:
    out = console()
    # Digests and identities shortened on a terminal only: a pipe gets them whole.
    terminal = sys.stdout.isatty()
    out.print(f"{doc['samples_pulled']} new sample(s) pulled from the gateways", highlight=False)
    for problem in doc["pull_errors"]:
        out.print(f"[yellow]pull failed:[/yellow] {escape(problem)}", highlight=False)
    if doc["error"]:
        out.print(f"[red]{escape(doc['error'])}[/red]", highlight=False)
    if not doc["checks"]:
        out.print("nothing to check", highlight=False)
    for c in doc["checks"]:
        digest = c["image_digest"][:19] if terminal else c["image_digest"]
        head = escape(f"check {c['check_id']} ({c['kind']}) {c['image']} {digest}")
        if c["error"]:
            out.print(f"{head}: [red]could not run: {escape(c['error'])}[/red]", highlight=False)
            continue
        verdict = (
            "[green]PASSED[/green]"
            if not c["mismatches"]
            else f"[red]FAILED: {c['mismatches']} mismatch(es)[/red]"
        )
        out.print(
            f"{head}: {c['pairs']} pair(s) replayed on trusted job "
            f"{escape(c['trusted_job_uuid'])} in {c['duration_s']:.2f}s (torn down): {verdict}",
            highlight=False,
        )
        by_miner: dict[str, list[int]] = {}
        for v in c["verdicts"]:
            counts = by_miner.setdefault(v["miner"], [0, 0])
            counts[0 if v["passed"] else 1] += 1
        for miner, (ok, bad) in by_miner.items():
            name = f"{miner[:28]}..." if terminal else miner
            out.print(f"    miner {escape(name)}: {ok} matched, {bad} differ", highlight=False)
        for v in c["verdicts"]:
            if not v["passed"]:
                out.print(
                    f"    [red]x[/red] job {escape(v['job_uuid'])} seq {v['seq']}: "
                    f"{escape(v['detail'])} (evidence {v['evidence_id']})",
                    highlight=False,
                )


def miner_filters(text: str) -> list[str]:
    """The canonical identities (`<scheme>:<lowercase hex>`, as the validator stores them) that
    --miner names, in any spelling the CLI prints: `sr25519:<hex>` (ed25519) with the hex and
    scheme in any case, or an SS58 address, which does not say the scheme, so both; [""] (every
    miner) for none. ValueError when it is neither."""
    text = text.strip()
    if not text:
        return [""]
    scheme, colon, key = text.partition(":")
    if colon:
        return [str(Identity.parse(f"{scheme.lower()}:{key.lower()}"))]
    public_key = Identity.from_ss58(text).public_key
    return [str(Identity(key_type, public_key)) for key_type in KEY_TYPES]


def _out_problem(path: Path) -> str | None:
    """Why --out cannot be written, or None; checked before the call, not after it."""
    if path.is_dir():
        return "is a directory"
    parent = path.parent
    if not parent.exists():
        return f"no such directory: {parent}"
    if not parent.is_dir():
        return f"not a directory: {parent}"
    if not os.access(path if path.exists() else parent, os.W_OK):
        return "permission denied"
    return None


def _export(args: argparse.Namespace) -> int:
    prog = "horde validator evidence export"
    try:
        miners = miner_filters(args.miner)
    except ValueError:
        print(
            f"{prog}: --miner {args.miner!r}: not a miner identity "
            "(give its SS58 address, or sr25519:<64 hex> / ed25519:<64 hex>)",
            file=sys.stderr,
        )
        return 2
    if args.out is not None and (problem := _out_problem(args.out)) is not None:
        print(f"{prog}: --out {args.out}: {problem}", file=sys.stderr)
        return 2

    async def fn(stub: validator_admin_pb2_grpc.ValidatorAdminServiceStub) -> int:
        records: list[Any] = []
        for miner in miners:
            resp = await stub.ExportEvidence(
                validator_admin_pb2.ExportEvidenceRequest(miner_hotkey=miner),
                timeout=EXPORT_TIMEOUT_S,
            )
            records += [json.loads(r) for r in resp.records_json]
        if args.out is not None:
            try:
                args.out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            except OSError as exc:
                print(f"{prog}: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"{len(records)} evidence record(s) written to {args.out}", file=sys.stderr)
        if args.json:
            print(json.dumps({"evidence": records}, indent=2, sort_keys=True))
        elif args.out is None:
            for r in records:
                print(json.dumps(r, sort_keys=True))
        return 0

    return admin_call(args, "evidence export", fn)


def _trusted_miners(values: list[str]) -> set[str]:
    """The identities --trusted-miner names (any spelling miner_filters takes; an ss58 address
    stands for both schemes)."""
    out: set[str] = set()
    for value in values:
        try:
            named = miner_filters(value)
        except ValueError:
            named = [""]
        if named == [""]:
            raise ValueError(f"{value!r}: not an identity or ss58 address")
        out.update(named)
    return out


def _verify(args: argparse.Namespace) -> int:
    return run_command("horde evidence verify", lambda: _verify_file(args))


def _verify_file(args: argparse.Namespace) -> int:
    from horde_services.validator.evidence import EvidenceError, load_records, verify_record

    try:
        trusted = _trusted_miners(args.trusted_miner)
    except ValueError as exc:
        print(f"horde evidence verify: --trusted-miner {exc}", file=sys.stderr)
        return 2
    try:
        records = load_records(args.file.read_text())
    except (OSError, EvidenceError) as exc:
        print(f"horde evidence verify: {exc}", file=sys.stderr)
        return 2
    if not records:
        if args.json:
            print(json.dumps({"records": [], "valid": 0}, indent=2))
        print(f"horde evidence verify: no evidence records in {args.file}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    for index, record in enumerate(records, start=1):
        try:
            ok = verify_record(record)
            if trusted and ok.trusted_miner not in trusted:
                raise EvidenceError(
                    f"trusted: the trusted instance {ok.trusted_miner} is not one of "
                    "--trusted-miner"
                )
            results.append(
                {
                    "record": index,
                    "valid": True,
                    "miner": ok.miner_hotkey,
                    "job_uuid": ok.job_uuid,
                    "seq": ok.seq,
                    "comparator": ok.comparator,
                    "detail": ok.detail,
                    "trusted_miner": ok.trusted_miner,
                }
            )
        except EvidenceError as exc:
            results.append({"record": index, "valid": False, "reason": str(exc)})
    bad = [r for r in results if not r["valid"]]
    if args.json:
        print(json.dumps({"records": results, "valid": len(results) - len(bad)}, indent=2))
    else:
        for r in results:
            if r["valid"]:
                print(
                    f"record {r['record']}: valid: miner {r['miner']} job {r['job_uuid']} "
                    f"seq {r['seq']}: {r['detail']} (trusted instance {r['trusted_miner']})"
                )
            else:
                print(f"record {r['record']}: invalid: {r['reason']}")
        print(f"{len(results) - len(bad)} valid, {len(bad)} invalid", file=sys.stderr)
    return 1 if bad else 0
