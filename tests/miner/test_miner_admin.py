"""`horde miner executors|jobs`, the miner operator's read-only view, against a real miner (gRPC
on port 0, SQLite, real signatures): the miner's own key and its admins see the executors and
the jobs, anyone else is refused; the CLI runs as a subprocess."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
from horde.v1 import common_pb2, miner_pb2
from miner_admin_support import (
    CPU_ONLY,
    H100,
    FakeExecutor,
    MinerNet,
    ValidatorJob,
    make_net,
)
from tls_support import make_pki

from horde_services.cli.main import main
from horde_services.core.config import TLSSettings
from horde_services.core.errors import ConfigError
from horde_services.core.identity import load_key_file

pytestmark = pytest.mark.timeout(120)

DENIED = "is not the miner's own key or one of its admins"


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[MinerNet]:
    handle = await make_net(tmp_path / "net")
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


def own(net: MinerNet) -> list[str]:
    """The options of the operator with the miner's own key file (no identity needed)."""
    return ["--miner", net.address, "--key", str(net.miner_key)]


def admin(net: MinerNet) -> list[str]:
    return ["--miner", net.address, "--miner-identity", net.identity, "--key", str(net.admin_key)]


def stranger(net: MinerNet) -> list[str]:
    return [
        "--miner",
        net.address,
        "--miner-identity",
        net.identity,
        "--key",
        str(net.stranger_key),
    ]


