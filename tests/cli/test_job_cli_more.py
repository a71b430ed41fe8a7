"""`horde job` exit statuses, a closed stdout and output files, as a user runs it (real `horde`
processes) against a stand-in validator: a real gRPC server on port 0 serving ValidatorService,
which answers every call with whatever status a test sets (what the real validator rarely or
never sends on demand: DEADLINE_EXCEEDED, an error after a job was accepted), and sends whatever
output bytes a test sets (bytes that do not match the result, a download that stops midway)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from horde.v1 import common_pb2, job_pb2, validator_pb2, validator_pb2_grpc

from horde_services.core.identity import create_key_file

BIN = Path(sys.executable).parent
BASE = "horde/base:latest"
JOB = str(uuid.UUID(int=7))
REFUSALS = [
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INTERNAL,
]
CONNECTION = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]


def record(
    job_uuid: str, labels: dict[str, str] | None = None, outputs: dict[str, bytes] | None = None
) -> job_pb2.JobRecord:
    """A completed job whose result lists `outputs` (path -> content)."""
    return job_pb2.JobRecord(
        job_uuid=job_uuid,
        spec=job_pb2.JobSpec(image=BASE, labels=labels),
        state=common_pb2.JOB_STATE_COMPLETED,
        result=job_pb2.JobResult(
            job_uuid=job_uuid,
            state=common_pb2.JOB_STATE_COMPLETED,
            exit_code=0,
            outputs=[
                job_pb2.OutputFile(
                    path=path, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
                for path, data in (outputs or {}).items()
            ],
        ),
    )


def chunk(path: str, data: bytes, offset: int = 0, last: bool = True) -> job_pb2.OutputChunk:
    return job_pb2.OutputChunk(path=path, offset=offset, data=data, last=last)


class FakeValidator(validator_pb2_grpc.ValidatorServiceServicer):
    """Answers as a validator would, or fails every call with `code` (SubmitJob: once the job
    was accepted, when `after_accept`)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.after_accept = False
        # ListJobs: a job for each (image, labels), newest first.
        self.listed: list[tuple[str, dict[str, str]]] = [(BASE, {"team": "ml"})] * 5
        # The job's outputs as SubmitJob and DownloadOutputs send them, and as its result lists
        # them (path -> content).
        self.chunks = [chunk("a.txt", b"A")]
        self.outputs = {"a.txt": b"A"}
        # Stop after the chunks (SubmitJob: after an event saying "held") until `release`.
        self.hold = False
        self.release = threading.Event()
        self.downloading = threading.Event()  # DownloadOutputs was called

    def record(self, job_uuid: str) -> job_pb2.JobRecord:
        return record(job_uuid, outputs=self.outputs)

    def _fail(self, context: grpc.ServicerContext) -> None:
        if self.code is not None:
            context.abort(self.code, f"the stand-in says {self.code.name.lower()}")

    def SubmitJob(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        next(request_iterator)  # the spec
        if not self.after_accept:
            self._fail(context)
        yield validator_pb2.SubmitJobResponse(
            event=job_pb2.JobEvent(job_uuid=JOB, state=common_pb2.JOB_STATE_RUNNING)
        )
        self._fail(context)
        for item in self.chunks:
            yield validator_pb2.SubmitJobResponse(output_chunk=item)
        if self.hold:
            yield validator_pb2.SubmitJobResponse(
                event=job_pb2.JobEvent(
                    job_uuid=JOB, state=common_pb2.JOB_STATE_RUNNING, message="held"
                )
            )
            self.release.wait(60)
            return
        yield validator_pb2.SubmitJobResponse(result=self.record(JOB).result)

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        yield validator_pb2.WatchJobResponse(
            event=job_pb2.JobEvent(job_uuid=request.job_uuid, state=common_pb2.JOB_STATE_RUNNING)
        )
        yield validator_pb2.WatchJobResponse(result=self.record(request.job_uuid).result)

    def DownloadOutputs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        for item in self.chunks:
            yield validator_pb2.DownloadOutputsResponse(chunk=item)
        self.downloading.set()
        if self.hold:
            self.release.wait(60)

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        return validator_pb2.GetJobResponse(job=self.record(request.job_uuid))

    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        return validator_pb2.CancelJobResponse(state=common_pb2.JOB_STATE_CANCELLED)

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        jobs = []
        for i, (image, labels) in enumerate(self.listed):
            job = record(str(uuid.UUID(int=i)), labels)
            job.spec.image = image
            jobs.append(job)
        return validator_pb2.ListJobsResponse(jobs=jobs)


@dataclass
class Validator:
    fake: FakeValidator
    address: str
    args: list[str]  # --validator, --validator-identity and --key for a `horde job` command
    out: Path  # a directory for outputs: what OUT in a command's words stands for


@pytest.fixture
def validator(tmp_path: Path) -> Iterator[Validator]:
    key = tmp_path / "client.json"
    create_key_file(key, "ed25519")
    fake = FakeValidator()  # type: ignore[abstract]  # serves only what `horde job` calls
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    validator_pb2_grpc.add_ValidatorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        yield Validator(
            fake,
            address,
            [
                "--validator",
                address,
                "--validator-identity",
                "sr25519:" + "11" * 32,
                "--key",
                str(key),
            ],
            tmp_path / "out",
        )
    finally:
        fake.release.set()  # a held call ends
        server.stop(None)


OUT = "<out>"
COMMANDS = {
    "run": ["run", BASE, "--", "true"],
    "watch": ["watch", JOB],
    "download": ["download", "--output", OUT, JOB],
    "status": ["status", JOB],
    "cancel": ["cancel", JOB],
    "list": ["list"],
}


def argv(validator: Validator, words: list[str]) -> list[str]:
    """`horde job WORDS[0] <the stand-in's target> WORDS[1:]`, OUT replaced."""
    rest = [str(validator.out) if word == OUT else word for word in words[1:]]
    return [str(BIN / "horde"), "job", words[0], *validator.args, *rest]


def horde_job(validator: Validator, words: list[str], *, stdout: Any = subprocess.PIPE) -> Any:
    """`horde job WORDS[0] <the stand-in's target> WORDS[1:]`."""
    return subprocess.run(
        argv(validator, words), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120
    )


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_a_refusal_exits_1_and_no_answer_2(validator: Validator, cmd: str) -> None:
    for code in REFUSALS + CONNECTION:
        validator.fake.code = code
        out = horde_job(validator, COMMANDS[cmd])
        why = f"{code.name}: the stand-in says {code.name.lower()}"
        if code in CONNECTION:
            assert out.returncode == 2, (code, out.stderr)
            assert f"the validator at {validator.address}: {why}" in out.stderr, out.stderr
        else:
            assert out.returncode == 1, (code, out.stderr)
            lead = "validator refused the job: " if cmd == "run" else ""
            assert out.stderr == f"horde job {cmd}: {lead}{why}\n"
        assert out.stdout == ""


def test_the_validator_ending_an_accepted_job_is_1_losing_it_2(validator: Validator) -> None:
    validator.fake.after_accept = True
    again = f"ask again with `horde job status {JOB}`"
    validator.fake.code = grpc.StatusCode.INTERNAL
    out = horde_job(validator, COMMANDS["run"])
    assert out.returncode == 1
    assert out.stderr.endswith(
        f"horde job run: the validator ended job {JOB} (INTERNAL: the stand-in says internal); "
        f"{again}\n"
    )
    validator.fake.code = grpc.StatusCode.UNAVAILABLE
    out = horde_job(validator, COMMANDS["run"])
    assert out.returncode == 2
    assert out.stderr.endswith(
        f"horde job run: lost the validator while following job {JOB} (UNAVAILABLE: the "
        f"stand-in says unavailable); {again}\n"
    )


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_output_closed_early_exits_quietly_with_141(
    validator: Validator, cmd: str, as_json: bool
) -> None:
    """What `horde job ... | head -c 10` leaves once head has gone: a pipe with no reader."""
    reader, writer = os.pipe()
    os.close(reader)  # closed before the command starts: every write to stdout fails
    words = [COMMANDS[cmd][0], *(["--json"] if as_json else []), *COMMANDS[cmd][1:]]
    try:
        out = horde_job(validator, words, stdout=writer)
    finally:
        os.close(writer)
    assert out.returncode == 141, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    if cmd not in ("run", "watch") or as_json:  # as text, these report progress on stderr
        assert out.stderr == ""


@pytest.mark.parametrize("cmd", ["status", "cancel", "list"])
def test_help_gives_the_exit_statuses(cmd: str) -> None:
    out = subprocess.run(
        [str(BIN / "horde"), "job", cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert (
        "Exit status: 0 done, 1 refused by the validator (e.g. not an enrolled client, no such "
        "job, another client's job), 2 for usage and connection problems, 130 when "
        "interrupted, 141 when the output was closed early" in text
    )


def test_list_shows_labels_in_a_column_only_when_a_job_has_any(validator: Validator) -> None:
    long_image = "registry.example:5000/team/a-long-image:v1"
    validator.fake.listed = [(BASE, {}), (long_image, {})]
    rows = [f"{uuid.UUID(int=i)}  completed{' ' * 26}" for i in range(3)]
    out = horde_job(validator, ["list"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{rows[0]}{BASE}\n{rows[1]}{long_image}\n"  # no labels column

    validator.fake.listed = [
        (BASE, {"b": "2", "a": "1"}),
        (long_image, {}),
        (BASE, {"x": "tab\there"}),
    ]
    out = horde_job(validator, ["list"])
    assert out.returncode == 0, out.stderr
    pad = " " * (len(long_image) - len(BASE))
    assert out.stdout == (
        f"{rows[0]}{BASE}{pad}  a=1,b=2\n"
        f"{rows[1]}{long_image}\n"
        f"{rows[2]}{BASE}{pad}  x=tab\\x09here\n"
    )
    out = horde_job(validator, ["list", "--json"])
    assert [row["labels"] for row in json.loads(out.stdout)] == [
        {"a": "1", "b": "2"},
        {},
        {"x": "tab\there"},
    ]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_line(path: str, data: bytes) -> str:
    return f"output {path} ({len(data)} bytes, sha256 {sha(data)[:16]}...)"


@pytest.mark.parametrize("cmd", ["run", "watch", "download"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_outputs_that_do_not_match_the_result_are_not_written(
    validator: Validator, cmd: str, as_json: bool
) -> None:
    fake = validator.fake
    fake.chunks = [
        chunk("same-size.txt", b"AAAB"),  # the result lists AAAA: another sha256
        chunk("short.txt", b"B"),  # the result lists 2 bytes
        chunk("good.txt", b"C"),
        chunk("unlisted.txt", b"E"),  # not in the result
        chunk("cut.txt", b"F", last=False),  # its last chunk never comes
    ]
    fake.outputs = {
        "same-size.txt": b"AAAA",
        "short.txt": b"BB",
        "good.txt": b"C",
        "cut.txt": b"FF",
        "never.txt": b"D",  # listed, never sent
    }
    words = {
        "run": ["run", "--output", OUT, BASE, "--", "true"],
        "watch": ["watch", "--output", OUT, JOB],
        "download": ["download", "--output", OUT, JOB],
    }[cmd]
    out = horde_job(validator, [words[0], *(["--json"] if as_json else []), *words[1:]])
    assert out.returncode == 1, out.stderr
    # Only the output that came whole and as the result lists it; no temporary file stays.
    assert sorted(p.name for p in validator.out.iterdir()) == ["good.txt"]
    assert (validator.out / "good.txt").read_bytes() == b"C"
    got, listed = sha(b"AAAB")[:16], sha(b"AAAA")[:16]
    missing = {
        "run": "the validator did not send it",
        "watch": "the validator does not hold it (past its cap for a job's inline outputs)",
    }
    missing["download"] = missing["watch"]
    why = {
        "same-size.txt": f"sha256 {got}... of the bytes that came, the result lists {listed}...",
        "short.txt": "1 bytes came, the result lists 2",
        "cut.txt": "the stream ended after 1 of its bytes",
        "never.txt": missing[cmd],
        "unlisted.txt": "the job's result does not list it (it cannot be checked)",
    }
    for path, reason in why.items():
        assert f"horde job {cmd}: output {path} not written: {reason}\n" in out.stderr
    assert "good.txt not written" not in out.stderr and "Traceback" not in out.stderr
    if as_json:
        doc = json.loads(out.stdout)
        marks = {o["path"]: (o["written_to"], o.get("not_written")) for o in doc["outputs"]}
        assert marks == {
            "same-size.txt": (None, why["same-size.txt"]),
            "short.txt": (None, why["short.txt"]),
            "good.txt": (str(validator.out / "good.txt"), None),
            "cut.txt": (None, why["cut.txt"]),
            "never.txt": (None, why["never.txt"]),
        }
        assert doc["outputs_not_written"] == why
    else:
        lines = out.stdout.splitlines()
        assert f"{output_line('good.txt', b'C')} -> {validator.out / 'good.txt'}" in lines
        for path, data in fake.outputs.items():
            if path != "good.txt":
                assert f"{output_line(path, data)} not written: {why[path]}" in lines


def start(validator: Validator, words: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv(validator, words), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_run_stopped_mid_output_leaves_no_partial_file(
    validator: Validator, sig: signal.Signals
) -> None:
    validator.fake.chunks = [chunk("a.txt", b"half", last=False)]  # of 8 bytes
    validator.fake.outputs = {"a.txt": b"halfhalf"}
    validator.fake.hold = True
    proc = start(validator, ["run", "--output", OUT, BASE, "--", "true"])
    assert proc.stderr is not None
    # The event after the chunk: once it is shown, the chunk was written (to a temporary file).
    for line in proc.stderr:
        if line.rstrip().endswith(" held"):
            break
    else:
        raise AssertionError("horde job run ended before the held event")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert list(validator.out.iterdir()) == []  # neither a.txt cut short nor a temporary file
    interrupted = "horde job run: output a.txt not written: interrupted before it was complete\n"
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert err == f"\nhorde job run: interrupted: job {JOB} cancelled\n{interrupted}"
    else:
        assert proc.returncode == 143
        assert err == (
            f"horde job run: stopped by SIGTERM: job {JOB} was not cancelled; follow it again "
            f"with `horde job watch {JOB} --output {validator.out}`, or cancel it with "
            f"`horde job cancel {JOB}`\n{interrupted}"
        )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_download_stopped_midway_keeps_whole_outputs_only(
    validator: Validator, sig: signal.Signals
) -> None:
    # b.txt begins before a.txt comes whole: once a.txt is said written, b.txt was begun.
    validator.fake.chunks = [chunk("b.txt", b"B", last=False), chunk("a.txt", b"A")]
    validator.fake.outputs = {"a.txt": b"A", "b.txt": b"BB", "c.txt": b"C"}
    validator.fake.hold = True
    proc = start(validator, ["download", "--output", OUT, JOB])
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == f"{output_line('a.txt', b'A')} -> {validator.out / 'a.txt'}\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143)
    assert out == ""
    assert sorted(p.name for p in validator.out.iterdir()) == ["a.txt"]  # no b.txt, no temporary
    how = (
        "\nhorde job download: interrupted"
        if sig == signal.SIGINT
        else ("horde job download: stopped by SIGTERM")
    )
    assert err == (
        f"{how}; fetch the outputs again with `horde job download {JOB} --output "
        f"{validator.out}`\n"
        "horde job download: output b.txt not written: interrupted before it was complete\n"
        "horde job download: output c.txt not written: interrupted before it was complete\n"
    )


def test_watch_stopped_while_downloading_leaves_no_partial_file(validator: Validator) -> None:
    validator.fake.chunks = [chunk("a.txt", b"A", last=False)]
    validator.fake.outputs = {"a.txt": b"AA"}
    validator.fake.hold = True
    proc = start(validator, ["watch", "--output", OUT, JOB])
    assert validator.fake.downloading.wait(60)  # it has the result and is downloading
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert out == ""
    assert list(validator.out.iterdir()) == []
    assert err.endswith(
        f"horde job watch: stopped by SIGTERM: job {JOB} was not cancelled; follow it again with "
        f"`horde job watch {JOB} --output {validator.out}`, or cancel it with "
        f"`horde job cancel {JOB}`\n"
        "horde job watch: output a.txt not written: interrupted before it was complete\n"
    )
