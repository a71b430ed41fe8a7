"""Organic jobs end to end: a client's SubmitJob through validator, miner and executor to Docker
and back, over real gRPC with real signatures (DESIGN.md, "Organic", "Job lifecycle")."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import grpc
import pytest
from horde.v1 import common_pb2 as S
from horde.v1 import job_pb2, miner_pb2, receipts_pb2, validator_pb2, validator_pb2_grpc
from organic_support import (
    BASE_IMAGE,
    DEMO_IMAGE,
    HttpServer,
    JobRun,
    Network,
    assert_result,
    make_tar,
    python_job,
    sha256,
    spec_for,
    wait_for,
    wait_job_container_running,
    wait_no_job_objects,
)

from horde_services.core import lifecycle
from horde_services.core.identity import Ed25519Signer
from horde_services.core.metrics import REGISTRY
from horde_services.validator.store import JobStore

pytestmark = pytest.mark.timeout(120)

INPUT_FILES = {"a.txt": b"hello world\n", "sub/b.txt": b"horde\n"}


def demo_outputs(files: dict[str, bytes]) -> dict[str, bytes]:
    """What horde/demo-job writes for these files under /volume (see deploy/images/demo-job)."""
    entries = [
        {"name": name, "size": len(data), "sha256": sha256(data)}
        for name, data in sorted(files.items())
    ]
    summary = json.dumps(
        {"files": entries, "total_bytes": sum(len(d) for d in files.values())}, indent=2
    )
    upper = "".join(files[name].decode() for name in sorted(files)).upper()
    return {"summary.json": (summary + "\n").encode(), "upper.txt": upper.encode()}


def archive_spec(data: bytes, mount_path: str = "") -> job_pb2.JobSpec:
    return spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                mount_path=mount_path,
                inline_archive=job_pb2.InlineArchive(
                    format=job_pb2.ARCHIVE_FORMAT_TAR, size_bytes=len(data), sha256=sha256(data)
                ),
            )
        ],
    )


def assert_completed(run: JobRun) -> job_pb2.JobResult:
    assert run.result is not None, run.describe()
    assert run.result.state == S.JOB_STATE_COMPLETED, run.describe()
    assert run.result.reason == S.FAILURE_REASON_UNSPECIFIED
    assert run.result.exit_code == 0
    return run.result


def assert_outputs(run: JobRun, expected: dict[str, bytes]) -> None:
    """The streamed bytes are the expected files, and the result's metadata describes them."""
    assert run.files() == expected
    assert run.result is not None
    meta = {o.path: (o.size_bytes, o.sha256) for o in run.result.outputs}
    assert meta == {p: (len(d), sha256(d)) for p, d in expected.items()}


