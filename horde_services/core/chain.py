"""The chain adapter: who is registered, with what stake and where, and setting weights.

Every Horde service asks one :class:`ChainAdapter` these questions. Two implementations:

* :class:`LocalRoster` - a TOML file on one machine, the embedded default (``horde dev up``).
  Weights go to a JSON-lines ledger beside it instead of a chain.
* :class:`BittensorChain` - the Bittensor chain through the ``bittensor`` SDK. All
  SDK-specific calls live in that one class so an SDK upgrade touches one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import structlog

from horde_services.core.identity import SS58_FORMAT, HotkeySigner, Identity, KeyType

__all__ = [
    "BittensorChain",
    "ChainAdapter",
    "ChainAdapterError",
    "LocalRoster",
    "Neuron",
    "RosterError",
    "normalise_weights",
    "parse_roster",
    "write_roster",
]

log = structlog.get_logger(__name__)

_NEURON_FIELDS: Final = frozenset(
    {"uid", "hotkey", "key_type", "stake", "validator_permit", "endpoint"}
)
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_MAX_UID: Final = 65535  # uids are u16 on chain


class ChainAdapterError(RuntimeError):
    """The chain (or roster) could not answer or refused a write."""


class RosterError(ValueError):
    """A roster file is missing or malformed; the message names the file and the entry."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"roster {self.path}: {problem}")


# --------------------------------------------------------------------------------------------
# Neuron and the adapter protocol
# --------------------------------------------------------------------------------------------


def check_endpoint(endpoint: str) -> str:
    """Validate ``"host:port"`` (``"[v6addr]:port"`` for IPv6); returns it unchanged."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"endpoint {endpoint!r} must be 'host:port'")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"endpoint {endpoint!r} has port {port} outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"endpoint {endpoint!r} has an invalid IPv6 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(
            f"endpoint {endpoint!r} has an invalid host (IPv6 needs brackets: '[::1]:port')"
        )
    return endpoint


def _canonical_hotkey(hotkey: str, key_type: KeyType) -> str:
    """Check an SS58 hotkey and insist on format 42, so one key has exactly one spelling."""
    identity = Identity.from_ss58(hotkey, key_type)
    if identity.ss58 != hotkey:
        raise ValueError(
            f"hotkey {hotkey!r} is not a format-{SS58_FORMAT} SS58 address "
            f"(the same key is {identity.ss58!r})"
        )
    return hotkey


@dataclass(frozen=True)
class Neuron:
    """One registered neuron as Horde needs it.

    ``stake`` is in the subnet's own units as the chain reports total stake (alpha on dynamic
    TAO subnets); for a roster it is whatever the operator wrote. ``endpoint`` is the served
    ``host:port``, or None when nothing is served.
    """

    uid: int
    hotkey: str
    key_type: KeyType = "sr25519"
    stake: float = 0.0
    validator_permit: bool = False
    endpoint: str | None = None

    @cached_property
    def identity(self) -> Identity:
        return Identity.from_ss58(self.hotkey, self.key_type)


@runtime_checkable
class ChainAdapter(Protocol):
    """The one interface every service uses to read the registry and write weights."""

    async def neurons(self) -> list[Neuron]:
        """Every registered neuron, ordered by uid."""
        ...

    async def neuron(self, hotkey: str) -> Neuron | None:
        """The neuron registered under an SS58 hotkey, or None."""
        ...

    async def set_weights(self, weights: Mapping[str, float]) -> str:
        """Set this validator's weights (hotkey -> relative weight); returns a reference."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class NormalisedWeights:
    """Weights resolved against a neuron list: non-negative, summing to 1."""

    by_uid: dict[int, float]
    by_hotkey: dict[str, float]
    dropped: list[str] = field(default_factory=list)  # hotkeys not registered


def normalise_weights(weights: Mapping[str, float], neurons: Iterable[Neuron]) -> NormalisedWeights:
    """Resolve hotkey weights to uids and scale them to sum 1.

    Weights for hotkeys that are not registered are dropped (and reported), because a
    validator's scores routinely outlive a miner's registration. Negative or non-finite
    weights are a bug in the caller and raise, naming the hotkey.
    """
    uid_of = {n.hotkey: n.uid for n in neurons}
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for hotkey, weight in weights.items():
        value = float(weight)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight for {hotkey} must be finite and >= 0, got {weight!r}")
        if hotkey not in uid_of:
            dropped.append(hotkey)
            continue
        kept[hotkey] = value
    total = math.fsum(kept.values())
    if total <= 0:
        raise ValueError("no positive weight for any registered hotkey; nothing to set")
    by_hotkey = {hk: w / total for hk, w in sorted(kept.items(), key=lambda kv: uid_of[kv[0]])}
    by_uid = {uid_of[hk]: w for hk, w in by_hotkey.items()}
    return NormalisedWeights(by_uid=by_uid, by_hotkey=by_hotkey, dropped=dropped)


