"""Streaming-job RPCs of the ValidatorService, answered UNIMPLEMENTED until the streaming flow
lands; kept in one mixin so the servicer stays complete against the generated base class."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from horde.v1 import validator_pb2

from services.core.errors import HordeError


class Unimplemented(HordeError):
    code = grpc.StatusCode.UNIMPLEMENTED


_NOT_YET = "streaming jobs are not served by this validator version yet"


class StreamingNotServed:
    async def StartStreamingJob(
        self, request: validator_pb2.StartStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[validator_pb2.StartStreamingJobResponse]:
        raise Unimplemented(_NOT_YET)
        yield  # pragma: no cover - makes this an async generator

    async def StopStreamingJob(
        self, request: validator_pb2.StopStreamingJobRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.StopStreamingJobResponse:
        raise Unimplemented(_NOT_YET)

    async def AddExtraData(
        self,
        request_iterator: AsyncIterator[validator_pb2.AddExtraDataRequest],
        context: grpc.aio.ServicerContext,
    ) -> validator_pb2.AddExtraDataResponse:
        raise Unimplemented(_NOT_YET)

    async def ReportBadReceipt(
        self, request: validator_pb2.ReportBadReceiptRequest, context: grpc.aio.ServicerContext
    ) -> validator_pb2.ReportBadReceiptResponse:
        raise Unimplemented(_NOT_YET)