async def test_inline_archive_happy_path(net: Network) -> None:
    tar = make_tar(INPUT_FILES)
    run = await net.run_job(archive_spec(tar), {0: tar})

    res = assert_completed(run)
    assert_outputs(run, demo_outputs(INPUT_FILES))
    assert b"summarised 2 file(s), 18 bytes" in res.stdout.data
    assert res.stderr.data == b""
    assert res.miner_hotkey == net.keys.identity("miner")
    assert res.executor_id == net.agent.executor_id != ""
    timed = {t.stage for t in res.stage_timings}
    assert {S.STAGE_IMAGE_PULL, S.STAGE_VOLUME_DOWNLOAD, S.STAGE_EXECUTION} <= timed

    # Lifecycle order: every event precedes the result, states never go backwards.
    assert run.states == [
        S.JOB_STATE_ACCEPTED,
        S.JOB_STATE_EXECUTOR_READY,
        S.JOB_STATE_VOLUMES_READY,
        S.JOB_STATE_RUNNING,
    ]
    assert run.order[-1] == "result" and run.order.count("result") == 1
    assert all(ev.job_uuid == res.job_uuid for ev in run.events)
    stamps = [ev.timestamp_ns for ev in run.events]
    assert stamps == sorted(stamps)
    # Output chunks are streamed after the container ran and before the result.
    first_chunk = run.order.index("output_chunk")
    assert first_chunk > run.order.index("event") and first_chunk < run.order.index("result")

    # Lifecycle receipts at the miner: started and finished, signed by miner and validator.
    resp = await net.miner_stub().ListReceipts(miner_pb2.ListReceiptsRequest(), timeout=10)
    mine = [r for r in resp.receipts if lifecycle.parse(r).job_uuid == res.job_uuid]
    kinds = [lifecycle.parse(r).kind for r in mine]
    assert kinds == [
        receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_STARTED,
        receipts_pb2.LIFECYCLE_RECEIPT_KIND_JOB_FINISHED,
    ]
    for receipt in mine:
        assert lifecycle.verify(receipt, require_validator=True) is None
        payload = lifecycle.parse(receipt)
        assert payload.miner_hotkey == net.keys.identity("miner")
        assert payload.validator_hotkey == net.keys.identity("validator")
        assert payload.executor_class == "cpu-small"
        assert payload.job_kind == "organic"
        # A tampered payload or a foreign signature must not verify.
        forged = receipts_pb2.LifecycleReceipt()
        forged.CopyFrom(receipt)
        forged.validator_signature = net.keys.signers["client"].sign(
            lifecycle.DOMAIN + receipt.payload
        )
        assert lifecycle.verify(forged) == "validator signature does not verify"
    finished = lifecycle.parse(mine[1])
    assert finished.state == S.JOB_STATE_COMPLETED
    assert finished.duration_s > 0
    assert list(resp.states)[-1] == S.JOB_STATE_COMPLETED
    started = lifecycle.parse(mine[0])
    assert started.timestamp_ns <= finished.timestamp_ns


