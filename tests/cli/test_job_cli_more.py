"""`horde job` exit statuses and a closed stdout, as a user runs it (real `horde` processes)
against a stand-in validator: a real gRPC server on port 0 serving ValidatorService, which
answers every call with whatever status a test sets (what the real validator rarely or never
sends on demand: DEADLINE_EXCEEDED, an error after a job was accepted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def record(job_uuid: str, labels: dict[str, str] | None = None) -> job_pb2.JobRecord:
    return job_pb2.JobRecord(
        job_uuid=job_uuid,
        spec=job_pb2.JobSpec(image=BASE, labels=labels),
        state=common_pb2.JOB_STATE_COMPLETED,
        result=job_pb2.JobResult(
            job_uuid=job_uuid, state=common_pb2.JOB_STATE_COMPLETED, exit_code=0
        ),
    )


class FakeValidator(validator_pb2_grpc.ValidatorServiceServicer):
    """Answers as a validator would, or fails every call with `code` (SubmitJob: once the job
    was accepted, when `after_accept`)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.after_accept = False
        # ListJobs: a job for each (image, labels), newest first.
        self.listed: list[tuple[str, dict[str, str]]] = [(BASE, {"team": "ml"})] * 5

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
        yield validator_pb2.SubmitJobResponse(result=record(JOB).result)

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context)
        return validator_pb2.GetJobResponse(job=record(request.job_uuid))

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
        )
    finally:
        server.stop(None)


COMMANDS = {
    "run": ["run", BASE, "--", "true"],
    "status": ["status", JOB],
    "cancel": ["cancel", JOB],
    "list": ["list"],
}


def horde_job(validator: Validator, words: list[str], *, stdout: Any = subprocess.PIPE) -> Any:
    """`horde job WORDS[0] <the stand-in's target> WORDS[1:]`."""
    return subprocess.run(
        [str(BIN / "horde"), "job", words[0], *validator.args, *words[1:]],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
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
    if cmd != "run" or as_json:  # as text, `job run` reports progress on stderr
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
