"""`horde job run` with inline inputs, as a user runs it: inputs streamed from disk (a file read
in chunks as it is sent, a directory tarred into a temporary file that is gone afterwards) with
the CLI's memory bounded whatever their size, the upload handshake with an older validator that
does not say it accepted the upload, paths that are no input, and the byte progress of uploads
and downloads on a terminal (and nowhere else)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import pty
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cli_support import BIN, horde
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc
from rich.console import Console
from validator.test_job_api_errors import IMAGE, Validator
from validator.test_job_api_errors import v as v  # (the fixture: a real validator)

from horde_services.cli import client as cli
from horde_services.core.identity import Ed25519Signer, create_key_file, write_key_file
from horde_services.validator import service

MiB = 1024 * 1024
BIG = 160 * MiB  # an input far larger than the CLI's own memory


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes, the command's peak resident set


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Ran:
    """Run a command to its end; what it printed and its peak memory (wait4's ru_maxrss)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Ran(
            proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024
        )


def run_on_a_terminal(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a command with its stderr on a terminal (a pty), its stdout into a pipe; its exit
    status, stdout and what reached the terminal."""
    master, slave = pty.openpty()
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command's end of the terminal is closed
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        term = {**(env or os.environ), "TERM": "xterm", "COLUMNS": "160"}
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=slave, text=True, env=term, timeout=120
        )
    finally:
        os.close(slave)
        reader.join(30)
        os.close(master)
    return proc.returncode, proc.stdout, seen.decode(errors="replace")


def target_args(v: Validator, tmp_path: Path) -> list[str]:
    """The validator and the enrolled client's key, as `horde job` options."""
    key = tmp_path / "client.json"
    if not key.exists():
        write_key_file(key, v.client)
    return ["--validator", v.target.address, "--validator-identity", v.identity, "--key", str(key)]


def nowhere(tmp_path: Path) -> list[str]:
    """`horde job` options naming a validator nobody listens at, with a key made for it: for
    what the CLI refuses before it calls."""
    key = tmp_path / "client.json"
    create_key_file(key, "ed25519")
    nobody = ["--validator", "127.0.0.1:1", "--validator-identity", "ed25519:" + "11" * 32]
    return [*nobody, "--key", str(key)]


# ------------------------------------------------------------------------ streaming from disk


@pytest.mark.settings(max_inline_input_bytes=200 * MiB)
async def test_a_large_input_is_streamed_with_bounded_memory(v: Validator, tmp_path: Path) -> None:
    """160 MiB through `horde job run`: hashed, then sent in chunks read from disk as they go;
    the CLI's peak memory stays far below the input's size, within a few chunks of what it is
    with an empty input. The validator read and checked all of it (the job, accepted, is
    rejected only for want of a miner)."""
    argv = [str(BIN / "horde"), "job", "run", *target_args(v, tmp_path), "--json"]
    peaks = {}
    for size in (0, BIG):
        path = tmp_path / f"in-{size}.bin"
        with path.open("wb") as fh:
            fh.truncate(size)  # sparse: cheap to make, read in full all the same
        ran = await asyncio.to_thread(
            run_measured, [*argv, "--input", str(path), IMAGE, "--", "true"]
        )
        assert ran.returncode == 1, ran.stderr
        doc = json.loads(ran.stdout)
        assert (doc["state"], doc["reason"]) == ("rejected", "no_executor_of_class"), doc
        assert ran.stderr == ""  # (no progress, no event lines: --json)
        peaks[size] = ran.max_rss
    assert peaks[BIG] < 200 * MiB, f"peak RSS {peaks[BIG] // MiB} MiB"
    grown = peaks[BIG] - peaks[0]
    assert grown < 64 * MiB, f"{grown // MiB} MiB more than with an empty input"
    assert list(v.spool.iterdir()) == []


CATS = ["/volume/a.txt", "/volume/sub/b.txt", "/volume/c.txt"]


def test_a_directory_input_is_tarred_into_a_temporary_file_that_goes(
    dev: Path, tmp_path: Path
) -> None:
    """A directory and a file as inputs, run for real: the job sees both under /volume; the
    directory's tar was made in the system's temporary directory (TMPDIR) and is gone after."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "c.txt").write_text("gamma\n")
    env = {**os.environ, "TMPDIR": str(temp)}
    out = subprocess.run(
        [
            str(BIN / "horde"), "job", "run", "--dev", str(dev), "--json",
            "--input", str(data), "--input", str(tmp_path / "c.txt"),
            "horde/base:latest", "--", "sh", "-c", f"cat {' '.join(CATS)}",
        ],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stdout"] == "alpha\nbeta\ngamma\n"
    assert list(temp.iterdir()) == []


async def test_a_refused_job_leaves_no_temporary_file(v: Validator, tmp_path: Path) -> None:
    """Refused from its spec (a label too long), the job's directory input was tarred, not
    sent, and its tar is gone; the validator's reason comes through."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(os.urandom(3 * MiB))
    argv = [
        str(BIN / "horde"), "job", "run", *target_args(v, tmp_path), "--input", str(data),
        "--label", "k=" + "x" * 1025, IMAGE, "--", "true",
    ]  # fmt: skip
    ran = await asyncio.to_thread(run_measured, argv, {**os.environ, "TMPDIR": str(temp)})
    assert ran.returncode == 1
    assert ran.stderr == (
        "horde job run: validator refused the job: INVALID_ARGUMENT: spec.labels['k']: 1025 "
        "characters, at most 1024\n"
    )
    assert list(temp.iterdir()) == []


class OldValidator(validator_pb2_grpc.ValidatorServiceServicer):
    """SubmitJob as a validator from before the upload handshake answers it: it sends nothing
    (no initial metadata) until it has read every input chunk, then the job's result."""

    def __init__(self) -> None:
        self.received: dict[int, hashlib._Hash] = {}

    async def SubmitJob(
        self, request_iterator: AsyncIterator[validator_pb2.SubmitJobRequest], context: Any
    ) -> AsyncIterator[validator_pb2.SubmitJobResponse]:
        requests = aiter(request_iterator)
        spec = (await anext(requests)).spec
        open_inputs = {i for i, vol in enumerate(spec.inputs) if vol.HasField("inline_file")}
        while open_inputs:
            chunk = (await anext(requests)).input_chunk
            self.received.setdefault(chunk.volume_index, hashlib.sha256()).update(chunk.data)
            if chunk.last:
                open_inputs.discard(chunk.volume_index)
        job = str(uuid.UUID(int=1))
        yield validator_pb2.SubmitJobResponse(
            event=job_pb2.JobEvent(job_uuid=job, state=common_pb2.JOB_STATE_ACCEPTED)
        )
        yield validator_pb2.SubmitJobResponse(
            result=job_pb2.JobResult(
                job_uuid=job, state=common_pb2.JOB_STATE_COMPLETED, exit_code=0
            )
        )


@contextlib.asynccontextmanager
async def serving(
    servicer: validator_pb2_grpc.ValidatorServiceServicer,
) -> AsyncIterator[cli.Target]:
    """`servicer` (a stand-in validator) on a port of its own; a target for the CLI's code."""
    server = grpc.aio.server()
    validator_pb2_grpc.add_ValidatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield cli.Target(
            f"127.0.0.1:{port}", str(Ed25519Signer.generate().identity), Ed25519Signer.generate()
        )
    finally:
        await server.stop(0)


async def test_an_older_validator_gets_the_inputs_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A validator that never says it accepted the upload: the CLI sends the inputs anyway once
    it has waited UPLOAD_ACCEPT_WAIT_S, and the job runs."""
    monkeypatch.setattr(cli, "UPLOAD_ACCEPT_WAIT_S", 0.2)
    old = OldValidator()
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(2 * MiB + 5))
    spec = job_pb2.JobSpec(image=IMAGE, command=["true"])
    # (A client that never sent the inputs would hang: the timeout says so.)
    async with serving(old) as target, asyncio.timeout(30):
        status = await cli.run_job(target, spec, cli.build_inputs([str(path)]), None, True)
    assert status == 0
    assert json.loads(capsys.readouterr().out)["state"] == "completed"
    assert old.received[0].hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


class OldRefusingValidator(validator_pb2_grpc.ValidatorServiceServicer):
    """SubmitJob as a validator from before the upload handshake refuses a spec: it reads and
    drops the inputs until the client half-closes or has sent nothing for `idle_s`
    (validator/service.py: REFUSED_UPLOAD_IDLE_S), then ends the call with the refusal."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    async def SubmitJob(
        self, request_iterator: AsyncIterator[validator_pb2.SubmitJobRequest], context: Any
    ) -> AsyncIterator[validator_pb2.SubmitJobResponse]:
        requests = aiter(request_iterator)
        await anext(requests)
        try:
            while await asyncio.wait_for(anext(requests, None), self.idle_s) is not None:
                pass
        except TimeoutError:
            pass
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the spec is refused")
        yield validator_pb2.SubmitJobResponse()  # (unreachable: makes this a generator)