async def test_job_queries_after_completion(
    net: Network, client_stub: validator_pb2_grpc.ValidatorServiceStub
) -> None:
    tar = make_tar(INPUT_FILES)
    spec = archive_spec(tar)
    spec.labels["suite"] = "organic"
    run = await net.run_job(spec, {0: tar})
    res = assert_completed(run)
    stub = client_stub

    got = (await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=res.job_uuid), timeout=10)).job
    assert got.job_uuid == res.job_uuid
    assert got.state == S.JOB_STATE_COMPLETED
    assert got.result == res
    assert got.client == net.keys.identity("client")
    assert got.spec.image == DEMO_IMAGE
    assert got.spec.labels["suite"] == "organic"

    listed = await stub.ListJobs(validator_pb2.ListJobsRequest(limit=10), timeout=10)
    assert [j.job_uuid for j in listed.jobs] == [res.job_uuid]
    done = await stub.ListJobs(
        validator_pb2.ListJobsRequest(state=S.JOB_STATE_COMPLETED), timeout=10
    )
    assert [j.job_uuid for j in done.jobs] == [res.job_uuid]
    failed = await stub.ListJobs(validator_pb2.ListJobsRequest(state=S.JOB_STATE_FAILED))
    assert list(failed.jobs) == []

    # WatchJob after completion replays the stored events, then the result.
    watched = JobRun()
    async for msg in stub.WatchJob(validator_pb2.WatchJobRequest(job_uuid=res.job_uuid)):
        kind = msg.WhichOneof("payload")
        watched.order.append(kind)
        if kind == "event":
            watched.events.append(msg.event)
        else:
            watched.result = msg.result
    assert watched.order[-1] == "result"
    assert watched.result == res
    assert [(e.state, e.stage, e.message) for e in watched.events] == [
        (e.state, e.stage, e.message) for e in run.events
    ]

    files: dict[str, bytearray] = {}
    async for msg in stub.DownloadOutputs(
        validator_pb2.DownloadOutputsRequest(job_uuid=res.job_uuid)
    ):
        files.setdefault(msg.chunk.path, bytearray()).extend(msg.chunk.data)
    assert {k: bytes(v) for k, v in files.items()} == demo_outputs(INPUT_FILES)

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=str(uuid.uuid4())), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await stub.GetJob(validator_pb2.GetJobRequest(job_uuid="no-such-job"), timeout=10)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_client_sees_and_acts_on_its_own_jobs_only(net: Network) -> None:
    """Another enrolled client can neither read, follow, download nor cancel a client's job,
    nor see it listed; a validator admin sees every job."""
    owner = net.client()
    job = net.start_job(python_job("import time; time.sleep(30)", execution_s=60))
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    job_uuid = running.job_uuid
    other = net.client(signer=net.keys.signers["client2"])
    calls = {
        "GetJob": lambda: other.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10),
        "CancelJob": lambda: other.CancelJob(
            validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=10
        ),
        "WatchJob": lambda: anext(
            aiter(other.WatchJob(validator_pb2.WatchJobRequest(job_uuid=job_uuid), timeout=10))
        ),
        "DownloadOutputs": lambda: anext(
            aiter(
                other.DownloadOutputs(
                    validator_pb2.DownloadOutputsRequest(job_uuid=job_uuid), timeout=10
                )
            )
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "submitted by another client" in (denied.value.details() or ""), name
    assert list((await other.ListJobs(validator_pb2.ListJobsRequest(), timeout=10)).jobs) == []
    # The job went on: the other client's cancel did nothing.
    got = (await owner.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10)).job
    assert got.state == S.JOB_STATE_RUNNING
    listed = await owner.ListJobs(validator_pb2.ListJobsRequest(), timeout=10)
    assert [j.job_uuid for j in listed.jobs] == [job_uuid]

    # The admin sees it and may cancel it; its own jobs are listed beside it.
    admin = net.client(signer=net.keys.signers["admin"])
    seen = (await admin.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10)).job
    assert seen.client == net.keys.identity("client")
    cancelled = await admin.CancelJob(validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=30)
    assert cancelled.state == S.JOB_STATE_CANCELLED
    run = await job.finished(within=30)
    assert run.result is not None and run.result.state == S.JOB_STATE_CANCELLED, run.describe()
    own = await net.start_job(spec_for(BASE_IMAGE, ["true"]), stub=admin).finished(60)
    assert own.result is not None and own.result.state == S.JOB_STATE_COMPLETED, own.describe()
    listed = await admin.ListJobs(validator_pb2.ListJobsRequest(), timeout=10)
    assert [j.job_uuid for j in listed.jobs] == [own.job_uuid, job_uuid]


async def test_inline_single_file_under_mount_path(net: Network) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, several input chunks
    spec = spec_for(
        BASE_IMAGE,
        [
            "python3",
            "-c",
            "import hashlib, os, pathlib; p = pathlib.Path('/volume/in/data.bin');"
            "print(sorted(os.listdir('/volume')), sorted(os.listdir('/volume/in')));"
            "print(hashlib.sha256(p.read_bytes()).hexdigest());"
            "pathlib.Path('/output/copy.bin').write_bytes(p.read_bytes())",
        ],
        inputs=[
            job_pb2.InputVolume(
                mount_path="in",
                inline_file=job_pb2.InlineFile(
                    file_name="data.bin", size_bytes=len(data), sha256=sha256(data)
                ),
            )
        ],
    )
    run = await net.run_job(spec, {0: data})
    res = assert_completed(run)
    lines = res.stdout.data.decode().split("\n")
    assert lines[0] == "['in'] ['data.bin']"
    assert lines[1] == sha256(data)
    assert_outputs(run, {"copy.bin": data})


