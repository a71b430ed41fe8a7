"""The executor's side of a synthetic challenge: solve it and answer with its own timings.

Production runs the challenge in the ``horde/synthetic`` image under the same sandbox as jobs
(``DockerSolver``): no network, read-only root, the executor's limits, GPUs passed (and the CUDA
path asked for) only when the host has them. ``InProcessSolver`` solves in a thread with the
same algorithm, for tests and benchmarks where Docker is not the point.

``python -m horde_services.executor.synthetic --calibrate`` prints this host's CPU hash rate, the
figure the class difficulties in ``horde_services.validator.synthetic`` are calibrated from.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from horde.v1 import executor_pb2, executor_pb2_grpc, manifest_pb2, synthetic_pb2

from horde_services.core.identity import Signer
from horde_services.core.server import open_channel
from horde_services.executor.sandbox import (
    ContainerRun,
    DockerRuntime,
    SandboxError,
    SandboxLimits,
)

log = structlog.get_logger("horde.executor.synthetic")

SYNTHETIC_IMAGE = "horde/synthetic:latest"
MAX_RANGE = 2**40
MAX_DIGESTS = 64
# Container time limit when the challenge's deadline has already passed by this host's clock.
MIN_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 3600.0


class SolveError(Exception):
    """The challenge could not be solved here; the message goes back in the answer."""


def solve_cpu(salt: bytes, start: int, end: int, digests: Sequence[bytes]) -> list[int | None]:
    """The CPU algorithm of the image's solver.py: hash every candidate, stop when all found."""
    base = hashlib.sha256(salt)
    wanted = set(digests)
    found: dict[bytes, int] = {}
    for secret in range(start, end):
        h = base.copy()
        h.update(secret.to_bytes(8, "big"))
        d = h.digest()
        if d in wanted:
            found[d] = secret
            if len(found) == len(wanted):
                break
    return [found.get(d) for d in digests]


def challenge_problem(ch: synthetic_pb2.SyntheticChallenge) -> str | None:
    """Why a challenge is malformed or too big to attempt, or None."""
    if len(ch.salt) != 32:
        return "salt must be 32 bytes"
    if not ch.digests or len(ch.digests) > MAX_DIGESTS:
        return f"between 1 and {MAX_DIGESTS} digests are required"
    if any(len(d) != 32 for d in ch.digests):
        return "digests must be 32 bytes"
    if not ch.range_start < ch.range_end or ch.range_end - ch.range_start > MAX_RANGE:
        return f"the range must be non-empty and at most {MAX_RANGE} candidates"
    return None


class SyntheticSolver(Protocol):
    async def solve(self, ch: synthetic_pb2.SyntheticChallenge) -> tuple[list[int], str]:
        """The secrets in digest order and the backend used; raises SolveError."""
        ...


class InProcessSolver:
    """Solves in a worker thread (tests, benchmarks)."""

    async def solve(self, ch: synthetic_pb2.SyntheticChallenge) -> tuple[list[int], str]:
        found = await asyncio.to_thread(
            solve_cpu, ch.salt, ch.range_start, ch.range_end, list(ch.digests)
        )
        return _complete(found), "cpu"


