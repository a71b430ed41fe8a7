"""`horde stream` as a user runs it, against a gateway in front of the fake validator and proxy."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from streaming_support import WHITELIST, Behaviour, Harness, answer

from services.core.app import ServiceApp
from services.core.identity import write_key_file

HORDE = str(Path(sys.executable).with_name("horde"))


async def horde(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        HORDE,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def target(h: Harness, app: ServiceApp, tmp_path: Path) -> list[str]:
    key = tmp_path / "client.json"
    if not key.exists():
        write_key_file(key, h.client)
    return [
        "--gateway",
        f"127.0.0.1:{app.port}",
        "--gateway-identity",
        app.identity,
        "--key",
        str(key),
        "--image",
        WHITELIST,
    ]


async def test_each_line_is_one_request_and_saved_receipts_verify(
    harness: Harness, tmp_path: Path
) -> None:
    app = await harness.start_gateway()
    lines = [b"hello world", b"", b"caf\xc3\xa9 \t tabs  ", b"x" * 1024]
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        str(requests),
        "--receipts",
        str(receipts),
    )
    assert code == 0, err
    assert out.splitlines() == [answer(line).decode(errors="replace") for line in lines]
    assert "4 responses, receipts verified" in err and "session closed" in err
    code, out, err = await horde("receipts", "verify", str(receipts))
    assert code == 0, out + err
    assert "4 valid, 0 invalid" in err
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 4


async def test_json_output(harness: Harness, tmp_path: Path) -> None:
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests), "--json"
    )
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["seq"] for d in docs] == [1, 2]
    assert [d["response"] for d in docs] == ["echo:eno", "echo:owt"]
    assert all(d["http_status"] == 200 and d["receipt"]["version"] == 1 for d in docs)


async def test_a_tampered_response_fails_the_command(harness: Harness, tmp_path: Path) -> None:
    harness.fake_validator.next_behaviour = Behaviour(tamper="output", tamper_seq=2)
    app = await harness.start_gateway()
    requests = tmp_path / "requests.txt"
    requests.write_text("one\ntwo\nthree\n")
    code, out, err = await horde(
        "stream", *target(harness, app, tmp_path), "--input", str(requests)
    )
    assert code == 1
    assert out.splitlines() == ["echo:eno"]
    assert "receipt 2: output hash does not match" in err


async def test_a_window_keeps_requests_in_flight_and_answers_stay_in_order(
    harness: Harness, tmp_path: Path
) -> None:
    # The fake job answers only once 4 requests are waiting: only a pipelined client gets through.
    harness.fake_validator.next_behaviour = Behaviour(answer_in_batches_of=4)
    app = await harness.start_gateway()
    lines = [f"request {i}".encode() for i in range(12)]  # three batches of 4
    requests = tmp_path / "requests.txt"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    receipts = tmp_path / "receipts.jsonl"
    code, out, err = await horde(
        "stream",
        *target(harness, app, tmp_path),
        "--input",
        str(requests),
        "--window",
        "4",
        "--receipts",
        str(receipts),
    )
    assert code == 0, err
    assert out.splitlines() == [answer(line).decode() for line in lines]
    assert "12 responses, receipts verified" in err
    (job,) = harness.fake_proxy.jobs.values()
    assert job.served == 12 and job.most_held == 4
    code, _, err = await horde("receipts", "verify", str(receipts))
    assert code == 0 and "12 valid, 0 invalid" in err


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, err = await horde("stream", "--image", WHITELIST)
    assert code == 2 and "--dev DIR" in err
    code, _, err = await horde("stream", "--dev", str(tmp_path), "--image", WHITELIST)
    assert code == 2 and "horde dev up" in err
    code, _, err = await horde("stream", "--window", "0", "--image", WHITELIST)
    assert code == 2 and "--window must be at least 1" in err
