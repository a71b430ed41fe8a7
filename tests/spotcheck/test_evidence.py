"""Evidence records verify offline from signatures alone; any altered piece fails with a reason.
Comparators; the weight cut a proven mismatch applies through the scorer."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from evidence_support import make_record

from horde_services.core.chain import Neuron
from horde_services.core.config import ComparatorSettings, SyntheticSettings
from horde_services.core.db import open_database, synthetic_results, synthetic_rounds
from horde_services.core.identity import HotkeySigner, Identity
from horde_services.validator.comparators import (
    NumericComparator,
    Sha256Comparator,
    for_image,
    from_name,
)
from horde_services.validator.evidence import EvidenceError, load_records, verify_record
from horde_services.validator.scoring import Scorer
from horde_services.validator.spotcheck import SpotStore
from horde_services.validator.synthetic import SyntheticStore

HORDE = str(Path(sys.executable).with_name("horde"))


def test_a_genuine_record_verifies() -> None:
    ok = verify_record(make_record())
    assert ok.seq == 7 and ok.comparator == "sha256"
    assert "differs" in ok.detail


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _flip(text: str) -> str:
    """Flip one byte of a base64 or hex field."""
    try:
        raw = bytearray(base64.b64decode(text, validate=True))
        raw[len(raw) // 2] ^= 1
        return _b64(bytes(raw))
    except ValueError:
        return text[:-1] + ("0" if text[-1] != "0" else "1")


FORGERIES: list[tuple[str, Any, str]] = [
    ("request", lambda r: r.update(request=_b64(b"another request")), "input_sha256"),
    ("claimed output", lambda r: r.update(claimed_output=_b64(b"x")), "output_sha256"),
    (
        "trusted output equal to the claim",
        lambda r: r.update(trusted_output=r["claimed_output"]),
        "no mismatch",
    ),
    ("trusted output", lambda r: r.update(trusted_output=_b64(b"x")), "trusted receipt"),
    (
        "receipt signature",
        lambda r: r["receipt"].update(signature=_flip(r["receipt"]["signature"])),
        "signature",
    ),
    ("receipt output hash", lambda r: r["receipt"].update(output_sha256="00" * 32), "signature"),
    ("receipt seq", lambda r: r["receipt"].update(seq=8), "signature"),
    ("receipt key", lambda r: r["receipt"].update(job_public_key="11" * 32), "signature"),
    (
        "certificate payload",
        lambda r: r["certificate"].update(payload=_flip(r["certificate"]["payload"])),
        "certificate",
    ),
    (
        "certificate signature",
        lambda r: r["certificate"].update(
            miner_signature=_flip(r["certificate"]["miner_signature"])
        ),
        "signature does not verify",
    ),
    (
        "miner named",
        lambda r: r.update(miner_hotkey=str(HotkeySigner.generate().identity)),
        "signed for miner",
    ),
    ("seq", lambda r: r.update(seq=3), "seq"),
    ("image digest", lambda r: r.update(image_digest="sha256:" + "cd" * 32), "image_digest"),
    ("validator", lambda r: r.update(validator_hotkey="sr25519:" + "00" * 32), "validator"),
    ("job", lambda r: r.update(job_uuid="00000000-0000-0000-0000-000000000000"), "job"),
    ("comparator", lambda r: r.update(comparator="anything"), "comparator"),
    (
        "trusted certificate",
        lambda r: r["trusted"]["certificate"].update(
            miner_signature=_flip(r["trusted"]["certificate"]["miner_signature"])
        ),
        "trusted.certificate",
    ),
    ("kind", lambda r: r.update(kind="something else"), "not a"),
]


@pytest.mark.parametrize(("what", "forge", "reason"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_a_forged_piece_fails_with_a_reason(what: str, forge: Any, reason: str) -> None:
    record = copy.deepcopy(make_record())
    forge(record)
    with pytest.raises(EvidenceError, match=reason):
        verify_record(record)


def test_the_trusted_part_is_required() -> None:
    """Without the trusted instance's certificate and receipt, trusted_output would be any bytes
    the record's author wrote: such a record proves nothing."""
    record = make_record()
    del record["trusted"]
    with pytest.raises(EvidenceError, match="trusted: missing"):
        verify_record(record)


def test_the_trusted_part_must_come_from_another_miner_for_the_same_validator() -> None:
    with pytest.raises(EvidenceError, match="cannot be its own trusted instance"):
        verify_record(make_record(trusted_by_the_miner=True))
    with pytest.raises(EvidenceError, match="issued for another validator"):
        verify_record(make_record(trusted_for_another_validator=True))


def test_the_verdict_names_the_trusted_instance() -> None:
    record = make_record()
    assert verify_record(record).trusted_miner == record["trusted"]["miner_hotkey"]


