"""What every service does at start-up: load its key, open its chain adapter, build policies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from horde_services.core.chain import BittensorChain, ChainAdapter, LocalRoster, RosterError
from horde_services.core.config import ServiceSettings
from horde_services.core.errors import ConfigError
from horde_services.core.identity import (
    HotkeySigner,
    Identity,
    KeyFileError,
    Signer,
    load_key_file,
    load_wallet_hotkey,
)

NEURON_CACHE_S = 5.0


# The kind of key each service signs with (docs/operators.md, "Keys and wallets"): validators and
# miners are Bittensor hotkeys (registered on the subnet); executors and gateways Ed25519 keys.
_HOTKEY_SERVICES = ("validator", "miner")
_ED25519_SERVICES = ("executor", "gateway")
_ARTICLE = {"validator": "a", "miner": "a", "executor": "an", "gateway": "a"}


def _kind_mismatch(service: str, what: str, hotkey: bool) -> str | None:
    """Why a `what` (a hotkey when `hotkey`) is the wrong kind of key for `service`, or None."""
    if hotkey and service in _ED25519_SERVICES:
        need, new = "an ed25519 key", "horde keys new --kind ed25519 --out FILE"
    elif not hotkey and service in _HOTKEY_SERVICES:
        need, new = "a hotkey", "horde keys new --kind hotkey --out FILE"
    else:
        return None
    return f"{what}; {_ARTICLE[service]} {service} needs {need} (make one with `{new}`)"


def load_signer(settings: ServiceSettings, service: str) -> Signer:
    """The service's key: a Horde key file, or (validator, miner) a btcli wallet hotkey. A key
    of the wrong kind for the service (an ed25519 key file for a validator or miner, a hotkey
    for an executor or gateway) is a ConfigError: peers would refuse every call it signs."""
    if settings.key_file is not None:
        try:
            signer = load_key_file(settings.key_file)
        except (KeyFileError, OSError) as exc:
            raise ConfigError(f"invalid setting 'key_file': {exc}") from None
        hotkey = isinstance(signer, HotkeySigner)
        what = f"{settings.key_file} is {'a hotkey' if hotkey else 'an ed25519 key'} file"
        problem = _kind_mismatch(service, what, hotkey)
        if problem is not None:
            raise ConfigError(f"invalid setting 'key_file': {problem}")
        return signer
    if settings.wallet_name and settings.wallet_hotkey:
        problem = _kind_mismatch(service, "a btcli wallet's hotkey is a hotkey", True)
        if problem is not None:
            raise ConfigError(f"invalid setting 'wallet_name/wallet_hotkey': {problem}")
        try:
            return load_wallet_hotkey(
                settings.wallet_name, settings.wallet_hotkey, settings.wallet_path
            )
        except Exception as exc:
            raise ConfigError(f"invalid setting 'wallet_name/wallet_hotkey': {exc}") from None
    if service in _ED25519_SERVICES:
        raise ConfigError(
            f"invalid setting 'key_file': the {service} needs a key; create one with "
            "`horde keys new --kind ed25519 --out FILE`"
        )
    kind = " --kind hotkey" if service in _HOTKEY_SERVICES else ""
    raise ConfigError(
        f"invalid setting 'key_file': the {service} needs a key (key_file, or wallet_name and "
        f"wallet_hotkey); create one with `horde keys new{kind} --out FILE`"
    )


def open_chain(settings: ServiceSettings, signer: Signer | None = None) -> ChainAdapter:
    if settings.chain == "bittensor":
        hotkey = signer if isinstance(signer, HotkeySigner) else None
        return BittensorChain(settings.netuid, hotkey, network=settings.chain_network)
    if settings.roster_file is None:
        raise ConfigError("invalid setting 'roster_file': the local chain needs a roster file")
    if not Path(settings.roster_file).is_file():
        raise ConfigError(f"invalid setting 'roster_file': file not found: {settings.roster_file}")
    # Weights set through the local chain are appended to a ledger in the service's own state
    # dir (writable under the systemd units, where the roster's directory is read-only); each
    # entry names the validator that set them.
    roster = LocalRoster(
        settings.roster_file,
        ledger_path=settings.state_dir / "weights.jsonl",
        validator=signer.identity if signer is not None else None,
    )
    try:
        roster.reload(force=True)  # a malformed roster stops the service here, not at first use
    except (RosterError, OSError) as exc:
        raise ConfigError(f"invalid setting 'roster_file': {settings.roster_file}: {exc}") from None
    return roster


def parse_identities(values: list[str], field_name: str) -> set[str]:
    """Validate enrolled identities from config; returns their canonical strings."""
    out = set()
    for value in values:
        try:
            out.add(str(Identity.parse(value)))
        except ValueError as exc:
            raise ConfigError(f"invalid setting '{field_name}': {value!r}: {exc}") from None
    return out


@dataclass
class ChainPolicy:
    """Allow callers registered on the chain: validators need a permit and enough stake."""

    chain: ChainAdapter
    require_validator: bool
    min_stake: float = 0.0
    _cache: dict[str, tuple[float, bool, float]] = field(default_factory=dict)

    async def deny_reason(self, caller: Identity, method: str) -> str | None:
        try:
            ss58 = caller.ss58
        except Exception:
            return f"{caller} is not a hotkey"
        cached = self._cache.get(ss58)
        now = time.monotonic()
        if cached is None or now - cached[0] > NEURON_CACHE_S:
            neuron = await self.chain.neuron(ss58)
            if neuron is None:
                return f"{ss58} is not registered on the subnet"
            cached = (now, neuron.validator_permit, neuron.stake)
            self._cache[ss58] = cached
        _, permit, stake = cached
        if self.require_validator:
            if not permit:
                return f"{ss58} has no validator permit"
            if stake < self.min_stake:
                return f"{ss58} has stake {stake}, below the minimum {self.min_stake}"
        return None
