"""Client side of the CLI: connect to a validator and run, follow, list and cancel jobs and
download their outputs."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import stat
import sys
import tarfile
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from horde_services.cli.args import checked_target, client_tls, tls_hint
from horde_services.cli.devenv import DevEnv, DevEnvError
from horde_services.core.auth import wrong_callee
from horde_services.core.identity import Signer
from horde_services.core.proto_util import (
    TERMINAL_STATES,
    UPLOAD_ACCEPTED,
    reason_name,
    stage_name,
    state_name,
)
from horde_services.core.server import open_channel
from horde_services.executor.archive import ArchiveError, check_tar

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
    return f"cannot reach the {service} at {address}{tls_hint(exc.details() or '')}"


def misaddressed(service: str, address: str, exc: grpc.aio.AioRpcError) -> str | None:
    """The line for a call the service refused because it is another service than the one the
    command was told of (its identity, --validator-identity or the dev network's, is not the
    identity of what answers at the address): a usage problem, exit status 2; else None."""
    if exc.code() is not grpc.StatusCode.UNAUTHENTICATED:
        return None
    found = wrong_callee(exc.details() or "")
    if found is None:
        return None
    given, actual = found
    return (
        f"the {service} at {address} is {actual}, not {given}: check the {service}'s identity "
        f"you gave (--{service}-identity), or the address"
    )


def call_failed(exc: grpc.aio.AioRpcError, address: str, refused: str = "") -> CliError:
    """A failed call as one line: a connection problem (CliError, exit status 2) when nothing
    answered or another service did, else the validator's refusal (Refused, exit status 1),
    after `refused` if given."""
    why = f"{exc.code().name}: {exc.details()}"
    where = unreachable("validator", address, exc)
    if where is not None:
        return CliError(f"{where}: {why}")
    wrong = misaddressed("validator", address, exc)
    if wrong is not None:
        return CliError(wrong)
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
    """An inline input: its volume (file name, size and sha256 declared) and where its bytes
    come from when they are sent, in chunks: the file itself (read again then), or a directory's
    tar in an unnamed temporary file (gone when closed, or when the command ends however it
    does)."""

    volume: job_pb2.InputVolume
    raw: str  # the --input it comes from
    size: int
    path: Path | None = None
    temp: BinaryIO | None = None

    @contextlib.contextmanager
    def reader(self) -> Iterator[BinaryIO]:
        if self.temp is not None:
            self.temp.seek(0)
            yield self.temp
            return
        assert self.path is not None
        with self.path.open("rb") as fh:
            yield fh

    def close(self) -> None:
        if self.temp is not None:
            self.temp.close()


def close_inputs(inputs: Iterable[Inline | job_pb2.InputVolume]) -> None:
    """Let go of inputs' temporary files (directories' tars)."""
    for item in inputs:
        if isinstance(item, Inline):
            item.close()


class _Stopped(Exception):
    """Building the inputs was given up (Ctrl-C, SIGTERM, SIGHUP while they were read)."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise _Stopped


def _digest(fh: BinaryIO, stop: threading.Event | None = None) -> tuple[int, str]:
    """Size and sha256 of what is left in `fh`, read in chunks of CHUNK bytes (given up between
    two when `stop` is set)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while n := fh.readinto(view):  # type: ignore[attr-defined]
        digest.update(view[:n])
        size += n
        _check(stop)
    return size, digest.hexdigest()


# Paths an input may not be (st_mode's file type), named in the message that says so.
_NOT_INPUTS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_an_input(raw: str, path: Path) -> CliError:
    """Why `path` (neither a regular file nor a directory) cannot be an input."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return CliError(f"--input {raw}: no such file or directory")
        return CliError(f"--input {raw}: {exc.strerror or exc}")
    what = next((name for test, name in _NOT_INPUTS if test(mode)), "a special file")
    return CliError(
        f"--input {raw}: {what}, not a regular file or a directory (an input is a file, a "
        f"directory, or URL#sha256=HEX)"
    )


