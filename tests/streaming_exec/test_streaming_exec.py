"""The execution half of streaming jobs, end to end: validator -> miner -> executor with real
Docker, the test acting as the gateway (StartStreamingJob, then the job proxy directly)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import ipaddress
import json
import re
import signal
import socket
import time
import uuid
from pathlib import Path
from types import ModuleType

import aiodocker
import grpc
import pytest
import sqlalchemy as sa
from horde.v1 import common_pb2, streaming_pb2, validator_pb2
from sqlalchemy.ext.asyncio import create_async_engine
from streaming_exec_support import (
    DISHONEST_IMAGE,
    HORDE_BIN,
    LLM_IMAGE,
    REPO_ROOT,
    Network,
    job_objects,
    probe_spec,
    streaming_spec,
    wait_for,
)

from horde_services.core.certificates import verify_certificate
from horde_services.core.db import penalties
from horde_services.core.proxy_wire import ProxyError
from horde_services.core.receipts import verify_lines

S = common_pb2
DEMO_LLM = REPO_ROOT / "deploy" / "images" / "demo-llm" / "server.py"


def demo_llm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_llm_server", DEMO_LLM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected(prompt: bytes, tokens: int = 32, rate: float = 0.0) -> bytes:
    return "".join(demo_llm().generate(prompt, tokens, rate)).encode()


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------------------ receipts


async def test_n_requests_give_n_receipts_that_verify_offline(net: Network, tmp_path: Path) -> None:
    session = net.start_session(streaming_spec(LLM_IMAGE))
    ready = await session.wait_ready()
    states = [ev.state for ev in session.events]
    assert states[0] == S.JOB_STATE_ACCEPTED and states[-1] == S.JOB_STATE_STREAMING_READY
    payload = verify_certificate(
        ready.certificate, miner=net.keys.identity("miner"), job_uuid=ready.job_uuid
    )
    assert payload.validator_hotkey == net.keys.identity("validator")
    assert payload.endpoint == ready.proxy_endpoint
    assert ready.proxy_identity == net.keys.identity("executor")
    image_id = (await net.docker.images.inspect(LLM_IMAGE))["Id"]
    assert payload.image_digest == image_id

    proxy = await net.proxy(ready)
    prompts = [f"prompt number {i}".encode() for i in range(20)]
    lines = []
    last_from = 0
    for i, prompt in enumerate(prompts, start=1):
        sent = time.time_ns()
        answer = await proxy.ask(prompt, pieces=1 + i % 3)
        received = time.time_ns()
        assert answer.status == 200
        assert answer.body == expected(prompt)
        receipt = answer.receipt
        receipt.verify()
        assert receipt.seq == i
        assert receipt.job_uuid == uuid.UUID(ready.job_uuid)
        assert receipt.job_public_key == payload.job_public_key
        assert receipt.input_sha256 == sha(prompt)
        assert receipt.output_sha256 == sha(answer.body)
        assert sent <= receipt.timestamp_from_ns <= receipt.timestamp_to_ns <= received
        assert receipt.timestamp_from_ns >= last_from
        last_from = receipt.timestamp_from_ns
        lines.append(receipt.to_json())
    assert all(c.error is None for c in verify_lines(lines))
    path = tmp_path / "receipts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = await asyncio.create_subprocess_exec(
        str(HORDE_BIN),
        "receipts",
        "verify",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()


async def test_chunked_response_is_relayed_in_pieces_and_one_receipt_covers_it(
    net: Network,
) -> None:
    session = net.start_session(streaming_spec(LLM_IMAGE))
    proxy = await net.proxy(await session.wait_ready())
    body = json.dumps(
        {"prompt": "tell me a story", "max_tokens": 40, "stream": True, "token_delay_ms": 10}
    ).encode()
    answer = await proxy.ask(body)
    # Words 10 ms apart come back as they are made (a few may share a frame), then an empty
    # frame with the receipt.
    assert len(answer.frames) >= 20, [f.body for f in answer.frames]
    assert all(not f.HasField("receipt") and not f.last for f in answer.frames[:-1])
    assert answer.frames[-1].last and answer.frames[-1].body == b""
    whole = answer.body
    assert whole == expected(b"tell me a story", 40)
    receipt = answer.receipt
    receipt.verify()
    assert receipt.output_sha256 == sha(whole)
    assert receipt.input_sha256 == sha(body)
    # The same request unstreamed: the same words in one frame.
    flat = await proxy.ask(json.dumps({"prompt": "tell me a story", "max_tokens": 40}).encode())
    assert len(flat.frames) == 1 and flat.body == whole and flat.receipt.seq == 2


# ------------------------------------------------------------------------------ clocks and auth


@pytest.mark.parametrize("offset_s", [5, -5], ids=["proxy-ahead", "proxy-behind"])
async def test_a_job_proxy_clock_skewed_either_way_refuses_requests(
    bare_net: Network, offset_s: int
) -> None:
    await bare_net.start(proxy_clock_offset_ns=offset_s * 10**9)
    session = bare_net.start_session(streaming_spec(LLM_IMAGE))
    proxy = await bare_net.proxy(await session.wait_ready())
    with pytest.raises(ProxyError) as info:
        await proxy.ask(b"hello")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    direction = "behind" if offset_s > 0 else "ahead of"
    assert re.search(
        rf"client clock is (4\.99|5\.0)\d* s {direction} the job proxy's", str(info.value.details())
    ), info.value.details()
    # A client whose clock agrees with the proxy's within the skew is served, receipts in the
    # proxy's time.
    proxy = await bare_net.proxy(session.ready, clock_ns=lambda: time.time_ns() + offset_s * 10**9)  # type: ignore[arg-type]
    answer = await proxy.ask(b"hello", seq=1)
    answer.receipt.verify()
    assert abs(answer.receipt.timestamp_from_ns - (time.time_ns() + offset_s * 10**9)) < 10**9


async def test_only_the_sessions_gateway_reaches_the_proxy_in_order(net: Network) -> None:
    session = net.start_session(streaming_spec(LLM_IMAGE))
    ready = await session.wait_ready()
    stranger = await net.proxy(ready, who="stranger")
    with pytest.raises(ProxyError) as info:
        await stranger.ask(b"hello")
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    proxy = await net.proxy(ready)
    with pytest.raises(ProxyError) as info:
        await proxy.ask(b"hello", seq=7)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 1" in info.value.details()


# ------------------------------------------------------------------------------ whitelist


async def test_an_image_off_the_whitelist_is_refused(net: Network) -> None:
    session = net.start_session(streaming_spec("horde/demo-job:latest"))
    res = await session.finished()
    assert res.state == S.JOB_STATE_REJECTED
    assert res.reason == S.FAILURE_REASON_IMAGE_NOT_ALLOWED
    assert "streaming whitelist" in res.detail
    assert session.ready is None


async def test_a_pinned_digest_refuses_another_build(bare_net: Network) -> None:
    bare_net.whitelist = [f"{DISHONEST_IMAGE}@sha256:{'0' * 64}"]
    await bare_net.start()
    session = bare_net.start_session(streaming_spec(DISHONEST_IMAGE))
    res = await session.finished()
    assert res.state == S.JOB_STATE_REJECTED, session.describe()
    assert res.reason == S.FAILURE_REASON_IMAGE_NOT_ALLOWED
    assert "whitelisted sha256:000" in res.detail


# ------------------------------------------------------------------------------ isolation


async def test_the_job_container_reaches_nothing_but_the_proxy(net: Network) -> None:
    assert net.miner is not None and net.executor is not None and net.validator is not None
    seen: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.close()

    # A host port open on every interface: the one a container on a Docker network could reach.
    listener = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    open_port = listener.sockets[0].getsockname()[1]
    bridge = await net.docker.networks.get("bridge")
    ipam = (await bridge.show())["IPAM"]["Config"][0]
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    host_ips = {
        info[4][0]
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        if not info[4][0].startswith("127.")
    }
    try:
        session = net.start_session(probe_spec())
        proxy = await net.proxy(await session.wait_ready())
        # The probe works: it reaches its own port inside its namespace.
        assert (await proxy.op(op="tcp", host="127.0.0.1", port=8000))["ok"]
        assert (await proxy.op(op="interfaces"))["interfaces"] == ["lo"]
        targets = [
            ("127.0.0.1", net.miner.port),  # the host's loopback: the miner...
            ("127.0.0.1", net.executor.port),  # ...the executor...
            ("127.0.0.1", int(proxy.ready.proxy_endpoint.rpartition(":")[2])),  # its job proxy
            ("127.0.0.1", net.validator.port),  # ...the validator
            ("127.0.0.1", open_port),
            (gateway, open_port),  # the Docker bridge's gateway, i.e. the host
            (gateway, net.miner.port),
            *((ip, open_port) for ip in sorted(host_ips)),
            ("1.1.1.1", 53),  # the internet
            ("8.8.8.8", 443),
        ]
        for host, port in targets:
            reply = await proxy.op(op="tcp", host=host, port=port)
            assert not reply["ok"], f"the job reached {host}:{port}"
        for host in (gateway, "8.8.8.8"):
            reply = await proxy.op(op="udp", host=host, port=53)
            assert not reply["ok"] and "unreachable" in reply["error"], reply
        assert not (await proxy.op(op="resolve", host="example.com"))["ok"]
    finally:
        listener.close()
        await listener.wait_closed()
    assert seen == [], f"the job connected to the host: {seen}"


# ------------------------------------------------------------------------------ extra data


async def test_extra_data_reaches_volume_extra_read_only(net: Network) -> None:
    session = net.start_session(probe_spec())
    ready = await session.wait_ready()
    proxy = await net.proxy(ready)
    data = b"some context for the model\n" * 5000
    reply = await net.add_extra(ready.job_uuid, "notes.txt", data, pieces=3)
    assert list(reply.file_names) == ["notes.txt"]
    # Confirmed means placed: the job sees the whole file at once.
    read = await proxy.op(op="read", path="/volume/extra/notes.txt")
    assert read["ok"] and read["data"].encode() == data
    for path in ("/volume/extra/notes.txt", "/volume/extra/new.txt"):
        wrote = await proxy.op(op="write", path=path)
        assert not wrote["ok"] and wrote["error"].startswith("EROFS"), wrote

    # The job is told through its HTTP interface.
    async def noted() -> list[dict[str, object]]:
        notes: list[dict[str, object]] = (await proxy.op(op="notes"))["notes"]
        return notes

    notes = await wait_for(noted, 10.0, "POST /extra-data at the job")
    assert notes == [
        {
            "file": "notes.txt",
            "path": "/volume/extra/notes.txt",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    ]
    # A file sent again replaces the old one.
    await net.add_extra(ready.job_uuid, "notes.txt", b"v2", pieces=1)
    assert (await proxy.op(op="read", path="/volume/extra/notes.txt"))["data"] == "v2"
    # ...but not while it is still being placed: confirmations go by name.
    twice = [
        validator_pb2.AddExtraDataRequest(
            job_uuid=ready.job_uuid,
            data=streaming_pb2.ExtraData(file_name="same.txt", data=body, last=True),
        )
        for body in (b"first", b"second")
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await net.validator_stub().AddExtraData(iter(twice), timeout=60)
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS, info.value
    assert "'same.txt' is still being placed" in (info.value.details() or "")

    # As the refusal says: once the first one is confirmed, sending it again works.
    async def sent_again() -> bool:
        try:
            await net.add_extra(ready.job_uuid, "same.txt", b"third", pieces=1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        return True

    assert await wait_for(sent_again, 10.0, "the first same.txt to be confirmed")
    assert (await proxy.op(op="read", path="/volume/extra/same.txt"))["data"] == "third"

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await net.add_extra(ready.job_uuid, "../escape", b"x")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    stub = net.validator_stub("stranger")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AddExtraData(
            iter(
                [
                    validator_pb2.AddExtraDataRequest(
                        job_uuid=ready.job_uuid,
                        data={"file_name": "x", "data": b"x", "last": True},
                    )
                ]
            ),
            timeout=30,
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------------------ lifecycle


async def containers_of(docker: aiodocker.Docker, job_uuid: str) -> list[str]:
    return [o for o in await job_objects(docker, {job_uuid}) if o.startswith("container")]


@pytest.mark.parametrize("how", ["stop", "cancel", "time_limit"])
async def test_closing_removes_container_relay_and_key(net: Network, how: str) -> None:
    session = net.start_session(
        streaming_spec(LLM_IMAGE, time_limit_s=4 if how == "time_limit" else 120)
    )
    ready = await session.wait_ready()
    job_uuid = ready.job_uuid
    assert len(await containers_of(net.docker, job_uuid)) == 2  # the service and its relay
    proxy = await net.proxy(ready)
    (await proxy.ask(b"hello")).receipt.verify()
    work = net.root / "executor-work"
    assert [p.name for p in work.iterdir() if p.name.startswith("stream-")]

    if how == "stop":
        reply = await net.validator_stub().StopStreamingJob(
            validator_pb2.StopStreamingJobRequest(job_uuid=job_uuid, reason="client closed"),
            timeout=60,
        )
        res = reply.result
        assert res.state == S.JOB_STATE_CANCELLED, res
        assert (await session.finished()).state == S.JOB_STATE_CANCELLED
    elif how == "cancel":
        await session.close()

        async def stored() -> int:
            record = await net.validator_stub().GetJob(
                validator_pb2.GetJobRequest(job_uuid=job_uuid), timeout=10
            )
            return int(record.job.state) if record.job.state in (S.JOB_STATE_CANCELLED,) else 0

        await wait_for(stored, 30.0, "the job to be cancelled")
    else:
        res = await session.finished()
        assert res.state == S.JOB_STATE_COMPLETED, session.describe()
        assert "time limit of 4s" in res.detail

    # The result follows the cleanup: nothing of the job is left.
    assert await job_objects(net.docker, {job_uuid}) == []
    assert not [p for p in work.iterdir() if p.name.startswith("stream-")]
    # The open proxy stream ended, and the key is gone: nobody is served for the job any more.
    async with asyncio.timeout(10):
        ended = await proxy.ended()
    assert ended is not None and ended.code() is grpc.StatusCode.UNAVAILABLE, ended
    assert "streaming job ended" in ended.details(), ended
    fresh = await net.proxy(ready)
    async with asyncio.timeout(10):
        ended = await fresh.ended()
    assert ended is not None and ended.code() is grpc.StatusCode.PERMISSION_DENIED, ended


async def test_a_request_the_service_drops_fails_alone(net: Network) -> None:
    """The service closes the connection without answering one request: the proxy says so in
    that request's last frame (no receipt) and the next request is answered and signed."""
    session = net.start_session(probe_spec())
    proxy = await net.proxy(await session.wait_ready())
    dropped = await proxy.ask(json.dumps({"op": "drop"}).encode())
    [frame] = dropped.frames
    assert frame.last and not frame.HasField("receipt") and frame.body == b""
    assert "did not answer request 1" in frame.error, frame.error
    after = await proxy.ask(json.dumps({"op": "notes"}).encode())
    assert after.json()["ok"] is True
    receipt = after.receipt
    receipt.verify()
    assert receipt.seq == 2
    assert session.result is None  # the session goes on