async def test_url_input_downloaded_by_executor(net: Network, http_server: HttpServer) -> None:
    body = b"fetched over http\n"
    http_server.files["input.txt"] = body
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                url=job_pb2.UrlInput(url=http_server.url("/files/input.txt"), sha256=sha256(body))
            )
        ],
    )
    run = await net.run_job(spec)
    assert_completed(run)
    assert http_server.gets == ["input.txt"]
    assert_outputs(run, demo_outputs({"input.txt": body}))


@pytest.mark.parametrize("problem", ["wrong_sha256", "http_404"])
async def test_url_input_failures(net: Network, http_server: HttpServer, problem: str) -> None:
    http_server.files["input.txt"] = b"the real bytes"
    name = "input.txt" if problem == "wrong_sha256" else "missing.txt"
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                url=job_pb2.UrlInput(url=http_server.url(f"/files/{name}"), sha256="ab" * 32)
            )
        ],
    )
    run = await net.run_job(spec)
    res = run.result
    assert res is not None
    assert (res.state, res.reason) == (S.JOB_STATE_FAILED, S.FAILURE_REASON_DOWNLOAD_FAILED), (
        run.describe()
    )
    assert res.stage == S.STAGE_VOLUME_DOWNLOAD
    assert ("expected " + "ab" * 32 if problem == "wrong_sha256" else "HTTP 404") in res.detail
    assert S.JOB_STATE_RUNNING not in run.states
    assert http_server.gets == [name]


async def test_url_input_on_loopback_refused_by_default(
    bare_net: Network, http_server: HttpServer
) -> None:
    """A default executor (job_urls_allow_private unset) fetches nothing from its host's
    loopback: the job fails at the download stage saying why, and the server sees no request."""
    net = bare_net
    await net.start_executor(job_urls_allow_private=False)
    http_server.files["input.txt"] = b"secret on the miner host"
    url = http_server.url("/files/input.txt")
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[job_pb2.InputVolume(url=job_pb2.UrlInput(url=url + "?token=x", sha256="ab" * 32))],
    )
    run = await net.run_job(spec)
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_DOWNLOAD_FAILED, S.STAGE_VOLUME_DOWNLOAD
    )
    assert res.detail == (
        f"input 0: {url} resolves to 127.0.0.1, which is not a public address "
        "(executor setting job_urls_allow_private)"
    )
    assert S.JOB_STATE_RUNNING not in run.states
    assert http_server.gets == []


async def test_output_upload_to_loopback_refused_by_default(
    bare_net: Network, http_server: HttpServer
) -> None:
    """Uploads follow the URL-input policy: a default executor sends nothing to its host's
    loopback; the job fails at the upload stage saying why."""
    net = bare_net
    await net.start_executor(job_urls_allow_private=False)
    tar = make_tar(INPUT_FILES)
    spec = archive_spec(tar)
    url = http_server.url("/upload/out.tar")
    spec.output.upload.url = url + "?X-Signature=secret"
    spec.output.upload.method = job_pb2.HTTP_METHOD_PUT
    run = await net.run_job(spec, {0: tar})
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_UPLOAD_FAILED, S.STAGE_OUTPUT_UPLOAD
    )
    assert res.detail == (
        f"upload to {url} resolves to 127.0.0.1, which is not a public address "
        "(executor setting job_urls_allow_private)"
    )
    assert http_server.uploads == {}


async def test_output_upload_put(net: Network, http_server: HttpServer) -> None:
    tar = make_tar(INPUT_FILES)
    spec = archive_spec(tar)
    url = http_server.url("/upload/out.tar") + "?X-Signature=secret"
    spec.output.upload.url = url
    spec.output.upload.method = job_pb2.HTTP_METHOD_PUT
    spec.output.upload.headers["X-Horde-Test"] = "yes"
    run = await net.run_job(spec, {0: tar})
    res = assert_completed(run)

    assert run.chunks == []  # uploaded, not streamed
    assert res.upload_url == http_server.url("/upload/out.tar")  # the query string is a secret
    assert http_server.upload_headers["out.tar"]["X-Horde-Test"] == "yes"
    body = http_server.uploads["out.tar"]
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        got = {
            m.name.removeprefix("./"): archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile()
        }
    expected = demo_outputs(INPUT_FILES)
    assert got == expected
    assert {o.path: o.sha256 for o in res.outputs} == {p: sha256(d) for p, d in expected.items()}


