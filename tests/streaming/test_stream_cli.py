"""`horde stream` as a user runs it, against a gateway in front of the fake validator and proxy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pty
import select
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from streaming_support import WHITELIST, Behaviour, Harness, answer

from horde_services.cli import stream as stream_module
from horde_services.cli.main import main as cli_main
from horde_services.core.app import ServiceApp
from horde_services.core.identity import Ed25519Signer, write_key_file

HORDE = str(Path(sys.executable).with_name("horde"))


async def horde(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def target(h: Harness, app: ServiceApp, tmp_path: Path) -> list[str]:
    key = tmp_path / "client.json"
    if not key.exists():
        write_key_file(key, h.client)
    return [
        "--gateway",
        f"127.0.0.1:{app.port}",
        "--gateway-identity",
        app.identity,
        "--key",
        str(key),
        "--image",
        WHITELIST,
    ]


async def test_each_line_is_one_request_and_saved_receipts_verify(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    lines = [b"hello world", b"", b"caf\xc3\xa9 \t tabs  ", b"x" * 1024]
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        str(requests),
        "--receipts",
        str(receipts),
    )
    assert code == 0, err
    assert out.splitlines() == [answer(line).decode(errors="replace") for line in lines]
    assert "4 responses, receipts verified" in err and "session closed" in err
    code, out, err = await horde("receipts", "verify", str(receipts))
    assert code == 0, out + err
    assert "4 valid, 0 invalid" in err
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 4


async def test_json_output(harness: Harness, tmp_path: Path) -> None:
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests), "--json"
    )
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["seq"] for d in docs] == [1, 2]
    assert [d["response"] for d in docs] == ["echo:eno", "echo:owt"]
    assert all(d["http_status"] == 200 and d["receipt"]["version"] == 1 for d in docs)


@pytest.mark.parametrize("as_json", [False, True], ids=["lines", "json"])
async def test_a_request_left_unanswered_keeps_its_line_and_fails_the_command(
    harness: Harness, tmp_path: Path, as_json: bool
) -> None:
    """Its line stays (empty, or an object with "error"), stderr says why, the other requests
    are answered and their receipts saved, and the exit status is 1."""
    harness.fake_validator.next_behaviour = Behaviour(fail_seqs=frozenset({2}))
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\nthree\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        str(requests),
        "--receipts",
        str(receipts),
        *(["--json"] if as_json else []),
    )
    assert code == 1, err
    if as_json:
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["seq"] for d in docs] == [1, 2, 3]
        assert [d.get("response") for d in docs] == ["echo:eno", None, "echo:eerht"]
        assert "did not answer request 2" in docs[1]["error"]
    else:
        assert out.splitlines() == ["echo:eno", "", "echo:eerht"]
    assert "request 2 failed, no receipt: the job's service did not answer request 2" in err
    assert "2 responses, receipts verified" in err
    assert "1 request(s) failed" in err
    assert [json.loads(line)["seq"] for line in receipts.read_text().splitlines()] == [1, 3]


async def test_a_tampered_response_fails_the_command(harness: Harness, tmp_path: Path) -> None:
    harness.fake_validator.next_behaviour = Behaviour(tamper="output", tamper_seq=2)
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\nthree\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests)
    )
    assert code == 1
    assert out.splitlines() == ["echo:eno"]
    assert "receipt 2: output hash does not match" in err


async def test_a_window_keeps_requests_in_flight_and_answers_stay_in_order(
    harness: Harness, tmp_path: Path
) -> None:
    # The fake job answers only once 4 requests are waiting: only a pipelined client gets through.
    harness.fake_validator.next_behaviour = Behaviour(answer_in_batches_of=4)
    app = await harness.start_gateway()
    lines = [f"request {i}".encode() for i in range(12)]  # three batches of 4
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        str(requests),
        "--window",
        "4",
        "--receipts",
        str(receipts),
    )
    assert code == 0, err
    assert out.splitlines() == [answer(line).decode() for line in lines]
    assert "12 responses, receipts verified" in err
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 12 and job.most_held == 4
    code, _, err = await horde("receipts", "verify", str(receipts))
    assert code == 0 and "12 valid, 0 invalid" in err


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, err = await horde("stream", "--image", WHITELIST)
    assert code == 2 and "--dev DIR" in err
    code, _, err = await horde("stream", "--dev", str(tmp_path), "--image", WHITELIST)
    assert code == 2 and "horde dev up" in err
    for window in ("0", "65"):
        code, _, err = await horde("stream", "--window", window, "--image", WHITELIST)
        assert code == 2 and "--window must be 1 to 64" in err, err


async def test_a_failed_start_leaves_an_existing_receipts_file_alone(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text('{"kept": "from an earlier session"}\n')
    argv = target(harness, app, tmp_path)
    argv[argv.index(WHITELIST)] = "horde/not-whitelisted:latest"
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    code, _, err = await horde(
        "stream", *argv, "--input", str(requests), "--receipts", str(receipts)
    )
    assert code == 1 and "not on the streaming whitelist" in err
    assert receipts.read_text() == '{"kept": "from an earlier session"}\n'


async def test_a_request_over_the_grpc_message_limit_goes_in_frames(
    harness: Harness, tmp_path: Path
) -> None:
    harness.fake_validator.next_behaviour = Behaviour(chunks=16)  # the answer comes back in pieces
    app = await harness.start_gateway()
    big = bytes(range(256)).replace(b"\n", b"N") * (9 * 4096)  # 9 MiB: over gRPC's 8 MiB
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"small\n" + big + b"\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests), "--json",
        "--receipts", str(receipts),
    )  # fmt: skip
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["seq"] for d in docs] == [1, 2]
    assert docs[1]["response"].encode(errors="replace") == answer(big).decode(
        errors="replace"
    ).encode(errors="replace")
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 2
    code, _, err = await horde("receipts", "verify", str(receipts))
    assert code == 0 and "2 valid, 0 invalid" in err


async def test_crlf_line_endings_are_not_part_of_the_request(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"one\r\ntwo\r\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests)
    )
    assert code == 0, err
    assert out.splitlines() == ["echo:eno", "echo:owt"]


async def test_receipts_that_cannot_be_written_end_the_session_cleanly(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\n")
    code, _, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests),
        "--receipts", "/dev/full",
    )  # fmt: skip
    assert code == 1
    assert "cannot write receipts to /dev/full: No space left on device" in err
    assert "Traceback" not in err
    assert "session closed" in err  # closed, not abandoned


async def test_a_closed_output_pipe_stops_quietly(harness: Harness, tmp_path: Path) -> None:
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("".join(f"request {i}\n" for i in range(2000)))
    proc = await asyncio.create_subprocess_exec(
        HORDE, "stream", *target(harness, app, tmp_path), "--input", str(requests),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert await proc.stdout.readline() == b"echo:0 tseuqer\n"
    proc.stdout.feed_eof()
    transport = proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # what `| head -1` does once it has its line
    err = (await proc.stderr.read()).decode()
    assert await proc.wait() == 141, err
    assert "Traceback" not in err


async def _until_ready(proc: asyncio.subprocess.Process) -> None:
    """Read the command's stderr up to its "session ready" line."""
    assert proc.stderr is not None
    seen = b""
    while b"session ready" not in seen:
        line = await proc.stderr.readline()
        assert line, seen
        seen += line


