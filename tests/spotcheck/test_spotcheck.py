"""Spot checks end to end with real Docker: sessions through the gateway, samples pulled by the
validator, replayed on the trusted miner, verdicts, evidence, penalties.

Detection probability. The dishonest demo model answers a share p = 0.1 of prompts wrongly,
independently per prompt (a hash of the prompt decides). A check of n sampled pairs misses it
only when all n are answered right: P(miss) = (1 - p)^n = 0.9^n. P(miss) <= 0.01 needs
n >= ln(0.01) / ln(0.9) = 43.7, so n >= 44 pairs. The test sends N_PAIRS = 50 requests with the
gateway keeping every pair (sample_rate 1), so all 50 are checked: P(miss) = 0.9^50 = 0.0052,
caught with probability 0.9948 >= 0.99 over this traffic. Because the wrong answers are
deterministic per prompt, the test also computes which of its prompts the dishonest model gets
wrong (demo-llm's own `answers_wrongly`) and checks that exactly those pairs are flagged.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import grpc
import pytest
from horde.v1 import validator_admin_pb2, validator_admin_pb2_grpc
from spotcheck_support import SpotNet, demo_llm, labelled

from horde_services.core.db import open_database
from horde_services.core.identity import Ed25519Signer
from horde_services.core.metrics import REGISTRY
from horde_services.core.server import open_channel
from horde_services.validator.evidence import EvidenceError, verify_record
from horde_services.validator.store import JobStore

HORDE = str(Path(sys.executable).with_name("horde"))
DISHONEST_RATE = 0.1
N_PAIRS = 50
PROMPTS = [f"spot check prompt {i}: what does the horde compute?".encode() for i in range(N_PAIRS)]
pytestmark = pytest.mark.timeout(240)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def horde(*args: str, timeout_s: float = 60) -> Ran:
    """Run the `horde` CLI without blocking the loop the in-process services run on."""
    proc = await asyncio.create_subprocess_exec(
        HORDE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def admin_args(spotnet: SpotNet) -> list[str]:
    """The CLI's arguments for the spot net's validator, as its admin (the client key)."""
    assert spotnet.validator is not None
    return [
        "--validator",
        f"127.0.0.1:{spotnet.validator.port}",
        "--validator-identity",
        spotnet.identity("validator"),
        "--key",
        str(spotnet.root / "keys" / "client.json"),
    ]


async def spotcheck_cli(spotnet: SpotNet) -> tuple[int, dict[str, Any]]:
    """`horde validator spotcheck --json`, as an operator's cron job runs it: status and doc."""
    ran = await horde("validator", "spotcheck", *admin_args(spotnet), "--json", timeout_s=180)
    assert ran.stdout, ran.stderr
    return ran.returncode, json.loads(ran.stdout)


def test_sample_size_gives_99_percent_detection() -> None:
    needed = math.ceil(math.log(0.01) / math.log(1 - DISHONEST_RATE))
    assert needed == 44
    assert N_PAIRS >= needed
    assert (1 - DISHONEST_RATE) ** N_PAIRS <= 0.01


async def _torn_down(docker: aiodocker.Docker, job_uuid: str, within_s: float = 30.0) -> None:
    """No container, volume or network of the trusted job is left. The check returns once the
    trusted job has ended; an organic job's output holder is removed in the background, so poll
    for that (a condition with a deadline, not a fixed sleep)."""
    assert job_uuid
    left = await labelled(docker, job_uuid)
    deadline = asyncio.get_running_loop().time() + within_s
    while left and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        left = await labelled(docker, job_uuid)
    assert left == []