async def test_output_upload_refused(net: Network, http_server: HttpServer) -> None:
    http_server.upload_status = 403
    spec = spec_for(BASE_IMAGE, ["sh", "-c", "echo x > /output/x"])
    spec.output.upload.url = http_server.url("/upload/out.tar")
    run = await net.run_job(spec)
    res = assert_result(
        run, S.JOB_STATE_FAILED, S.FAILURE_REASON_UPLOAD_FAILED, S.STAGE_OUTPUT_UPLOAD
    )
    assert "403" in res.detail
    assert "out.tar" in http_server.uploads


async def test_cancel_long_job(net: Network) -> None:
    """A cancelled job stops at once, and its result carries what it wrote until then."""
    script = "echo started; echo warming up >&2; touch /tmp/ready; exec sleep 60"
    job = net.start_job(spec_for(BASE_IMAGE, ["sh", "-c", script], execution_s=120))
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    job_uuid = running.job_uuid
    container = net.docker.containers.container(
        await wait_job_container_running(net.docker, job_uuid)
    )

    async def wrote() -> bool:  # the job got past its echoes
        probe = await container.exec(["test", "-e", "/tmp/ready"])
        async with probe.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass
        return (await probe.inspect())["ExitCode"] == 0

    await wait_for(wrote, 30, "the job to write its first lines")
    stub = net.client()

    resp = await stub.CancelJob(validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=30)
    assert resp.state == S.JOB_STATE_CANCELLED
    run = await job.finished(within=30)
    assert run.result is not None
    assert (run.result.state, run.result.reason) == (
        S.JOB_STATE_CANCELLED,
        S.FAILURE_REASON_CANCELLED,
    ), run.describe()
    assert run.result.stdout.data == b"started\n", run.describe()
    assert run.result.stderr.data == b"warming up\n", run.describe()
    # The container (and its output volume) is gone well before `sleep 60` would have ended.
    await wait_no_job_objects(net.docker, [job_uuid], within=20)
    record = (await stub.GetJob(validator_pb2.GetJobRequest(job_uuid=job_uuid))).job
    assert record.state == S.JOB_STATE_CANCELLED
    # Cancelling a finished job is a no-op that reports its state.
    again = await stub.CancelJob(validator_pb2.CancelJobRequest(job_uuid=job_uuid), timeout=10)
    assert again.state == S.JOB_STATE_CANCELLED
    # The executor is free again: a new job runs.
    after = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert_completed(after)


def _bad_mount(spec: job_pb2.JobSpec) -> None:
    spec.inputs.append(
        job_pb2.InputVolume(
            mount_path="../x",
            url=job_pb2.UrlInput(url="http://127.0.0.1:9/x", sha256="00" * 32),
        )
    )


def _no_image(spec: job_pb2.JobSpec) -> None:
    spec.image = ""


def _bad_url(spec: job_pb2.JobSpec) -> None:
    spec.inputs.append(
        job_pb2.InputVolume(url=job_pb2.UrlInput(url="file:///etc/passwd", sha256="00" * 32))
    )


def _bad_upload(spec: job_pb2.JobSpec) -> None:
    spec.output.upload.url = "ftp://example.com/out.tar"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_bad_mount, "spec.inputs[0].mount_path"),
        (_no_image, "spec.image"),
        (_bad_url, "spec.inputs[0].url.url"),
        (_bad_upload, "spec.output.upload.url"),
    ],
    ids=["mount_path_escape", "missing_image", "non_http_url", "non_http_upload"],
)
async def test_invalid_spec_is_invalid_argument(net: Network, mutate: object, field: str) -> None:
    spec = spec_for(BASE_IMAGE, ["true"])
    assert callable(mutate)
    mutate(spec)
    job = net.start_job(spec)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await job.finished(within=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field + ":"), err.value.details()
    assert job.run.events == [] and job.run.result is None
    listed = await net.client().ListJobs(validator_pb2.ListJobsRequest(), timeout=10)
    assert list(listed.jobs) == []  # nothing was stored