async def gather_inputs(paths: list[str]) -> list[Inline | job_pb2.InputVolume]:
    """build_inputs off the event loop, so that Ctrl-C, SIGTERM and SIGHUP end the command at
    once, however large the inputs being read (the reading stops at its next chunk, its
    temporary files closed)."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(build_inputs, paths, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def build_inputs(
    paths: list[str], stop: threading.Event | None = None
) -> list[Inline | job_pb2.InputVolume]:
    """The inputs named by --input, checked first (names under /volume, files that exist), then
    each file hashed and each directory tarred into a temporary file and hashed, reading
    CHUNK bytes at a time whatever their size: nothing is held in memory whole. Given up (its
    temporary files closed) once `stop` is set."""
    names: dict[str, str] = {}  # top-level name under /volume -> the --input it comes from

    def claim(name: str, raw: str) -> None:
        other = names.setdefault(name, raw)
        if other != raw:
            raise CliError(
                f"--input {raw}: {name!r} would land under /volume beside the same name from "
                f"--input {other}"
            )

    planned: list[tuple[str, Path | None]] = []  # (--input, a local path or None for a URL)
    for raw in paths:
        if raw.startswith(("http://", "https://")):
            if not raw.partition("#")[2].startswith("sha256="):
                raise CliError(f"--input {raw}: a URL input needs '#sha256=<hex>'")
            planned.append((raw, None))
            continue
        path = Path(raw)
        try:
            if path.is_dir():
                for child in path.iterdir():
                    claim(child.name, raw)
            elif path.is_file():
                claim(path.name, raw)
            else:
                raise _not_an_input(raw, path)
        except OSError as exc:
            raise CliError(f"--input {raw}: {exc.strerror or exc}") from None
        planned.append((raw, path))

    out: list[Inline | job_pb2.InputVolume] = []
    try:
        for raw, local in planned:
            if local is None:
                url, _, fragment = raw.partition("#")
                out.append(job_pb2.InputVolume(url=job_pb2.UrlInput(url=url, sha256=fragment[7:])))
                continue
            try:
                out.append(_inline(raw, local, stop))
            except OSError as exc:
                raise CliError(f"--input {raw}: {_os_error(exc)}") from None
    except BaseException:
        close_inputs(out)
        raise
    return out


def _inline(raw: str, path: Path, stop: threading.Event | None = None) -> Inline:
    def unless_stopped(member: tarfile.TarInfo) -> tarfile.TarInfo:
        _check(stop)
        return member

    if path.is_dir():
        temp = tempfile.TemporaryFile(prefix="horde-input-", suffix=".tar")
        try:
            with tarfile.open(fileobj=temp, mode="w") as tar:
                for child in sorted(path.iterdir()):
                    tar.add(child, arcname=child.name, filter=unless_stopped)
            temp.seek(0)
            try:
                # What the executor would refuse, found before the upload and the queue.
                check_tar(temp)
            except ArchiveError as exc:
                raise CliError(
                    f"--input {raw}: {exc} (an input directory may hold files, directories and "
                    "relative symlinks that stay inside it)"
                ) from None
            temp.seek(0)
            size, sha256 = _digest(temp, stop)
        except BaseException:
            temp.close()
            raise
        volume = job_pb2.InputVolume(
            inline_archive=job_pb2.InlineArchive(
                format=job_pb2.ARCHIVE_FORMAT_TAR, size_bytes=size, sha256=sha256
            )
        )
        return Inline(volume, raw, size, temp=temp)
    with path.open("rb") as fh:
        size, sha256 = _digest(fh, stop)
    volume = job_pb2.InputVolume(
        inline_file=job_pb2.InlineFile(file_name=path.name, size_bytes=size, sha256=sha256)
    )
    return Inline(volume, raw, size, path=path)


async def _requests(
    spec: job_pb2.JobSpec, inline: list[tuple[int, bytes]]
) -> AsyncIterator[validator_pb2.SubmitJobRequest]:
    """The requests of a SubmitJob with its inline inputs in memory, sent without waiting for
    the validator to accept the upload (benchmarks/organic.py sends jobs with none; `horde job
    run` uses Upload)."""
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


# How long the client waits for the validator to accept an upload of inline inputs (its initial
# metadata, UPLOAD_ACCEPTED) before it sends them anyway: a validator too old to say so sends no
# metadata before it has read them. Well under such a validator's REFUSED_UPLOAD_IDLE_S (5 s):
# one that refused from the spec reads and drops the inputs until the client has been idle that
# long, so a client idle as long raced its end and read INTERNAL instead of the refusal.
UPLOAD_ACCEPT_WAIT_S = 2.0


class Upload:
    """The requests of a SubmitJob: the spec, then, once the validator has accepted the upload,
    the inline inputs in chunks of CHUNK bytes read from disk as they are sent. A validator that
    refuses the job from its spec ends the call (or says "refused") before any chunk is sent:
    the client sends nothing more and reads the validator's status, not grpc.aio's INTERNAL of a
    write that raced it."""

    def __init__(self, spec: job_pb2.JobSpec, inline: list[tuple[int, Inline]]) -> None:
        self.spec = spec
        self.inline = inline
        self.call: Any = None  # the SubmitJob call, once made
        self.sent_chunks = 0
        self.failed: str | None = None  # an input that could not be read as it was sent
        # Told the bytes of each chunk sent (a progress display).
        self.progress: Callable[[int], None] | None = None

    @property
    def declared(self) -> int:
        return sum(item.size for _, item in self.inline)

    async def accepted(self) -> bool:
        """Whether to send the inputs: the validator accepted the upload, or said nothing in
        UPLOAD_ACCEPT_WAIT_S (an older validator); not when it answered otherwise (a refusal,
        or a job rejected without reading them) or the call ended."""
        try:
            async with asyncio.timeout(UPLOAD_ACCEPT_WAIT_S):
                metadata = await self.call.initial_metadata()
        except TimeoutError:
            return not self.call.done()
        return UPLOAD_ACCEPTED[1] in (metadata.get_all(UPLOAD_ACCEPTED[0]) if metadata else ())

    async def requests(self) -> AsyncIterator[validator_pb2.SubmitJobRequest]:
        yield validator_pb2.SubmitJobRequest(spec=self.spec)
        if not self.inline or not await self.accepted():
            return  # (half-closed: a validator that refused answers at once)
        for index, item in self.inline:
            try:
                async for request in self._chunks(index, item):
                    yield request
            except OSError as exc:
                self.failed = f"--input {item.raw}: {_os_error(exc)}"
                self.call.cancel()
                return

    async def _chunks(
        self, index: int, item: Inline
    ) -> AsyncIterator[validator_pb2.SubmitJobRequest]:
        with item.reader() as fh:
            left = item.size
            while True:
                # (A file that shrank since it was hashed ends early: the validator says its
                # size is not the one declared; one that changed, that its sha256 is not.)
                block = fh.read(min(CHUNK, left)) if left else b""
                left = left - len(block) if block else 0
                yield validator_pb2.SubmitJobRequest(
                    input_chunk=job_pb2.InputChunk(volume_index=index, data=block, last=not left)
                )
                self.sent_chunks += 1
                if self.progress is not None and block:
                    self.progress(len(block))
                if not left:
                    return


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
        "outputs": [_output_json(o) for o in res.outputs],
        "stage_seconds": {stage_name(t.stage): round(t.seconds, 3) for t in res.stage_timings},
        "miner": res.miner_hotkey,
        "executor": res.executor_id,
        # Output that is no UTF-8 text reads with replacement characters above: its bytes as
        # they were, in base64 (only then).
        **{
            f"{name}_base64": base64.b64encode(out.data).decode()
            for name, out in (("stdout", res.stdout), ("stderr", res.stderr))
            if not _is_text(out.data, out.truncated)
        },
    }


# How the executor marks the middle it left out of a capped stream (sandbox.py, CappedBuffer).
_OMITTED = re.compile(rb"\n\[\.\.\. horde: \d+ bytes omitted \.\.\.\]\n")


def _is_text(data: bytes, truncated: bool) -> bool:
    """Whether `data` is UTF-8 text; a capped stream's head and tail may each have a character
    cut where the middle was left out, which does not count."""
    head, tail = data, b""
    if truncated:
        parts = _OMITTED.split(data, maxsplit=1)
        if len(parts) == 2:
            head, tail = parts
            tail = tail[next((i for i, b in enumerate(tail[:4]) if b & 0xC0 != 0x80), 0) :]
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=not truncated)
        tail.decode()
    except UnicodeDecodeError:
        return False
    return True


def _output_json(o: job_pb2.OutputFile) -> dict[str, Any]:
    return {"path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}


def _output_line(o: dict[str, Any]) -> str:
    """`output PATH (N bytes, sha256 HEX...)`, then where it was written or why it was not
    (when it was to be written here)."""
    line = f"output {o['path']} ({o['size_bytes']} bytes, sha256 {o['sha256'][:16]}...)"
    if "written_to" in o:
        where = o["written_to"]
        line += f" -> {where}" if where is not None else f" not written: {o['not_written']}"
    return line


def _safe_output_path(root: Path, rel: str) -> Path:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CliError(f"refusing output path {rel!r} outside {root}")
    return target


# Why an output is not written when the command stops before it is complete.
INTERRUPTED = "interrupted before it was complete"


@dataclass
class _Part:
    """An output file being received: its bytes go to `temp`, beside `target`."""

    target: Path
    temp: Path
    fh: BinaryIO
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    complete: bool = False


class Outputs:
    """A job's output files, written under `root`: each into a temporary file beside its final
    name, renamed into place only once complete and of the size and sha256 the job's result
    lists for it. An output that cannot be (a write error, a mismatch, an interruption) leaves
    no file behind and is noted in `unwritten`, the others still arrive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts: dict[str, _Part] = {}  # received (in part or whole), not yet checked
        self.written: dict[str, Path] = {}  # output path -> where it was written
        self.unwritten: dict[str, str] = {}  # output path -> why it was not written here
        self.listed: dict[str, job_pb2.OutputFile] = {}  # the result's entries, once known

    def expect(self, listed: Iterable[job_pb2.OutputFile]) -> None:
        """The job's result lists these outputs: a complete one is checked at once."""
        self.listed = {o.path: o for o in listed}

    def chunk(self, chunk: job_pb2.OutputChunk) -> str | None:
        """Write one chunk; returns the output's path once it is written into place."""
        path = chunk.path
        if path in self.unwritten:
            return None
        if path in self.written:
            return None  # (sent once more: it is written already)
        if path in self.parts and self.parts[path].complete:
            self._drop(path, "its bytes came twice")
            return None
        try:
            part = self.parts.get(path) or self._open(path)
            if chunk.offset != part.size:
                self._drop(path, f"bytes at offset {chunk.offset} came after {part.size} bytes")
                return None
            part.fh.write(chunk.data)
            part.digest.update(chunk.data)
            part.size += len(chunk.data)
            if chunk.last:
                part.fh.close()
                part.complete = True
        except OSError as exc:
            self._drop(path, _os_error(exc))
            return None
        except CliError as exc:
            self._drop(path, str(exc))
            return None
        if chunk.last and path in self.listed:
            return path if self._place(path) else None
        return None

    def _open(self, path: str) -> _Part:
        target = _safe_output_path(self.root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        part = self.parts[path] = _Part(target, temp, os.fdopen(fd, "wb"))
        return part

    def _place(self, path: str) -> bool:
        """Check a complete output against the result's entry and rename it into place."""
        part = self.parts[path]
        entry = self.listed[path]
        sha256 = part.digest.hexdigest()
        if part.size != entry.size_bytes:
            self._drop(path, f"{part.size} bytes came, the result lists {entry.size_bytes}")
            return False
        if sha256 != entry.sha256.lower():
            self._drop(
                path,
                f"sha256 {sha256[:16]}... of the bytes that came, the result lists "
                f"{entry.sha256[:16]}...",
            )
            return False
        try:
            os.replace(part.temp, part.target)
        except OSError as exc:
            self._drop(path, _os_error(exc, part.target))
            return False
        del self.parts[path]
        self.written[path] = part.target
        return True

    def finish(self, listed: Iterable[job_pb2.OutputFile], missing: str) -> None:
        """The stream ended with the result listing `listed`: write what came complete and as
        listed; the rest is not written (an output listed but never sent: `missing`)."""
        self.expect(listed)
        for path in self.listed:
            if path in self.written or path in self.unwritten:
                continue
            part = self.parts.get(path)
            if part is None:
                self.unwritten[path] = missing
            elif not part.complete:
                self._drop(path, f"the stream ended after {part.size} of its bytes")
            else:
                self._place(path)
        for path in list(self.parts):
            self._drop(path, "the job's result does not list it (it cannot be checked)")

    def abandon(self, why: str) -> None:
        """Stop: every output not yet written (and, once the result's list is known, every one
        listed and not yet come) is not written, for `why`; no temporary file stays."""
        for path in list(self.parts):
            self._drop(path, why)
        for path in self.listed:
            if path not in self.written:
                self.unwritten.setdefault(path, why)

    def _drop(self, path: str, why: str) -> None:
        part = self.parts.pop(path, None)
        if part is not None:
            with contextlib.suppress(OSError):
                part.fh.close()
            with contextlib.suppress(OSError):
                part.temp.unlink()
        self.unwritten[path] = why

    def mark(self, doc: dict[str, Any]) -> None:
        """Say in a document's `outputs` where each was written, or why it was not."""
        for o in doc["outputs"]:
            written = o["path"] in self.written
            o["written_to"] = str(self.root / o["path"]) if written else None
            if not written:
                o["not_written"] = self.unwritten.get(o["path"], "not received")
        if self.unwritten:
            doc["outputs_not_written"] = dict(self.unwritten)

    def report(self, cmd: str) -> None:
        """A line on stderr for each output not written."""
        terminal = sys.stderr.isatty()
        for path, why in self.unwritten.items():
            _say(shown(f"horde job {cmd}: output {path} not written: {why}", terminal))


def _os_error(exc: OSError, path: Path | None = None) -> str:
    return f"{exc.strerror or exc} ({path or exc.filename})"


def _say(line: str) -> None:
    """A line on stderr that must not fail the command (a hung-up terminal)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


@dataclass
class _Stop:
    """The signal (SIGTERM, SIGHUP) that stopped the command; None for none or Ctrl-C."""

    signum: int | None = None


_STOP = _Stop()
# Signals that stop a command as Ctrl-C does, except that a job being run is not cancelled.
DETACHING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def stoppable(work: Awaitable[int]) -> int:
    """Await `work` with SIGTERM and SIGHUP cancelling it as Ctrl-C does (what was in flight says
    what became of it; a job being run or followed is left as it is): then 128 + the signal's
    number (143, 129)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    _STOP.signum = None

    def stop(signum: int) -> None:
        if _STOP.signum is None and not task.cancelling():
            _STOP.signum = signum
            task.cancel()

    for signum in DETACHING_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await work
    except asyncio.CancelledError:
        if _STOP.signum is None:
            raise  # Ctrl-C
        task.uncancel()
        return 128 + _STOP.signum
    finally:
        for signum in DETACHING_SIGNALS:
            loop.remove_signal_handler(signum)


def _stopped_how() -> str:
    """'interrupted' (Ctrl-C), or 'stopped by SIGTERM' (or SIGHUP)."""
    if _STOP.signum is None:
        return "interrupted"
    return f"stopped by {signal.Signals(_STOP.signum).name}"


def _detached(cmd: str, job_uuid: str, output_dir: Path | None) -> None:
    """One line: the command stopped following a job it leaves as it is, and how to go on."""
    lead = "\n" if _STOP.signum is None else ""  # after the terminal's ^C
    if not job_uuid:
        _say(f"{lead}horde job {cmd}: {_stopped_how()} before the validator accepted the job")
        return
    out = f" --output {shlex.quote(str(output_dir))}" if output_dir is not None else ""
    _say(
        f"{lead}horde job {cmd}: {_stopped_how()}: job {job_uuid} was not cancelled; follow it "
        f"again with `horde job watch {job_uuid}{out}`, or cancel it with "
        f"`horde job cancel {job_uuid}`"
    )


class _OnlyForBytes(ProgressColumn):
    """A column shown on a transfer's line only (the status line has none)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> RenderableType:
        return self.column.render(task) if task.fields.get("transfer") else Text("")


class Display:
    """What a command shows on stderr while it works, when stderr is a terminal and it prints no
    --json (`enabled`): a status line, and a line counting the bytes of each transfer (an upload
    of inline inputs, a download of outputs) against its total when known. Nothing otherwise."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self._progress: Progress | None = None
        self._status: TaskID | None = None

    @classmethod
    def on_stderr(cls, as_json: bool) -> Display:
        console = Console(stderr=True)
        return cls(console, console.is_terminal and not as_json)

    @contextlib.contextmanager
    def showing(self, what: str) -> Iterator[None]:
        """Show `what` as the status line until the block ends (then the display goes)."""
        if not self.enabled:
            yield
            return
        if self._progress is not None:  # (showing already: the same display, this status)
            self.status(what)
            yield
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            _OnlyForBytes(BarColumn()),
            _OnlyForBytes(DownloadColumn()),
            _OnlyForBytes(TransferSpeedColumn()),
            console=self.console,
            transient=True,
            # What is printed to stdout meanwhile goes above the display only when stdout is
            # the terminal too (into a pipe or file it goes there as it is).
            redirect_stdout=sys.stdout.isatty(),
        )
        self._status = progress.add_task(what, total=None)
        self._progress = progress
        try:
            with progress:
                yield
        finally:
            self._progress = self._status = None

    def status(self, text: str) -> None:
        if self._progress is not None and self._status is not None:
            self._progress.update(self._status, description=text)

    def transfer(self, what: str, total: int | None) -> Callable[[int], None]:
        """A line counting a transfer's bytes while the display shows; returns what to tell
        each count of bytes moved (nothing is shown when the display does not show)."""
        progress = self._progress
        if progress is None:
            return lambda n: None
        task = progress.add_task(what, total=total, transfer=True)
        return lambda n: progress.advance(task, n)


