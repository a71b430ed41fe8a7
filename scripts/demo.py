"""`make demo`: a tour of Horde on embedded defaults.

Starts a whole local network (`horde dev up`), shows that every service answers health and that
the services authenticate one another (and refuse strangers), runs an organic job that reads its
input volume and writes output files, prints the result, runs a synthetic round, streams a few
dozen requests through the gateway to horde/demo-llm with verified receipts, spot-checks the
sampled pairs on the validator's trusted miner, and stops everything. Exit 0 on success.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from horde.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    miner_pb2,
    miner_pb2_grpc,
    validator_pb2,
    validator_pb2_grpc,
)
from rich.console import Console
from rich.table import Table

from horde_services.cli.devenv import DevEnv
from horde_services.core.identity import Ed25519Signer, load_key_file
from horde_services.core.server import open_channel

console = Console()
HORDE = str(Path(sys.executable).with_name("horde"))


def step(text: str) -> None:
    console.rule(f"[bold cyan]{text}")


async def health(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def auth_tour(env: DevEnv) -> None:
    client = load_key_file(env.client_key)
    validator_key = load_key_file(env.state_dir / "keys" / "validator.json")
    table = Table("caller", "callee", "call", "outcome")

    async def attempt(
        label: str, callee: str, signer: object, identity: str, call: str, fn: object
    ) -> bool:
        async with open_channel(env.address(callee), signer=signer, callee=identity) as ch:  # type: ignore[arg-type]
            try:
                detail = await fn(ch)  # type: ignore[operator]
                table.add_row(label, callee, call, f"[green]OK[/green] {detail}")
                return True
            except grpc.aio.AioRpcError as exc:
                table.add_row(label, callee, call, f"[red]{exc.code().name}[/red] {exc.details()}")
                return False

    async def manifest(ch: grpc.aio.Channel) -> str:
        resp = await miner_pb2_grpc.MinerServiceStub(ch).GetManifest(
            miner_pb2.GetManifestRequest(), timeout=5
        )
        ex = resp.manifest.executors
        return f"{len(ex)} executor(s) linked: " + ", ".join(
            f"{e.executor_id} ({e.executor_class})" for e in ex
        )

    async def list_jobs(ch: grpc.aio.Channel) -> str:
        resp = await validator_pb2_grpc.ValidatorServiceStub(ch).ListJobs(
            validator_pb2.ListJobsRequest(), timeout=5
        )
        return f"{len(resp.jobs)} job(s)"

    async def samples(ch: grpc.aio.Channel) -> str:
        await gateway_pb2_grpc.GatewayServiceStub(ch).ListSamples(
            gateway_pb2.ListSamplesRequest(), timeout=5
        )
        return "samples listed"

    ok = [
        await attempt(
            "validator (hotkey)",
            "miner",
            validator_key,
            env.identity("miner"),
            "GetManifest",
            manifest,
        ),
        await attempt(
            "client", "validator", client, env.identity("validator"), "ListJobs", list_jobs
        ),
        await attempt(
            "validator (hotkey)",
            "gateway",
            validator_key,
            env.identity("gateway"),
            "ListSamples",
            samples,
        ),
    ]
    stranger = Ed25519Signer.generate()
    refused = [
        not await attempt(
            "unknown key", "validator", stranger, env.identity("validator"), "ListJobs", list_jobs
        ),
        not await attempt(
            "client, signed for the miner",
            "validator",
            client,
            env.identity("miner"),
            "ListJobs",
            list_jobs,
        ),
        not await attempt(
            "client (not a validator)",
            "miner",
            client,
            env.identity("miner"),
            "GetManifest",
            manifest,
        ),
    ]
    console.print(table)
    if not all(ok) or not all(refused):
        raise SystemExit("authentication tour failed")


def run_job(state_dir: Path, work: Path) -> dict[str, object]:
    inputs = work / "inputs"
    inputs.mkdir()
    (inputs / "greeting.txt").write_text("hello from the horde demo\n")
    (inputs / "numbers.txt").write_text("\n".join(str(i * i) for i in range(10)) + "\n")
    out = work / "outputs"
    cmd = [
        HORDE,
        "job",
        "run",
        "--dev",
        str(state_dir),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--json",
        "horde/demo-job:latest",
    ]
    console.print("$ " + " ".join(cmd[1:]).replace(str(work), "$WORK"))
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    if proc.returncode != 0:
        console.print(proc.stdout, proc.stderr)
        raise SystemExit(f"the organic job failed (exit {proc.returncode})")
    doc: dict[str, object] = json.loads(proc.stdout)
    table = Table("field", "value")
    for key in ("job_uuid", "state", "exit_code", "stdout", "miner", "executor"):
        table.add_row(key, str(doc[key]).strip())
    for o in doc["outputs"]:  # type: ignore[attr-defined]
        table.add_row("output", f"{o['path']} ({o['size_bytes']} bytes)")
    table.add_row("end to end", f"{took:.2f}s (CLI start-up included)")
    console.print(table)
    console.print("[bold]/output/upper.txt:[/bold]")
    console.print((out / "upper.txt").read_text(), highlight=False)
    return doc


def synthetic_round(state_dir: Path) -> None:
    """`horde validator round` through the admin RPC, then `horde validator weights`."""
    for argv in (
        [HORDE, "validator", "round", "--dev", str(state_dir), "--set-weights"],
        [HORDE, "validator", "weights", "--dev", str(state_dir)],
    ):
        console.print("$ " + " ".join(argv[1:]).replace(str(state_dir), "$STATE"))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        console.print(proc.stdout, highlight=False)
        if proc.returncode != 0:
            console.print(proc.stderr)
            raise SystemExit(f"`horde validator {argv[2]}` failed (exit {proc.returncode})")
        if argv[2] == "round" and "passed" not in proc.stdout:
            raise SystemExit("the executor did not pass its synthetic challenge")


STREAM_REQUESTS = 40


def streaming_session(state_dir: Path, work: Path) -> None:
    """`horde stream` on horde/demo-llm: one session, a few dozen requests, each answered with a
    receipt signed by the job's key (checked by the gateway and by the CLI), then verified
    offline with `horde receipts verify`; latency per request as the client saw it."""
    requests = work / "prompts.txt"
    requests.write_text(
        "".join(
            f"prompt {i}: what does a horde of miners compute?\n" for i in range(STREAM_REQUESTS)
        )
    )
    receipts = work / "receipts.jsonl"
    cmd = [
        HORDE,
        "stream",
        "--dev",
        str(state_dir),
        "--image",
        "horde/demo-llm:latest",
        "--input",
        str(requests),
        "--receipts",
        str(receipts),
        "--json",
    ]
    console.print("$ " + " ".join(cmd[1:]).replace(str(work), "$WORK"))
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    if proc.returncode != 0:
        console.print(proc.stdout, proc.stderr)
        raise SystemExit(f"the streaming session failed (exit {proc.returncode})")
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    if len(docs) != STREAM_REQUESTS:
        raise SystemExit(f"{len(docs)} responses to {STREAM_REQUESTS} requests")
    table = Table("seq", "response (first words)", "ms", "receipt signature")
    for doc in docs[:3] + docs[-1:]:
        words = " ".join(doc["response"].split()[:6]) + " ..."
        table.add_row(
            str(doc["seq"]), words, f"{doc['latency_ms']:.2f}", doc["receipt"]["signature"][:24]
        )
    console.print(table)
    for line in proc.stderr.splitlines():
        if line.startswith(("session ready", "session closed")):
            console.print(line, highlight=False)
    verify = [HORDE, "receipts", "verify", str(receipts)]
    console.print("$ " + " ".join(verify[1:]).replace(str(work), "$WORK"))
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    console.print((checked.stdout + checked.stderr).strip(), highlight=False)
    if checked.returncode != 0 or f"{STREAM_REQUESTS} valid, 0 invalid" not in checked.stderr:
        raise SystemExit("the session's receipts did not verify")
    ordered = sorted(float(doc["latency_ms"]) for doc in docs)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    console.print(
        f"{STREAM_REQUESTS} requests, {STREAM_REQUESTS} receipts verified offline; latency per "
        f"request (client -> gateway -> job proxy -> container and back): p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms; whole session {took:.2f}s (container start and CLI start-up included)",
        highlight=False,
    )


def spot_check(state_dir: Path) -> None:
    """`horde validator spotcheck`: the validator pulls the pairs the gateway sampled, starts the
    same image on its trusted miner (dev up runs one, not in the roster), replays the requests,
    compares the outputs by sha256 and tears the instance down; then the verdict."""
    argv = [HORDE, "validator", "spotcheck", "--dev", str(state_dir), "--json"]
    console.print("$ " + " ".join(argv[1:]).replace(str(state_dir), "$STATE"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        console.print(proc.stdout, proc.stderr)
        raise SystemExit(f"`horde validator spotcheck` failed (exit {proc.returncode})")
    doc = json.loads(proc.stdout)
    console.print(f"{doc['samples_pulled']} sampled pair(s) pulled from the gateway")
    for check in doc["checks"]:
        verdict = "PASSED" if not check["mismatches"] else f"{check['mismatches']} MISMATCH(ES)"
        console.print(
            f"check {check['check_id']}: {check['pairs']} pair(s) of {check['image']} replayed on "
            f"the trusted miner in {check['duration_s']:.2f}s, instance torn down: "
            f"[bold]{verdict}[/bold]",
            highlight=False,
        )
        if check["mismatches"]:
            raise SystemExit("the honest dev miner failed its spot check")
    if not doc["checks"]:
        console.print("no pairs were sampled this time: nothing to check", highlight=False)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="horde-demo-") as tmp:
        work = Path(tmp)
        state_dir = work / "state"
        step("1. horde dev up: validator, miner, executor and gateway on 127.0.0.1")
        log = (work / "dev.log").open("w")
        proc = subprocess.Popen(
            [HORDE, "dev", "up", "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert proc.stdout is not None
            # dev up prints one line on stdout once endpoints.json is written.
            if "dev network up" not in proc.stdout.readline():
                print((work / "dev.log").read_text())
                raise SystemExit("horde dev up did not come up")
            env = DevEnv.load(state_dir)
            table = Table("service", "address", "identity", "health")
            for name in ("validator", "miner", "executor", "gateway"):
                status = asyncio.run(health(env.address(name)))
                table.add_row(name, env.address(name), env.identity(name)[:30] + "...", status)
                if status != "SERVING":
                    raise SystemExit(f"{name} is not serving")
            console.print(table)

            step("2. every RPC is signed: caller, callee, timestamp, nonce")
            asyncio.run(auth_tour(env))

            step("3. an organic job: inputs at /volume, outputs from /output, no network")
            run_job(state_dir, work)

            step("4. a synthetic round (horde/synthetic on the executor) and the weights it set")
            synthetic_round(state_dir)

            step("5. a streaming session on horde/demo-llm: every response with a signed receipt")
            streaming_session(state_dir, work)

            step("6. a spot check: the sampled pairs replayed on the validator's trusted miner")
            spot_check(state_dir)
        finally:
            step("7. stopping the network (SIGINT)")
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                code = -9
            log.close()
            console.print(f"horde dev up exited with status {code}")
        if code != 0:
            print((work / "dev.log").read_text()[-3000:])
            return 1
    console.print("[bold green]demo complete[/bold green]")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
