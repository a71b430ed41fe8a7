"""Start a miner: its MinerService for validators and ExecutorLinkService for executors."""

from __future__ import annotations

import asyncio
import functools

from horde.v1 import executor_pb2, executor_pb2_grpc, miner_pb2, miner_pb2_grpc

from horde_services.core.app import ServiceApp
from horde_services.core.auth import AnyOfPolicy, Authenticator, MethodPolicy, StaticPolicy
from horde_services.core.config import MinerSettings
from horde_services.core.db import open_database, watch_database
from horde_services.core.identity import Signer
from horde_services.core.runtime import ChainPolicy, load_signer, open_chain, parse_identities
from horde_services.core.server import ServiceRegistration, create_server
from horde_services.core.statelock import StateLock, lock_dir
from horde_services.miner.admin import MinerAdminServicer
from horde_services.miner.link import ExecutorLinkServicer
from horde_services.miner.pool import ExecutorPool
from horde_services.miner.service import MinerServicer, ReceiptStore


async def start_miner(settings: MinerSettings, signer: Signer | None = None) -> ServiceApp:
    signer = signer or load_signer(settings, "miner")
    # One miner per state dir, found out before it opens the database: two would share one
    # receipt store and each serve the same executors' jobs. Held until the service is closed
    # (or the process ends, however it ends).
    lock = lock_dir(settings.state_dir, "miner")
    try:
        return await _start_locked(settings, signer, lock)
    except BaseException:
        lock.release()
        raise


async def _start_locked(settings: MinerSettings, signer: Signer, lock: StateLock) -> ServiceApp:
    executors = parse_identities(settings.executors, "executors")
    validators = parse_identities(settings.validators, "validators")
    # The operator's read-only view (`horde miner executors|jobs`): the miner's own key (the key
    # file it runs with) and its `admins`.
    operators = StaticPolicy(
        parse_identities(settings.admins, "admins") | {str(signer.identity)},
        "the miner's own key or one of its admins",
    )
    chain = open_chain(settings, signer)
    engine = await open_database(settings.database("miner"))
    pool = ExecutorPool()
    serving_validators = AnyOfPolicy(
        [
            StaticPolicy(validators, "a configured validator"),
            ChainPolicy(chain, True, settings.min_validator_stake),
        ]
    )
    policy = MethodPolicy(
        [
            ("/horde.v1.ExecutorLinkService/", StaticPolicy(executors, "an enrolled executor")),
            ("/horde.v1.MinerAdminService/", operators),
            # The manifest is no secret from the operator: `horde miner executors` reads it.
            (
                "/horde.v1.MinerService/GetManifest",
                AnyOfPolicy([operators, serving_validators]),
            ),
            ("/horde.v1.MinerService/", serving_validators),
        ]
    )
    auth = Authenticator(signer.identity, policy, max_skew_s=settings.auth.max_clock_skew_s)
    receipts = ReceiptStore(engine)
    servicer = MinerServicer(signer, pool, receipts)
    server = await create_server(
        settings.listen,
        [
            ServiceRegistration(
                miner_pb2.DESCRIPTOR.services_by_name["MinerService"].full_name,
                miner_pb2_grpc.add_MinerServiceServicer_to_server,
                servicer,
            ),
            ServiceRegistration(
                miner_pb2.DESCRIPTOR.services_by_name["MinerAdminService"].full_name,
                miner_pb2_grpc.add_MinerAdminServiceServicer_to_server,
                MinerAdminServicer(servicer.relayed, receipts),
            ),
            ServiceRegistration(
                executor_pb2.DESCRIPTOR.services_by_name["ExecutorLinkService"].full_name,
                executor_pb2_grpc.add_ExecutorLinkServiceServicer_to_server,
                ExecutorLinkServicer(pool, settings.heartbeat_interval_s),
            ),
        ],
        authenticator=auth,
        service_label="miner",
        tls=settings.tls,
    )

    async def expire_loop() -> None:
        while True:
            await asyncio.sleep(min(1.0, settings.executor_timeout_s / 4))
            pool.expire(settings.executor_timeout_s)

    async def close_all() -> None:
        for conn in pool.all():
            pool.unregister(conn, "miner shutting down")
        await chain.close()
        await receipts.settle()  # a receipt being written as the last job streams ended
        await engine.dispose()

    return ServiceApp(
        name="miner",
        signer=signer,
        servers=[server],
        background=[
            expire_loop,
            functools.partial(watch_database, engine, server.set_serving, service="miner"),
        ],
        # The lock goes last (closers run in reverse): after the database is closed.
        closers=[lock.aclose, close_all],
        # SIGTERM: no new job (every executor listed as draining), the jobs in flight may finish
        # and report first (up to drain_timeout_s); health is NOT_SERVING meanwhile.
        drainers=[lambda _grace_s: servicer.drain(settings.drain_timeout_s)],
        grace_s=settings.shutdown_grace_s,
    )