async def test_unknown_client_is_denied(net: Network) -> None:
    stranger = Ed25519Signer.generate()
    stub = net.client(signer=stranger)
    job = net.start_job(spec_for(BASE_IMAGE, ["true"]), stub=stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await job.finished(within=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert str(stranger.identity) in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as listing:
        await stub.ListJobs(validator_pb2.ListJobsRequest(), timeout=10)
    assert listing.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The enrolled client sees that nothing was submitted.
    listed = await net.client().ListJobs(validator_pb2.ListJobsRequest(), timeout=10)
    assert list(listed.jobs) == []


async def test_stalled_url_download_hits_volume_stage_limit(
    net: Network, http_server: HttpServer
) -> None:
    spec = spec_for(
        DEMO_IMAGE,
        inputs=[
            job_pb2.InputVolume(
                url=job_pb2.UrlInput(url=http_server.url("/stall/big.bin"), sha256="ab" * 32)
            )
        ],
    )
    spec.timeouts.volume_download_s = 2
    run = await net.run_job(spec, within=30)
    assert_result(run, S.JOB_STATE_FAILED, S.FAILURE_REASON_TIMEOUT, S.STAGE_VOLUME_DOWNLOAD)
    assert http_server.gets == ["big.bin"]
    assert S.JOB_STATE_RUNNING not in run.states


async def test_second_job_waits_for_the_busy_executor(net: Network) -> None:
    first = net.start_job(spec_for(BASE_IMAGE, ["sleep", "3"]))
    first_running = await first.wait_state(S.JOB_STATE_RUNNING)
    second = net.start_job(spec_for(BASE_IMAGE, ["echo", "second"]))
    first_run = await first.finished()
    second_run = await second.finished()
    assert_completed(first_run)
    assert_completed(second_run)
    assert second_run.result is not None and second_run.result.stdout.data == b"second\n"
    # The one executor took the second job only once the first had slept its 3 s.
    second_ready = next(e for e in second_run.events if e.state == S.JOB_STATE_EXECUTOR_READY)
    assert second_ready.timestamp_ns >= first_running.timestamp_ns + 2_500_000_000


async def test_busy_executor_rejects_after_reservation_limit(net: Network) -> None:
    first = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120))
    running = await first.wait_state(S.JOB_STATE_RUNNING)
    spec = spec_for(BASE_IMAGE, ["true"])
    spec.timeouts.reservation_s = 2
    second = await net.run_job(spec, within=30)
    assert_result(second, S.JOB_STATE_REJECTED, S.FAILURE_REASON_BUSY, S.STAGE_RESERVATION)
    assert second.states == [S.JOB_STATE_ACCEPTED]
    stub = net.client()
    await stub.CancelJob(validator_pb2.CancelJobRequest(job_uuid=running.job_uuid), timeout=30)
    cancelled = await first.finished(within=30)
    assert cancelled.result is not None and cancelled.result.state == S.JOB_STATE_CANCELLED


async def test_cancel_on_the_submit_stream(net: Network) -> None:
    job = net.start_job(spec_for(BASE_IMAGE, ["sleep", "60"], execution_s=120), hold_open=True)
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    await wait_job_container_running(net.docker, running.job_uuid)
    job.send(validator_pb2.SubmitJobRequest(cancel=True))
    run = await job.finished(within=30)
    assert run.result is not None
    assert (run.result.state, run.result.reason) == (
        S.JOB_STATE_CANCELLED,
        S.FAILURE_REASON_CANCELLED,
    ), run.describe()
    await wait_no_job_objects(net.docker, [running.job_uuid], within=20)


