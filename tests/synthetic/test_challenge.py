"""Challenges, answers and solvers: binding, checking, the image's solver and backend choice."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
from horde.v1 import synthetic_pb2

from horde_services.core.config import SyntheticClass
from horde_services.executor.sandbox import SandboxLimits
from horde_services.executor.synthetic import (
    DockerSolver,
    InProcessSolver,
    answer,
    challenge_problem,
    solve_cpu,
)
from horde_services.validator.synthetic import build_challenge, check_answer, make_salt

SOLVER = Path(__file__).resolve().parents[2] / "deploy" / "images" / "synthetic" / "solver.py"
SMALL = SyntheticClass(range_size=3_000, digests=5, deadline_s=5.0)


def _challenge(
    miner: str = "sr25519:" + "11" * 32, round_: int = 7, seed: int | None = 1
) -> synthetic_pb2.SyntheticChallenge:
    return build_challenge(
        validator="sr25519:" + "00" * 32,
        miner=miner,
        round_=round_,
        executor_class="cpu-small",
        difficulty=SMALL,
        deadline_ns=0,
        rng=random.Random(seed) if seed is not None else None,
    )


def _load_solver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("horde_synthetic_solver", SOLVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_a_solved_challenge_checks() -> None:
    ch = _challenge()
    assert len(ch.digests) == SMALL.digests
    assert ch.range_end - ch.range_start == SMALL.range_size
    reply = await answer(InProcessSolver(), ch)
    assert reply.error == ""
    assert check_answer(ch, reply) is None
    assert reply.started_ns <= reply.finished_ns


async def test_answers_for_another_miner_or_round_are_worthless() -> None:
    mine = _challenge(seed=None)
    other_miner = _challenge(miner="sr25519:" + "22" * 32, seed=None)
    other_round = _challenge(round_=8, seed=None)
    for other in (other_miner, other_round):
        stolen = await answer(InProcessSolver(), other)
        stolen.challenge_id = mine.challenge_id
        assert check_answer(mine, stolen) is not None
    # The salt itself differs per miner, round and nonce.
    salts = {
        make_salt("v", "m1", 1, b"n"),
        make_salt("v", "m2", 1, b"n"),
        make_salt("v", "m1", 2, b"n"),
        make_salt("v", "m1", 1, b"o"),
    }
    assert len(salts) == 4


async def test_check_answer_reasons() -> None:
    ch = _challenge()
    good = await answer(InProcessSolver(), ch)

    def variant(**changes: object) -> synthetic_pb2.SyntheticAnswer:
        out = synthetic_pb2.SyntheticAnswer()
        out.CopyFrom(good)
        for key, value in changes.items():
            if key == "secrets":
                del out.secrets[:]
                out.secrets.extend(value)  # type: ignore[arg-type]
            else:
                setattr(out, key, value)
        return out

    assert "secrets for" in (check_answer(ch, variant(secrets=list(good.secrets)[:-1])) or "")
    outside = [ch.range_end, *list(good.secrets)[1:]]
    assert "outside the range" in (check_answer(ch, variant(secrets=outside)) or "")
    swapped = list(reversed(good.secrets))
    assert "does not match" in (check_answer(ch, variant(secrets=swapped)) or "")
    assert "another challenge" in (check_answer(ch, variant(challenge_id="x")) or "")
    assert "executor error: boom" == check_answer(ch, variant(error="boom"))


async def test_malformed_challenges_are_refused() -> None:
    ch = _challenge()
    ch.range_end = ch.range_start
    reply = await answer(InProcessSolver(), ch)
    assert reply.error.startswith("challenge refused")
    assert challenge_problem(synthetic_pb2.SyntheticChallenge(salt=b"x")) == "salt must be 32 bytes"


def test_image_solver_matches_the_executor_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    solver = _load_solver()
    ch = _challenge()
    digests = list(ch.digests)
    expected = solve_cpu(ch.salt, ch.range_start, ch.range_end, digests)
    assert solver.solve_cpu(ch.salt, ch.range_start, ch.range_end, digests) == expected
    assert solver.solve_cpu(ch.salt, ch.range_start, ch.range_end, digests, workers=2) == expected
    env = {
        "HORDE_CHALLENGE": json.dumps(
            {
                "salt": ch.salt.hex(),
                "range_start": ch.range_start,
                "range_end": ch.range_end,
                "digests": [d.hex() for d in digests],
                "backend": "cpu",
            }
        )
    }
    assert solver.main(env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["secrets"] == expected and doc["backend"] == "cpu"
    assert solver.main({"HORDE_CHALLENGE": "{}"}) == 2


def test_gpu_backend_selection_and_fallback() -> None:
    solver = _load_solver()
    calls: list[tuple[bytes, int, int]] = []

    def fake_cuda(salt: bytes, start: int, end: int, digests: Sequence[bytes]) -> list[int | None]:
        calls.append((salt, start, end))
        return [start] * len(digests)

    name, solve, why = solver.choose_backend("auto", 1, cuda_loader=lambda: fake_cuda)
    assert (name, why) == ("cuda", "")
    assert solve(b"s" * 32, 5, 10, [b"d" * 32]) == [5] and calls

    def no_cuda() -> object:
        raise ModuleNotFoundError("No module named 'cupy'")

    name, solve, why = solver.choose_backend("auto", 1, cuda_loader=no_cuda)
    assert name == "cpu" and "cupy" in why
    salt = hashlib.sha256(b"x").digest()
    digest = hashlib.sha256(salt + (42).to_bytes(8, "big")).digest()
    assert solve(salt, 0, 100, [digest]) == [42]
    with pytest.raises(ModuleNotFoundError):
        solver.choose_backend("cuda", 1, cuda_loader=no_cuda)
    name, _, why = solver.choose_backend("cpu", 1, cuda_loader=lambda: fake_cuda)
    assert (name, why) == ("cpu", "")
    # The CUDA kernel source is there for GPU images (compiled by CuPy on a GPU host).
    assert "__global__ void search" in solver.CUDA_SOURCE


def test_docker_solver_asks_for_gpus_only_with_gpus(tmp_path: Path) -> None:
    limits = SandboxLimits(nano_cpus=2_000_000_000)
    ch = _challenge()
    ch.deadline_ns = 10 * 10**9
    cpu = DockerSolver(None, limits, tmp_path, gpus=0).container_run(ch, 0)  # type: ignore[arg-type]
    gpu = DockerSolver(None, limits, tmp_path, gpus=-1).container_run(ch, 0)  # type: ignore[arg-type]
    assert cpu.gpus == 0 and json.loads(cpu.env["HORDE_CHALLENGE"])["backend"] == "cpu"
    assert gpu.gpus == -1 and json.loads(gpu.env["HORDE_CHALLENGE"])["backend"] == "auto"
    assert json.loads(cpu.env["HORDE_CHALLENGE"])["workers"] == 2
    assert cpu.timeout_s == pytest.approx(11.0)
    assert cpu.image == "horde/synthetic:latest"