async def test_executors_show_class_state_hardware_and_the_job_of_a_busy_one(
    net: MinerNet,
) -> None:
    async with (
        FakeExecutor(net, net.executors[0], "gpu-h100", H100) as gpu,
        FakeExecutor(net, net.executors[1], "cpu-small", CPU_ONLY) as cpu,
    ):
        job = ValidatorJob(net, "gpu-h100")
        await job.started()
        assert (await gpu.next_job()).job_uuid == job.job_uuid

        for who in (own(net), admin(net)):
            doc = await net.horde_json("miner", "executors", *who)
            assert doc["miner"] == net.identity
            assert doc["counts"] == {"idle": 1, "busy": 1, "draining": 0}
            by_id = {e["executor_id"]: e for e in doc["executors"]}
            busy, idle = by_id[gpu.executor_id], by_id[cpu.executor_id]
            assert busy["state"] == "busy" and busy["executor_class"] == "gpu-h100"
            assert busy["executor_identity"] == str(net.executors[0].identity)
            assert busy["job"]["job_uuid"] == job.job_uuid
            assert busy["job"]["validator"] == str(net.validator.identity)
            assert busy["job"]["in_flight"] is True
            assert busy["hardware"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
            assert busy["hardware_summary"] == (
                "1x NVIDIA H100 80GB HBM3 (80.0 GiB), 16 CPU AMD EPYC 9454, 128.0 GiB RAM, "
                "500.0 GiB disk free"
            )
            assert idle["state"] == "idle" and idle["job"] is None
            assert idle["hardware_summary"].startswith("no GPU, 4 CPU Intel Xeon")

        # Text into a pipe: a header, then one unwrapped table row per executor, values whole.
        code, out, err = await net.horde("miner", "executors", *own(net))
        assert code == 0, err
        assert f"miner {net.identity}: 2 executor(s), 1 idle, 1 busy, 0 draining" in out
        [row] = [line for line in out.splitlines() if gpu.executor_id in line]
        assert job.job_uuid in row and "busy" in row and "NVIDIA H100 80GB HBM3" in row
        assert str(net.executors[0].identity) in row  # not shortened off a terminal

        gpu.finish(job.job_uuid, common_pb2.JOB_STATE_COMPLETED)
        assert (await job.result()).state == common_pb2.JOB_STATE_COMPLETED
        doc = await net.horde_json("miner", "executors", *own(net))
        assert doc["counts"] == {"idle": 2, "busy": 0, "draining": 0}


async def test_jobs_list_those_in_flight_and_those_that_ended(net: MinerNet) -> None:
    async with FakeExecutor(net, net.executors[0], "cpu-small", CPU_ONLY) as ex:
        done = ValidatorJob(net, "cpu-small")
        await done.started()
        await ex.next_job()
        ex.finish(
            done.job_uuid,
            common_pb2.JOB_STATE_FAILED,
            reason=common_pb2.FAILURE_REASON_NONZERO_EXIT,
            detail="exit status 3",
        )
        assert (await done.result()).state == common_pb2.JOB_STATE_FAILED

        live = ValidatorJob(net, "cpu-small", job_kind="streaming")
        await live.started()
        await ex.next_job()
        ex.report(live.job_uuid, common_pb2.JOB_STATE_RUNNING)
        await live.until_event(common_pb2.JOB_STATE_RUNNING)

        for who in (own(net), admin(net)):
            doc = await net.horde_json("miner", "jobs", *who)
            assert doc["in_flight"] == 1
            first, second = doc["jobs"]
            assert first["job_uuid"] == live.job_uuid
            assert (first["in_flight"], first["state"], first["job_kind"]) == (
                True,
                "running",
                "streaming",
            )
            assert first["executor_id"] == ex.executor_id and first["ended_ns"] == 0
            assert first["duration_s"] is None
            assert second["job_uuid"] == done.job_uuid
            assert (second["state"], second["reason"], second["detail"]) == (
                "failed",
                "nonzero_exit",
                "exit status 3",
            )
            assert second["in_flight"] is False and second["countersigned"] is True
            assert second["executor_id"] == ex.executor_id
            assert second["validator"] == str(net.validator.identity)
            assert second["executor_class"] == "cpu-small" and second["job_kind"] == "organic"
            assert second["ended_ns"] >= second["started_ns"] > 0
            assert second["duration_s"] >= 0 and second["ended"].endswith("Z")

        code, out, err = await net.horde("miner", "jobs", *admin(net))
        assert code == 0, err
        assert "1 in flight, 1 ended (newest first)" in out
        [row] = [line for line in out.splitlines() if done.job_uuid in line]
        assert "failed: nonzero_exit" in row and "exit status 3" in row
        assert "organic" not in row and "streaming" not in row
        [row] = [line for line in out.splitlines() if live.job_uuid in line]
        assert row.split("│")[-2].strip() == "streaming", row  # the note says the kind

        ex.finish(live.job_uuid, common_pb2.JOB_STATE_COMPLETED)
        await live.result()


async def test_strangers_and_validators_are_refused(net: MinerNet) -> None:
    for command in ("executors", "jobs"):
        code, out, err = await net.horde("miner", command, *stranger(net))
        assert code == 1
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith(f"horde miner {command}: PERMISSION_DENIED: ")
        assert DENIED in line and "admins" in line

    # A validator serves jobs, it does not inspect the operator's; an admin only reads.
    validator = net.admin_stub(net.validator)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await validator.ListRelayedJobs(miner_pb2.ListRelayedJobsRequest(), timeout=10)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert DENIED in (refused.value.details() or "")
    admin_signer = load_key_file(net.admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await net.miner_stub(admin_signer).ListReceipts(miner_pb2.ListReceiptsRequest())
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # The manifest is open to both.
    for who in (net.validator, admin_signer):
        resp = await net.miner_stub(who).GetManifest(miner_pb2.GetManifestRequest(), timeout=10)
        assert resp.manifest.miner_hotkey == net.identity


async def test_an_admin_key_without_the_miner_identity_gets_a_hint(net: MinerNet) -> None:
    code, _, err = await net.horde(
        "miner", "jobs", "--miner", net.address, "--key", str(net.admin_key)
    )
    assert code == 1
    [line] = err.splitlines()
    assert "UNAUTHENTICATED" in line and "give --miner-identity" in line
    assert net.identity in line  # the miner says who it is


async def test_history_survives_a_restart_and_interrupted_jobs_say_so(
    net: MinerNet,
) -> None:
    async with FakeExecutor(net, net.executors[0], "cpu-small", CPU_ONLY) as ex:
        done = ValidatorJob(net, "cpu-small")
        await done.started()
        await ex.next_job()
        ex.finish(done.job_uuid, common_pb2.JOB_STATE_COMPLETED)
        await done.result()
        gone = ValidatorJob(net, "cpu-small")
        await gone.started()
        await ex.next_job()
        gone.cancel()  # the validator goes away: the miner stops the job, no result
        assert await ex.next_cancel() == gone.job_uuid

        stub = net.admin_stub(net.signer)
        resp = await stub.ListRelayedJobs(miner_pb2.ListRelayedJobsRequest(), timeout=10)
        [interrupted, completed] = resp.jobs
        assert interrupted.job_uuid == gone.job_uuid and not interrupted.in_flight
        assert interrupted.state == common_pb2.JOB_STATE_UNSPECIFIED
        assert interrupted.detail == "ended without a result: the validator went away"
        assert interrupted.executor_id == ex.executor_id
        assert completed.state == common_pb2.JOB_STATE_COMPLETED

    await net.stop()
    await net.start()
    doc = await net.horde_json("miner", "jobs", *own(net))
    assert doc["in_flight"] == 0
    interrupted_doc, completed_doc = doc["jobs"]
    assert (interrupted_doc["job_uuid"], interrupted_doc["state"]) == (gone.job_uuid, "interrupted")
    assert interrupted_doc["ended_ns"] == 0 and interrupted_doc["executor_id"] == ""
    assert (completed_doc["job_uuid"], completed_doc["state"]) == (done.job_uuid, "completed")
    assert completed_doc["countersigned"] is True
    assert completed_doc["executor_id"] == ""  # the miner restarted: no longer known


async def test_limit_keeps_the_newest_ended_jobs(net: MinerNet) -> None:
    uuids = []
    async with FakeExecutor(net, net.executors[0], "cpu-small", CPU_ONLY) as ex:
        for _ in range(3):
            job = ValidatorJob(net, "cpu-small")
            await job.started()
            await ex.next_job()
            ex.finish(job.job_uuid, common_pb2.JOB_STATE_COMPLETED)
            await job.result()
            uuids.append(job.job_uuid)
    doc = await net.horde_json("miner", "jobs", *own(net), "--limit", "2")
    assert [j["job_uuid"] for j in doc["jobs"]] == uuids[::-1][:2]
    code, _, err = await net.horde("miner", "jobs", *own(net), "--limit", "0")
    assert code == 2 and "--limit" in err


async def test_dev_state_dir_fills_in_the_dev_miner_and_its_own_key(
    net: MinerNet, tmp_path: Path
) -> None:
    """`--dev DIR` reads the miner's endpoint from endpoints.json and uses keys/miner.json."""
    dev = tmp_path / "devnet"
    (dev / "keys").mkdir(parents=True)
    (dev / "keys" / "miner.json").write_bytes(net.miner_key.read_bytes())
    (dev / "keys" / "miner.json").chmod(0o600)
    elsewhere = {"address": "127.0.0.1:9", "identity": net.identity}
    (dev / "endpoints.json").write_text(
        json.dumps(
            {
                "services": {
                    "validator": elsewhere,
                    "gateway": elsewhere,
                    "miner": {"address": net.address, "identity": net.identity},
                },
                "client_key": str(dev / "keys" / "client.json"),
            }
        )
    )
    doc = await net.horde_json("miner", "jobs", "--dev", str(dev))
    assert doc == {"in_flight": 0, "jobs": []}
    # An admin key with --dev: the miner's identity still comes from the dev network.
    doc = await net.horde_json("miner", "executors", "--dev", str(dev), "--key", str(net.admin_key))
    assert doc["miner"] == net.identity and doc["executors"] == []


def test_usage_problems_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = structlog.get_config()  # main() points structlog at this test's captured stderr
    try:
        _usage_problems(tmp_path, capsys)
    finally:
        structlog.configure(**saved)


def _usage_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["miner", "executors"]) == 2
    assert "give --dev DIR, or --miner HOST:PORT with --key FILE" in capsys.readouterr().err
    assert main(["miner", "jobs", "--miner", "nowhere", "--key", "k.json"]) == 2
    assert "--miner 'nowhere': HOST:PORT is required" in capsys.readouterr().err
    assert main(["miner", "jobs", "--miner", "127.0.0.1:7200", "--key", "missing.json"]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["miner", "jobs", "--dev", str(tmp_path)]) == 2
    assert "endpoints.json not found" in capsys.readouterr().err


async def test_nobody_listening_exits_2(net: MinerNet, tmp_path: Path) -> None:
    address = net.address
    await net.stop()
    code, _, err = await net.horde("miner", "jobs", "--miner", address, "--key", str(net.miner_key))
    assert code == 2
    assert f"horde miner jobs: cannot reach the miner at {address}" in err


async def test_admins_are_validated_at_start(tmp_path: Path) -> None:
    bad = await make_net(tmp_path / "bad")
    bad.settings.admins = ["5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"]
    with pytest.raises(ConfigError, match="invalid setting 'admins'"):
        await bad.start()


async def test_the_cli_reaches_a_tls_miner_with_the_ca_from_the_environment(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    net = await make_net(
        tmp_path / "net",
        executors=1,
        tls=TLSSettings(
            cert_file=pki.server_cert,
            key_file=pki.server_key,
            ca_file=pki.ca,
            require_client_cert=True,
        ),
    )
    await net.start()
    argv = ("miner", "executors", *admin(net), "--json")
    client_cert = {
        "HORDE_TLS_CERT_FILE": str(pki.client_cert),
        "HORDE_TLS_KEY_FILE": str(pki.client_key),
    }
    try:
        # Plaintext, or TLS without the client certificate the miner requires: no connection.
        for env in ({}, {"HORDE_TLS_CA_FILE": str(pki.ca)}):
            code, out, err = await net.horde(*argv, env=env)
            assert code == 2 and "cannot reach the miner" in err, (env, err)
        code, out, err = await net.horde(
            *argv, env={"HORDE_TLS_CA_FILE": str(pki.ca), **client_cert}
        )
        assert code == 0, err
        assert json.loads(out)["executors"] == []
        # Settings that cannot work are usage errors naming the variable.
        bad = [
            (
                {"HORDE_TLS_CA_FILE": str(tmp_path / "missing.pem")},
                "HORDE_TLS_CA_FILE: file not found",
            ),
            (client_cert, "need HORDE_TLS_CA_FILE"),
            (
                {"HORDE_TLS_CA_FILE": str(pki.ca), "HORDE_TLS_CERT_FILE": str(pki.client_cert)},
                "go together",
            ),
        ]
        for env, words in bad:
            code, out, err = await net.horde(*argv, env=env)
            assert code == 2 and words in err and out == "", (env, err)
    finally:
        await net.stop()