async def test_a_crashing_service_ends_the_session_with_its_exit_status(net: Network) -> None:
    session = net.start_session(probe_spec())
    proxy = await net.proxy(await session.wait_ready())
    try:
        # The request dies with the service: it fails alone, or the job's end comes first.
        answer = await proxy.ask(json.dumps({"op": "exit", "code": 3}).encode())
        assert answer.frames[-1].error and not answer.frames[-1].HasField("receipt")
    except ProxyError:
        pass
    res = await session.finished()
    assert res.state == S.JOB_STATE_FAILED, session.describe()
    assert res.reason == S.FAILURE_REASON_NONZERO_EXIT
    assert res.stage == S.STAGE_EXECUTION
    assert res.exit_code == 3
    assert await job_objects(net.docker, {res.job_uuid}) == []


async def test_a_dead_relay_ends_the_job_horde_failed(net: Network) -> None:
    """The relay is the executor's own container: when it dies the job cannot be served, and
    the verdict is horde_failed (Horde's fault), not the service's failure or a cancel."""
    session = net.start_session(streaming_spec(LLM_IMAGE))
    ready = await session.wait_ready()
    proxy = await net.proxy(ready)
    (await proxy.ask(b"hello")).receipt.verify()
    relay = await net.docker.containers.get(f"horde-{ready.job_uuid}-stream-relay")
    await relay.kill(signal="SIGKILL")
    res = await session.finished(within=30)
    assert res.state == S.JOB_STATE_HORDE_FAILED, session.describe()
    assert res.reason == S.FAILURE_REASON_INTERNAL_ERROR
    assert res.stage == S.STAGE_EXECUTION
    assert "relay" in res.detail and "exited with status 137 mid-session" in res.detail, res.detail
    assert await job_objects(net.docker, {ready.job_uuid}) == []
    async with asyncio.timeout(10):
        ended = await proxy.ended()
    assert ended is not None and ended.code() is grpc.StatusCode.UNAVAILABLE, ended
    assert "relay" in ended.details(), ended


