"""The validator's job API answers refusals with its own status and reason, and leaves nothing
behind: uploads over the inline-input cap (declared up front or not) are RESOURCE_EXHAUSTED at
the client (not grpc.aio's "INTERNAL: Internal error from Core"), with no spool file and no job
row left; job lookups take a job uuid in any spelling and refuse one that is not a UUID."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from horde.v1 import common_pb2, job_pb2, streaming_pb2, validator_pb2, validator_pb2_grpc

from horde_services.cli import client as cli
from horde_services.cli.client import Target
from horde_services.core.app import ServiceApp
from horde_services.core.chain import Neuron, write_roster
from horde_services.core.config import ValidatorSettings, load_settings
from horde_services.core.db import open_database
from horde_services.core.errors import InvalidArgument
from horde_services.core.identity import Ed25519Signer, HotkeySigner
from horde_services.core.server import open_channel
from horde_services.validator import service
from horde_services.validator.app import start_validator
from horde_services.validator.store import JobStore
from horde_services.validator.streaming import parse_job_uuid

CAP = 512 * 1024  # the validator's max_inline_input_bytes in these tests
CHUNK = 64 * 1024
IMAGE = "horde/base:latest"
CAP_REASON = f"inline inputs exceed the validator's cap of {CAP} bytes"


@dataclass
class Validator:
    app: ServiceApp
    stub: validator_pb2_grpc.ValidatorServiceStub
    settings: ValidatorSettings
    client: Ed25519Signer  # an enrolled client (the stub's)
    identity: str  # the validator's

    @property
    def target(self) -> Target:
        """Where the CLI's client code reaches it, as the enrolled client."""
        return Target(f"127.0.0.1:{self.app.port}", self.identity, self.client)

    @property
    def spool(self) -> Path:
        return self.settings.state_dir / "spool"

    async def job_rows(self) -> list[str]:
        engine = await open_database(self.settings.database("validator"))
        try:
            records, _ = await JobStore(engine).list_jobs(500, None, None)
        finally:
            await engine.dispose()
        return [r.job_uuid for r in records]

    async def assert_nothing_left(self) -> None:
        assert list(self.spool.iterdir()) == [], "spooled inputs left behind"
        assert await self.job_rows() == [], "job rows left behind"


@pytest.fixture
async def v(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Validator]:
    """A validator; `@pytest.mark.settings(key=value)` sets more of its settings."""
    marker = request.node.get_closest_marker("settings")
    extra = marker.kwargs if marker is not None else {}
    signer, client = HotkeySigner.generate(), Ed25519Signer.generate()
    roster = tmp_path / "roster.toml"
    write_roster(roster, [Neuron(uid=0, hotkey=signer.identity.ss58, validator_permit=True)])
    settings = load_settings(
        ValidatorSettings,
        state_dir=tmp_path,
        roster_file=roster,
        clients=[str(client.identity)],
        allowed_images=[IMAGE],
        streaming_whitelist=[],
        **{"max_inline_input_bytes": CAP, **extra},
    )
    app = await start_validator(settings, signer)
    try:
        async with open_channel(
            f"127.0.0.1:{app.port}", signer=client, callee=str(signer.identity)
        ) as channel:
            stub = validator_pb2_grpc.ValidatorServiceStub(channel)
            yield Validator(app, stub, settings, client, str(signer.identity))
    finally:
        await app.stop(0)


def inline_file(name: str, declared: int, data: bytes = b"") -> job_pb2.InputVolume:
    sha = hashlib.sha256(data).hexdigest() if data else ""
    return job_pb2.InputVolume(
        inline_file=job_pb2.InlineFile(file_name=name, size_bytes=declared, sha256=sha)
    )


def spec_with(*inputs: job_pb2.InputVolume, image: str = IMAGE) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(
        image=image,
        command=["true"],
        inputs=list(inputs),
        output=job_pb2.OutputSpec(stream=job_pb2.StreamOutput()),
    )