async def test_ctrl_c_cancels_the_session_and_says_so(harness: Harness, tmp_path: Path) -> None:
    # The fake job answers only once 4 requests wait: one request alone waits forever.
    harness.fake_validator.next_behaviour = Behaviour(answer_in_batches_of=4)
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    receipts = tmp_path / "receipts.jsonl"
    proc = await asyncio.create_subprocess_exec(
        HORDE, "stream", *target(harness, app, tmp_path), "--input", str(requests),
        "--receipts", str(receipts),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await _until_ready(proc)
    proc.send_signal(signal.SIGINT)
    err = (await proc.stderr.read()).decode()
    assert await proc.wait() == 130
    assert "interrupted after 0 responses; session cancelled; 0 receipts kept in" in err
    assert "Traceback" not in err


async def test_ctrl_c_ends_the_session_while_it_waits_for_a_line(
    harness: Harness, tmp_path: Path
) -> None:
    """Standard input open and idle (a terminal, a pipe): Ctrl-C still ends the command at
    once, not once the next line or end of input comes."""
    app = await harness.start_gateway()
    proc = await asyncio.create_subprocess_exec(
        HORDE, "stream", *target(harness, app, tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdin is not None
    try:
        await _until_ready(proc)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 15)  # stdin is still open
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 130, err
    assert "interrupted after 0 responses" in err and "Traceback" not in err


async def test_dev_fills_in_only_what_is_not_given(harness: Harness, tmp_path: Path) -> None:
    app = await harness.start_gateway()
    client_key = tmp_path / "client.json"
    write_key_file(client_key, harness.client)
    dev = tmp_path / "devnet"
    dev.mkdir()
    (dev / "endpoints.json").write_text(
        json.dumps(
            {
                "services": {
                    "gateway": {"address": f"127.0.0.1:{app.port}", "identity": app.identity},
                    "validator": {
                        "address": "127.0.0.1:1",
                        "identity": str(harness.validator_signer.identity),
                    },
                },
                "client_key": str(client_key),
            }
        )
    )
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    common = ["stream", "--dev", str(dev), "--image", WHITELIST, "--input", str(requests)]
    code, out, err = await horde(*common)
    assert code == 0 and out == "echo:eno\n", err
    stranger = tmp_path / "stranger.json"
    write_key_file(stranger, Ed25519Signer.generate())
    code, _, err = await horde(*common, "--key", str(stranger))  # the explicit key is used
    assert code == 1 and "PERMISSION_DENIED" in err and "not an enrolled client" in err, err
    (dev / "endpoints.json").write_text('{"services": {}}')
    code, _, err = await horde(*common)
    assert code == 2 and "is not a readable `horde dev up` endpoints file" in err


async def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    for value in ("-1", str(2**32), "soon"):
        code, _, err = await horde("stream", "--time-limit", value, "--image", WHITELIST)
        assert code == 2 and "--time-limit" in err and "Traceback" not in err, err
    key = tmp_path / "client.json"
    write_key_file(key, Ed25519Signer.generate())
    code, _, err = await horde(
        "stream", "--gateway", "127.0.0.1:1", "--gateway-identity", "garbage", "--key", str(key),
        "--image", WHITELIST,
    )  # fmt: skip
    assert code == 2 and "--gateway-identity: invalid identity 'garbage'" in err
    code, _, err = await horde(
        "stream", "--gateway", "localhost", "--gateway-identity", "garbage", "--key", str(key),
        "--image", WHITELIST,
    )  # fmt: skip
    assert code == 2 and "--gateway 'localhost': HOST:PORT is required" in err
    gateway = str(Ed25519Signer.generate().identity)
    code, _, err = await horde(
        "stream", "--gateway", "127.0.0.1:1", "--gateway-identity", gateway, "--key", str(key),
        "--image", WHITELIST, "--receipts", str(tmp_path / "no" / "r.jsonl"),
    )  # fmt: skip
    assert code == 2 and "no such directory" in err


class _Terminal:
    """The master end of a pty: what the program wrote, read up to markers in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""
        self.pos = 0  # where the next search starts

    def until(self, marker: bytes, timeout_s: float = 30.0) -> bytes:
        """What came after the previous marker, up to and including `marker`."""
        deadline = time.monotonic() + timeout_s
        while (at := self.seen.find(marker, self.pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.seen[self.pos :]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the other end closed
                    chunk = b""
                assert chunk, f"the terminal closed before {marker!r}: {self.seen[self.pos :]!r}"
                self.seen += chunk
        start, self.pos = self.pos, at + len(marker)
        return self.seen[start : self.pos]


@contextlib.asynccontextmanager
async def _on_terminal(
    *argv: str, stdin_too: bool = True
) -> AsyncIterator[tuple[asyncio.subprocess.Process, _Terminal]]:
    """`horde ARGV` with its output (and, unless told otherwise, its input) on a pty; killed
    on the way out if it is still running."""
    master, slave = pty.openpty()
    stdin = slave if stdin_too else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        HORDE, *argv, stdin=stdin, stdout=slave, stderr=slave
    )
    os.close(slave)
    try:
        yield proc, _Terminal(master)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


async def test_on_a_terminal_the_next_prompt_follows_the_answer(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    async with _on_terminal("stream", *target(harness, app, tmp_path)) as (proc, term):
        await asyncio.to_thread(term.until, b"session ready")
        await asyncio.to_thread(term.until, b"> ")
        for word in (b"one", b"two"):
            os.write(term.fd, word + b"\n")
            after = await asyncio.to_thread(term.until, b"> ")
            # The answer comes before the next prompt (typing waits for the answer).
            assert b"echo:" + word[::-1] in after, after
        os.write(term.fd, b"\x04")  # Ctrl-D: end of input
        await asyncio.to_thread(term.until, b"2 responses, receipts verified")
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_on_a_terminal_ctrl_d_after_a_partial_line_ends_the_input(
    harness: Harness, tmp_path: Path
) -> None:
    """Typed text then Ctrl-D twice (the first sends the text, the second is the end of input,
    as for `cat`): the text is one request and the command ends; a third was needed."""
    app = await harness.start_gateway()
    async with _on_terminal("stream", *target(harness, app, tmp_path)) as (proc, term):
        await asyncio.to_thread(term.until, b"session ready")
        await asyncio.to_thread(term.until, b"> ")
        os.write(term.fd, b"partial\x04")
        await asyncio.to_thread(term.until, b"partial")  # the terminal's echo
        os.write(term.fd, b"\x04")
        said = await asyncio.to_thread(term.until, b"1 response, receipts verified")
        assert b"echo:laitrap" in said, said
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_on_a_terminal_a_session_that_ends_is_reported_at_once(
    harness: Harness, tmp_path: Path
) -> None:
    """The session ends while the user types nothing (here the gateway stops; a time limit is
    the same): `horde stream` says so at once and exits 1, not at the next line typed."""
    app = await harness.start_gateway()
    async with _on_terminal("stream", *target(harness, app, tmp_path)) as (proc, term):
        await asyncio.to_thread(term.until, b"session ready")
        await asyncio.to_thread(term.until, b"> ")
        await harness.stop_gateway(app)
        said = await asyncio.to_thread(term.until, b"the gateway is shutting down")
        assert said.endswith(b"horde stream: session ended: the gateway is shutting down"), said
        assert await asyncio.wait_for(proc.wait(), 30) == 1


async def test_control_characters_from_the_job_are_escaped_on_a_terminal_only(
    harness: Harness, tmp_path: Path
) -> None:
    """A job's response could retitle the user's terminal window or clear the screen: on a
    terminal its control characters are shown escaped; into a pipe it goes verbatim."""
    app = await harness.start_gateway()
    body = b"\x1b]0;pwned\x07 \x1b[2J\tand a tab"
    requests = tmp_path / "requests.txt"
    requests.write_bytes(body + b"\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests)
    )
    assert code == 0, err
    assert out == answer(body).decode() + "\n"  # verbatim, escape sequences included

    argv = ("stream", *target(harness, app, tmp_path), "--input", str(requests))
    async with _on_terminal(*argv, stdin_too=False) as (proc, term):
        await asyncio.to_thread(term.until, b"receipts verified")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert b"\x1b" not in term.seen and b"\x07" not in term.seen, term.seen
    assert b"\\x07denwp;0]\\x1b" in term.seen and b"\tand a tab" not in term.seen, term.seen
    assert b"bat a dna\t" in term.seen, term.seen  # tabs are harmless: kept


async def test_extra_files_are_placed_before_the_first_request_and_env_is_passed(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"context for the job\n")
    weights = tmp_path / "w.bin"
    weights.write_bytes(bytes(range(256)) * 10)
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    argv = target(harness, app, tmp_path)
    code, out, err = await horde(
        "stream",
        *argv,
        "--input",
        str(requests),
        "--extra",
        str(notes),
        "--extra",
        f"weights.bin={weights}",
        "--env",
        "MODE=fast",
        "--env",
        "EMPTY=",
    )
    assert code == 0, err
    assert out == answer(b"one").decode() + "\n"
    (job,) = harness.fake_proxy.jobs.values()
    assert job.extra == {"notes.txt": notes.read_bytes(), "weights.bin": weights.read_bytes()}
    assert dict(harness.fake_validator.starts[-1].spec.env) == {"MODE": "fast", "EMPTY": ""}
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"extra data placed: /volume/extra/weights.bin (2560 bytes, sha256 {digest})" in err
    # Placed before the first request was sent.
    assert err.index("extra data placed: /volume/extra/notes.txt") < err.index("1 response")


async def test_an_extra_file_not_placed_ends_the_command_with_the_reason(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    harness.fake_validator.extra_refused["notes.txt"] = "no room left"
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"x")
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests), "--extra", str(notes)
    )
    assert code == 1, err
    assert out == ""
    assert "horde stream: extra data notes.txt failed: FAILED_PRECONDITION" in err
    assert "no room left; closing the session" in err
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 0


async def test_bad_extra_and_env_options_are_usage_errors(tmp_path: Path) -> None:
    key = tmp_path / "client.json"
    write_key_file(key, Ed25519Signer.generate())
    gateway = str(Ed25519Signer.generate().identity)
    base = ["stream", "--gateway", "127.0.0.1:1", "--gateway-identity", gateway, "--key", str(key)]
    code, _, err = await horde(*base, "--image", WHITELIST, "--env", "NOEQUALS")
    assert code == 2 and "--env 'NOEQUALS': expected KEY=VALUE" in err, err
    code, _, err = await horde(*base, "--image", WHITELIST, "--extra", str(tmp_path / "missing"))
    assert code == 2 and "No such file or directory" in err, err
    (tmp_path / "a").write_text("a")
    code, _, err = await horde(*base, "--image", WHITELIST, "--extra", f"../x={tmp_path / 'a'}")
    assert code == 2 and "a plain file name is required" in err, err
    code, _, err = await horde(
        *base,
        "--image",
        WHITELIST,
        "--extra",
        str(tmp_path / "a"),
        "--extra",
        f"a={tmp_path / 'a'}",
    )
    assert code == 2 and "the name 'a' is given twice" in err, err


async def test_closed_standard_descriptors_are_no_crash(harness: Harness, tmp_path: Path) -> None:
    """Run with stdin (and then stdout) closed, as some daemon tools and `<&-` do: uvloop aborted
    the process (an assertion on a descriptor below 3) once the session was over."""
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\n")
    argv = [HORDE, "stream", *target(harness, app, tmp_path), "--input", str(requests)]
    for closed in (0, 1):
        # The shell closes it and execs the command (a preexec_fn would run Python in the forked
        # child of this gRPC process, where gRPC's restarted poller can abort it before exec).
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            f'exec "$@" {closed}>&-',
            "sh",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, (closed, err.decode())
        assert b"2 responses, receipts verified" in err
        if closed == 0:
            assert out.decode() == answer(b"one").decode() + "\n" + answer(b"two").decode() + "\n"


async def test_input_dash_reads_standard_input(harness: Harness, tmp_path: Path) -> None:
    app = await harness.start_gateway()
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(b"one\ntwo\n")
    assert proc.returncode == 0, err.decode()
    assert out.decode() == answer(b"one").decode() + "\n" + answer(b"two").decode() + "\n"


async def test_an_extra_file_never_confirmed_ends_the_command_in_time(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A gateway that never says whether a file was placed (an older one) does not hold the
    command until the session's end: after EXTRA_WAIT_S it says so and exits 1. (In process,
    on a thread of its own, with the wait shortened.)"""
    app = await harness.start_gateway()
    harness.fake_validator.extra_hangs = True
    monkeypatch.setattr(stream_module, "EXTRA_WAIT_S", 0.5)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"x")
    requests = tmp_path / "requests.txt"
    requests.write_text("one\n")
    argv = ["stream", *target(harness, app, tmp_path), "--input", str(requests)]
    logging_config = structlog.get_config()  # the CLI sets its own; later tests keep theirs
    try:
        code = await asyncio.to_thread(cli_main, [*argv, "--extra", str(notes)])
    finally:
        structlog.configure(**logging_config)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "horde stream: extra data notes.txt: no word of its placement within 0.5s; " in err
    assert "closing the session" in err, err
