"""The `horde` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from horde.v1 import job_pb2

from horde_services import __version__
from horde_services.cli import health, miner_cmds, spotcheck_cmds, stream, validator_cmds
from horde_services.cli.args import bounded_int, key_values
from horde_services.core.config import (
    ExecutorSettings,
    GatewaySettings,
    MinerSettings,
    ServiceSettings,
    ValidatorSettings,
    load_settings,
)
from horde_services.core.errors import ConfigError
from horde_services.core.identity import create_key_file
from horde_services.core.logging import configure_logging
from horde_services.core.loop import run as run_loop
from horde_services.core.receipts import summarize_jobs, verify_lines


def _serve(kind: str, config: Path | None, metrics_port: int | None = None) -> int:
    classes: dict[str, type[ServiceSettings]] = {
        "validator": ValidatorSettings,
        "miner": MinerSettings,
        "executor": ExecutorSettings,
        "gateway": GatewaySettings,
    }
    try:
        settings = load_settings(classes[kind], config)
    except ConfigError as exc:
        print(f"horde {kind}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if metrics_port is not None:
        settings.metrics_port = metrics_port
    if settings.metrics_port:
        from horde_services.core.metrics import serve_metrics

        try:
            serve_metrics(settings.metrics_port)
        except ConfigError as exc:  # (names metrics_port and --metrics-port)
            print(f"horde {kind}: configuration error: {exc}", file=sys.stderr)
            return 2

    async def main() -> bool:
        if kind == "validator":
            from horde_services.validator.app import start_validator

            app = await start_validator(settings)  # type: ignore[arg-type]
        elif kind == "miner":
            from horde_services.miner.app import start_miner

            app = await start_miner(settings)  # type: ignore[arg-type]
        elif kind == "executor":
            from horde_services.executor.app import start_executor

            app, _agent = await start_executor(settings)  # type: ignore[arg-type]
        else:
            from horde_services.streaming_gateway.app import start_gateway

            app = await start_gateway(settings)  # type: ignore[arg-type]
        return await app.serve_forever()

    try:
        hurried = run_loop(main())
    except ConfigError as exc:
        print(f"horde {kind}: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"horde {kind}: {exc}", file=sys.stderr)
        return 1
    return 130 if hurried else 0  # a second signal cut the shutdown short


def _keys_new(args: argparse.Namespace) -> int:
    if args.key_type is not None and args.kind != "hotkey":
        print(
            "horde keys new: --key-type applies to --kind hotkey (an ed25519 key is ed25519)",
            file=sys.stderr,
        )
        return 2
    key_type: Literal["sr25519", "ed25519"] = args.key_type or "sr25519"
    try:
        signer = create_key_file(args.out, args.kind, key_type=key_type, overwrite=args.force)
    except FileExistsError as exc:
        print(f"horde keys new: {exc} (use --force to replace it)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"horde keys new: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{signer.identity}  {args.out}")
    if args.kind == "hotkey":
        print(f"ss58 {signer.identity.ss58}")
        if key_type == "ed25519":
            # An ss58 address does not say its scheme: a roster must (sr25519 is assumed).
            print('roster: key_type = "ed25519" in this hotkey\'s [[neuron]]')
    return 0


def _receipts_verify(args: argparse.Namespace) -> int:
    pinned: list[bytes] = []
    for text in args.job_key:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            print(
                f"horde receipts verify: --job-key {text!r} is not 64 hex digits (a 32-byte key)",
                file=sys.stderr,
            )
            return 2
        pinned.append(key)
    stdin = str(args.file) == "-"
    name = "standard input" if stdin else str(args.file)
    try:
        data = sys.stdin.buffer.read() if stdin else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"horde receipts verify: {exc}", file=sys.stderr)
        return 2
    checks = verify_lines(data.splitlines(), pinned_keys=pinned or None)
    if not checks:
        print(f"horde receipts verify: no receipts in {name}", file=sys.stderr)
        return 1
    bad = [c for c in checks if c.error is not None]
    for check in bad:
        print(f"line {check.line}: invalid: {check.error}")
    good = len(checks) - len(bad)
    print(f"{good} valid, {len(bad)} invalid", file=sys.stderr)
    for job in summarize_jobs(checks):
        print(job.describe(), file=sys.stderr)
    if pinned:
        meaning = "signed by a job key given with --job-key"
    else:
        meaning = "signed by the job key the receipt names (compare it with the job certificate)"
    print(
        f"valid = {meaning}, the same key on all of a job's receipts, no job and seq repeated",
        file=sys.stderr,
    )
    return 1 if bad else 0


def _client_target(args: argparse.Namespace) -> Any:
    from horde_services.cli.client import validator_target

    return validator_target(args.dev, args.validator, args.validator_identity, args.key)


def _job(args: argparse.Namespace) -> int:
    from horde_services.cli import client

    async def go() -> int:
        target = _client_target(args)
        if args.job_cmd == "run":
            command = list(args.command)
            if command and command[0] == "--":
                command = command[1:]
            spec = job_pb2.JobSpec(
                image=args.image,
                command=command,
                env=_key_values("--env", args.env),
                labels=_key_values("--label", args.label),
                executor_class=args.job_class or "",
                output=job_pb2.OutputSpec(stream=job_pb2.StreamOutput()),
            )
            if args.timeout:
                spec.timeouts.execution_s = args.timeout
            _output_dir(args.output)
            return await client.run_job(
                target, spec, await client.gather_inputs(args.input), args.output, args.json
            )
        if args.job_cmd == "watch":
            _output_dir(args.output)
            return await client.job_watch(target, args.job_uuid, args.output, args.json)
        if args.job_cmd == "download":
            _output_dir(args.output)
            return await client.job_download(target, args.job_uuid, args.output, args.json)
        if args.job_cmd == "status":
            return await client.job_status(target, args.job_uuid, args.json)
        if args.job_cmd == "cancel":
            return await client.job_cancel(target, args.job_uuid, args.json)
        return await client.job_list(target, args.limit, args.json)

    try:
        # SIGTERM and SIGHUP end it as Ctrl-C does, with 143 and 129, leaving a job running.
        status = asyncio.run(client.stoppable(go()))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except client.CliError as exc:  # a refusal (1), or a usage or connection problem (2)
        print(f"horde job {args.job_cmd}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:  # what was in flight already said what became of it
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as `horde stream`
        # Nothing more can reach the closed pipe; keep the interpreter's final flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _output_dir(path: Path | None) -> None:
    """Make the --output directory (when given)."""
    from horde_services.cli.client import CliError

    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--output {path}: {exc.strerror or exc}") from None


def _key_values(option: str, items: list[str]) -> dict[str, str]:
    from horde_services.cli.client import CliError

    try:
        return key_values(option, items)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _dev_up(args: argparse.Namespace) -> int:
    from horde_services.cli.dev import StateDirBusy, dev_up

    configure_logging(args.log_level)
    try:
        run_loop(dev_up(args.state_dir, args.allow_image))
    except StateDirBusy as exc:
        print(f"horde dev up: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"horde dev up: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"horde dev up: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dev",
        type=Path,
        help="state dir of a `horde dev up` network (fills in whichever of --validator, "
        "--validator-identity and --key are not given)",
    )
    p.add_argument("--validator", help="validator host:port")
    p.add_argument(
        "--validator-identity", help="validator identity (sr25519:<hex> or ed25519:<hex>)"
    )
    p.add_argument("--key", type=Path, help="client key file (`horde keys new`)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


# `horde job status|cancel|list` (`run`, `watch` and `download` say their own in their
# descriptions).
_JOB_EPILOG = (
    "Exit status: 0 done, 1 refused by the validator (e.g. not an enrolled client, no such job, "
    "another client's job), 2 for usage and connection problems, 130 when interrupted, "
    "141 when the output was closed early (e.g. piped into `head`)."
)
# How `horde job run`, `watch` and `download` write outputs.
_OUTPUTS_WRITTEN = (
    "Each output is written under a temporary name beside its own and renamed into place only "
    "once complete and of the size and sha256 the job's result lists; one that is not (a write "
    "error, a mismatch, an interruption) leaves no file and is named on stderr as not written."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horde", description="Horde: decentralized compute.")
    parser.add_argument("--version", action="version", version=f"horde {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    for name in ("validator", "miner", "executor", "gateway"):
        p = sub.add_parser(name, help=f"the {name} service")
        s = p.add_subparsers(dest="action", metavar="COMMAND", required=True)
        serve = s.add_parser("serve", help=f"run the {name} until SIGTERM/SIGINT")
        serve.add_argument("--config", type=Path, help="TOML config file")
        serve.add_argument(
            "--metrics-port",
            type=bounded_int(0, 65535, "--metrics-port"),
            metavar="PORT",
            help="serve Prometheus metrics on 127.0.0.1:PORT (0: none)",
        )
        serve.set_defaults(func=lambda a, n=name: _serve(n, a.config, a.metrics_port))
        if name == "validator":
            validator_cmds.register(s)
            spotcheck_cmds.register_validator(s)
        elif name == "miner":
            miner_cmds.register(s)

    keys = sub.add_parser("keys", help="key files").add_subparsers(
        dest="action", metavar="COMMAND", required=True
    )
    new = keys.add_parser("new", help="write a new key file (mode 0600)")
    new.add_argument(
        "--kind",
        choices=["ed25519", "hotkey"],
        default="ed25519",
        help="ed25519 for executors, gateways and clients; hotkey for validators and miners",
    )
    new.add_argument(
        "--key-type",
        choices=["sr25519", "ed25519"],
        default=None,
        help="signature scheme of a hotkey (default sr25519; only with --kind hotkey)",
    )
    new.add_argument("--out", type=Path, required=True, help="where to write the key file")
    new.add_argument("--force", action="store_true", help="replace an existing file")
    new.set_defaults(func=_keys_new)

    receipts = sub.add_parser("receipts", help="stream receipts").add_subparsers(
        dest="action", metavar="COMMAND", required=True
    )
    verify = receipts.add_parser("verify", help="verify receipts in JSON form, one a line")
    verify.add_argument("file", type=Path, help="receipts file, or - for standard input")
    verify.add_argument(
        "--job-key",
        action="append",
        default=[],
        metavar="HEX",
        help="expected job public key (from the job certificate); repeat for several jobs. "
        "A receipt signed by any other key is invalid",
    )
    verify.set_defaults(func=_receipts_verify)

    stream.register(sub)
    health.register(sub)
    spotcheck_cmds.register(sub)

    dev = sub.add_parser("dev", help="local network").add_subparsers(
        dest="action", metavar="COMMAND", required=True
    )
    up = dev.add_parser("up", help="start all services on 127.0.0.1 until SIGINT/SIGTERM")
    up.add_argument("--state-dir", type=Path, required=True)
    up.add_argument("--allow-image", action="append", default=[], metavar="REF")
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    up.set_defaults(func=_dev_up)

    job = sub.add_parser("job", help="organic jobs").add_subparsers(
        dest="job_cmd", metavar="COMMAND", required=True
    )
    run = job.add_parser(
        "run",
        help="run a job and wait for its result",
        description="Run IMAGE (with COMMAND, if given) as an organic job and wait for its "
        "result. Ctrl-C cancels the job. SIGTERM and SIGHUP leave it running: the command says "
        "how to follow it again (`horde job watch JOB_UUID`) or cancel it, and ends. "
        f"{_OUTPUTS_WRITTEN} "
        "Exit status: 0 when the job completed with exit code 0, "
        "1 when it failed, was rejected or cancelled, the validator refused it (e.g. not an "
        "enrolled client, a bad spec), or an output could not be written here, "
        "2 for usage and connection problems, 129 on SIGHUP, 130 when interrupted, "
        "141 when the output was closed early (e.g. piped into `head`), 143 on SIGTERM.",
    )
    _add_client_args(run)
    run.add_argument("--class", dest="job_class", help="executor class")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="file or directory placed under /volume (a directory's contents), or "
        "URL#sha256=HEX downloaded by the executor; repeat for several",
    )
    run.add_argument("--output", type=Path, help="directory to write /output files into")
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment variable for the job's command; repeat for several",
    )
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="a label kept with the job (shown by `horde job list` and `horde job status "
        "--json`); repeat for several",
    )
    run.add_argument(
        "--timeout",
        type=bounded_int(1, 2**32 - 1, "--timeout"),
        help="execution time limit in seconds (default: the network's, 600 s)",
    )
    run.add_argument("image")
    run.add_argument("command", nargs=argparse.REMAINDER)
    watch = job.add_parser(
        "watch",
        help="follow a job to its result (again), downloading its outputs",
        description="Follow a job (its past events first) until its result and print it as "
        "`horde job run` does; with --output, download its outputs (as `horde job download`). "
        "Ctrl-C, SIGTERM and SIGHUP stop following and leave the job as it is. "
        f"{_OUTPUTS_WRITTEN} "
        "Exit status: 0 when the job completed with exit code 0 (and every output was written), "
        "1 when it failed, was rejected or cancelled, the validator refused the call (e.g. no "
        "such job, another client's job), or an output could not be written here, "
        "2 for usage and connection problems, 129 on SIGHUP, 130 when interrupted, "
        "141 when the output was closed early (e.g. piped into `head`), 143 on SIGTERM.",
    )
    _add_client_args(watch)
    watch.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="directory to download the job's /output files into",
    )
    watch.add_argument("job_uuid")
    download = job.add_parser(
        "download",
        help="download a finished job's outputs (again)",
        description="Download the output files a finished job returned inline (the validator "
        "keeps them for its output retention) into DIR, saying each one as it is written. "
        f"{_OUTPUTS_WRITTEN} "
        "Exit status: 0 when every output was written, 1 when one was not, the job has not "
        "finished or the validator refused the call (e.g. no such job, another client's job), "
        "2 for usage and connection problems, 129 on SIGHUP, 130 when interrupted, "
        "141 when the output was closed early (e.g. piped into `head`), 143 on SIGTERM.",
    )
    _add_client_args(download)
    download.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory to write the job's /output files into",
    )
    download.add_argument("job_uuid")
    for name, helptext in (("status", "show a job"), ("cancel", "cancel a job")):
        p = job.add_parser(name, help=helptext, epilog=_JOB_EPILOG)
        _add_client_args(p)
        p.add_argument("job_uuid")
    lst = job.add_parser(
        "list", help="list your recent jobs (a validator admin: every client's)", epilog=_JOB_EPILOG
    )
    _add_client_args(lst)
    lst.add_argument(
        "--limit",
        type=bounded_int(1, 2**32 - 1, "--limit"),
        default=20,
        help="most recent jobs to list (default 20)",
    )
    for p in job.choices.values():
        p.set_defaults(func=_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Client commands log only warnings, to stderr; `serve` and `dev up` reconfigure.
    configure_logging("warning", json=False)
    func: Callable[[argparse.Namespace], int | Awaitable[int]] = args.func
    result = func(args)
    assert isinstance(result, int)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