class DockerSolver:
    """Runs ``horde/synthetic`` in the sandbox; the answer is the container's JSON stdout."""

    def __init__(
        self,
        runtime: DockerRuntime,
        limits: SandboxLimits,
        work_dir: Path,
        gpus: int = 0,
        image: str = SYNTHETIC_IMAGE,
    ) -> None:
        self._runtime = runtime
        self._limits = limits
        self._work_dir = work_dir
        self._gpus = gpus
        self._image = image

    def container_run(self, ch: synthetic_pb2.SyntheticChallenge, now_ns: int) -> ContainerRun:
        remaining = (ch.deadline_ns - now_ns) / 1e9 if ch.deadline_ns else MAX_TIMEOUT_S
        spec = {
            "salt": ch.salt.hex(),
            "range_start": ch.range_start,
            "range_end": ch.range_end,
            "digests": [d.hex() for d in ch.digests],
            # The CUDA path only where the executor has GPUs; "auto" falls back to the CPU when
            # the image lacks CuPy, and says so in its output.
            "backend": "auto" if self._gpus else "cpu",
            "workers": max(1, self._limits.nano_cpus // 1_000_000_000),
        }
        return ContainerRun(
            job_uuid=f"synthetic-{ch.challenge_id}",
            image=self._image,
            env={"HORDE_CHALLENGE": json.dumps(spec)},
            limits=self._limits,
            timeout_s=min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, remaining + 1.0)),
            gpus=self._gpus,
        )

    async def solve(self, ch: synthetic_pb2.SyntheticChallenge) -> tuple[list[int], str]:
        run = self.container_run(ch, time.time_ns())
        out_dir = Path(tempfile.mkdtemp(prefix="synthetic-", dir=self._work_dir))
        try:
            res = await self._runtime.run(run, out_dir)
        except SandboxError as exc:
            raise SolveError(f"sandbox: {exc}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, out_dir, True)
        if res.timed_out:
            raise SolveError(f"the solver ran past {run.timeout_s:.0f}s and was killed")
        try:
            doc = json.loads(res.stdout.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SolveError(
                f"solver exited {res.exit_code} without an answer: "
                f"{res.stderr.decode(errors='replace')[-300:]}"
            ) from None
        if "error" in doc:
            raise SolveError(str(doc["error"]))
        if doc.get("fallback"):
            log.warning("synthetic_cuda_unavailable", reason=doc["fallback"])
        return _complete(doc.get("secrets") or []), str(doc.get("backend", "cpu"))


def _complete(found: Sequence[int | None]) -> list[int]:
    missing = sum(1 for s in found if s is None)
    if missing:
        raise SolveError(f"{missing} of {len(found)} secrets not found in the range")
    return [int(s) for s in found if s is not None]


async def answer(
    solver: SyntheticSolver, ch: synthetic_pb2.SyntheticChallenge
) -> synthetic_pb2.SyntheticAnswer:
    """Solve and build the answer, timed by this executor's clock; errors become answers."""
    out = synthetic_pb2.SyntheticAnswer(challenge_id=ch.challenge_id)
    out.started_ns = time.time_ns()
    problem = challenge_problem(ch)
    try:
        if problem is not None:
            raise SolveError(f"challenge refused: {problem}")
        found, backend = await solver.solve(ch)
        out.secrets.extend(found)
        out.backend = backend
    except SolveError as exc:
        out.error = str(exc)
    except Exception as exc:
        log.exception("synthetic_failed", challenge_id=ch.challenge_id)
        out.error = f"executor error: {exc!r}"
    out.finished_ns = time.time_ns()
    return out


def calibrate(seconds: float = 2.0) -> float:
    """Hashes per second of ``solve_cpu`` on this host (one core)."""
    salt = hashlib.sha256(b"calibrate").digest()
    size, elapsed = 100_000, 0.0
    while elapsed < seconds:
        t0 = time.perf_counter()
        solve_cpu(salt, 0, size, [b"\x00" * 32])
        elapsed = time.perf_counter() - t0
        if elapsed < seconds:
            size *= 2
    return size / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_services.executor.synthetic")
    parser.add_argument("--calibrate", action="store_true", help="print the CPU hash rate")
    args = parser.parse_args(argv)
    if args.calibrate:
        rate = calibrate()
        print(f"{rate / 1e6:.2f} M sha256/s on one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------------ light executor

Behaviour = Callable[
    [synthetic_pb2.SyntheticChallenge], Awaitable[synthetic_pb2.SyntheticAnswer | None]
]


class LightExecutor:
    """A minimal executor for tests and benchmarks: dials its miner over the real authenticated
    link, sends a manifest, heartbeats, and answers synthetic challenges with ``behaviour``
    (default: solve in process; None from a behaviour means never answer). No jobs, no Docker,
    so one process can simulate a thousand executors."""

    def __init__(
        self,
        signer: Signer,
        miner_address: str,
        miner_identity: str,
        executor_class: str = "cpu-small",
        behaviour: Behaviour | None = None,
        inline: bool = False,
    ) -> None:
        """``inline``: run the behaviour in the link's read loop instead of a task (for
        behaviours that answer at once, so the executor's timestamps bracket receipt and
        reply as a real executor's do)."""
        self._signer = signer
        self._inline = inline
        self._address = miner_address
        self._miner = miner_identity
        self._class = executor_class
        self._behaviour = behaviour or (lambda ch: answer(InProcessSolver(), ch))
        self.connected = asyncio.Event()
        self.executor_id = ""
        self.challenges: list[synthetic_pb2.SyntheticChallenge] = []
        self.challenged = asyncio.Event()

    async def run(self) -> None:
        outbox: asyncio.Queue[executor_pb2.ConnectRequest] = asyncio.Queue()
        outbox.put_nowait(
            executor_pb2.ConnectRequest(
                manifest=manifest_pb2.ExecutorManifest(
                    executor_class=self._class, executor_identity=str(self._signer.identity)
                )
            )
        )
        tasks: set[asyncio.Task[None]] = set()

        async def requests() -> AsyncIterator[executor_pb2.ConnectRequest]:
            while True:
                yield await outbox.get()

        async def heartbeat(interval: float) -> None:
            while True:
                await asyncio.sleep(interval)
                outbox.put_nowait(
                    executor_pb2.ConnectRequest(
                        heartbeat=executor_pb2.Heartbeat(timestamp_ns=time.time_ns())
                    )
                )

        async def reply(ch: synthetic_pb2.SyntheticChallenge) -> None:
            out = await self._behaviour(ch)
            if out is not None:
                outbox.put_nowait(executor_pb2.ConnectRequest(synthetic_answer=out))

        async with open_channel(self._address, signer=self._signer, callee=self._miner) as channel:
            call = executor_pb2_grpc.ExecutorLinkServiceStub(channel).Connect(requests())
            try:
                async for msg in call:
                    kind = msg.WhichOneof("payload")
                    if kind == "accepted":
                        self.executor_id = msg.accepted.executor_id
                        beat = asyncio.create_task(
                            heartbeat(msg.accepted.heartbeat_interval_s or 5.0)
                        )
                        tasks.add(beat)
                        self.connected.set()
                    elif kind == "synthetic_challenge":
                        self.challenges.append(msg.synthetic_challenge)
                        self.challenged.set()
                        if self._inline:
                            await reply(msg.synthetic_challenge)
                            continue
                        task = asyncio.create_task(reply(msg.synthetic_challenge))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            finally:
                for task in tasks:
                    task.cancel()
                call.cancel()
