"""The validator's view of miners: who they are, where, and channels signed for each."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc
import structlog
from horde.v1 import manifest_pb2, miner_pb2, miner_pb2_grpc

from horde_services.core.chain import ChainAdapter
from horde_services.core.config import TLSSettings
from horde_services.core.identity import Identity, Signer
from horde_services.core.server import open_channel

log = structlog.get_logger("horde.validator.miners")
MANIFEST_TIMEOUT_S = 3.0
CLASS_MEMORY_S = 600.0


@dataclass(frozen=True)
class MinerRef:
    identity: str
    address: str


@dataclass(frozen=True)
class Candidates:
    """Where a job of one class could go now."""

    free: list[MinerRef]  # miners with a free executor of the class, most free first
    any_of_class: bool  # whether any miner that answered has the class at all (busy or not)
    unreachable: int  # miners that did not answer: their executors are unknown
    draining: int  # executors of the class that are shutting down (taking no new job)


class MinerDirectory:
    def __init__(
        self,
        signer: Signer,
        chain: ChainAdapter,
        extra: dict[str, str],
        tls: TLSSettings | None = None,
    ) -> None:
        self._signer = signer
        self._chain = chain
        self._extra = {str(Identity.parse(k)): v for k, v in extra.items()}
        self._tls = tls if tls is not None and tls.ca_file else None
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        # Miners whose manifest could not be had, by the status it failed with (logged once).
        self._unavailable: dict[str, grpc.StatusCode] = {}
        # When each executor class was last offered by some miner.
        self._class_seen: dict[str, float] = {}

    def recently_offered(self, executor_class: str, within_s: float = CLASS_MEMORY_S) -> bool:
        """True when some miner offered the class lately: its executors may be reconnecting
        (e.g. after a miner restart), so a job for it should wait rather than be rejected."""
        seen = self._class_seen.get(executor_class)
        return seen is not None and time.monotonic() - seen <= within_s

    async def miners(self) -> list[MinerRef]:
        """Registered neurons serving an endpoint (not ourselves), plus configured miners."""
        out = {k: MinerRef(k, v) for k, v in self._extra.items()}
        me = str(self._signer.identity)
        for neuron in await self._chain.neurons():
            ident = str(neuron.identity)
            if neuron.endpoint and ident != me and ident not in out:
                out[ident] = MinerRef(ident, neuron.endpoint)
        return list(out.values())

    def stub(self, miner: MinerRef) -> miner_pb2_grpc.MinerServiceStub:
        key = (miner.identity, miner.address)
        channel = self._channels.get(key)
        if channel is None:
            channel = open_channel(
                miner.address, signer=self._signer, callee=miner.identity, tls=self._tls
            )
            self._channels[key] = channel
        return miner_pb2_grpc.MinerServiceStub(channel)

    async def manifest(self, miner: MinerRef) -> manifest_pb2.MinerManifest | None:
        manifest, _ = await self.manifest_or_error(miner)
        return manifest

    async def manifest_or_error(
        self, miner: MinerRef
    ) -> tuple[manifest_pb2.MinerManifest | None, str]:
        """The miner's manifest, or None and why it could not be had ("UNAVAILABLE: ...")."""
        try:
            resp: miner_pb2.GetManifestResponse = await self.stub(miner).GetManifest(
                miner_pb2.GetManifestRequest(), timeout=MANIFEST_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            # Once per miner until it answers again (a job waiting for executors asks about
            # twice a second).
            if self._unavailable.get(miner.identity) != exc.code():
                self._unavailable[miner.identity] = exc.code()
                log.info("manifest_unavailable", miner=miner.identity, error=error)
            return None, error
        if self._unavailable.pop(miner.identity, None) is not None:
            log.info("manifest_available_again", miner=miner.identity)
        return resp.manifest, ""

    async def candidates(self, executor_class: str) -> Candidates:
        """Miners with a free executor of the class; "no executor of the class" cannot be
        concluded while some miner does not answer (its executors are unknown)."""
        miners = await self.miners()
        manifests = await asyncio.gather(*(self.manifest(m) for m in miners))
        scored: list[tuple[int, float, MinerRef]] = []
        any_of_class = False
        unreachable = draining = 0
        for miner, manifest in zip(miners, manifests, strict=True):
            if manifest is None:
                unreachable += 1
                continue
            for e in manifest.executors:
                self._class_seen[e.executor_class] = time.monotonic()
            of_class = [e for e in manifest.executors if e.executor_class == executor_class]
            any_of_class = any_of_class or bool(of_class)
            draining += sum(1 for e in of_class if e.draining)
            free = sum(1 for e in of_class if not e.busy and not e.draining)
            if free:
                scored.append((-free, random.random(), miner))
        scored.sort(key=lambda t: (t[0], t[1]))
        return Candidates([m for _, _, m in scored], any_of_class, unreachable, draining)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