class _Follower:
    """Follows a job's stream: shows its progress (a live line on a terminal, else a line per
    event on stderr; nothing with --json), writes output chunks, keeps the result."""

    def __init__(self, as_json: bool, job_uuid: str = "") -> None:
        self.display = Display.on_stderr(as_json)
        self.console = self.display.console
        self.live = self.display.enabled
        self.as_json = as_json
        self.job_uuid = job_uuid
        self.answered = False  # a message came
        self.result: job_pb2.JobResult | None = None

    def showing(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self.display.showing(what)

    async def follow(self, call: AsyncIterator[Any], outputs: Outputs | None, what: str) -> None:
        with self.showing(what):
            received: Callable[[int], None] | None = None
            async for msg in call:
                self.answered = True
                kind = msg.WhichOneof("payload")
                if kind == "event":
                    ev = msg.event
                    self.job_uuid = self.job_uuid or ev.job_uuid
                    text = shown(
                        f"{state_name(ev.state)} [{stage_name(ev.stage)}] {ev.message}",
                        self.console.is_terminal,
                    )
                    if self.live:
                        self.display.status(f"{ev.job_uuid} {text}")
                    elif not self.as_json:
                        print(f"{ev.job_uuid} {text}", file=sys.stderr)
                elif kind == "output_chunk" and outputs is not None:
                    if received is None:  # (their sizes are listed by the result, after them)
                        received = self.display.transfer("receiving outputs", None)
                    received(len(msg.output_chunk.data))
                    outputs.chunk(msg.output_chunk)
                elif kind == "result":
                    self.result = msg.result


async def run_job(
    target: Target,
    spec: job_pb2.JobSpec,
    inputs: list[Inline | job_pb2.InputVolume],
    output_dir: Path | None,
    as_json: bool,
) -> int:
    """Submit, follow and print one job. Ctrl-C cancels the job (once the validator has accepted
    it) before the command ends; SIGTERM and SIGHUP leave it running and say how to follow it.
    The inputs' temporary files are let go of however it ends."""
    inline: list[tuple[int, Inline]] = []
    for item in inputs:
        if isinstance(item, Inline):
            inline.append((len(spec.inputs), item))
            spec.inputs.append(item.volume)
        else:
            spec.inputs.append(item)
    follower = _Follower(as_json)
    outputs = Outputs(output_dir) if output_dir is not None else None
    upload = Upload(spec, inline)
    try:
        async with target.channel() as channel:
            stub = validator_pb2_grpc.ValidatorServiceStub(channel)
            try:
                upload.call = stub.SubmitJob(upload.requests())
                with follower.showing("submitting job..."):
                    if inline:
                        upload.progress = follower.display.transfer(
                            "uploading inputs", upload.declared
                        )
                    await follower.follow(upload.call, outputs, "submitting job...")
            except asyncio.CancelledError:  # Ctrl-C, SIGTERM, SIGHUP
                current = asyncio.current_task()
                if upload.failed is not None and not (current and current.cancelling()):
                    # The call was cancelled here, for an input that could not be read as it
                    # was sent (grpc.aio reads a call cancelled on this side as CancelledError).
                    raise CliError(upload.failed) from None
                if outputs is not None:
                    outputs.abandon(INTERRUPTED)
                if _STOP.signum is None:
                    await _cancel_on_interrupt(stub, follower.job_uuid)
                else:
                    _detached("run", follower.job_uuid, output_dir)
                if outputs is not None:
                    outputs.report("run")
                raise
            if outputs is not None and follower.result is not None:
                outputs.finish(follower.result.outputs, "the validator did not send it")
            elif outputs is not None:
                outputs.abandon("the stream ended without the job's result")
    except grpc.aio.AioRpcError as exc:
        job_uuid = follower.job_uuid
        if outputs is not None:
            outputs.abandon(f"the stream broke off ({exc.code().name})")
            outputs.report("run")
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
        close_inputs(inputs)
        if outputs is not None:
            outputs.abandon(INTERRUPTED)  # whatever happened, no temporary file stays
    if follower.result is None:
        if outputs is not None:
            outputs.report("run")
        raise CliError("the validator closed the stream without a result")
    return _outcome("run", follower.result, outputs, as_json)


async def job_watch(target: Target, job_uuid: str, output_dir: Path | None, as_json: bool) -> int:
    """Follow a job (replaying its past events) to its result and print it as `run_job` does,
    its outputs downloaded into `output_dir` when given. Ctrl-C, SIGTERM and SIGHUP stop
    following; the job is left as it is."""
    follower = _Follower(as_json, job_uuid)
    outputs = Outputs(output_dir) if output_dir is not None else None
    try:
        async with target.channel() as channel:
            stub = validator_pb2_grpc.ValidatorServiceStub(channel)
            try:
                call = stub.WatchJob(validator_pb2.WatchJobRequest(job_uuid=job_uuid))
                await follower.follow(call, None, f"following job {job_uuid}...")
                final = follower.result
                if outputs is None or final is None or not final.outputs:
                    pass
                elif final.upload_url:  # the validator holds none of them
                    outputs.finish(final.outputs, f"the job uploaded it to {final.upload_url}")
                else:
                    with follower.showing(f"downloading the outputs of job {job_uuid}..."):
                        await _fetch(
                            stub, job_uuid, outputs, final.outputs, display=follower.display
                        )
            except asyncio.CancelledError:  # Ctrl-C, SIGTERM, SIGHUP
                if outputs is not None:
                    outputs.abandon(INTERRUPTED)
                _detached("watch", job_uuid, output_dir)
                if outputs is not None:
                    outputs.report("watch")
                raise
    except grpc.aio.AioRpcError as exc:
        if outputs is not None:
            outputs.abandon(f"the download broke off ({exc.code().name})")
            outputs.report("watch")
        if not follower.answered:
            raise call_failed(exc, target.address) from None
        lost = exc.code() in CONNECTION_CODES
        error = CliError if lost else Refused
        why = f"{exc.code().name}: {exc.details()}"
        if follower.result is not None:
            raise error(
                f"downloading the outputs of job {job_uuid}: {why}; fetch them again with "
                f"`horde job download {job_uuid} --output {shlex.quote(str(output_dir))}`"
            ) from None
        what = "lost the validator while following" if lost else "the validator ended"
        raise error(
            f"{what} job {job_uuid} ({why}); follow it again with `horde job watch {job_uuid}`"
        ) from None
    finally:
        if outputs is not None:
            outputs.abandon(INTERRUPTED)
    if follower.result is None:
        raise CliError(
            f"the validator closed the stream without a result; ask again with "
            f"`horde job status {job_uuid}`"
        )
    return _outcome("watch", follower.result, outputs, as_json)


# An output the result lists that DownloadOutputs does not send (past the validator's cap).
NOT_HELD = "the validator does not hold it (past its cap for a job's inline outputs)"


async def _fetch(
    stub: validator_pb2_grpc.ValidatorServiceStub,
    job_uuid: str,
    outputs: Outputs,
    listed: Iterable[job_pb2.OutputFile],
    written: Callable[[str], None] | None = None,
    display: Display | None = None,
) -> None:
    """Download a finished job's outputs (DownloadOutputs) and write those the result lists;
    `written` is told each one as it is written into place; `display` (while it shows) counts
    the bytes against the listed outputs' sizes."""
    listed = list(listed)
    outputs.expect(listed)
    total = sum(o.size_bytes for o in listed)
    received = display.transfer("downloading outputs", total) if display else lambda n: None
    call = stub.DownloadOutputs(validator_pb2.DownloadOutputsRequest(job_uuid=job_uuid))
    async for msg in call:
        received(len(msg.chunk.data))
        path = outputs.chunk(msg.chunk)
        if path is not None and written is not None:
            written(path)
    outputs.finish(listed, NOT_HELD)


async def job_download(target: Target, job_uuid: str, output_dir: Path, as_json: bool) -> int:
    """Fetch a finished job's outputs into `output_dir` again; as text, a line for each output
    as it is written."""
    outputs = Outputs(output_dir)
    terminal = sys.stdout.isatty()
    listed: dict[str, job_pb2.OutputFile] = {}

    def written(path: str) -> None:
        if not as_json:
            doc = _output_json(listed[path])
            doc["written_to"] = str(output_dir / path)
            print(shown(_output_line(doc), terminal), flush=True)

    try:
        async with target.channel() as channel:
            stub = validator_pb2_grpc.ValidatorServiceStub(channel)
            with _refused_as_cli_error(target):
                job = (
                    await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10)
                ).job
            state = state_name(job.state)
            if job.state not in TERMINAL_STATES:
                raise Refused(
                    f"job {job_uuid} has not finished ({state}); follow it with "
                    f"`horde job watch {job_uuid} --output {shlex.quote(str(output_dir))}`"
                )
            if job.spec.output.WhichOneof("target") == "upload":
                raise Refused(
                    f"job {job_uuid} uploaded its outputs to {job.result.upload_url or 'a URL'}; "
                    "the validator holds none"
                )
            listed = {o.path: o for o in job.result.outputs}
            display = Display.on_stderr(as_json)
            try:
                if listed:
                    with display.showing(f"downloading the outputs of job {job_uuid}..."):
                        await _fetch(stub, job_uuid, outputs, job.result.outputs, written, display)
            except asyncio.CancelledError:  # Ctrl-C, SIGTERM, SIGHUP
                outputs.abandon(INTERRUPTED)
                lead = "\n" if _STOP.signum is None else ""
                _say(
                    f"{lead}horde job download: {_stopped_how()}; fetch the outputs again with "
                    f"`horde job download {job_uuid} --output {shlex.quote(str(output_dir))}`"
                )
                outputs.report("download")
                raise
    except grpc.aio.AioRpcError as exc:
        outputs.abandon(f"the download broke off ({exc.code().name})")
        outputs.report("download")
        raise call_failed(
            exc, target.address, f"downloading the outputs of job {job_uuid}"
        ) from None
    finally:
        outputs.abandon(INTERRUPTED)
    doc: dict[str, Any] = {
        "job_uuid": job_uuid,
        "state": state,
        "outputs": [_output_json(o) for o in job.result.outputs],
    }
    outputs.mark(doc)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        for o in doc["outputs"]:
            if o["written_to"] is None:  # (the others were said as they were written)
                print(shown(_output_line(o), terminal))
    if not listed:
        _say(f"horde job download: job {job_uuid} ({state}) returned no output files")
    outputs.report("download")
    return 1 if outputs.unwritten else 0