# --------------------------------------------------------------------------------------------
# LocalRoster
# --------------------------------------------------------------------------------------------


def _entry_name(index: int, entry: Mapping[str, Any]) -> str:
    uid = entry.get("uid")
    return f"[[neuron]] #{index + 1}" + (f" (uid {uid})" if isinstance(uid, int) else "")


def _parse_neuron(index: int, entry: Any, path: Path) -> Neuron:
    if not isinstance(entry, dict):
        raise RosterError(path, f"[[neuron]] #{index + 1} must be a table")
    where = _entry_name(index, entry)

    def bad(name: str, problem: str) -> RosterError:
        return RosterError(path, f"{where}: field {name!r} {problem}")

    unknown = sorted(set(entry) - _NEURON_FIELDS)
    if unknown:
        raise bad(
            unknown[0], f"is not a roster field (expected {', '.join(sorted(_NEURON_FIELDS))})"
        )
    uid = entry.get("uid")
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= _MAX_UID:
        raise bad("uid", f"must be an integer in 0..{_MAX_UID}, got {uid!r}")
    key_type = entry.get("key_type", "sr25519")
    if key_type not in ("sr25519", "ed25519"):
        raise bad("key_type", f"must be 'sr25519' or 'ed25519', got {key_type!r}")
    hotkey = entry.get("hotkey")
    if not isinstance(hotkey, str):
        raise bad("hotkey", f"must be an SS58 address string, got {hotkey!r}")
    try:
        _canonical_hotkey(hotkey, key_type)
    except ValueError as error:
        raise bad("hotkey", f"is invalid: {error}") from None
    stake = entry.get("stake", 0.0)
    if isinstance(stake, bool) or not isinstance(stake, int | float):
        raise bad("stake", f"must be a number, got {stake!r}")
    if not math.isfinite(stake) or stake < 0:
        raise bad("stake", f"must be finite and >= 0, got {stake!r}")
    permit = entry.get("validator_permit", False)
    if not isinstance(permit, bool):
        raise bad("validator_permit", f"must be true or false, got {permit!r}")
    endpoint = entry.get("endpoint")
    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise bad("endpoint", f"must be a 'host:port' string, got {endpoint!r}")
        try:
            check_endpoint(endpoint)
        except ValueError as error:
            raise bad("endpoint", f"is invalid: {error}") from None
    return Neuron(
        uid=uid,
        hotkey=hotkey,
        key_type=key_type,
        stake=float(stake),
        validator_permit=permit,
        endpoint=endpoint,
    )


def parse_roster(text: str, path: str | os.PathLike[str] = "<roster>") -> list[Neuron]:
    """Parse and validate roster TOML; errors name the file, the entry and the field."""
    source = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RosterError(source, f"is not valid TOML: {error}") from None
    unknown = sorted(set(data) - {"neuron"})
    if unknown:
        # Catches typos such as [[neurons]], which would otherwise read as an empty roster.
        raise RosterError(source, f"unknown top-level key {unknown[0]!r} (expected [[neuron]])")
    entries = data.get("neuron", [])
    if not isinstance(entries, list):
        raise RosterError(source, "'neuron' must be an array of tables ([[neuron]])")
    neurons = [_parse_neuron(i, entry, source) for i, entry in enumerate(entries)]
    seen_uid: dict[int, int] = {}
    seen_hotkey: dict[str, int] = {}
    for index, neuron in enumerate(neurons):
        if neuron.uid in seen_uid:
            raise RosterError(
                source,
                f"[[neuron]] #{index + 1}: field 'uid' {neuron.uid} is already used by "
                f"[[neuron]] #{seen_uid[neuron.uid] + 1}",
            )
        if neuron.hotkey in seen_hotkey:
            raise RosterError(
                source,
                f"[[neuron]] #{index + 1} (uid {neuron.uid}): field 'hotkey' {neuron.hotkey} "
                f"is already registered by [[neuron]] #{seen_hotkey[neuron.hotkey] + 1}",
            )
        seen_uid[neuron.uid] = index
        seen_hotkey[neuron.hotkey] = index
    return sorted(neurons, key=lambda n: n.uid)


