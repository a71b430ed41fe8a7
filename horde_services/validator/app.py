"""Start a validator: the client job API over the miners the chain adapter knows."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from horde.v1 import (
    validator_admin_pb2,
    validator_admin_pb2_grpc,
    validator_pb2,
    validator_pb2_grpc,
)

from horde_services.core.app import ServiceApp
from horde_services.core.auth import Authenticator, MethodPolicy, StaticPolicy
from horde_services.core.config import ValidatorSettings
from horde_services.core.db import open_database, watch_database
from horde_services.core.errors import ConfigError
from horde_services.core.identity import Signer
from horde_services.core.runtime import load_signer, open_chain, parse_identities
from horde_services.core.server import ServiceRegistration, create_server
from horde_services.core.statelock import StateLock, lock_dir
from horde_services.validator.admin import ValidatorAdminServicer
from horde_services.validator.jobs import JobManager
from horde_services.validator.miners import MinerDirectory
from horde_services.validator.scoring import Scorer
from horde_services.validator.service import ValidatorServicer
from horde_services.validator.spotcheck import SpotChecker
from horde_services.validator.store import JobStore
from horde_services.validator.streaming import StreamingJobs, Whitelist
from horde_services.validator.synthetic import RoundRunner, SyntheticStore


async def start_validator(settings: ValidatorSettings, signer: Signer | None = None) -> ServiceApp:
    signer = signer or load_signer(settings, "validator")
    clients = parse_identities(settings.clients, "clients")
    admins = parse_identities(settings.admins, "admins")
    parse_identities(list(settings.miners), "miners")
    parse_identities(list(settings.gateways), "gateways")
    if settings.trusted_miner is not None:
        (trusted,) = parse_identities([settings.trusted_miner.identity], "trusted_miner.identity")
        if trusted in parse_identities(list(settings.miners), "miners"):
            raise ConfigError(
                "invalid setting 'trusted_miner': it must not also be in 'miners' "
                "(organic and streaming jobs would be routed to it)"
            )
    try:
        whitelist = Whitelist(settings.streaming_whitelist)
    except ValueError as exc:
        raise ConfigError(f"invalid setting 'streaming_whitelist': {exc}") from None
    # One validator per state dir, found out before anything touches its database or spool: a
    # second one's recover() would end the live one's jobs as validator_restarted and empty the
    # spool holding its queued jobs' inputs. Held until the service is closed (or the process
    # ends, however it ends).
    lock = lock_dir(settings.state_dir, "validator")
    try:
        return await _start_locked(settings, signer, clients, admins, whitelist, lock)
    except BaseException:
        lock.release()
        raise


async def _start_locked(
    settings: ValidatorSettings,
    signer: Signer,
    clients: set[str],
    admins: set[str],
    whitelist: Whitelist,
    lock: StateLock,
) -> ServiceApp:
    chain = open_chain(settings, signer)
    engine = await open_database(settings.database("validator"))
    store = JobStore(engine)
    directory = MinerDirectory(signer, chain, settings.miners, settings.tls)
    manager = JobManager(
        signer, store, directory, settings.state_dir / "spool", settings.max_inline_output_bytes
    )
    await manager.recover()
    synthetic = SyntheticStore(engine)
    rounds = RoundRunner(str(signer.identity), directory, synthetic, settings.synthetic)
    scorer = Scorer(synthetic, chain, settings.synthetic)
    spotcheck = SpotChecker(
        signer,
        engine,
        store,
        synthetic,
        settings.spotcheck,
        settings.gateways,
        settings.trusted_miner,
        settings.tls,
        settings.default_executor_class,
    )
    admin_prefix = (
        "/"
        + validator_admin_pb2.DESCRIPTOR.services_by_name["ValidatorAdminService"].full_name
        + "/"
    )
    auth = Authenticator(
        signer.identity,
        MethodPolicy(
            [
                (admin_prefix, StaticPolicy(admins, "a validator admin")),
                ("/", StaticPolicy(clients, "an enrolled client")),
            ]
        ),
        max_skew_s=settings.auth.max_clock_skew_s,
    )
    servicer = ValidatorServicer(
        manager,
        store,
        set(settings.allowed_images),
        settings.default_executor_class,
        settings.max_inline_input_bytes,
        settings.max_stage_timeout_s,
        admins,
        settings.spool_min_free_mb * 2**20,
    )
    servicer.streaming = StreamingJobs(
        manager,
        store,
        whitelist,
        settings.default_executor_class,
        str(signer.identity),
        synthetic,
        settings.max_inline_input_bytes,
        frozenset(parse_identities(list(settings.gateways), "gateways")),
    )
    server = await create_server(
        settings.listen,
        [
            ServiceRegistration(
                validator_pb2.DESCRIPTOR.services_by_name["ValidatorService"].full_name,
                validator_pb2_grpc.add_ValidatorServiceServicer_to_server,
                servicer,
            ),
            ServiceRegistration(
                validator_admin_pb2.DESCRIPTOR.services_by_name["ValidatorAdminService"].full_name,
                validator_admin_pb2_grpc.add_ValidatorAdminServiceServicer_to_server,
                ValidatorAdminServicer(rounds, scorer, spotcheck),
            ),
        ],
        authenticator=auth,
        service_label="validator",
        tls=settings.tls,
    )

    async def close_all() -> None:
        await manager.close()
        await spotcheck.close()
        await directory.close()
        await chain.close()
        await engine.dispose()

    background: list[Callable[[], Awaitable[None]]] = [
        functools.partial(manager.prune_outputs_forever, settings.output_retention_days * 86400),
        functools.partial(watch_database, engine, server.set_serving, service="validator"),
    ]
    if settings.synthetic.enabled:
        background += [rounds.run_forever, scorer.run_forever]
    if settings.spotcheck.enabled and spotcheck.configured:
        background.append(spotcheck.run_forever)
    return ServiceApp(
        name="validator",
        signer=signer,
        servers=[server],
        background=background,
        # The lock goes last (closers run in reverse): after the database is closed.
        closers=[lock.aclose, close_all],
        # SIGTERM: no new job; the organic ones in flight may finish (up to drain_timeout_s),
        # then the rest end with a result their followers see before the server stops.
        drainers=[lambda _grace_s: manager.drain(settings.drain_timeout_s)],
        grace_s=settings.shutdown_grace_s,
    )
