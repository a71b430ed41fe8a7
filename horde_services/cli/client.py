"""Client side of the CLI: connect to a validator and run, follow, list and cancel jobs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc
from rich.console import Console

from horde_services.cli.args import checked_target, client_tls
from horde_services.cli.devenv import DevEnv, DevEnvError
from horde_services.core.identity import Signer
from horde_services.core.proto_util import TERMINAL_STATES, reason_name, stage_name, state_name
from horde_services.core.server import open_channel

if TYPE_CHECKING:
    from horde_services.core.config import TLSSettings

CHUNK = 1024 * 1024


class CliError(Exception):
    """A usage or connection problem reported as one line, exit status 2."""

    status = 2


class Refused(CliError):
    """The validator refused or failed a call (any gRPC status but the connection ones),
    reported as one line, exit status 1."""

    status = 1


# What a client cannot tell from the network failing: nothing answered (in time). Every other
# status is the validator's own answer.
CONNECTION_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def unreachable(service: str, address: str, exc: grpc.aio.AioRpcError) -> str | None:
    """What went wrong when no usable answer came (exit status 2): the service could not be
    reached, did not answer in time, or answered that it is unavailable (its database refusing);
    None when the service answered with a refusal of its own."""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer in time from the {service} at {address}"
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    if (exc.details() or "").startswith("the service cannot use its database"):
        return f"the {service} at {address} is unavailable"
    return f"cannot reach the {service} at {address}"


def call_failed(exc: grpc.aio.AioRpcError, address: str, refused: str = "") -> CliError:
    """A failed call as one line: a connection problem (CliError, exit status 2) when nothing
    answered, else the validator's refusal (Refused, exit status 1), after `refused` if given."""
    why = f"{exc.code().name}: {exc.details()}"
    where = unreachable("validator", address, exc)
    if where is not None:
        return CliError(f"{where}: {why}")
    return Refused(f"{refused}: {why}" if refused else why)


@dataclass
class Target:
    address: str
    identity: str
    signer: Signer
    tls: TLSSettings | None = None  # from HORDE_TLS_* (cli.args.client_tls)

    def channel(self) -> grpc.aio.Channel:
        return open_channel(self.address, signer=self.signer, callee=self.identity, tls=self.tls)


def validator_target(
    dev: Path | None, address: str | None, identity: str | None, key: Path | None
) -> Target:
    if dev is not None:
        # The network's endpoints and client key, unless given explicitly as well.
        try:
            env = DevEnv.load(dev)
        except DevEnvError as exc:
            raise CliError(str(exc)) from None
        address = address or env.address("validator")
        identity = identity or env.identity("validator")
        key = key or env.client_key
    if not (address and identity and key):
        raise CliError(
            "give --dev DIR, or --validator ADDR with --validator-identity ID and --key FILE"
        )
    try:
        return Target(*checked_target(address, identity, key, "validator"), tls=client_tls())
    except ValueError as exc:
        raise CliError(str(exc)) from None


# Control characters (C0 but tab and newline, DEL, C1): on a terminal they could move the cursor,
# retitle the window or hide text, so job-controlled text shown there has them escaped.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str, terminal: bool) -> str:
    """`text` as printed: verbatim into a pipe or file, control characters escaped (\\xNN) on a
    terminal."""
    if not terminal:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass
class Inline:
    volume: job_pb2.InputVolume
    data: bytes