def uploads(
    spec: job_pb2.JobSpec,
    inline: dict[int, bytes],
    *,
    hold: asyncio.Event | None = None,
    sent: list[int] | None = None,
) -> AsyncIterator[validator_pb2.SubmitJobRequest]:
    """The requests of a SubmitJob: the spec, then each input in CHUNK-sized pieces; with
    ``hold`` the stream stays open (no half-close) until the event is set; the sizes of the
    chunks grpc took are appended to ``sent``."""

    def pieces() -> Iterator[validator_pb2.SubmitJobRequest]:
        yield validator_pb2.SubmitJobRequest(spec=spec)
        for index, data in inline.items():
            for offset in range(0, len(data), CHUNK):
                yield validator_pb2.SubmitJobRequest(
                    input_chunk=job_pb2.InputChunk(
                        volume_index=index,
                        data=data[offset : offset + CHUNK],
                        last=offset + CHUNK >= len(data),
                    )
                )

    async def gen() -> AsyncIterator[validator_pb2.SubmitJobRequest]:
        for request in pieces():
            yield request
            if sent is not None:
                sent.append(len(request.input_chunk.data))
        if hold is not None:
            await hold.wait()

    return gen()


async def submit_refused(
    v: Validator,
    spec: job_pb2.JobSpec,
    inline: dict[int, bytes],
    *,
    hold: asyncio.Event | None = None,
    sent: list[int] | None = None,
) -> grpc.aio.AioRpcError:
    call = v.stub.SubmitJob(uploads(spec, inline, hold=hold, sent=sent), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for msg in call:
            raise AssertionError(f"a refused job answered {msg}")
    return err.value


def blob(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


# ------------------------------------------------------------------------- the inline-input cap


@pytest.mark.parametrize("size", [CAP + 1, CAP + CAP // 2, 2 * CAP])
async def test_declared_over_the_cap_is_resource_exhausted(v: Validator, size: int) -> None:
    data = blob(size)
    err = await submit_refused(v, spec_with(inline_file("in.bin", size, data)), {0: data})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details() == f"{CAP_REASON} (the spec declares {size})"
    await v.assert_nothing_left()


async def test_declared_sizes_are_summed_over_inputs(v: Validator) -> None:
    half = blob(CAP // 2 + 10)
    spec = spec_with(inline_file("a", len(half), half), inline_file("b", len(half), half))
    err = await submit_refused(v, spec, {0: half, 1: half})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details() == f"{CAP_REASON} (the spec declares {2 * len(half)})"
    await v.assert_nothing_left()


@pytest.mark.parametrize("declared", [0, 1024], ids=["undeclared", "declared_less"])
@pytest.mark.parametrize("size", [CAP + 1, CAP + CAP // 2, 2 * CAP])
async def test_sent_over_the_cap_is_resource_exhausted(
    v: Validator, declared: int, size: int
) -> None:
    data = blob(size)
    err = await submit_refused(v, spec_with(inline_file("in.bin", declared)), {0: data})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details() == CAP_REASON
    await v.assert_nothing_left()


async def test_sent_over_the_cap_across_inputs(v: Validator) -> None:
    first, second = blob(CAP // 2), blob(CAP)
    spec = spec_with(inline_file("a", 0), inline_file("b", 0))
    err = await submit_refused(v, spec, {0: first, 1: second})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details() == CAP_REASON
    await v.assert_nothing_left()


async def test_refused_client_that_holds_the_stream_open_gets_the_status(
    v: Validator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps its stream open after the inputs (to be able to cancel) is answered
    once it has been idle for a while, not when it half-closes."""
    monkeypatch.setattr(service, "REFUSED_UPLOAD_IDLE_S", 0.3)
    hold = asyncio.Event()
    try:
        data = blob(CAP + CHUNK)
        err = await submit_refused(v, spec_with(inline_file("in.bin", 0)), {0: data}, hold=hold)
    finally:
        hold.set()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert err.details() == CAP_REASON
    await v.assert_nothing_left()


@pytest.mark.parametrize("declared", [0, 20 * CAP], ids=["undeclared", "declared"])
async def test_upload_far_past_the_cap_is_cut_off(v: Validator, declared: int) -> None:
    """Past the cap twice over the validator stops reading (or, when the spec says so, does
    not start): the call fails at once and the validator stays healthy."""
    data = blob(20 * CAP)
    sent: list[int] = []
    err = await submit_refused(v, spec_with(inline_file("in.bin", declared)), {0: data}, sent=sent)
    # Cut off mid-upload the client may see the validator's status or grpc.aio's INTERNAL.
    assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL), err
    assert sum(sent) < len(data) // 2, "the validator read on past its limit"
    await v.assert_nothing_left()
    data = blob(CAP + 1)
    err = await submit_refused(v, spec_with(inline_file("in.bin", 0)), {0: data})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err


async def test_other_refusals_mid_upload_keep_their_status(v: Validator) -> None:
    """A sha256 mismatch on the first input, found while the client still uploads the second,
    is INVALID_ARGUMENT at the client too."""
    first, second = blob(CAP // 4), blob(CAP // 2)
    bad = inline_file("a", len(first))
    bad.inline_file.sha256 = "00" * 32
    err = await submit_refused(v, spec_with(bad, inline_file("b", 0)), {0: first, 1: second})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == "spec.inputs[0]: sha256 mismatch"
    await v.assert_nothing_left()


async def test_upload_of_exactly_the_cap_is_accepted(v: Validator) -> None:
    data = blob(CAP)
    call = v.stub.SubmitJob(
        uploads(spec_with(inline_file("in.bin", len(data), data)), {0: data}), timeout=30
    )
    try:
        first = await call.read()
    finally:
        call.cancel()
    assert isinstance(first, validator_pb2.SubmitJobResponse)
    assert first.event.state == common_pb2.JOB_STATE_ACCEPTED, first


# ------------------------------------------------------------------------- the upload handshake


def input_file(tmp_path: Path, size: int, name: str = "in.bin") -> cli.Inline:
    """A file of `size` bytes as the CLI sends it (cli.build_inputs)."""
    path = tmp_path / name
    path.write_bytes(blob(size))
    (item,) = cli.build_inputs([str(path)])
    assert isinstance(item, cli.Inline)
    return item


async def submit_as_the_cli(
    v: Validator, spec: job_pb2.JobSpec, items: list[cli.Inline], deadline: float = 30
) -> tuple[cli.Upload, grpc.aio.AioRpcError | None, list[validator_pb2.SubmitJobResponse]]:
    """A SubmitJob as `horde job run` makes it (cli.Upload: the spec, then its inline inputs once
    the validator has accepted the upload), `items` added to the spec's inputs; the upload, the
    error the call ended with (None when it ended well) and the answers."""
    inline = []
    for item in items:
        inline.append((len(spec.inputs), item))
        spec.inputs.append(item.volume)
    upload = cli.Upload(spec, inline)
    upload.call = v.stub.SubmitJob(upload.requests(), timeout=deadline)
    answers: list[validator_pb2.SubmitJobResponse] = []
    try:
        async for msg in upload.call:
            answers.append(msg)
    except grpc.aio.AioRpcError as exc:
        return upload, exc, answers
    return upload, None, answers


async def test_a_client_that_waits_reads_the_refusal_of_what_it_declares(
    v: Validator, tmp_path: Path
) -> None:
    """Declared far past the read limit, an upload is refused at once, from the spec: a client
    writing its chunks meanwhile may see grpc.aio's "INTERNAL: Internal error from Core"
    (test_upload_far_past_the_cap_is_cut_off). The CLI waits for the validator to accept the
    upload before its first chunk: the validator's status, every time, and no chunk sent."""
    size = 20 * CAP
    item = input_file(tmp_path, size)
    for attempt in range(20):
        upload, err, answers = await submit_as_the_cli(v, spec_with(), [item])
        assert err is not None, answers
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (attempt, err)
        assert err.details() == f"{CAP_REASON} (the spec declares {size})"
        assert upload.sent_chunks == 0
    await v.assert_nothing_left()


@pytest.mark.settings(spool_min_free_mb=2**40)  # no upload the spec passes fits on the disk
async def test_a_client_that_waits_sends_no_chunk_of_an_upload_refused_from_its_spec(
    v: Validator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refusal made from the spec (validate_spec, the cap, the read limit, the spool's
    disk) comes before the validator accepts the upload: the CLI sends no
    chunk, and the refusal comes at once. Neither side waits out a time limit for it: with
    both set to a minute, a call that relied on one would run past its own 10 s deadline."""
    monkeypatch.setattr(service, "REFUSED_UPLOAD_IDLE_S", 60.0)
    monkeypatch.setattr(cli, "UPLOAD_ACCEPT_WAIT_S", 60.0)
    bad_label = spec_with()
    bad_label.labels["big"] = "x" * 1025
    cases = [
        (
            bad_label,
            CAP // 2,
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.labels['big']: 1025 characters, at most 1024",
        ),
        (
            spec_with(),
            CAP + 1,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{CAP_REASON} (the spec declares {CAP + 1})",
        ),
        (
            spec_with(),
            20 * CAP,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{CAP_REASON} (the spec declares {20 * CAP})",
        ),
        (spec_with(), CAP, grpc.StatusCode.UNAVAILABLE, "the validator is short of disk space"),
    ]
    for spec, size, code, details in cases:
        item = input_file(tmp_path, size)
        upload, err, answers = await submit_as_the_cli(v, spec, [item], deadline=10)
        assert err is not None, answers
        assert err.code() == code, (size, err)
        assert (err.details() or "").startswith(details), err.details()
        assert upload.sent_chunks == 0
        item.close()
    await v.assert_nothing_left()


async def test_a_client_that_does_not_wait_still_reads_the_refusal(v: Validator) -> None:
    """Older clients write their chunks without waiting for the validator to accept the
    upload: the validator reads and drops them (here more than the stream's flow-control
    window holds, so the client's writes need it) and answers once they half-close."""
    data = blob(CAP)
    spec = spec_with(inline_file("in.bin", len(data), data))
    spec.labels["big"] = "x" * 1025
    for _ in range(5):
        sent: list[int] = []
        err = await submit_refused(v, spec, {0: data}, sent=sent)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert err.details() == "spec.labels['big']: 1025 characters, at most 1024"
        assert sum(sent) == len(data)  # every chunk was taken (and thrown away)
    await v.assert_nothing_left()


@pytest.mark.settings(max_inline_input_bytes=4 * cli.CHUNK)
async def test_the_handshake_accepts_an_upload_and_a_rejection_skips_it(
    v: Validator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted, the CLI's inputs arrive whole (here the job is rejected later, for want of a
    miner, once every byte was read and checked against its sha256). A job rejected from its
    spec (an image not on the allow-list: a result, not a status) reads no input: no chunk is
    sent. Neither waits out the CLI's time limit for an answer (a minute here)."""
    monkeypatch.setattr(cli, "UPLOAD_ACCEPT_WAIT_S", 60.0)
    items = [input_file(tmp_path, 3 * cli.CHUNK // 2, "a.bin"), input_file(tmp_path, 0, "e")]
    upload, err, answers = await submit_as_the_cli(v, spec_with(), items, deadline=10)
    assert err is None, err
    assert answers[0].event.state == common_pb2.JOB_STATE_ACCEPTED, answers
    assert answers[-1].result.reason == common_pb2.FAILURE_REASON_NO_EXECUTOR_OF_CLASS
    assert upload.sent_chunks == 2 + 1  # (an empty file: one empty chunk)
    item = input_file(tmp_path, CAP)
    upload, err, answers = await submit_as_the_cli(
        v, spec_with(image="horde/not-allowed:latest"), [item], deadline=10
    )
    assert err is None, err
    assert answers[-1].result.reason == common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED, answers
    assert upload.sent_chunks == 0


# ------------------------------------------------------------------------- job uuids in lookups


BAD_UUIDS = [
    "not-a-uuid",
    "",
    " " + str(uuid.UUID(int=7)),
    "0" * 31 + "_",
    str(uuid.UUID(int=7)) + "\n",
]


@pytest.mark.parametrize("value", BAD_UUIDS)
def test_parse_job_uuid_refuses_what_is_not_a_uuid(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_job_uuid(value)
    assert str(err.value) == f"job_uuid {value!r} is not a UUID"


def test_parse_job_uuid_gives_the_canonical_form() -> None:
    canonical = "0f8a1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b"
    for spelling in (
        canonical,
        canonical.upper(),
        canonical.replace("-", ""),
        "{" + canonical.upper() + "}",
        "urn:uuid:" + canonical,
    ):
        assert parse_job_uuid(spelling) == canonical


async def rejected_job(v: Validator) -> str:
    """A job the validator stored (refused: its image is not on the allow-list)."""
    call = v.stub.SubmitJob(uploads(spec_with(image="horde/not-allowed:latest"), {}), timeout=30)
    answers = [msg async for msg in call]
    assert answers[-1].result.state == common_pb2.JOB_STATE_REJECTED
    return str(answers[-1].result.job_uuid)


async def lookup_errors(v: Validator, job_uuid: str) -> dict[str, grpc.aio.AioRpcError]:
    """Every job lookup of the API with ``job_uuid``: the error each answered."""

    async def get() -> object:
        return await v.stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10)

    async def cancel() -> object:
        return await v.stub.CancelJob(validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=10)

    async def watch() -> object:
        return [m async for m in v.stub.WatchJob(validator_pb2.WatchJobRequest(job_uuid=job_uuid))]

    async def download() -> object:
        req = validator_pb2.DownloadOutputsRequest(job_uuid=job_uuid)
        return [m async for m in v.stub.DownloadOutputs(req, timeout=10)]

    async def stop() -> object:
        req = validator_pb2.StopStreamingJobRequest(job_uuid=job_uuid, reason="test")
        return await v.stub.StopStreamingJob(req, timeout=10)

    async def report() -> object:
        req = validator_pb2.ReportBadReceiptRequest(job_uuid=job_uuid, reason="test")
        return await v.stub.ReportBadReceipt(req, timeout=10)

    async def extra() -> object:
        async def requests() -> AsyncIterator[validator_pb2.AddExtraDataRequest]:
            yield validator_pb2.AddExtraDataRequest(
                job_uuid=job_uuid, data=streaming_pb2.ExtraData(file_name="f", data=b"x", last=True)
            )

        return await v.stub.AddExtraData(requests(), timeout=10)

    errors = {}
    for name, rpc in [
        ("GetJob", get),
        ("CancelJob", cancel),
        ("WatchJob", watch),
        ("DownloadOutputs", download),
        ("StopStreamingJob", stop),
        ("ReportBadReceipt", report),
        ("AddExtraData", extra),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc()
        errors[name] = err.value
    return errors


@pytest.mark.parametrize("value", ["not-a-uuid", "12345", str(uuid.uuid4())[:-1] + "g"])
async def test_malformed_job_uuid_is_invalid_argument_in_every_lookup(
    v: Validator, value: str
) -> None:
    for name, err in (await lookup_errors(v, value)).items():
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
        assert err.details() == f"job_uuid {value!r} is not a UUID", name


async def test_unknown_job_uuid_is_not_found_in_its_canonical_form(v: Validator) -> None:
    canonical = str(uuid.uuid4())
    for name in ("GetJob", "CancelJob", "WatchJob", "DownloadOutputs", "StopStreamingJob"):
        err = (await lookup_errors(v, canonical.upper()))[name]
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, err)
        assert canonical in (err.details() or ""), (name, err.details())


async def test_job_uuid_in_any_case_or_spelling_finds_the_job(v: Validator) -> None:
    job_uuid = await rejected_job(v)
    for spelling in (job_uuid.upper(), job_uuid.replace("-", ""), "{" + job_uuid + "}"):
        got = await v.stub.GetJob(validator_pb2.GetJobRequest(job_uuid=spelling), timeout=10)
        assert got.job.job_uuid == job_uuid
        assert got.job.state == common_pb2.JOB_STATE_REJECTED
        cancelled = await v.stub.CancelJob(
            validator_pb2.CancelJobRequest(job_uuid=spelling), timeout=10
        )
        assert cancelled.state == common_pb2.JOB_STATE_REJECTED
        watched = [
            m async for m in v.stub.WatchJob(validator_pb2.WatchJobRequest(job_uuid=spelling))
        ]
        assert watched[-1].result.job_uuid == job_uuid
        downloaded = [
            m
            async for m in v.stub.DownloadOutputs(
                validator_pb2.DownloadOutputsRequest(job_uuid=spelling), timeout=10
            )
        ]
        assert downloaded == []
        # The streaming API's lookups find it too: a finished job's stop answers its result.
        stopped = await v.stub.StopStreamingJob(
            validator_pb2.StopStreamingJobRequest(job_uuid=spelling, reason="test"), timeout=10
        )
        assert stopped.result.job_uuid == job_uuid


async def test_a_stage_time_limit_above_the_maximum_is_refused(v: Validator) -> None:
    """No client holds an executor for longer than the validator allows (max_stage_timeout_s);
    refused while the client still uploads, with the reason it can read."""
    spec = spec_with(inline_file("a", CAP // 2))
    spec.timeouts.execution_s = v.settings.max_stage_timeout_s + 1
    err = await submit_refused(v, spec, {0: blob(CAP // 2)})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == (
        f"spec.timeouts.execution_s: {v.settings.max_stage_timeout_s + 1} s exceeds this "
        f"validator's maximum of {v.settings.max_stage_timeout_s} s"
    )
    await v.assert_nothing_left()


async def test_two_files_for_one_path_under_volume_are_refused(v: Validator) -> None:
    a, b = blob(10), blob(20)
    spec = spec_with(inline_file("x.txt", len(a), a), inline_file("x.txt", len(b), b))
    err = await submit_refused(v, spec, {0: a, 1: b})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == "spec.inputs[1].inline_file: /volume/x.txt is already spec.inputs[0]'s"
    await v.assert_nothing_left()


# ------------------------------------------------------------------- spec checks and listings


def _with(**fields: object) -> job_pb2.JobSpec:
    spec = spec_with()
    for name, value in fields.items():
        if name == "env":
            assert isinstance(value, dict)
            spec.env.update(value)
        elif name == "labels":
            assert isinstance(value, dict)
            spec.labels.update(value)
        elif name == "command":
            assert isinstance(value, list)
            spec.command[:] = value
        elif name == "inputs":
            assert isinstance(value, list)
            spec.inputs.extend(value)
        elif name == "streaming":
            spec.streaming.port = 8000
        else:
            setattr(spec, name, value)
    return spec


_BIG = _with(command=["python3", "-c", "#" * (300 * 1024)])


@pytest.mark.parametrize(
    ("spec", "details"),
    [
        (
            _with(env={"A": "x\x00y"}),
            "spec.env['A']: a value cannot contain a NUL byte",
        ),
        (
            _with(env={"HORDE_PORT": "9999"}),
            "spec.env['HORDE_PORT']: set by Horde itself (the streaming service's port, "
            "spec.streaming.port)",
        ),
        (
            _with(command=["echo", "a\x00b"]),
            "spec.command[1]: an argument cannot contain a NUL byte",
        ),
        (
            _with(image="horde/base:latest\n"),
            "spec.image: 'horde/base:latest\\n' is not an image reference (whitespace or "
            "control characters)",
        ),
        (
            _with(labels={f"k{i}": "v" for i in range(65)}),
            "spec.labels: 65 labels, at most 64",
        ),
        (
            _with(labels={"big": "x" * 1025}),
            "spec.labels['big']: 1025 characters, at most 1024",
        ),
        (
            _BIG,
            f"spec: {_BIG.ByteSize()} bytes, over the 262144-byte limit (send large data as "
            "inputs)",
        ),
        (
            _with(streaming=True),
            "spec.streaming: streaming jobs start through a gateway (StartStreamingJob), not "
            "SubmitJob",
        ),
        (
            _with(
                inputs=[
                    job_pb2.InputVolume(url=job_pb2.UrlInput(url="https://x/y", sha256="z" * 64))
                ]
            ),
            "spec.inputs[0].url.sha256: a 64-hex-digit sha256 is required",
        ),
        (
            _with(
                inputs=[
                    job_pb2.InputVolume(inline_file=job_pb2.InlineFile(file_name="a", sha256="zz"))
                ]
            ),
            "spec.inputs[0].inline_file.sha256: 'zz' is not a 64-hex-digit sha256",
        ),
    ],
    ids=[
        "nul_in_env_value",
        "horde_env",
        "nul_in_command",
        "newline_in_image",
        "too_many_labels",
        "label_too_long",
        "spec_too_large",
        "streaming_on_submit",
        "url_sha256_not_hex",
        "inline_sha256_not_hex",
    ],
)
async def test_a_spec_the_executor_could_not_run_is_refused_up_front(
    v: Validator, spec: job_pb2.JobSpec, details: str
) -> None:
    """Refused as the client's mistake (INVALID_ARGUMENT, nothing stored), not passed on to a
    miner whose executor would refuse it: the job would end horde_failed, against the miner."""
    err = await submit_refused(v, spec, {})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == details
    await v.assert_nothing_left()


@pytest.mark.parametrize("cursor", ["9" * 30, str(2**63), "-1", "1e3", "abc", "٣"])
async def test_a_cursor_no_page_returned_is_invalid_argument(v: Validator, cursor: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await v.stub.ListJobs(validator_pb2.ListJobsRequest(cursor=cursor), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert (err.value.details() or "").startswith("malformed cursor"), err.value.details()


@pytest.mark.parametrize("state", [99, -5])
async def test_an_unknown_state_filter_is_invalid_argument(v: Validator, state: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await v.stub.ListJobs(validator_pb2.ListJobsRequest(state=state), timeout=10)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details() == f"state: {state} is not a JobState"


async def test_a_page_of_large_jobs_ends_early_and_the_cursor_goes_on(v: Validator) -> None:
    """Jobs near the spec size limit: a default page of 50 would pass gRPC's 4 MiB receive
    limit, so the page ends early; following the cursors lists every job exactly once."""
    submitted = []
    for i in range(20):  # refused at once (image not allowed) but stored: ~200 KiB each
        spec = _with(image="not/allowed:latest", command=["x" * (200 * 1024), str(i)])
        call = v.stub.SubmitJob(uploads(spec, {}), timeout=30)
        results = [m.result async for m in call if m.HasField("result")]
        submitted.append(results[-1].job_uuid)
    listed: list[str] = []
    pages = 0
    cursor = ""
    while True:
        page = await v.stub.ListJobs(validator_pb2.ListJobsRequest(cursor=cursor), timeout=10)
        assert page.ByteSize() <= service.LIST_PAGE_BYTES
        listed += [j.job_uuid for j in page.jobs]
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break
    assert listed == submitted[::-1]
    assert pages > 1


async def test_a_refused_streaming_spec_is_not_stored_whole(v: Validator) -> None:
    """A streaming spec refused for its size is recorded by image, class and client only: stored
    whole, it would make every listing of the caller's jobs too large to receive."""
    spec = _with(command=["x" * (1024 * 1024)])
    spec.streaming.port = 8000
    call = v.stub.StartStreamingJob(validator_pb2.StartStreamingJobRequest(spec=spec), timeout=30)
    (reply,) = [m async for m in call]
    assert reply.result.state == common_pb2.JOB_STATE_REJECTED
    assert reply.result.reason == common_pb2.FAILURE_REASON_INVALID_SPEC
    assert reply.result.detail.startswith("spec: 10"), reply.result.detail
    (record,) = (await v.stub.ListJobs(validator_pb2.ListJobsRequest(), timeout=10)).jobs
    assert record.spec.image == IMAGE and record.spec.ByteSize() < 1024
    # Whose it was is kept, as on every streaming job.
    assert dict(record.spec.labels) == {"horde.client": str(v.client.identity)}


# ------------------------------------------------------------------ uploads a validator can hold


async def test_a_client_may_have_only_so_many_uploads_under_way(
    v: Validator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each upload is spooled to the validator's disk (which its database shares): one client's
    uploads at once are bounded, and the next is refused with the reason, nothing kept."""
    monkeypatch.setattr(service, "MAX_UPLOADS_PER_CLIENT", 1)
    hold = asyncio.Event()
    data = blob(4 * CHUNK)
    # The first upload sends half its input, then waits.
    first = v.stub.SubmitJob(
        uploads(spec_with(inline_file("in.bin", 2 * len(data))), {0: data}, hold=hold),
        timeout=30,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not list(v.spool.iterdir()):
            assert asyncio.get_running_loop().time() < deadline, "the first upload never began"
            await asyncio.sleep(0.01)
        err = await submit_refused(v, spec_with(inline_file("b", len(data), data)), {0: data})
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert err.details().startswith("1 uploads of inline inputs of yours are under way"), err
        assert len(list(v.spool.iterdir())) == 1  # the refused one kept nothing
    finally:
        hold.set()
        first.cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while list(v.spool.iterdir()):  # the cancelled upload's spool goes with its count
        assert asyncio.get_running_loop().time() < deadline, "the cancelled upload stayed"
        await asyncio.sleep(0.01)
    # Once it is over, the client may upload again (here: refused only for its image).
    call = v.stub.SubmitJob(
        uploads(spec_with(inline_file("b", len(data), data), image="not/allowed"), {0: data}),
        timeout=30,
    )
    [answer] = [msg async for msg in call]
    assert answer.result.reason == common_pb2.FAILURE_REASON_IMAGE_NOT_ALLOWED, answer


@pytest.mark.settings(spool_min_free_mb=2**40)  # more than any disk has
async def test_an_upload_that_would_fill_the_disk_is_refused(v: Validator) -> None:
    data = blob(CHUNK)
    err = await submit_refused(v, spec_with(inline_file("in.bin", len(data), data)), {0: data})
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "short of disk space for inputs" in err.details(), err
    await v.assert_nothing_left()
