"""`horde validator ...` and `horde miner ...` tell a service that did not answer in time (exit 2,
as for one that cannot be reached, and as `horde job` does) from one that refused (exit 1),
against stand-in admin services on a real gRPC server on port 0."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from horde.v1 import miner_pb2_grpc, validator_admin_pb2_grpc

from horde_services.core.identity import create_key_file

HORDE = str(Path(sys.executable).parent / "horde")


class Failing:
    """Fails every call with `code`."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    detail = ""

    def _fail(self, context: grpc.ServicerContext) -> Any:
        context.abort(self.code, self.detail or f"the stand-in says {self.code.name.lower()}")


class Validator(Failing, validator_admin_pb2_grpc.ValidatorAdminServiceServicer):
    def GetWeights(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fail(context)


class Miner(Failing, miner_pb2_grpc.MinerAdminServiceServicer):
    def ListRelayedJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fail(context)


@pytest.fixture
def served() -> Iterator[tuple[str, Validator, Miner]]:
    validator, miner = Validator(), Miner()  # type: ignore[abstract]
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    validator_admin_pb2_grpc.add_ValidatorAdminServiceServicer_to_server(validator, server)
    miner_pb2_grpc.add_MinerAdminServiceServicer_to_server(miner, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", validator, miner
    finally:
        server.stop(None)


STORAGE = "the service cannot use its database right now (database or disk is full): try again"


@pytest.mark.parametrize(
    ("code", "detail", "status", "words"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", 2, "no answer in time from the {} at"),
        (grpc.StatusCode.UNAVAILABLE, STORAGE, 2, "the {} at 127.0.0.1:"),
        (grpc.StatusCode.PERMISSION_DENIED, "", 1, "PERMISSION_DENIED: the stand-in says"),
    ],
)
def test_no_answer_in_time_is_2_and_a_refusal_1(
    served: tuple[str, Validator, Miner],
    tmp_path: Path,
    code: grpc.StatusCode,
    detail: str,
    status: int,
    words: str,
) -> None:
    """(A service whose database refuses answers UNAVAILABLE: exit 2 as well, and the words say
    it is unavailable, not that it cannot be reached.)"""
    address, validator, miner = served
    validator.code = miner.code = code
    validator.detail = miner.detail = detail
    key = tmp_path / "admin.json"
    create_key_file(key, "ed25519")
    identity = "sr25519:" + "11" * 32
    for service, argv in (
        ("validator", ["validator", "weights", "--validator", address]),
        ("miner", ["miner", "jobs", "--miner", address]),
    ):
        done = subprocess.run(
            [HORDE, *argv, f"--{service}-identity", identity, "--key", str(key)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == status, done.stderr
        assert words.format(service) in done.stderr, done.stderr
        if detail:
            assert "is unavailable: " in done.stderr and "cannot reach" not in done.stderr
        assert done.stdout == ""