@pytest.mark.parametrize("known", [False, True], ids=["any-caller", "known-gateway"])
async def test_only_a_known_gateway_names_the_client_a_session_serves(
    net: Network, known: bool
) -> None:
    """Any enrolled caller may start a session, but only a gateway the validator knows (its
    `gateways`) may say which client it serves: another caller's session is its own (it could
    put its sessions on anyone's account)."""
    gateway = net.keys.identity("gateway")
    if known:
        assert net.validator is not None
        await net.validator.stop(1.0)
        await net.start_validator(gateways={gateway: "127.0.0.1:9"})
    session = net.start_session(streaming_spec(LLM_IMAGE))  # client_identity: ed25519:00...
    ready = await session.wait_ready()
    record = (
        await net.validator_stub().GetJob(validator_pb2.GetJobRequest(job_uuid=ready.job_uuid))
    ).job
    expected = "ed25519:" + "00" * 32 if known else gateway
    assert record.spec.labels["horde.client"] == expected


async def test_a_stopping_validator_ends_the_session_with_a_result(net: Network) -> None:
    """The validator shutting down ends a live session with a result the gateway reads (not a
    broken call), counted against no miner, and its miner stops the service."""
    session = net.start_session(streaming_spec(LLM_IMAGE))
    ready = await session.wait_ready()
    proxy = await net.proxy(ready)
    (await proxy.ask(b"hello")).receipt.verify()
    validator, net.validator = net.validator, None
    assert validator is not None
    await validator.stop(1.0)
    res = await session.finished(within=10)
    assert res.state == S.JOB_STATE_HORDE_FAILED, session.describe()
    assert res.reason == S.FAILURE_REASON_VALIDATOR_RESTARTED, session.describe()
    assert "validator shut down during the session" in res.detail, res.detail
    assert res.miner_hotkey == ""

    async def removed() -> bool:
        return await job_objects(net.docker, {ready.job_uuid}) == []

    await wait_for(removed, 30, "the miner's executor to remove the service")