def _toml_string(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def render_roster(neurons: Iterable[Neuron]) -> str:
    """Roster TOML for ``neurons`` (ordered by uid; no ``endpoint`` line when None)."""
    blocks = ["# Horde local roster: one [[neuron]] table per registered neuron.\n"]
    for neuron in sorted(neurons, key=lambda n: n.uid):
        lines = [
            "[[neuron]]",
            f"uid = {neuron.uid}",
            f"hotkey = {_toml_string(neuron.hotkey)}",
            f"key_type = {_toml_string(neuron.key_type)}",
            f"stake = {float(neuron.stake)!r}",
            f"validator_permit = {'true' if neuron.validator_permit else 'false'}",
        ]
        if neuron.endpoint is not None:
            lines.append(f"endpoint = {_toml_string(neuron.endpoint)}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def write_roster(path: str | os.PathLike[str], neurons: Iterable[Neuron]) -> Path:
    """Atomically (re)write a roster file; readers see the old or the new file, never half."""
    target = Path(path).expanduser()
    neurons = list(neurons)
    text = render_roster(neurons)
    parse_roster(text, target)  # refuse to write a roster we would refuse to read
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # public registry data, unlike key files
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


_FileVersion = tuple[int, int, int]  # (inode, size, mtime_ns)


class LocalRoster:
    """A roster TOML file acting as the chain for a single machine.

    The file is re-read whenever it changes (inode, size or mtime), so ``horde dev up`` can add
    neurons to a running network. If an edit breaks the file, the last good roster stays in
    force and the error is logged once; the first load, though, raises :class:`RosterError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ledger_path: str | os.PathLike[str] | None = None,
        validator: Identity | None = None,
    ) -> None:
        self._path = Path(path).expanduser()
        self._ledger_path = (
            Path(ledger_path).expanduser()
            if ledger_path is not None
            else self._path.with_name(self._path.name + ".weights.jsonl")
        )
        self._validator = validator
        self._neurons: list[Neuron] | None = None
        self._by_hotkey: dict[str, Neuron] = {}
        self._loaded_version: _FileVersion | None = None
        self._failed_version: _FileVersion | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def ledger_path(self) -> Path:
        """Where :meth:`set_weights` appends (``<roster file name>.weights.jsonl``)."""
        return self._ledger_path

    def _version(self) -> _FileVersion:
        info = self._path.stat()
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def reload(self, *, force: bool = False) -> list[Neuron]:
        """Re-read the file if it changed (or ``force``); returns the roster in force.

        Synchronous on purpose: a stat per call, and a parse of a small file only on change.
        """
        try:
            version = self._version()
            if not force and version == self._loaded_version and self._neurons is not None:
                return self._neurons
            neurons = parse_roster(self._path.read_text(encoding="utf-8"), self._path)
        except (OSError, UnicodeDecodeError, RosterError) as error:
            problem = (
                error
                if isinstance(error, RosterError)
                else RosterError(
                    self._path,
                    "does not exist"
                    if isinstance(error, FileNotFoundError)
                    else f"cannot be read: {error}",
                )
            )
            if self._neurons is None:
                raise problem from None
            failed = self._safe_version()
            if failed != self._failed_version:
                self._failed_version = failed
                log.error("roster.reload_failed", path=str(self._path), error=str(problem))
            return self._neurons
        self._neurons = neurons
        self._by_hotkey = {n.hotkey: n for n in neurons}
        self._loaded_version = version
        self._failed_version = None
        log.info("roster.loaded", path=str(self._path), neurons=len(neurons))
        silent = [n.uid for n in neurons if not n.validator_permit and not n.endpoint]
        if silent:
            # Validators route jobs only to miners that serve an endpoint: these get none.
            log.warning(
                "roster.miners_without_endpoint",
                path=str(self._path),
                uids=silent,
                hint='a miner needs endpoint = "host:port" in the roster to be sent jobs',
            )
        return neurons

    def _safe_version(self) -> _FileVersion | None:
        try:
            return self._version()
        except OSError:
            return None

    async def neurons(self) -> list[Neuron]:
        return list(self.reload())

    async def neuron(self, hotkey: str) -> Neuron | None:
        self.reload()
        return self._by_hotkey.get(hotkey)

    async def set_weights(self, weights: Mapping[str, float]) -> str:
        """Append the normalised weights to the ledger; returns the entry's id."""
        normalised = normalise_weights(weights, self.reload())
        now = datetime.now(UTC)
        entry_id = f"local-{uuid.uuid4().hex}"
        entry = {
            "id": entry_id,
            "timestamp": now.isoformat(),
            "validator": str(self._validator) if self._validator is not None else None,
            "by_uid": {str(uid): w for uid, w in normalised.by_uid.items()},
            "by_hotkey": normalised.by_hotkey,
            "dropped": normalised.dropped,
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        await asyncio.to_thread(self._append, line)
        if normalised.dropped:
            log.warning("weights.dropped_unregistered", hotkeys=normalised.dropped)
        log.info(
            "weights.recorded",
            ledger=str(self._ledger_path),
            id=entry_id,
            neurons=len(normalised.by_uid),
        )
        return entry_id

    def _append(self, line: bytes) -> None:
        self._ledger_path.parent.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND descriptor: concurrent validators on one machine cannot
        # interleave within a line.
        fd = os.open(self._ledger_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def ledger_entries(self) -> list[dict[str, Any]]:
        """Every ledger entry, oldest first (empty when no weights were set yet)."""
        try:
            text = self._ledger_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# BittensorChain
# --------------------------------------------------------------------------------------------

CommitRevealMode = Literal["auto", "always"]


def _sdk_error() -> type[Exception]:
    from bittensor import BittensorError

    return BittensorError  # type: ignore[no-any-return]


class BittensorChain:
    """The Bittensor chain through the ``bittensor`` SDK (v11).

    Reads the subnet's metagraph in one runtime-API call (hotkeys, uids, stake, validator
    permits, axon endpoints), cached for ``cache_ttl`` seconds (about a block) because
    authentication looks up a neuron on every RPC. If a refresh fails, the last metagraph is
    served for up to ``max_stale`` seconds (reads only: weights always use a fresh one).

    Weights go through the SDK's ``SetWeights`` intent, which preflights registration and the
    rate limit, clips to the subnet's max weight, quantises to u16 and picks the plaintext or
    timelocked commit-reveal extrinsic from the subnet's own setting (``commit_reveal="auto"``);
    ``"always"`` forces the commit path (``CommitWeights``).

    ``substrate`` replaces the SDK's websocket backend with any object implementing
    ``bittensor.Substrate`` - the seam tests use to run this class against an in-memory chain.
    The chain does not record a hotkey's signature scheme; ``key_types`` names the ed25519 ones.
    """

    def __init__(
        self,
        netuid: int,
        signer: HotkeySigner | None = None,
        *,
        network: str = "finney",
        substrate: Any | None = None,
        cache_ttl: float = 12.0,
        max_stale: float = 600.0,
        commit_reveal: CommitRevealMode = "auto",
        version_key: int = 0,
        mechid: int = 0,
        key_types: Mapping[str, KeyType] | None = None,
        wait_for_finalization: bool = False,
    ) -> None:
        if commit_reveal not in ("auto", "always"):
            raise ValueError(f"commit_reveal must be 'auto' or 'always', got {commit_reveal!r}")
        self._netuid = netuid
        self._signer = signer
        # The SDK is imported here, not at module level: only chain = "bittensor" needs it.
        from bittensor import Client

        self._client = Client(network, substrate=substrate)
        self._network = network
        self._cache_ttl = cache_ttl
        self._commit_reveal = commit_reveal
        self._version_key = version_key
        self._mechid = mechid
        self._key_types: dict[str, KeyType] = dict(key_types or {})
        self._wait_for_finalization = wait_for_finalization
        self._connected = False
        self._connect_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._neurons: list[Neuron] = []
        self._by_hotkey: dict[str, Neuron] = {}
        self._fetched_at: float | None = None  # last attempt that counts for the cache
        self._succeeded_at: float | None = None
        self._max_stale = max_stale

    @property
    def netuid(self) -> int:
        return self._netuid

    async def _connected_client(self) -> Any:
        async with self._connect_lock:
            if not self._connected:
                try:
                    await self._client.connect()
                except _sdk_error() as error:
                    raise ChainAdapterError(
                        f"cannot connect to {self._network}: {error}"
                    ) from error
                self._connected = True
                log.info("chain.connected", network=self._network, netuid=self._netuid)
        return self._client

    def _convert(self, row: Any) -> Neuron:
        hotkey = str(row.hotkey)
        endpoint = row.axon if isinstance(row.axon, str) else None
        return Neuron(
            uid=int(row.uid),
            hotkey=hotkey,
            key_type=self._key_types.get(hotkey, "sr25519"),
            stake=float(row.total_stake.amount),
            validator_permit=bool(row.validator_permit),
            endpoint=endpoint,
        )

    async def _fetch(self) -> list[Neuron]:
        client = await self._connected_client()
        try:
            graph = await client.subnets.metagraph(self._netuid, commitments=False)
        except (_sdk_error(), OSError, TimeoutError) as error:
            raise ChainAdapterError(f"reading netuid {self._netuid} failed: {error}") from error
        if graph is None:
            raise ChainAdapterError(f"subnet {self._netuid} does not exist on {self._network}")
        neurons = sorted((self._convert(row) for row in graph.neurons), key=lambda n: n.uid)
        self._neurons = neurons
        self._by_hotkey = {n.hotkey: n for n in neurons}
        self._fetched_at = self._succeeded_at = time.monotonic()
        log.debug("chain.metagraph", netuid=self._netuid, block=graph.block, neurons=len(neurons))
        return neurons

    async def _current(self, *, fresh: bool = False) -> list[Neuron]:
        def stale() -> bool:
            return self._fetched_at is None or time.monotonic() - self._fetched_at > self._cache_ttl

        if fresh or stale():
            async with self._refresh_lock:
                # Concurrent callers queue on the lock; only the first one fetches.
                if fresh or stale():
                    try:
                        return await self._fetch()
                    except ChainAdapterError as error:
                        if fresh or not self._can_serve_stale():
                            raise
                        # A flaky RPC node must not fail every authentication: serve the last
                        # metagraph for a while, retrying after another TTL.
                        self._fetched_at = time.monotonic()
                        log.warning("chain.serving_stale_metagraph", error=str(error))
        return self._neurons

    def _can_serve_stale(self) -> bool:
        return (
            self._succeeded_at is not None
            and time.monotonic() - self._succeeded_at <= self._max_stale
        )

    async def neurons(self) -> list[Neuron]:
        return list(await self._current())

    async def neuron(self, hotkey: str) -> Neuron | None:
        await self._current()
        return self._by_hotkey.get(hotkey)

    async def set_weights(self, weights: Mapping[str, float]) -> str:
        if self._signer is None:
            raise ChainAdapterError("set_weights needs a hotkey signer; this adapter is read-only")
        # Uids are recycled when miners deregister: always map against a fresh metagraph.
        normalised = normalise_weights(weights, await self._current(fresh=True))
        if normalised.dropped:
            log.warning("weights.dropped_unregistered", hotkeys=normalised.dropped)
        intent = self._weights_intent(normalised.by_uid)
        client = await self._connected_client()
        try:
            result = await client.execute(
                intent,
                self._signer.keypair,
                wait_for_inclusion=True,
                wait_for_finalization=self._wait_for_finalization,
            )
        except _sdk_error() as error:
            raise ChainAdapterError(f"set_weights on netuid {self._netuid}: {error}") from error
        if not result.success:
            raise ChainAdapterError(
                f"set_weights on netuid {self._netuid} failed: {result.message}"
            )
        reference = str(result.extrinsic_id or result.block_hash or "submitted")
        log.info(
            "weights.set",
            netuid=self._netuid,
            reference=reference,
            neurons=len(normalised.by_uid),
            path=type(intent).__name__,
            reveal_round=result.data.get("reveal_round"),
        )
        return reference

    def _weights_intent(self, by_uid: Mapping[int, float]) -> Any:
        # Floats summing to 1: the intent does the chain-specific part (max-weight clip,
        # max-upscale, u16 quantisation), so that logic exists once, in the SDK.
        uid_weights = dict(sorted(by_uid.items()))
        if self._commit_reveal == "always":
            from bittensor.intents.weights import CommitWeights

            return CommitWeights(
                netuid=self._netuid,
                weights=uid_weights,  # type: ignore[arg-type]  # SDK accepts a uid mapping
                mechid=self._mechid,
                version_key=self._version_key,
            )
        from bittensor.intents.weights import SetWeights

        return SetWeights(
            netuid=self._netuid,
            weights=uid_weights,  # type: ignore[arg-type]
            mechid=self._mechid,
            version_key=self._version_key,
        )

    async def close(self) -> None:
        async with self._connect_lock:
            if self._connected:
                self._connected = False
                await self._client.close()


if TYPE_CHECKING:  # mypy proves both implementations satisfy the protocol
    _roster_is_adapter: type[ChainAdapter] = LocalRoster
    _chain_is_adapter: type[ChainAdapter] = BittensorChain
