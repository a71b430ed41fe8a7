"""Chain adapters: the local roster and BittensorChain against an in-memory substrate."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bittensor as bt
import pytest

from horde_services.core.chain import (
    BittensorChain,
    ChainAdapter,
    ChainAdapterError,
    LocalRoster,
    Neuron,
    RosterError,
    normalise_weights,
    parse_roster,
    write_roster,
)
from horde_services.core.identity import HotkeySigner, Identity

VALIDATOR = HotkeySigner.from_uri("//Alice")
MINER_A = HotkeySigner.from_uri("//Bob")
MINER_B = HotkeySigner.from_uri("//Charlie")
ED_MINER = HotkeySigner.from_uri("//Dave", "ed25519")


def roster_neurons() -> list[Neuron]:
    return [
        Neuron(0, VALIDATOR.ss58, "sr25519", 1000.0, True, "127.0.0.1:7000"),
        Neuron(1, MINER_A.ss58, "sr25519", 10.0, False, "miner-a.local:7001"),
        Neuron(2, ED_MINER.ss58, "ed25519", 0, False, None),
    ]


@pytest.fixture
def roster_path(tmp_path: Path) -> Path:
    return write_roster(tmp_path / "roster.toml", roster_neurons())


def _edit(path: Path, old: str | None, new: str) -> None:
    """Edit a file in place (same inode), as an operator's editor might."""
    text = path.read_text()
    path.write_text(new if old is None else text.replace(old, new))


# ---- LocalRoster -------------------------------------------------------------------------


