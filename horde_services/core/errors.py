"""One error hierarchy for every service, mapped to gRPC status codes in one interceptor."""

from __future__ import annotations

import grpc


class HordeError(Exception):
    """Base class: carries the gRPC status code it maps to and a message safe to show callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HordeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HordeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(HordeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(HordeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(HordeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(HordeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(HordeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(HordeError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(HordeError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(HordeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(Exception):
    """A configuration problem found at start-up; the message names the field."""