async def test_an_older_validator_s_refusal_reads_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older validator refusing from the spec waits for the inputs until the client is idle
    for its REFUSED_UPLOAD_IDLE_S: the client's wait for a handshake that never comes must be
    well under that, else the two timers race and the client reads INTERNAL (review: with both
    at 5 s it did, 6 runs in 6). Scaled down here, in the same proportion."""
    assert cli.UPLOAD_ACCEPT_WAIT_S <= service.REFUSED_UPLOAD_IDLE_S / 2
    scale = 0.2
    monkeypatch.setattr(cli, "UPLOAD_ACCEPT_WAIT_S", cli.UPLOAD_ACCEPT_WAIT_S * scale)
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(2 * MiB + 5))
    async with serving(OldRefusingValidator(service.REFUSED_UPLOAD_IDLE_S * scale)) as target:
        for _ in range(5):
            spec = job_pb2.JobSpec(image=IMAGE, command=["true"])
            with pytest.raises(cli.Refused) as refused:
                await cli.run_job(target, spec, cli.build_inputs([str(path)]), None, True)
            assert "INVALID_ARGUMENT: the spec is refused" in str(refused.value), refused.value


async def test_an_input_that_cannot_be_read_as_it_is_sent_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input gone between its hashing and its upload: one line naming it (exit 2), not the
    "interrupted" of a Ctrl-C (the call is cancelled for it, which grpc.aio reads as a
    CancelledError)."""
    monkeypatch.setattr(cli, "UPLOAD_ACCEPT_WAIT_S", 0.1)
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 1000)
    inputs = cli.build_inputs([str(path)])
    path.unlink()
    spec = job_pb2.JobSpec(image=IMAGE, command=["true"])
    async with serving(OldValidator()) as target, asyncio.timeout(30):
        with pytest.raises(cli.CliError) as failed:
            await cli.run_job(target, spec, inputs, None, True)
    assert type(failed.value) is cli.CliError
    assert str(failed.value) == f"--input {path}: No such file or directory ({path})"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_large_input_is_read_ends_the_command_at_once(
    tmp_path: Path, signum: int
) -> None:
    """Hashing a 64 GiB input takes minutes: Ctrl-C (or SIGTERM) then ends the command at once
    (it read on the event loop, which heard the signal only once the whole input was read)."""
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(64 * 2**30)  # sparse
    argv = [str(BIN / "horde"), "job", "run", *nowhere(tmp_path), "--input", str(big), IMAGE]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read = 0
        deadline = time.monotonic() + 60
        while read < 256 * MiB:  # the hashing is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the CLI never started reading its input"
            io_counts = Path(f"/proc/{proc.pid}/io").read_text().split()
            read = int(io_counts[io_counts.index("rchar:") + 1])
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)  # (the whole input: minutes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert list(Path(tempfile.gettempdir()).glob("horde-input-*")) == []