def test_a_miner_without_an_endpoint_is_warned_of(
    roster_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A roster miner with no endpoint is sent no job ("no miner offers an executor of class"):
    loading the roster says which, and what it lacks."""
    from log_support import record_log

    from horde_services.core import chain

    warnings = record_log(monkeypatch, chain, ("warning",))
    LocalRoster(roster_path).reload()
    ((_, event, fields),) = warnings
    assert event == "roster.miners_without_endpoint"
    assert fields["uids"] == [2]  # the ed25519 miner; the validator (uid 0) needs none
    assert "endpoint" in fields["hint"]


async def test_roster_load(roster_path: Path) -> None:
    roster = LocalRoster(roster_path)
    assert isinstance(roster, ChainAdapter)
    neurons = await roster.neurons()
    assert neurons == roster_neurons()
    found = await roster.neuron(ED_MINER.ss58)
    assert found is not None and found.identity == ED_MINER.identity
    assert (await roster.neuron(MINER_B.ss58)) is None
    assert (await roster.neuron("not-an-address")) is None
    await roster.close()


def test_roster_text_is_readable_toml(roster_path: Path) -> None:
    text = roster_path.read_text()
    assert "[[neuron]]" in text and 'key_type = "ed25519"' in text
    # The third neuron has no endpoint: TOML has no null, so the key is left out.
    assert text.count("endpoint =") == 2
    hand_written = f"""
        [[neuron]]
        uid = 5
        hotkey = "{MINER_B.ss58}"
        stake = 3
        endpoint = "[::1]:9000"
    """
    (neuron,) = parse_roster(hand_written)
    assert neuron == Neuron(5, MINER_B.ss58, "sr25519", 3.0, False, "[::1]:9000")


async def test_roster_reloads_after_edit(roster_path: Path) -> None:
    roster = LocalRoster(roster_path)
    assert len(await roster.neurons()) == 3
    newcomer = Neuron(7, MINER_B.ss58, stake=5.0, endpoint="10.0.0.7:7007")
    write_roster(roster_path, [*roster_neurons(), newcomer])
    assert (await roster.neuron(MINER_B.ss58)) == newcomer
    assert len(await roster.neurons()) == 4

    # In-place edit by hand (same inode) is picked up too.
    _edit(roster_path, "stake = 5.0", "stake = 6.5")
    updated = await roster.neuron(MINER_B.ss58)
    assert updated is not None and updated.stake == 6.5


async def test_roster_bad_edit_keeps_last_good(roster_path: Path) -> None:
    roster = LocalRoster(roster_path)
    before = await roster.neurons()
    _edit(roster_path, None, "[[neuron]]\nuid = 'zero'\n")
    assert await roster.neurons() == before  # a typo must not empty a running network
    assert roster.reload(force=True) == before
    with pytest.raises(RosterError, match="field 'uid'"):
        LocalRoster(roster_path).reload()  # a fresh roster has nothing to fall back on
    write_roster(roster_path, before[:1])
    assert len(await roster.neurons()) == 1  # and a fixed file is picked up again


async def test_roster_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="does not exist") as caught:
        await LocalRoster(tmp_path / "none.toml").neurons()
    assert "none.toml" in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('uid = -1\nhotkey = "{hk}"', r"#1 \(uid -1\): field 'uid' must be an integer in 0..65535"),
        ('uid = true\nhotkey = "{hk}"', r"field 'uid'"),
        ("uid = 3", r"#1 \(uid 3\): field 'hotkey' must be an SS58"),
        ('uid = 3\nhotkey = "5notreal"', r"\(uid 3\): field 'hotkey' is invalid"),
        ('uid = 3\nhotkey = "{hk}"\nkey_type = "ecdsa"', r"\(uid 3\): field 'key_type'"),
        ('uid = 3\nhotkey = "{hk}"\nstake = "lots"', r"\(uid 3\): field 'stake' must be a number"),
        ('uid = 3\nhotkey = "{hk}"\nstake = -2', r"field 'stake' must be finite and >= 0"),
        ('uid = 3\nhotkey = "{hk}"\nstake = nan', r"field 'stake' must be finite"),
        ('uid = 3\nhotkey = "{hk}"\nvalidator_permit = 1', r"field 'validator_permit'"),
        ('uid = 3\nhotkey = "{hk}"\nendpoint = "nohost"', r"\(uid 3\): field 'endpoint'"),
        ('uid = 3\nhotkey = "{hk}"\nendpoint = "h:70000"', r"field 'endpoint'.*outside"),
        ('uid = 3\nhotkey = "{hk}"\nendpoint = "::1:80"', r"field 'endpoint'.*brackets"),
        ('uid = 3\nhotkey = "{hk}"\nvalidator_permits = true', r"'validator_permits' is not a"),
    ],
)
def test_bad_roster_errors_name_entry_and_field(tmp_path: Path, entry: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[neuron]]\n" + entry.format(hk=MINER_A.ss58) + "\n")
    with pytest.raises(RosterError, match=expected) as caught:
        LocalRoster(path).reload()
    assert str(path) in str(caught.value)


def test_roster_document_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="not valid TOML"):
        parse_roster("[[neuron]\n", tmp_path / "r.toml")
    with pytest.raises(RosterError, match="unknown top-level key 'neurons'"):
        parse_roster("[[neurons]]\nuid = 1\n")
    dup_uid = f'[[neuron]]\nuid = 1\nhotkey = "{MINER_A.ss58}"\n'
    dup_uid += f'[[neuron]]\nuid = 1\nhotkey = "{MINER_B.ss58}"\n'
    with pytest.raises(
        RosterError, match=r"#2: field 'uid' 1 is already used by \[\[neuron\]\] #1"
    ):
        parse_roster(dup_uid)
    dup_hk = f'[[neuron]]\nuid = 1\nhotkey = "{MINER_A.ss58}"\n'
    dup_hk += f'[[neuron]]\nuid = 2\nhotkey = "{MINER_A.ss58}"\n'
    with pytest.raises(RosterError, match=r"#2 \(uid 2\): field 'hotkey'.*already registered"):
        parse_roster(dup_hk)
    polkadot_format = "15oF4uVJwmo4TdGW7VfQxNLavjCXviqxT9S1MgbjMNHr6Sp5"  # //Alice, prefix 0
    with pytest.raises(RosterError, match="not a format-42"):
        parse_roster(f'[[neuron]]\nuid = 1\nhotkey = "{polkadot_format}"\n')
    assert parse_roster("") == []


def test_write_roster_refuses_invalid(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="endpoint"):
        write_roster(tmp_path / "r.toml", [Neuron(0, MINER_A.ss58, endpoint="bad endpoint")])
    assert not (tmp_path / "r.toml").exists()


async def test_roster_set_weights_ledger(roster_path: Path) -> None:
    roster = LocalRoster(roster_path, validator=VALIDATOR.identity)
    assert roster.ledger_path == roster_path.with_name("roster.toml.weights.jsonl")
    first = await roster.set_weights({MINER_A.ss58: 3.0, ED_MINER.ss58: 1.0, MINER_B.ss58: 9.0})
    second = await roster.set_weights({MINER_A.ss58: 1.0})
    assert first != second and first.startswith("local-")

    lines = roster.ledger_path.read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["id"] == first
    assert entry["validator"] == str(VALIDATOR.identity)
    assert entry["by_uid"] == {"1": 0.75, "2": 0.25}
    assert entry["by_hotkey"] == {MINER_A.ss58: 0.75, ED_MINER.ss58: 0.25}
    assert entry["dropped"] == [MINER_B.ss58]  # not registered
    assert "T" in entry["timestamp"]
    assert roster.ledger_entries()[1]["by_uid"] == {"1": 1.0}

    with pytest.raises(ValueError, match="no positive weight"):
        await roster.set_weights({MINER_B.ss58: 1.0})
    with pytest.raises(ValueError, match=f"weight for {MINER_A.ss58}"):
        await roster.set_weights({MINER_A.ss58: -1.0})
    assert len(roster.ledger_entries()) == 2


def test_normalise_weights_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        normalise_weights({MINER_A.ss58: float("inf")}, roster_neurons())


# ---- BittensorChain against an in-memory substrate ---------------------------------------


def _ip_int(address: str) -> int:
    return int(ipaddress.ip_address(address))


class FakeSubstrate:
    """Implements the part of ``bittensor.Substrate`` that the metagraph read and the weights
    intents use, with chain state held in dicts. Everything above it (Client, namespaces,
    metagraph decoding, SetWeights/CommitWeights preflight and quantisation) is the real SDK.
    """

    def __init__(self, netuid: int) -> None:
        self.netuid = netuid
        self.token_symbols: dict[int, str] = {}
        self.block = 5000
        self.rows: list[dict[str, Any]] = []
        self.storage: dict[tuple[str, str, tuple[Any, ...]], Any] = {}
        self.runtime_calls = 0
        self.submitted: list[tuple[Any, str]] = []
        self.connected = False
        self.submit_result: bt.ExtrinsicResult | None = None
        self.fail_reads = False

    def register(
        self,
        signer: HotkeySigner,
        *,
        stake_rao: int = 0,
        permit: bool = False,
        axon: tuple[str, int] | None = None,
    ) -> int:
        uid = len(self.rows)
        ip, port = axon or ("0.0.0.0", 0)
        self.rows.append(
            {
                "hotkey": signer.ss58,
                "coldkey": signer.ss58,
                "stake": stake_rao,
                "permit": permit,
                "axon": {
                    "ip": _ip_int(ip),
                    "port": port,
                    "ip_type": 6 if ":" in ip else 4,
                },
            }
        )
        self.storage[("SubtensorModule", "Uids", (self.netuid, signer.ss58))] = uid
        return uid

    def replace(self, uid: int, signer: HotkeySigner) -> None:
        """Deregister the neuron at ``uid`` and give the uid to ``signer`` (uid recycling)."""
        old = self.rows[uid]["hotkey"]
        del self.storage[("SubtensorModule", "Uids", (self.netuid, old))]
        self.rows[uid]["hotkey"] = signer.ss58
        self.storage[("SubtensorModule", "Uids", (self.netuid, signer.ss58))] = uid

    def _metagraph(self) -> dict[str, Any]:
        return {
            "netuid": self.netuid,
            "block": self.block,
            "tempo": 360,
            "last_step": self.block - 100,
            "blocks_since_last_step": 100,
            "owner_hotkey": self.rows[0]["hotkey"] if self.rows else "",
            "owner_coldkey": self.rows[0]["coldkey"] if self.rows else "",
            "network_registered_at": 1,
            "hotkeys": [r["hotkey"] for r in self.rows],
            "coldkeys": [r["coldkey"] for r in self.rows],
            "validator_permit": [r["permit"] for r in self.rows],
            "total_stake": [r["stake"] for r in self.rows],
            "axons": [r["axon"] for r in self.rows],
        }

    # -- the Substrate protocol subset ------------------------------------------------
    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid)

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def block_number(self) -> int:
        return self.block

    async def block_hash(self, block: int | None = None) -> str:
        return "0x" + f"{block if block is not None else self.block:064x}"

    async def block_time(self) -> float:
        return 12.0

    async def query(
        self, module: str, name: str, params: list[Any] | None = None, block_hash: Any = None
    ) -> Any:
        return self.storage.get((module, name, tuple(params or [])))

    async def query_map(
        self, module: str, name: str, params: list[Any] | None = None, block_hash: Any = None
    ) -> list[tuple[Any, Any]]:
        return []

    async def runtime_call(
        self, api: str, method: str, params: list[Any], block_hash: Any = None
    ) -> Any:
        assert (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph")
        if self.fail_reads:
            raise bt.ChainError("node down")
        self.runtime_calls += 1
        return self._metagraph() if params == [self.netuid] else None

    async def compose(self, call: Any) -> Any:
        return call  # a generated Call(module, function, params): easy to assert on

    async def estimate_fee(self, call: Any, keypair: Any) -> bt.Balance:
        return bt.Balance(0)

    async def submit(self, call: Any, keypair: Any, **_: Any) -> bt.ExtrinsicResult:
        # Prove the adapter handed over a real signing key for the registered hotkey.
        payload = b"extrinsic payload"
        assert Identity.from_ss58(keypair.ss58_address).verify(payload, keypair.sign(payload))
        self.submitted.append((call, keypair.ss58_address))
        if self.submit_result is not None:
            return self.submit_result
        return bt.ExtrinsicResult(
            success=True,
            message="Success",
            block_hash=await self.block_hash(),
            extrinsic_id=f"{self.block}-{len(self.submitted):04d}",
        )


NETUID = 12


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSubstrate:
    # Client.connect caches token symbols on disk; keep that out of the real home directory.
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "token_symbols.json"))
    substrate = FakeSubstrate(NETUID)
    substrate.register(VALIDATOR, stake_rao=2_500 * 10**9, permit=True, axon=("10.1.2.3", 7000))
    substrate.register(MINER_A, stake_rao=5 * 10**8, axon=("2001:db8::1", 7001))
    substrate.register(ED_MINER)
    return substrate


@pytest.fixture
def chain(fake: FakeSubstrate) -> Iterator[BittensorChain]:
    yield BittensorChain(
        NETUID,
        VALIDATOR,
        network="local",
        substrate=fake,
        key_types={ED_MINER.ss58: "ed25519"},
    )


async def test_bittensor_chain_reads_metagraph(chain: BittensorChain, fake: FakeSubstrate) -> None:
    assert isinstance(chain, ChainAdapter)
    neurons = await chain.neurons()
    assert neurons == [
        Neuron(0, VALIDATOR.ss58, "sr25519", 2500.0, True, "10.1.2.3:7000"),
        Neuron(1, MINER_A.ss58, "sr25519", 0.5, False, "[2001:db8::1]:7001"),
        Neuron(2, ED_MINER.ss58, "ed25519", 0.0, False, None),
    ]
    assert fake.connected
    ed = await chain.neuron(ED_MINER.ss58)
    assert ed is not None and ed.identity == ED_MINER.identity
    assert await chain.neuron(MINER_B.ss58) is None
    assert fake.runtime_calls == 1  # cached within the TTL
    await chain.close()
    assert not fake.connected


async def test_bittensor_chain_cache_expires(fake: FakeSubstrate) -> None:
    chain = BittensorChain(NETUID, network="local", substrate=fake, cache_ttl=0.0)
    await chain.neurons()
    fake.register(MINER_B)
    await asyncio.sleep(0.001)
    assert (await chain.neuron(MINER_B.ss58)) is not None
    assert fake.runtime_calls == 2


async def test_bittensor_chain_concurrent_reads_share_one_fetch(fake: FakeSubstrate) -> None:
    chain = BittensorChain(NETUID, network="local", substrate=fake)
    results = await asyncio.gather(*(chain.neuron(MINER_A.ss58) for _ in range(10)))
    assert all(r is not None and r.uid == 1 for r in results)
    assert fake.runtime_calls == 1


async def test_bittensor_chain_serves_stale_metagraph_when_node_fails(
    fake: FakeSubstrate,
) -> None:
    chain = BittensorChain(NETUID, VALIDATOR, network="local", substrate=fake, cache_ttl=0.0)
    before = await chain.neurons()
    fake.fail_reads = True
    assert await chain.neurons() == before  # authentication keeps working
    with pytest.raises(ChainAdapterError, match="reading netuid"):
        await chain.set_weights({MINER_A.ss58: 1.0})  # but never weights on stale uids
    assert fake.submitted == []
    expired = BittensorChain(NETUID, network="local", substrate=fake, cache_ttl=0.0, max_stale=0.0)
    with pytest.raises(ChainAdapterError, match="node down"):
        await expired.neurons()


async def test_bittensor_chain_missing_subnet(fake: FakeSubstrate) -> None:
    chain = BittensorChain(99, network="local", substrate=fake)
    with pytest.raises(ChainAdapterError, match="subnet 99 does not exist"):
        await chain.neurons()


async def test_bittensor_chain_set_weights_plaintext(
    chain: BittensorChain, fake: FakeSubstrate
) -> None:
    reference = await chain.set_weights(
        {MINER_A.ss58: 3.0, ED_MINER.ss58: 1.0, MINER_B.ss58: 5.0}  # MINER_B: not registered
    )
    assert reference == "5000-0001"
    ((call, signer_ss58),) = fake.submitted
    assert signer_ss58 == VALIDATOR.ss58
    assert (call.module, call.function) == ("SubtensorModule", "set_mechanism_weights")
    # hotkeys -> uids, then the SDK's max-upscale to u16.
    assert call.params["netuid"] == NETUID
    assert call.params["dests"] == [1, 2]
    assert call.params["weights"] == [65535, round(65535 / 3)]


async def test_bittensor_chain_set_weights_maps_against_fresh_uids(
    chain: BittensorChain, fake: FakeSubstrate
) -> None:
    await chain.neurons()  # warm the cache
    fake.replace(1, MINER_B)  # MINER_A deregistered; its uid now belongs to MINER_B
    await chain.set_weights({MINER_A.ss58: 1.0, ED_MINER.ss58: 1.0})
    ((call, _),) = fake.submitted
    assert call.params["dests"] == [2]  # never MINER_A's stale uid 1


async def test_bittensor_chain_respects_max_weight_limit(
    chain: BittensorChain, fake: FakeSubstrate
) -> None:
    fake.storage[("SubtensorModule", "MaxWeightsLimit", (NETUID,))] = 65535 // 2  # 50% cap
    await chain.set_weights({MINER_A.ss58: 9.0, ED_MINER.ss58: 1.0})
    ((call, _),) = fake.submitted
    assert call.params["dests"] == [1, 2]
    top, low = call.params["weights"]
    assert top == 65535 and low >= 65535 * 0.99  # clipped to ~50/50 before quantising


async def test_bittensor_chain_commit_reveal(fake: FakeSubstrate) -> None:
    state = {
        "CommitRevealWeightsEnabled": True,
        "Tempo": 360,
        "RevealPeriodEpochs": 1,
        "LastEpochBlock": 4900,
        "SubnetEpochIndex": 13,
        "BlocksSinceLastStep": 100,
    }
    for name, value in state.items():
        fake.storage[("SubtensorModule", name, (NETUID,))] = value
    auto = BittensorChain(NETUID, VALIDATOR, network="local", substrate=fake)
    await auto.set_weights({MINER_A.ss58: 1.0})
    ((call, _),) = fake.submitted
    assert call.function == "commit_timelocked_mechanism_weights"
    assert isinstance(call.params["commit"], bytes) and call.params["reveal_round"] > 0


async def test_bittensor_chain_forced_commit_reveal(fake: FakeSubstrate) -> None:
    for name, value in {"Tempo": 360, "RevealPeriodEpochs": 1}.items():
        fake.storage[("SubtensorModule", name, (NETUID,))] = value
    forced = BittensorChain(
        NETUID, VALIDATOR, network="local", substrate=fake, commit_reveal="always"
    )
    await forced.set_weights({MINER_A.ss58: 1.0})
    assert fake.submitted[0][0].function == "commit_timelocked_mechanism_weights"


async def test_bittensor_chain_set_weights_errors(fake: FakeSubstrate) -> None:
    read_only = BittensorChain(NETUID, network="local", substrate=fake)
    with pytest.raises(ChainAdapterError, match="read-only"):
        await read_only.set_weights({MINER_A.ss58: 1.0})

    outsider = BittensorChain(NETUID, MINER_B, network="local", substrate=fake)
    with pytest.raises(ChainAdapterError, match="not registered"):
        await outsider.set_weights({MINER_A.ss58: 1.0})

    chain = BittensorChain(NETUID, VALIDATOR, network="local", substrate=fake)
    fake.storage[("SubtensorModule", "WeightsSetRateLimit", (NETUID,))] = 100
    fake.storage[("SubtensorModule", "LastUpdate", (NETUID,))] = [fake.block - 10, 0, 0]
    with pytest.raises(ChainAdapterError, match="rate limit"):
        await chain.set_weights({MINER_A.ss58: 1.0})
    del fake.storage[("SubtensorModule", "WeightsSetRateLimit", (NETUID,))]

    fake.submit_result = bt.ExtrinsicResult(success=False, message="SettingWeightsTooFast")
    with pytest.raises(ChainAdapterError, match="SettingWeightsTooFast"):
        await chain.set_weights({MINER_A.ss58: 1.0})
    with pytest.raises(ValueError, match="no positive weight"):
        await chain.set_weights({MINER_B.ss58: 1.0})