def build_inputs(paths: list[str]) -> list[Inline | job_pb2.InputVolume]:
    out: list[Inline | job_pb2.InputVolume] = []
    names: dict[str, str] = {}  # top-level name under /volume -> the --input it comes from

    def claim(name: str, raw: str) -> None:
        other = names.setdefault(name, raw)
        if other != raw:
            raise CliError(
                f"--input {raw}: {name!r} would land under /volume beside the same name from "
                f"--input {other}"
            )

    for raw in paths:
        if raw.startswith(("http://", "https://")):
            url, _, fragment = raw.partition("#")
            if not fragment.startswith("sha256="):
                raise CliError(f"--input {raw}: a URL input needs '#sha256=<hex>'")
            out.append(job_pb2.InputVolume(url=job_pb2.UrlInput(url=url, sha256=fragment[7:])))
            continue
        path = Path(raw)
        if path.is_dir():
            for child in path.iterdir():
                claim(child.name, raw)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for child in sorted(path.iterdir()):
                    tar.add(child, arcname=child.name)
            data = buf.getvalue()
            volume = job_pb2.InputVolume(
                inline_archive=job_pb2.InlineArchive(
                    format=job_pb2.ARCHIVE_FORMAT_TAR,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        elif path.is_file():
            claim(path.name, raw)
            data = path.read_bytes()
            volume = job_pb2.InputVolume(
                inline_file=job_pb2.InlineFile(
                    file_name=path.name,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        else:
            raise CliError(f"--input {raw}: no such file or directory")
        out.append(Inline(volume, data))
    return out


async def _requests(
    spec: job_pb2.JobSpec, inline: list[tuple[int, bytes]]
) -> AsyncIterator[validator_pb2.SubmitJobRequest]:
    yield validator_pb2.SubmitJobRequest(spec=spec)
    for index, data in inline:
        if not data:
            yield validator_pb2.SubmitJobRequest(
                input_chunk=job_pb2.InputChunk(volume_index=index, data=b"", last=True)
            )
        for offset in range(0, len(data), CHUNK):
            block = data[offset : offset + CHUNK]
            yield validator_pb2.SubmitJobRequest(
                input_chunk=job_pb2.InputChunk(
                    volume_index=index, data=block, last=offset + len(block) >= len(data)
                )
            )


def result_json(res: job_pb2.JobResult) -> dict[str, Any]:
    return {
        "job_uuid": res.job_uuid,
        "state": state_name(res.state),
        "reason": reason_name(res.reason),
        "stage": stage_name(res.stage),
        "detail": res.detail,
        "exit_code": res.exit_code if res.HasField("exit_code") else None,
        "stdout": res.stdout.data.decode(errors="replace"),
        "stderr": res.stderr.data.decode(errors="replace"),
        "stdout_truncated": res.stdout.truncated,
        "stderr_truncated": res.stderr.truncated,
        "outputs": [
            {"path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256} for o in res.outputs
        ],
        "stage_seconds": {stage_name(t.stage): round(t.seconds, 3) for t in res.stage_timings},
        "miner": res.miner_hotkey,
        "executor": res.executor_id,
    }


def _safe_output_path(root: Path, rel: str) -> Path:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CliError(f"refusing output path {rel!r} outside {root}")
    return target


async def run_job(
    target: Target,
    spec: job_pb2.JobSpec,
    inputs: list[Inline | job_pb2.InputVolume],
    output_dir: Path | None,
    as_json: bool,
) -> int:
    """Submit, follow and print one job. Ctrl-C cancels the job (once the validator has accepted
    it) before the command ends."""
    inline: list[tuple[int, bytes]] = []
    for item in inputs:
        if isinstance(item, Inline):
            inline.append((len(spec.inputs), item.data))
            spec.inputs.append(item.volume)
        else:
            spec.inputs.append(item)
    console = Console(stderr=True)
    live = console.is_terminal and not as_json
    final: job_pb2.JobResult | None = None
    files: dict[str, Any] = {}
    unwritten: dict[str, str] = {}  # output path -> why it could not be written here
    job_uuid = ""
    try:
        async with target.channel() as channel:
            stub = validator_pb2_grpc.ValidatorServiceStub(channel)
            call = stub.SubmitJob(_requests(spec, inline))
            status = console.status("submitting job...") if live else None
            if status is not None:
                status.start()
            try:
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "event":
                        ev = msg.event
                        job_uuid = job_uuid or ev.job_uuid
                        text = shown(
                            f"{state_name(ev.state)} [{stage_name(ev.stage)}] {ev.message}",
                            console.is_terminal,
                        )
                        if status is not None:
                            status.update(f"{ev.job_uuid} {text}")
                        elif not as_json:
                            print(f"{ev.job_uuid} {text}", file=sys.stderr)
                    elif kind == "output_chunk" and output_dir is not None:
                        _write_output(output_dir, msg.output_chunk, files, unwritten)
                    elif kind == "result":
                        final = msg.result
            except asyncio.CancelledError:  # Ctrl-C
                if status is not None:
                    status.stop()
                    status = None
                await _cancel_on_interrupt(stub, job_uuid)
                raise
            finally:
                if status is not None:
                    status.stop()
    except grpc.aio.AioRpcError as exc:
        why = f"{exc.code().name}: {exc.details()}"
        if job_uuid:
            # Nothing answered any more (2), or the validator itself ended the stream (1).
            lost = exc.code() in CONNECTION_CODES
            what = "lost the validator while following" if lost else "the validator ended"
            error = CliError if lost else Refused
            raise error(
                f"{what} job {job_uuid} ({why}); ask again with `horde job status {job_uuid}`"
            ) from None
        raise call_failed(exc, target.address, "validator refused the job") from None
    finally:
        for fh in files.values():
            fh.close()
    if final is None:
        raise CliError("the validator closed the stream without a result")
    doc = result_json(final)
    if as_json:
        if unwritten:
            doc["outputs_not_written"] = unwritten
        print(json.dumps(doc, indent=2))
    else:
        print_result(doc, output_dir)
    for path, why in unwritten.items():
        print(f"horde job run: output {path} not written: {why}", file=sys.stderr)
    ok = final.state == common_pb2.JOB_STATE_COMPLETED and doc["exit_code"] == 0
    return 0 if ok and not unwritten else 1


def _write_output(
    root: Path, chunk: job_pb2.OutputChunk, files: dict[str, Any], unwritten: dict[str, str]
) -> None:
    """Write one chunk of an output file under `root`; a file that cannot be written here is
    noted in `unwritten` (and skipped), the others still arrive."""
    if chunk.path in unwritten:
        return
    try:
        if chunk.path not in files:
            path = _safe_output_path(root, chunk.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            files[chunk.path] = path.open("wb")
        files[chunk.path].write(chunk.data)
        if chunk.last:
            files.pop(chunk.path).close()
    except (OSError, CliError) as exc:
        fh = files.pop(chunk.path, None)
        if fh is not None:
            fh.close()
        unwritten[chunk.path] = (
            str(exc) if isinstance(exc, CliError) else f"{exc.strerror or exc} ({exc.filename})"
        )


async def _cancel_on_interrupt(
    stub: validator_pb2_grpc.ValidatorServiceStub, job_uuid: str
) -> None:
    if not job_uuid:
        print("\nhorde job run: interrupted before the validator accepted the job", file=sys.stderr)
        return
    try:
        resp = await stub.CancelJob(validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=10)
        outcome = state_name(resp.state)
    except grpc.aio.AioRpcError as exc:
        outcome = f"not cancelled ({exc.code().name}: {exc.details()}); try `horde job cancel`"
    print(f"\nhorde job run: interrupted: job {job_uuid} {outcome}", file=sys.stderr)


def _why(res: dict[str, Any]) -> str:
    """'reason in stage: detail' (the stage left out when the result names none)."""
    where = f" in {res['stage']}" if res["stage"] else ""
    return f"{res['reason']}{where}: {res['detail']}"


def print_result(doc: dict[str, Any], output_dir: Path | None) -> None:
    """The result as text. The job's stdout and stderr come out as they were (on a terminal
    with control characters escaped), not re-wrapped."""
    terminal = sys.stdout.isatty()
    state = doc["state"]
    if terminal:
        colour = "32" if state == "completed" else "31"  # green / red
        state = f"\x1b[{colour}m{state}\x1b[0m"
    line = f"{doc['job_uuid']} {state}"
    if doc["reason"]:
        line += shown(f" ({_why(doc)})", terminal)
    print(line)
    if doc["exit_code"] is not None:
        print(f"exit code {doc['exit_code']}")
    for stream in ("stdout", "stderr"):
        if doc[stream]:
            print(f"--- {stream}" + (" (truncated)" if doc[f"{stream}_truncated"] else ""))
            text = shown(doc[stream], terminal)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    for o in doc["outputs"]:
        where = f" -> {output_dir / o['path']}" if output_dir else ""
        print(
            shown(
                f"output {o['path']} ({o['size_bytes']} bytes, sha256 {o['sha256'][:16]}...)"
                f"{where}",
                terminal,
            )
        )
    if doc["stage_seconds"]:
        print("stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in doc["stage_seconds"].items()))
    sys.stdout.flush()


@contextlib.contextmanager
def _refused_as_cli_error(target: Target) -> Iterator[None]:
    """A failed call becomes one line: `CODE: details`, exit status 1 for the validator's
    refusal, 2 when it could not be reached (call_failed)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise call_failed(exc, target.address) from None


# Every control character, newline and tab included: a label is shown inside one line.
_CONTROL_IN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def labels_text(labels: dict[str, str]) -> str:
    """A job's labels in one line: `k=v,k2=v2` by key, control characters escaped (\\xNN)."""
    text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return _CONTROL_IN_LINE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


async def job_status(target: Target, job_uuid: str, as_json: bool) -> int:
    async with target.channel() as channel:
        stub = validator_pb2_grpc.ValidatorServiceStub(channel)
        with _refused_as_cli_error(target):
            resp = await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10)
    job = resp.job
    doc: dict[str, Any] = {
        "job_uuid": job.job_uuid,
        "state": state_name(job.state),
        "image": job.spec.image,
        "labels": dict(sorted(job.spec.labels.items())),
    }
    if job.HasField("result"):
        doc["result"] = result_json(job.result)
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    line = f"{job.job_uuid} {doc['state']} {job.spec.image}"
    if job.HasField("result"):
        res = doc["result"]
        if res["reason"]:
            line += f" ({_why(res)})"
        if res["exit_code"] is not None:
            line += f", exit code {res['exit_code']}"
    print(shown(line, sys.stdout.isatty()))
    if doc["labels"]:
        print(f"labels: {labels_text(doc['labels'])}")
    return 0


async def job_cancel(target: Target, job_uuid: str, as_json: bool = False) -> int:
    """Cancel a job; a job that had already ended is left as it was (and said so)."""
    async with target.channel() as channel:
        stub = validator_pb2_grpc.ValidatorServiceStub(channel)
        with _refused_as_cli_error(target):
            resp = await stub.CancelJob(
                validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=30
            )
    state = state_name(resp.state)
    cancelled = resp.state == common_pb2.JOB_STATE_CANCELLED
    already = resp.state in TERMINAL_STATES and not cancelled
    if as_json:
        print(json.dumps({"job_uuid": job_uuid, "state": state, "already_ended": already}))
    elif already:
        print(f"{job_uuid} {state} (it had already ended: nothing to cancel)")
    else:
        print(f"{job_uuid} {state}")
    return 0


async def job_list(target: Target, limit: int, as_json: bool) -> int:
    async with target.channel() as channel:
        stub = validator_pb2_grpc.ValidatorServiceStub(channel)
        with _refused_as_cli_error(target):
            resp = await stub.ListJobs(validator_pb2.ListJobsRequest(limit=limit), timeout=10)
    rows = [
        {
            "job_uuid": j.job_uuid,
            "state": state_name(j.state),
            "image": j.spec.image,
            "reason": reason_name(j.result.reason),
            "labels": dict(sorted(j.spec.labels.items())),
        }
        for j in resp.jobs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    lines = [f"{r['job_uuid']}  {r['state']:<13} {r['reason']:<20} {r['image']}" for r in rows]
    # A job's labels after its image, lined up in a column (no column when no job has any).
    width = max(map(len, lines), default=0)
    for line, r in zip(lines, rows, strict=True):
        print(f"{line:<{width}}  {labels_text(r['labels'])}" if r["labels"] else line)
    return 0