# ----------------------------------------------------------------------- paths that are no input


def test_a_path_that_is_neither_file_nor_directory_is_a_usage_error(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = nowhere(tmp_path)
    accepted = (
        "not a regular file or a directory (an input is a file, a directory, or URL#sha256=HEX)"
    )
    cases = [
        ("/dev/null", f"a character device, {accepted}"),
        (str(fifo), f"a named pipe (FIFO), {accepted}"),
        (str(tmp_path / "missing"), "no such file or directory"),
    ]
    for raw, why in cases:
        out = horde("job", "run", *target, "--input", raw, IMAGE, "--", "true")
        assert out.returncode == 2, (raw, out.stderr)
        assert out.stderr == f"horde job run: --input {raw}: {why}\n"


def test_a_directory_the_executor_would_refuse_is_refused_before_the_upload(
    tmp_path: Path,
) -> None:
    """A link out of the directory (or a FIFO in it) would make the job fail at its volume stage
    after the whole upload and a wait for an executor: the CLI finds it first (nothing is
    listening at the validator's address here), with the executor's own words, exit 2."""
    target = nowhere(tmp_path)
    hint = (
        "(an input directory may hold files, directories and relative symlinks that stay inside it)"
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ok.txt").write_text("fine")
    (outside / "leak").symlink_to("/etc/hostname")
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "up").symlink_to("../outside/ok.txt")
    piped = tmp_path / "piped"
    piped.mkdir()
    os.mkfifo(piped / "fifo")
    for directory, why in [
        (outside, "symlink leak -> /etc/hostname: absolute target"),
        (escape, "symlink up -> ../outside/ok.txt: points outside the target"),
        (piped, "member 'fifo': FIFO not allowed"),
    ]:
        out = horde("job", "run", *target, "--input", str(directory), IMAGE, "--", "true")
        assert out.returncode == 2, (directory, out.stderr)
        assert out.stderr == f"horde job run: --input {directory}: {why} {hint}\n"
    # A link that stays inside is fine: the command goes on to the validator (none there).
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "a.txt").write_text("a")
    (inside / "b").symlink_to("a.txt")
    out = horde("job", "run", *target, "--input", str(inside), IMAGE, "--", "true")
    assert "--input" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------------ progress