def test_cli_verifies_a_file_and_names_the_bad_record(tmp_path: Path) -> None:
    good, bad = make_record(), make_record()
    bad["claimed_output"] = _b64(b"tampered")
    path = tmp_path / "evidence.jsonl"
    path.write_text(json.dumps(good) + "\n")
    ok = subprocess.run([HORDE, "evidence", "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 valid, 0 invalid" in ok.stderr
    path.write_text(json.dumps({"evidence": [good, bad]}))
    fail = subprocess.run(
        [HORDE, "evidence", "verify", "--json", str(path)], capture_output=True, text=True
    )
    assert fail.returncode == 1
    doc = json.loads(fail.stdout)
    assert doc["valid"] == 1
    assert "output_sha256" in doc["records"][1]["reason"]
    assert len(load_records(path.read_text())) == 2


def test_comparators() -> None:
    assert Sha256Comparator().compare(b"a", b"a").matched
    assert not Sha256Comparator().compare(b"a", b"b").matched
    num = NumericComparator(rel_tol=1e-3, abs_tol=0)
    assert num.compare(b'{"y": [1.0, 2.0001], "k": "v"}', b'{"k": "v", "y": [1.0, 2.0]}').matched
    assert not num.compare(b'{"y": [1.0, 2.1]}', b'{"y": [1.0, 2.0]}').matched
    assert not num.compare(b'{"y": 1, "k": "v"}', b'{"y": 1, "k": "w"}').matched
    assert num.compare(b"loss 0.50001 step 3", b"loss 0.5 step 3").matched
    assert not num.compare(b"loss 0.6 step 3", b"loss 0.5 step 3").matched
    assert from_name(num.name) == num
    settings = {"horde/model": ComparatorSettings(kind="numeric", rel_tol=0.01)}
    assert isinstance(for_image(settings, "horde/model:latest", "sha256:1"), NumericComparator)
    assert isinstance(for_image(settings, "horde/other:latest", "sha256:1"), Sha256Comparator)


def test_numeric_evidence_needs_a_real_difference() -> None:
    name = NumericComparator(rel_tol=1e-3).name
    assert verify_record(make_record(b"[1.0, 2.5]", b"[1.0, 2.0]", name)).comparator == name
    with pytest.raises(EvidenceError, match="no mismatch"):
        verify_record(make_record(b"[1.0, 2.0000001]", b"[1.0, 2.0]", name))


class _Chain:
    def __init__(self, neurons: list[Neuron]) -> None:
        self._neurons = neurons

    async def neurons(self) -> list[Neuron]:
        return self._neurons


async def test_a_sanction_cuts_the_weight_for_its_period(tmp_path: Path) -> None:
    engine = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'v.db'}")
    try:
        good, bad = HotkeySigner.generate().identity, HotkeySigner.generate().identity
        now = time.time_ns()
        async with engine.begin() as conn:
            await conn.execute(
                synthetic_rounds.insert().values(
                    round=1, started_ns=now, finished_ns=now, miners=2, executors=2
                )
            )
            for miner in (good, bad):
                await conn.execute(
                    synthetic_results.insert().values(
                        round=1,
                        miner_hotkey=str(miner),
                        executor_id="e",
                        executor_class="cpu-small",
                        challenge_id="c",
                        passed=True,
                        reason="passed",
                        duration_s=1.0,
                        executor_duration_s=1.0,
                        created_ns=now,
                    )
                )
        chain = _Chain([Neuron(uid=1, hotkey=good.ss58), Neuron(uid=2, hotkey=bad.ss58)])
        scorer = Scorer(SyntheticStore(engine), chain, SyntheticSettings())  # type: ignore[arg-type]
        before = {s.miner: s for s in (await scorer.scores()).miners}
        assert before[str(bad)].weight == pytest.approx(0.5)
        store = SpotStore(engine)
        await store.sanction(str(bad), "spotcheck_mismatch", 0.0, "spot check 1: wrong", 60, 1)
        after = {s.miner: s for s in (await scorer.scores()).miners}
        assert after[str(bad)].weight == 0.0 and after[str(bad)].score == 0.0
        assert "weight x0 until" in after[str(bad)].reason
        assert "spot check 1: wrong" in after[str(bad)].reason
        assert after[str(good)].weight == pytest.approx(1.0)
        # After the period the sanction no longer applies.
        later = {s.miner: s for s in (await scorer.scores(now_ns=now + 61 * 10**9)).miners}
        assert later[str(bad)].factor == 1.0
        async with engine.connect() as conn:
            assert (
                await conn.execute(sa.text("select count(*) from miner_sanctions"))
            ).scalar() == 1
    finally:
        await engine.dispose()


def test_cli_pins_the_trusted_instance(tmp_path: Path) -> None:
    record = make_record()
    trusted = record["trusted"]["miner_hotkey"]
    path = tmp_path / "evidence.jsonl"
    path.write_text(json.dumps(record) + "\n")

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [HORDE, "evidence", "verify", str(path), *extra]
        return subprocess.run(argv, capture_output=True, text=True)

    anyone = verify()
    assert anyone.returncode == 0 and f"(trusted instance {trusted})" in anyone.stdout
    ss58 = Identity.parse(trusted).ss58
    for pin in (trusted, ss58):
        assert verify("--trusted-miner", pin).returncode == 0, pin
    other = str(HotkeySigner.generate().identity)
    refused = verify("--trusted-miner", other)
    assert refused.returncode == 1
    assert f"the trusted instance {trusted} is not one of --trusted-miner" in refused.stdout
    bad = verify("--trusted-miner", "nonsense")
    assert bad.returncode == 2 and "--trusted-miner 'nonsense'" in bad.stderr