async def test_outputs_of_a_running_job_are_refused_until_it_ends(net: Network) -> None:
    """DownloadOutputs of a job still running is FAILED_PRECONDITION (not an empty answer that
    reads as "no outputs"); once it has ended it answers."""
    job = net.start_job(spec_for(BASE_IMAGE, ["sh", "-c", "echo out > /output/o.txt; sleep 600"]))
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    download = validator_pb2.DownloadOutputsRequest(job_uuid=running.job_uuid)
    with pytest.raises(grpc.aio.AioRpcError) as early:
        _ = [m async for m in net.client().DownloadOutputs(download, timeout=10)]
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert early.value.details().startswith(f"job {running.job_uuid} has not finished (running)"), (
        early.value.details()
    )
    await net.client().CancelJob(validator_pb2.CancelJobRequest(job_uuid=running.job_uuid))
    finished = await job.finished()
    assert finished.result is not None
    assert finished.result.state == S.JOB_STATE_CANCELLED
    assert [m async for m in net.client().DownloadOutputs(download, timeout=10)] == []


async def test_watch_a_running_job(net: Network) -> None:
    job = net.start_job(
        spec_for(BASE_IMAGE, ["sh", "-c", "sleep 2; echo watched; echo out > /output/o.txt"])
    )
    running = await job.wait_state(S.JOB_STATE_RUNNING)
    download = validator_pb2.DownloadOutputsRequest(job_uuid=running.job_uuid)
    watched = JobRun()
    request = validator_pb2.WatchJobRequest(job_uuid=running.job_uuid)
    async for msg in net.client().WatchJob(request, timeout=60):
        if msg.WhichOneof("payload") == "event":
            watched.events.append(msg.event)
        else:
            watched.result = msg.result
    submitted = await job.finished()
    # The watcher got the events so far replayed, then followed the job live to its result.
    assert watched.result == submitted.result
    assert watched.result is not None and watched.result.stdout.data == b"watched\n"
    assert watched.states == submitted.states
    assert watched.states[0] == S.JOB_STATE_ACCEPTED
    chunks = [m.chunk async for m in net.client().DownloadOutputs(download, timeout=10)]
    assert [(c.path, c.data) for c in chunks] == [("o.txt", b"out\n")]


async def test_nested_and_empty_output_files(net: Network) -> None:
    script = (
        "mkdir -p /output/a/b && printf deep > /output/a/b/c.txt && : > /output/empty"
        " && mkdir /output/emptydir && head -c 3000000 /dev/zero > /output/zeros.bin"
    )
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", script]))
    assert_completed(run)
    assert_outputs(run, {"a/b/c.txt": b"deep", "empty": b"", "zeros.bin": bytes(3_000_000)})
    assert max(len(c.data) for c in run.chunks) <= 1024 * 1024  # zeros.bin came in chunks


