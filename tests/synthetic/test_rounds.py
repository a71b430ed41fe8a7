"""Synthetic rounds end to end: a validator, real miners, light executors over the real link."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from horde.v1 import manifest_pb2, miner_pb2, validator_admin_pb2
from synthetic_support import (
    FAST,
    SynthNet,
    honest,
    late,
    made_up,
    silent,
)

from horde_services.core.config import SyntheticClass
from horde_services.core.identity import Identity
from horde_services.core.metrics import REGISTRY
from horde_services.miner import service as miner_service


def _by_miner(
    resp: validator_admin_pb2.RunRoundResponse,
) -> dict[str, validator_admin_pb2.MinerRoundResult]:
    return {m.miner_hotkey: m for m in resp.miners}


async def _round(net: SynthNet, set_weights: bool = False) -> validator_admin_pb2.RunRoundResponse:
    stub, close = net.admin_stub()
    try:
        return await stub.RunRound(
            validator_admin_pb2.RunRoundRequest(set_weights=set_weights), timeout=60
        )
    finally:
        await close()  # type: ignore[misc]


async def _weights(net: SynthNet) -> validator_admin_pb2.GetWeightsResponse:
    stub, close = net.admin_stub()
    try:
        return await stub.GetWeights(validator_admin_pb2.GetWeightsRequest(), timeout=30)
    finally:
        await close()  # type: ignore[misc]


async def test_honest_miner_scores(synth: SynthNet) -> None:
    miner = await synth.add_miner([honest(), honest()])
    await synth.start_validator()
    resp = await _round(synth)
    result = _by_miner(resp)[miner.identity]
    assert result.error == ""
    assert [v.passed for v in result.verdicts] == [True, True], result.verdicts
    assert all(v.reason == "passed" for v in result.verdicts)
    # Each executor got exactly one challenge, bound to this round.
    for ex in miner.executors:
        assert [c.round for c in ex.challenges] == [resp.round]
    for v in result.verdicts:
        assert 0 < v.executor_duration_s <= v.duration_s < FAST.deadline_s
    weights = await _weights(synth)
    [scored] = [m for m in weights.miners if m.miner_hotkey == miner.identity]
    assert scored.score == pytest.approx(2 * FAST.weight)
    assert scored.weight == pytest.approx(1.0)
    assert "2 passed" in scored.reason and "1 round(s)" in scored.reason
    # The gauges follow the computed scores, before any weight setting.
    ss58 = Identity.parse(miner.identity).ss58
    assert REGISTRY.get_sample_value("horde_miner_score", {"miner": ss58}) == scored.score
    assert REGISTRY.get_sample_value("horde_miner_weight", {"miner": ss58}) == scored.weight


async def test_made_up_answers_score_zero(synth: SynthNet) -> None:
    cheat = await synth.add_miner([made_up(), made_up()])
    good = await synth.add_miner([honest()])
    await synth.start_validator()
    resp = await _round(synth)
    verdicts = _by_miner(resp)[cheat.identity].verdicts
    assert [v.passed for v in verdicts] == [False, False]
    assert all(v.reason.startswith("wrong answer") for v in verdicts), verdicts
    assert [v.passed for v in _by_miner(resp)[good.identity].verdicts] == [True]
    weights = {m.miner_hotkey: m for m in (await _weights(synth)).miners}
    assert weights[cheat.identity].score == 0
    assert weights[cheat.identity].weight == 0
    assert weights[good.identity].weight == pytest.approx(1.0)


async def test_overclaiming_miner_is_paid_only_for_what_answered(
    synth: SynthNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miner whose manifest claims two executors it does not have: they fail, the real one
    is paid."""
    real_manifest = miner_service.MinerServicer.GetManifest

    async def inflated(
        self: miner_service.MinerServicer,
        request: miner_pb2.GetManifestRequest,
        context: grpc.aio.ServicerContext,
    ) -> miner_pb2.GetManifestResponse:
        resp = await real_manifest(self, request, context)
        for n in range(2):
            resp.manifest.executors.append(
                manifest_pb2.ExecutorManifest(executor_id=f"ghost-{n}", executor_class="cpu-small")
            )
        return resp

    monkeypatch.setattr(miner_service.MinerServicer, "GetManifest", inflated)
    miner = await synth.add_miner([honest()])
    await synth.start_validator()
    resp = await _round(synth)
    verdicts = {v.executor_id: v for v in _by_miner(resp)[miner.identity].verdicts}
    assert len(verdicts) == 3
    assert verdicts[miner.executors[0].executor_id].passed
    for ghost in ("ghost-0", "ghost-1"):
        assert not verdicts[ghost].passed
        assert "not connected" in verdicts[ghost].reason
    [scored] = [m for m in (await _weights(synth)).miners if m.miner_hotkey == miner.identity]
    assert scored.score == pytest.approx(FAST.weight)  # one executor, not three
    assert "1 passed" in scored.reason and "2 failed" in scored.reason


async def test_late_answers_score_zero(synth: SynthNet) -> None:
    quick = SyntheticClass(range_size=500, digests=2, deadline_s=0.5, weight=1.0)
    miner = await synth.add_miner([late(0.3), honest()])
    await synth.start_validator(classes={"cpu-small": quick}, grace_s=3.0)
    resp = await _round(synth)
    slow_id = miner.executors[0].executor_id
    verdicts = {v.executor_id: v for v in _by_miner(resp)[miner.identity].verdicts}
    assert not verdicts[slow_id].passed
    assert verdicts[slow_id].reason.startswith("late:"), verdicts[slow_id].reason
    assert verdicts[slow_id].duration_s > quick.deadline_s
    assert verdicts[miner.executors[1].executor_id].passed


