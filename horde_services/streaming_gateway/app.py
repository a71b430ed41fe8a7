"""Start a streaming gateway: sessions for enrolled clients, samples for its validator."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from horde.v1 import gateway_pb2, gateway_pb2_grpc, validator_pb2, validator_pb2_grpc

from horde_services.core import metrics
from horde_services.core.app import ServiceApp
from horde_services.core.auth import H_TIMESTAMP, Authenticator, MethodPolicy, StaticPolicy
from horde_services.core.chain import ChainAdapter
from horde_services.core.config import GatewaySettings
from horde_services.core.db import open_database
from horde_services.core.errors import ConfigError, Unavailable
from horde_services.core.identity import Identity, Signer
from horde_services.core.proto_util import parse_cursor
from horde_services.core.proxy_wire import ProxyLink
from horde_services.core.runtime import load_signer, open_chain, parse_identities
from horde_services.core.server import (
    HealthCheck,
    RunningServer,
    ServiceRegistration,
    create_server,
    current_caller,
    open_channel,
)
from horde_services.streaming_gateway.session import (
    GatewayDeps,
    MinerCheck,
    Session,
    SessionConfig,
    validator_refuses_gateway,
)
from horde_services.streaming_gateway.store import GatewayStore, ReceiptWriter, SqlStore

log = structlog.get_logger("horde.gateway")
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
DEFAULT_SAMPLES = 100
MAX_SAMPLES = 1000


SHUTDOWN_REASON = "the gateway is shutting down"
# How often a gateway checks that its validator takes its calls (health says NOT_SERVING, reason
# "validator", while it does not: sessions could not start).
VALIDATOR_PROBE_INTERVAL_S = 10.0
_NO_JOB = str(uuid.UUID(int=0))


async def watch_validator(
    validator: validator_pb2_grpc.ValidatorServiceStub, server: RunningServer
) -> None:
    """Run for ever: at start and every VALIDATOR_PROBE_INTERVAL_S, one cheap signed call to
    the validator (GetJob of no job: NOT_FOUND is the healthy answer). A validator that refuses
    this gateway (validator_identity is another's, or it does not enrol the gateway) or cannot
    be reached turns health NOT_SERVING until a check passes, each change logged once."""
    health = HealthCheck(
        server.set_serving, "validator", log, "validator_unusable", "validator_usable_again"
    )
    while True:
        try:
            await validator.GetJob(validator_pb2.GetJobRequest(job_uuid=_NO_JOB), timeout=10)
            problem: str | None = None
        except grpc.aio.AioRpcError as exc:
            problem = (
                None
                if exc.code() is grpc.StatusCode.NOT_FOUND
                else validator_refuses_gateway(exc) or f"{exc.code().name}: {exc.details()}"
            )
        await health.report(problem)
        await asyncio.sleep(VALIDATOR_PROBE_INTERVAL_S)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, deps: GatewayDeps, store: GatewayStore) -> None:
        self._deps = deps
        self._store = store
        self._sessions: dict[Session, asyncio.Task[Any]] = {}
        self._draining = False
        self._health_tasks: set[asyncio.Future[None]] = set()
        # Health follows the receipt store: NOT_SERVING from a batch that could not be stored
        # until one is stored again (set once the server exists).
        self.server: RunningServer | None = None
        self._storing = True

    def receipts_lost(self, job_uuids: set[str], error: str) -> None:
        """The receipt writer could not store a batch: end the sessions whose receipts were in
        it, and report NOT_SERVING (a balancer sends clients elsewhere meanwhile)."""
        for session in list(self._sessions):
            if session.job_uuid and session.job_uuid in job_uuids:
                session.receipts_lost(error)
        self._health(storing=False)

    def receipts_stored(self) -> None:
        self._health(storing=True)

    def _health(self, *, storing: bool) -> None:
        if storing == self._storing:
            return
        self._storing = storing
        if storing:
            log.info("receipts_stored_again")
        if self.server is not None:  # (a drain's own reason keeps it NOT_SERVING)
            task = asyncio.ensure_future(self.server.set_serving(storing, "receipt_store"))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def drain(self, grace_s: float) -> None:
        """Refuse new sessions; end the open ones with SHUTDOWN_REASON (their jobs stopped, their
        receipts stored, SessionClosed sent) and wait up to `grace_s` for them to finish."""
        self._draining = True
        open_sessions = dict(self._sessions)
        for session in open_sessions:
            session.shut_down(SHUTDOWN_REASON)
        if open_sessions:
            await asyncio.wait(open_sessions.values(), timeout=grace_s)

    # Written with context.write (several tasks answer one session), so not a generator.
    async def Session(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[gateway_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if self._draining:
            metrics.GATEWAY_SESSIONS.labels("refused").inc()
            raise Unavailable(SHUTDOWN_REASON)
        # Accepted: say so at once (StreamClient waits for it before its first write, so that a
        # refusal is never mistaken for a broken write).
        await context.send_initial_metadata(())
        stamped = dict(context.invocation_metadata() or ()).get(H_TIMESTAMP)
        session = Session(
            self._deps,
            str(current_caller()),
            context.write,
            called_ns=int(stamped) if isinstance(stamped, str) and stamped.isdigit() else None,
        )
        task = asyncio.current_task()
        assert task is not None
        self._sessions[session] = task
        try:
            await session.run(request_iterator)
        finally:
            del self._sessions[session]

    async def ListSamples(
        self, request: gateway_pb2.ListSamplesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListSamplesResponse:
        after = parse_cursor(request.cursor) or 0
        limit = min(request.limit or DEFAULT_SAMPLES, MAX_SAMPLES)
        rows = await self._store.samples_after(after, limit)
        reply = gateway_pb2.ListSamplesResponse(next_cursor=str(rows[-1].cursor if rows else after))
        for row in rows:
            reply.samples.add().ParseFromString(row.record.sample)
        return reply


def chain_miner_check(chain: ChainAdapter) -> MinerCheck:
    """Serve only miners registered on the chain under the key type they sign with."""

    async def check(miner_hotkey: str) -> str | None:
        identity = Identity.parse(miner_hotkey)
        neuron = await chain.neuron(identity.ss58)
        if neuron is None or neuron.identity != identity:
            return f"miner {miner_hotkey} is not registered on the subnet"
        return None

    return check


async def start_gateway(
    settings: GatewaySettings, signer: Signer | None = None, *, store: GatewayStore | None = None
) -> ServiceApp:
    signer = signer or load_signer(settings, "gateway")
    clients = parse_identities(settings.clients, "clients")
    # Without a validator the gateway still starts (health, auth) but cannot open sessions.
    validator = ""
    if settings.validator_identity:
        (validator,) = parse_identities([settings.validator_identity], "validator_identity")
    if settings.max_session_time_limit_s < settings.session_time_limit_s:
        raise ConfigError("invalid setting 'max_session_time_limit_s': below session_time_limit_s")
    chain: ChainAdapter | None = None
    if settings.require_registered_miner and (
        settings.chain == "bittensor" or settings.roster_file is not None
    ):
        chain = open_chain(settings, signer)
    elif settings.require_registered_miner:
        log.warning(
            "miner_registration_unchecked",
            reason="require_registered_miner is on, but the local chain has no roster_file: "
            "sessions are served by any miner whose certificate verifies",
        )
    if not validator:
        log.warning("no_validator", reason="validator_identity is not set: sessions are refused")
    if store is None:
        store = SqlStore(await open_database(settings.database("gateway")))
    writer = ReceiptWriter(store)
    writer.start()
    validator_channel = open_channel(
        settings.validator_address, signer=signer, callee=validator or None, tls=settings.tls
    )

    async def dial_proxy(endpoint: str, identity: str, job_uuid: str) -> ProxyLink:
        return await ProxyLink.connect(endpoint, signer=signer, callee=identity, job_uuid=job_uuid)

    validator_stub = validator_pb2_grpc.ValidatorServiceStub(validator_channel)
    deps = GatewayDeps(
        config=SessionConfig(
            gateway_identity=str(signer.identity),
            validator_identity=validator,
            skew_ns=int(settings.receipt_skew_s * 1e9),
            sample_rate=settings.sample_rate,
            default_time_limit_s=settings.session_time_limit_s,
            max_time_limit_s=settings.max_session_time_limit_s,
            startup_timeout_s=settings.startup_timeout_s,
        ),
        validator=validator_stub,
        dial_proxy=dial_proxy,
        writer=writer,
        miner_check=chain_miner_check(chain) if chain is not None else None,
    )
    auth = Authenticator(
        signer.identity,
        MethodPolicy(
            [
                (f"/{SERVICE}/Session", StaticPolicy(clients, "an enrolled client")),
                (
                    f"/{SERVICE}/ListSamples",
                    StaticPolicy({validator} - {""}, "this gateway's validator"),
                ),
            ]
        ),
        max_skew_s=settings.auth.max_clock_skew_s,
    )
    servicer = GatewayServicer(deps, store)
    writer.on_lost = servicer.receipts_lost
    writer.on_stored = servicer.receipts_stored
    server = await create_server(
        settings.listen,
        [
            ServiceRegistration(
                SERVICE,
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                servicer,
            )
        ],
        authenticator=auth,
        service_label="gateway",
        tls=settings.tls,
    )
    servicer.server = server

    async def close_all() -> None:
        await writer.close()
        await store.close()
        await validator_channel.close()
        if chain is not None:
            await chain.close()

    return ServiceApp(
        name="gateway",
        signer=signer,
        servers=[server],
        background=(
            [functools.partial(watch_validator, validator_stub, server)] if validator else []
        ),
        closers=[close_all],
        drainers=[servicer.drain],
        grace_s=settings.shutdown_grace_s,
    )