async def test_many_output_files_are_stored_in_batches(
    net: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 small outputs: stored in a few transactions (one per file took about 2.7 ms each, so
    a job with 10,000 waited ~27 s after its last byte), every one downloadable after."""
    writes: list[int] = []
    put_outputs = JobStore.put_outputs

    async def counted(self: JobStore, job_uuid: str, files: list[tuple[str, bytes]]) -> None:
        writes.append(len(files))
        await put_outputs(self, job_uuid, files)

    monkeypatch.setattr(JobStore, "put_outputs", counted)
    script = "for i in $(seq 1 600); do echo $i > /output/f$i.txt; done"
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", script]))
    assert_completed(run)
    assert writes == [256, 256, 88], writes
    res = run.result
    assert res is not None
    files: dict[str, bytearray] = {}
    async for msg in net.client().DownloadOutputs(
        validator_pb2.DownloadOutputsRequest(job_uuid=res.job_uuid)
    ):
        files.setdefault(msg.chunk.path, bytearray()).extend(msg.chunk.data)
    assert {k: bytes(v) for k, v in files.items()} == {
        f"f{i}.txt": f"{i}\n".encode() for i in range(1, 601)
    }


async def test_symlink_out_of_output_is_refused(net: Network) -> None:
    script = "ln -s /etc/hostname /output/leak && echo ok > /output/fine.txt"
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", script]))
    res = run.result
    assert res is not None
    assert (res.state, res.stage) == (S.JOB_STATE_FAILED, S.STAGE_OUTPUT_UPLOAD), run.describe()
    assert "leak" in res.detail
    assert run.chunks == [] and list(res.outputs) == []


async def test_symlinks_inside_output_are_named_not_dropped_silently(net: Network) -> None:
    """A symlink inside /output is no file to return inline: the job completes with its files,
    and its detail names each link it did not return."""
    script = (
        "echo ok > /output/fine.txt && ln -s fine.txt /output/alias"
        " && mkdir /output/d && ln -s ../fine.txt /output/d/up"
    )
    run = await net.run_job(spec_for(BASE_IMAGE, ["sh", "-c", script]))
    res = assert_completed(run)
    assert_outputs(run, {"fine.txt": b"ok\n"})
    assert res.detail == (
        "2 entries under /output not returned (only regular files are): alias (a symlink), "
        "d/up (a symlink)"
    )


async def test_output_upload_post_form(net: Network, http_server: HttpServer) -> None:
    spec = spec_for(BASE_IMAGE, ["sh", "-c", "echo posted > /output/p.txt"])
    spec.output.upload.url = http_server.url("/upload/form")
    spec.output.upload.method = job_pb2.HTTP_METHOD_POST
    spec.output.upload.form_fields["key"] = "uploads/job.tar"
    spec.output.upload.form_fields["policy"] = "signed-policy"
    run = await net.run_job(spec)
    res = assert_completed(run)
    assert res.upload_url == http_server.url("/upload/form")
    fields = http_server.upload_forms["form"]
    # S3-style: the policy fields come before the file.
    assert fields[-1] == ("file", "<file output.tar>")
    assert sorted(fields[:-1]) == [("key", "uploads/job.tar"), ("policy", "signed-policy")]
    with tarfile.open(fileobj=io.BytesIO(http_server.uploads["form"])) as archive:
        member = archive.extractfile("./p.txt")
        assert member is not None and member.read() == b"posted\n"


async def test_the_miner_and_executor_count_jobs_and_executors(net: Network) -> None:
    """What a miner operator's metrics say: executors by class and state, jobs by outcome."""

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    manifest = (await net.miner_stub().GetManifest(miner_pb2.GetManifestRequest())).manifest
    (executor,) = manifest.executors
    klass = executor.executor_class
    assert sample("horde_miner_executors", executor_class=klass, state="idle") == 1
    done = {
        "miner": sample("horde_miner_jobs_total", state="completed", reason=""),
        "executor": sample(
            "horde_executor_jobs_total", kind="organic", state="completed", reason=""
        ),
    }
    run = await net.run_job(spec_for(BASE_IMAGE, ["true"]))
    assert run.result is not None and run.result.state == S.JOB_STATE_COMPLETED, run.describe()
    assert sample("horde_miner_jobs_total", state="completed", reason="") == done["miner"] + 1
    executor_done = sample(
        "horde_executor_jobs_total", kind="organic", state="completed", reason=""
    )
    assert executor_done == done["executor"] + 1
    # The miner frees the executor just after the result is on its way: wait for it.
    await wait_for(
        lambda: sample("horde_miner_executors", executor_class=klass, state="busy") == 0,
        10,
        "the executor to be idle again",
    )
    assert sample("horde_miner_executors", executor_class=klass, state="idle") == 1