async def test_a_killed_executor_ends_the_session_as_executor_lost(bare_net: Network) -> None:
    net = bare_net
    await net.start(executor=False)
    log_path = net.root / "executor.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            str(HORDE_BIN),
            "executor",
            "serve",
            "--config",
            str(net.executor_config()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        await net.wait_executor_at_miner(within=60)
        session = net.start_session(streaming_spec(LLM_IMAGE))
        ready = await session.wait_ready()
        proxy = await net.proxy(ready)
        (await proxy.ask(b"hello")).receipt.verify()
        proc.send_signal(signal.SIGKILL)
        res = await session.finished(within=30)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert res.state == S.JOB_STATE_HORDE_FAILED, session.describe()
    assert res.reason == S.FAILURE_REASON_EXECUTOR_LOST
    assert "lost" in res.detail
    # Nobody was left to remove the service and its relay, until the executor starts again and
    # sweeps its leftovers.
    assert len(await containers_of(net.docker, ready.job_uuid)) == 2
    await net.start_executor()
    assert await job_objects(net.docker, {ready.job_uuid}) == []


# ------------------------------------------------------------------------------ demo images


def test_the_dishonest_image_serves_the_same_model() -> None:
    """The dishonest image is horde/demo-llm with another DISHONEST_RATE, nothing else."""
    dockerfile = (DEMO_LLM.parents[1] / "demo-llm-dishonest" / "Dockerfile").read_text()
    assert "ARG LLM=horde/demo-llm:latest" in dockerfile and "FROM ${LLM}" in dockerfile
    assert "COPY" not in dockerfile and "ENV DISHONEST_RATE=0.1" in dockerfile


async def test_the_dishonest_model_answers_a_share_of_prompts_wrongly(net: Network) -> None:
    model = demo_llm()
    prompts = [f"question {i}".encode() for i in range(400)]
    wrong = [p for p in prompts if model.answers_wrongly(p, 0.1)]
    assert 20 <= len(wrong) <= 60  # about 10%
    right = next(p for p in prompts if p not in wrong)
    session = net.start_session(streaming_spec(DISHONEST_IMAGE))
    proxy = await net.proxy(await session.wait_ready())
    for prompt in (wrong[0], right, wrong[1]):
        answer = await proxy.ask(prompt)
        honest = expected(prompt)
        assert (answer.body == honest) == (prompt == right)
        assert answer.body == expected(prompt, rate=0.1)  # wrong, but reproducibly so


async def test_a_bad_receipt_report_is_stored_as_evidence(net: Network) -> None:
    session = net.start_session(streaming_spec(LLM_IMAGE))
    ready = await session.wait_ready()
    proxy = await net.proxy(ready)
    answer = await proxy.ask(b"hello")
    report = validator_pb2.ReportBadReceiptRequest(
        job_uuid=ready.job_uuid,
        receipt=answer.frames[-1].receipt,
        certificate=ready.certificate,
        reason="receipt 1: output hash does not match the response received",
    )
    await net.validator_stub().ReportBadReceipt(report, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await net.validator_stub("stranger").ReportBadReceipt(report, timeout=10)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    forged = validator_pb2.ReportBadReceiptRequest()
    forged.CopyFrom(report)
    forged.certificate.miner_signature = b"\x00" * 64
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await net.validator_stub().ReportBadReceipt(forged, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    engine = create_async_engine(f"sqlite+aiosqlite:///{net.root / 'validator.db'}")
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(penalties))).fetchall()
    finally:
        await engine.dispose()
    assert [(r.miner_hotkey, r.kind, r.amount) for r in rows] == [
        (net.keys.identity("miner"), "bad_receipt_report", 0.0)
    ]
    assert validator_pb2.ReportBadReceiptRequest.FromString(rows[0].evidence) == report