def test_the_progress_display_counts_bytes_on_a_terminal() -> None:
    screen = io.StringIO()
    display = cli.Display(Console(file=screen, force_terminal=True, width=120), enabled=True)
    with display.showing("submitting job..."):
        sent = display.transfer("uploading inputs", 2_000_000)
        sent(500_000)
        sent(500_000)
        received = display.transfer("receiving outputs", None)
        received(300_000)
    text = screen.getvalue()
    assert "uploading inputs" in text and "1.0/2.0 MB" in text, text
    assert "receiving outputs" in text and "300.0/? kB" in text, text  # (no total known)
    assert display.transfer("after", 10) is not None  # (not showing: counts nothing, no error)


def test_no_progress_off_a_terminal_or_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    for as_json in (False, True):
        display = cli.Display.on_stderr(as_json)  # (stderr here is no terminal)
        assert not display.enabled
        with display.showing("downloading..."):
            display.transfer("downloading outputs", 100)(100)
    assert capsys.readouterr() == ("", "")
    screen = io.StringIO()
    display = cli.Display(Console(file=screen, force_terminal=True), enabled=False)  # --json
    with display.showing("downloading..."):
        display.transfer("downloading outputs", 100)(100)
    assert screen.getvalue() == ""


async def test_an_upload_shows_its_bytes_on_a_terminal(v: Validator, tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(300_000))
    argv = [str(BIN / "horde"), "job", "run", *target_args(v, tmp_path), "--input", str(path)]
    status, _, screen = await asyncio.to_thread(run_on_a_terminal, [*argv, IMAGE, "--", "true"])
    assert status == 1  # (rejected: no miner)
    assert "uploading inputs" in screen and "300.0/300.0 kB" in screen, screen
    status, out, screen = await asyncio.to_thread(
        run_on_a_terminal, [*argv, "--json", IMAGE, "--", "true"]
    )
    assert json.loads(out)["reason"] == "no_executor_of_class"
    assert screen == ""


def test_a_download_shows_its_bytes_on_a_terminal(dev: Path, tmp_path: Path) -> None:
    code = "open('/output/o.bin', 'wb').write(b'x' * 3_000_000)"
    run = horde(
        "job", "run", "--dev", str(dev), "--json", "horde/base:latest", "--", "python3", "-c", code
    )
    assert run.returncode == 0, run.stderr
    job_uuid = json.loads(run.stdout)["job_uuid"]
    for cmd in ("download", "watch"):
        out_dir = tmp_path / cmd
        status, out, screen = run_on_a_terminal(
            [str(BIN / "horde"), "job", cmd, "--dev", str(dev), "--output", str(out_dir), job_uuid]
        )
        assert status == 0, screen
        assert "downloading outputs" in screen and "3.0/3.0 MB" in screen, (cmd, screen)
        assert (out_dir / "o.bin").stat().st_size == 3_000_000
        assert "o.bin" in out


def test_capped_text_is_text_where_the_cap_cut_a_character() -> None:
    """The executor keeps a long stream's head and tail, cut at byte positions: a character cut
    there does not make text "not UTF-8" (no stdout_base64 for it); bytes that are no text do."""
    from horde_services.executor.sandbox import CappedBuffer

    for text in ("é" * 5000, "x" + "€" * 3000, "😀" * 3000, "x" + "😀" * 3000):
        for cap in range(1000, 1008):
            buffer = CappedBuffer(cap)
            buffer.feed(text.encode())
            assert buffer.truncated
            assert cli._is_text(buffer.getvalue(), truncated=True), (text[:2], cap)
    binary = CappedBuffer(1000)
    binary.feed(bytes(range(256)) * 20)
    assert not cli._is_text(binary.getvalue(), truncated=True)
    assert not cli._is_text("é".encode()[:1], truncated=False)  # whole: a cut is no text
    assert cli._is_text("é".encode(), truncated=False)