async def test_an_honest_miner_passes(spotnet: SpotNet, docker: aiodocker.Docker) -> None:
    await spotnet.start()
    await spotnet.session(PROMPTS)
    admin = spotnet.admin()
    status, doc = await spotcheck_cli(spotnet)
    assert status == 0  # everything matched
    assert doc["samples_pulled"] == N_PAIRS and not doc["error"] and not doc["pull_errors"]
    (check,) = doc["checks"]
    assert check["error"] == "" and check["kind"] == "streaming"
    assert check["pairs"] == N_PAIRS and check["mismatches"] == 0
    miner = spotnet.identity("miner")
    assert all(v["passed"] and v["miner"] == miner for v in check["verdicts"])
    assert check["image_digest"].startswith("sha256:")
    await _torn_down(docker, check["trusted_job_uuid"])
    evidence = await admin.ExportEvidence(validator_admin_pb2.ExportEvidenceRequest(), timeout=30)
    assert list(evidence.records_json) == []
    weights = await admin.GetWeights(validator_admin_pb2.GetWeightsRequest(), timeout=30)
    assert all("spot check" not in m.reason for m in weights.miners)
    # Nothing new has gathered: a second check pulls and replays nothing.
    again = await admin.RunSpotCheck(validator_admin_pb2.RunSpotCheckRequest(), timeout=60)
    assert again.samples_pulled == 0 and list(again.checks) == []


async def test_the_dishonest_model_is_caught_with_evidence_and_a_penalty(
    spotnet: SpotNet, docker: aiodocker.Docker, tmp_path: Path
) -> None:
    model = demo_llm()
    wrong = {seq for seq, p in enumerate(PROMPTS, start=1) if model.answers_wrongly(p, 0.1)}
    assert wrong, "the prompts must include some the dishonest model answers wrongly"
    await spotnet.start(cheat=True)
    await spotnet.session(PROMPTS)

    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "mismatched": counted("horde_spotcheck_pairs_total", outcome="mismatched"),
        "matched": counted("horde_spotcheck_pairs_total", outcome="matched"),
        "sanctions": counted("horde_miner_sanctions_total", kind="spotcheck_mismatch"),
    }
    admin = spotnet.admin()
    status, doc = await spotcheck_cli(spotnet)
    assert status == 3  # MISMATCH_EXIT: distinct from errors (1) and usage problems (2)
    (check,) = doc["checks"]
    assert check["error"] == "" and check["pairs"] == N_PAIRS
    flagged = {v["seq"] for v in check["verdicts"] if not v["passed"]}
    assert flagged == wrong
    assert check["mismatches"] == len(wrong)
    # The operator's metrics count it.
    mismatched = counted("horde_spotcheck_pairs_total", outcome="mismatched")
    assert mismatched - before["mismatched"] == len(wrong)
    matched = counted("horde_spotcheck_pairs_total", outcome="matched")
    assert matched - before["matched"] == N_PAIRS - len(wrong)
    sanctions = counted("horde_miner_sanctions_total", kind="spotcheck_mismatch")
    assert sanctions - before["sanctions"] == 1
    await _torn_down(docker, check["trusted_job_uuid"])

    # Evidence: exported, verified offline (by the library and by the CLI), one per mismatch.
    exported = await admin.ExportEvidence(validator_admin_pb2.ExportEvidenceRequest(), timeout=30)
    records = [json.loads(r) for r in exported.records_json]
    assert {r["seq"] for r in records} == wrong
    for record in records:
        ok = verify_record(record)
        assert ok.miner_hotkey == spotnet.identity("miner")
        assert record["trusted"]["miner_hotkey"] == spotnet.identity("trusted_miner")
    path = tmp_path / "evidence.jsonl"
    validator = f"127.0.0.1:{spotnet.validator.port}" if spotnet.validator else ""
    export = await horde(
        *[
            "validator",
            "evidence",
            "export",
            "--validator",
            validator,
            "--validator-identity",
            spotnet.identity("validator"),
            "--key",
            str(spotnet.root / "keys" / "client.json"),
            "--out",
            str(path),
        ]
    )
    assert export.returncode == 0, export.stderr
    checked = await horde("evidence", "verify", str(path))
    assert checked.returncode == 0, checked.stdout
    assert f"{len(wrong)} valid, 0 invalid" in checked.stderr

    # A forged piece does not verify: the claimed output swapped for the trusted one.
    forged = dict(records[0], claimed_output=records[0]["trusted_output"])
    with pytest.raises(EvidenceError, match="output_sha256"):
        verify_record(forged)
    path.write_text(json.dumps(forged) + "\n")
    refused = await horde("evidence", "verify", str(path))
    assert refused.returncode == 1 and "invalid: claimed_output" in refused.stdout

    # The penalty shows in the weights, with its reason.
    weights = await admin.GetWeights(validator_admin_pb2.GetWeightsRequest(), timeout=30)
    (miner,) = [m for m in weights.miners if m.miner_hotkey == spotnet.identity("miner")]
    assert miner.weight == 0.0 and miner.score == 0.0
    assert "weight x0 until" in miner.reason and f"{len(wrong)} of {N_PAIRS}" in miner.reason
    cli = await horde(
        *[
            "validator",
            "weights",
            "--validator",
            validator,
            "--validator-identity",
            spotnet.identity("validator"),
            "--key",
            str(spotnet.root / "keys" / "client.json"),
            "--json",
        ]
    )
    assert cli.returncode == 0, cli.stderr
    assert any("spot check" in m["reason"] for m in json.loads(cli.stdout)["miners"])