def _outcome(cmd: str, final: job_pb2.JobResult, outputs: Outputs | None, as_json: bool) -> int:
    """Print a job's result (and where its outputs went) and return the exit status."""
    doc = result_json(final)
    if outputs is not None:
        outputs.mark(doc)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print_result(doc)
    if outputs is not None:
        outputs.report(cmd)
    ok = final.state == common_pb2.JOB_STATE_COMPLETED and doc["exit_code"] == 0
    return 0 if ok and not (outputs is not None and outputs.unwritten) else 1


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


def print_result(doc: dict[str, Any]) -> None:
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
    if not doc["reason"] and doc["detail"]:  # a completed job's note (e.g. outputs not returned)
        print(shown(f"note: {doc['detail']}", terminal))
    if doc["exit_code"] is not None:
        print(f"exit code {doc['exit_code']}")
    for stream in ("stdout", "stderr"):
        if doc[stream]:
            notes = ["truncated"] if doc[f"{stream}_truncated"] else []
            if f"{stream}_base64" in doc:
                notes.append(f"not UTF-8 text: its bytes are {stream}_base64 in --json")
            print(f"--- {stream}" + (f" ({'; '.join(notes)})" if notes else ""))
            text = shown(doc[stream], terminal)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    for o in doc["outputs"]:
        print(shown(_output_line(o), terminal))
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
