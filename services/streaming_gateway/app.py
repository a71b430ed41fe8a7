"""Start a streaming gateway. Sessions are served once the streaming flow lands; until then the
gateway answers health and authenticates its callers, and Session replies UNIMPLEMENTED."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from horde.v1 import gateway_pb2, gateway_pb2_grpc

from services.core.app import ServiceApp
from services.core.auth import Authenticator, StaticPolicy
from services.core.config import GatewaySettings
from services.core.errors import HordeError
from services.core.identity import Signer
from services.core.runtime import load_signer, parse_identities
from services.core.server import ServiceRegistration, create_server


class NotYetServed(HordeError):
    code = grpc.StatusCode.UNIMPLEMENTED


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    async def Session(
        self,
        request_iterator: AsyncIterator[gateway_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.SessionResponse]:
        raise NotYetServed("streaming sessions are not served by this gateway version yet")
        yield  # pragma: no cover - makes this an async generator

    async def ListSamples(
        self, request: gateway_pb2.ListSamplesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListSamplesResponse:
        return gateway_pb2.ListSamplesResponse(next_cursor=request.cursor)


async def start_gateway(settings: GatewaySettings, signer: Signer | None = None) -> ServiceApp:
    signer = signer or load_signer(settings, "gateway")
    clients = parse_identities(settings.clients, "clients")
    if settings.validator_identity:
        clients |= parse_identities([settings.validator_identity], "validator_identity")
    auth = Authenticator(
        signer.identity,
        StaticPolicy(clients, "an enrolled client"),
        max_skew_s=settings.auth.max_clock_skew_s,
    )
    server = await create_server(
        settings.listen,
        [
            ServiceRegistration(
                gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                GatewayServicer(),
            )
        ],
        authenticator=auth,
        service_label="gateway",
        tls=settings.tls,
    )
    return ServiceApp(
        name="gateway", signer=signer, servers=[server], grace_s=settings.shutdown_grace_s
    )