async def test_only_admins_may_run_spotchecks(spotnet: SpotNet) -> None:
    await spotnet.start()
    # An admin with nothing gathered for the digest: nothing to check, no error.
    resp = await spotnet.admin().RunSpotCheck(
        validator_admin_pb2.RunSpotCheckRequest(image_digest="sha256:" + "0" * 64), timeout=30
    )
    assert list(resp.checks) == [] and not resp.error
    assert spotnet.validator is not None
    async with open_channel(
        f"127.0.0.1:{spotnet.validator.port}",
        signer=Ed25519Signer.generate(),
        callee=spotnet.identity("validator"),
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await validator_admin_pb2_grpc.ValidatorAdminServiceStub(ch).RunSpotCheck(
                validator_admin_pb2.RunSpotCheckRequest(), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("pruned", [False, True], ids=["kept", "pruned"])
async def test_organic_jobs_are_cross_checked_on_the_trusted_miner(
    spotnet: SpotNet, docker: aiodocker.Docker, pruned: bool
) -> None:
    """A completed organic job is re-run on the trusted miner and its files compared; one whose
    files are no longer kept (output_retention_days) is passed over, not held against its
    miner as a mismatch."""
    await spotnet.start(organic_share=1.0)
    assert spotnet.validator is not None
    ran = await horde(
        "job",
        "run",
        "--validator",
        f"127.0.0.1:{spotnet.validator.port}",
        "--validator-identity",
        spotnet.identity("validator"),
        "--key",
        str(spotnet.root / "keys" / "client.json"),
        "--json",
        "horde/base:latest",
        "--",
        "python3",
        "-c",
        "open('/output/answer.txt', 'w').write(str(6 * 7))",
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job = json.loads(ran.stdout)
    if pruned:
        url = f"sqlite+aiosqlite:///{spotnet.root / 'validator' / 'validator.db'}"
        engine = await open_database(url)
        try:
            assert await JobStore(engine).prune_outputs(time.time_ns() + 1) == 1
        finally:
            await engine.dispose()
    resp = await spotnet.admin().RunSpotCheck(
        validator_admin_pb2.RunSpotCheckRequest(), timeout=180
    )
    if pruned:
        assert list(resp.checks) == []
        return
    (check,) = resp.checks
    assert check.kind == "organic" and check.error == ""
    (verdict,) = check.verdicts
    assert verdict.passed and verdict.job_uuid == job["job_uuid"]
    assert verdict.miner_hotkey == spotnet.identity("miner")
    assert "1 output file(s) and the exit code match" in verdict.detail
    await _torn_down(docker, check.trusted_job_uuid)