async def test_weights_are_normalised_and_reach_the_chain(synth: SynthNet) -> None:
    big = await synth.add_miner([honest(), honest()])
    small = await synth.add_miner([honest()])
    cheat = await synth.add_miner([made_up()])
    await synth.start_validator()
    resp = await _round(synth, set_weights=True)
    assert resp.weights_reference.startswith("local-"), resp.weights_error
    entries = synth.ledger.ledger_entries()
    assert [e["id"] for e in entries] == [resp.weights_reference]
    by_hotkey = entries[0]["by_hotkey"]
    assert by_hotkey == pytest.approx(
        {big.signer.identity.ss58: 2 / 3, small.signer.identity.ss58: 1 / 3}
    )
    assert cheat.signer.identity.ss58 not in by_hotkey
    assert sum(by_hotkey.values()) == pytest.approx(1.0)
    weights = await _weights(synth)
    assert weights.last_weights_reference == resp.weights_reference
    assert sum(m.weight for m in weights.miners) == pytest.approx(1.0)
    assert weights.miners[0].miner_hotkey == big.identity  # highest weight first


async def test_no_positive_score_sets_no_weights(synth: SynthNet) -> None:
    await synth.add_miner([made_up()])
    await synth.start_validator()
    resp = await _round(synth, set_weights=True)
    assert resp.weights_reference == ""
    assert "no positive weight" in resp.weights_error
    assert synth.ledger.ledger_entries() == []


async def test_disconnecting_miner_does_not_stall_the_round(synth: SynthNet) -> None:
    """A miner that goes away mid-round fails its executors at once; the others still pass and
    the round ends long before the class deadline."""
    slow = SyntheticClass(range_size=2_000, digests=4, deadline_s=60.0, weight=1.0)
    release = asyncio.Event()
    good = await synth.add_miner([honest()])
    gone = await synth.add_miner([silent(release), silent(release)])
    await synth.start_validator(classes={"cpu-small": slow})
    started = time.monotonic()
    round_task = asyncio.create_task(_round(synth))
    async with asyncio.timeout(30):
        for ex in gone.executors:
            await ex.challenged.wait()
    await synth.stop_miner(gone)
    resp = await round_task
    took = time.monotonic() - started
    release.set()
    assert took < slow.deadline_s / 2, took
    verdicts = _by_miner(resp)[gone.identity].verdicts
    assert [v.passed for v in verdicts] == [False, False]
    assert all(v.reason.startswith("missing") for v in verdicts), verdicts
    assert [v.passed for v in _by_miner(resp)[good.identity].verdicts] == [True]


async def test_stalled_miner_is_cut_off_at_its_deadline(synth: SynthNet) -> None:
    """A miner that keeps its stream open but never answers costs the round its deadline plus
    grace, no more."""
    short = SyntheticClass(range_size=500, digests=2, deadline_s=1.0, weight=1.0)
    release = asyncio.Event()
    stalled = await synth.add_miner([silent(release)])
    await synth.start_validator(classes={"cpu-small": short}, grace_s=0.5)
    started = time.monotonic()
    resp = await _round(synth)
    took = time.monotonic() - started
    release.set()
    assert took < short.deadline_s + 0.5 + 2.0, took
    [v] = _by_miner(resp)[stalled.identity].verdicts
    assert not v.passed and v.reason.startswith("missing")


async def test_unreachable_and_unknown_class(synth: SynthNet) -> None:
    odd = await synth.add_miner([honest()], executor_class="gpu-unknown")
    await synth.start_validator(extra_miners={})
    # A registered miner whose endpoint does not answer.
    from horde_services.core.chain import Neuron, write_roster
    from horde_services.core.identity import create_key_file

    ghost = create_key_file(synth.root / "ghost.json", "hotkey")
    synth.neurons.append(
        Neuron(uid=99, hotkey=ghost.identity.ss58, stake=1.0, endpoint="127.0.0.1:9")
    )
    write_roster(synth.roster, synth.neurons)
    resp = await _round(synth)
    results = _by_miner(resp)
    # The operator reads why: the gRPC status of the manifest call.
    assert results[str(ghost.identity)].error.startswith("manifest unavailable: UNAVAILABLE: ")
    [v] = results[odd.identity].verdicts
    assert not v.passed and "not scored" in v.reason
    # Both show in the weights, each with the reason its round scored nothing.
    await _round(synth)
    scored = {m.miner_hotkey: m for m in (await _weights(synth)).miners}
    assert scored[str(ghost.identity)].score == 0
    assert "unreachable in 2 round(s) over 2 round(s)" in scored[str(ghost.identity)].reason
    assert "0 failed, 2 not challenged (busy or unscored)" in scored[odd.identity].reason


async def test_admin_rpc_needs_an_admin(synth: SynthNet) -> None:
    await synth.start_validator()
    stub, close = synth.admin_stub(synth.client)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetWeights(validator_admin_pb2.GetWeightsRequest(), timeout=10)
    finally:
        await close()  # type: ignore[misc]
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin" in (info.value.details() or "")


async def test_rounds_are_numbered_and_recorded(synth: SynthNet) -> None:
    await synth.add_miner([honest()])
    await synth.start_validator()
    first = await _round(synth)
    second = await _round(synth)
    assert second.round == first.round + 1
    weights = await _weights(synth)
    assert weights.rounds == 2
    assert weights.miners[0].score == pytest.approx(FAST.weight)  # average per round
