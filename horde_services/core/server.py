"""Server scaffolding shared by every service.

`create_server` builds a grpc.aio server with one middleware interceptor (authentication, logging
context, one summary line per RPC, errors mapped to status codes), the health and reflection
services, and a TLS or plaintext port. `serve_until_signal` runs it until SIGTERM/SIGINT and shuts
down gracefully: health goes NOT_SERVING, in-flight RPCs get a grace period, background tasks are
cancelled. A second signal cuts that short (calls in flight are cancelled, clean-up still runs);
a third exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import inspect
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from horde_services.core import metrics
from horde_services.core.auth import (
    PUBLIC_PREFIXES,
    Authenticator,
    AuthFailure,
)
from horde_services.core.channel import CHANNEL_OPTIONS as CHANNEL_OPTIONS
from horde_services.core.channel import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from horde_services.core.channel import open_channel as open_channel
from horde_services.core.channel import read_file
from horde_services.core.config import TLSSettings
from horde_services.core.errors import ConfigError, HordeError
from horde_services.core.identity import Identity

log = structlog.get_logger("horde.rpc")

_caller: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


def current_caller() -> Identity:
    """The authenticated identity of the RPC being served."""
    caller = _caller.get()
    if caller is None:
        raise RuntimeError("no authenticated caller in this context")
    return caller


class RpcMiddleware(grpc.aio.ServerInterceptor):
    """Authenticates, binds log context, maps errors to status codes, logs one line per RPC."""

    def __init__(self, authenticator: Authenticator | None, service: str) -> None:
        self._auth = authenticator
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if self._auth is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        return _wrap(handler, method, self)

    async def before(self, method: str, context: grpc.aio.ServicerContext) -> _CallLog:
        call = _CallLog(method=method, peer=context.peer(), service=self._service)
        structlog.contextvars.bind_contextvars(rpc=method, peer=call.peer, service=self._service)
        assert self._auth is not None
        try:
            caller = await self._auth.authenticate(method, context.invocation_metadata() or ())
        except AuthFailure as exc:
            metrics.AUTH_FAILURES.labels(self._service, exc.code.name).inc()
            call.code = exc.code
            call.detail = exc.reason
            call.caller = exc.caller  # (a refused caller whose signature held is named)
            call.done()
            await context.abort(exc.code, exc.reason)
            raise AssertionError("unreachable") from None
        _caller.set(caller)
        call.caller = str(caller)
        structlog.contextvars.bind_contextvars(caller=call.caller)
        return call

    @staticmethod
    async def on_error(
        exc: BaseException, call: _CallLog, context: grpc.aio.ServicerContext
    ) -> None:
        if isinstance(exc, HordeError):
            call.code, call.detail = exc.code, exc.message
            await context.abort(exc.code, exc.message)
        if isinstance(exc, NotImplementedError):
            # What generated servicer base classes raise for a method the servicer lacks.
            call.code, call.detail = grpc.StatusCode.UNIMPLEMENTED, "method not implemented"
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
        storage = _storage_trouble(exc)
        if storage is not None:
            # The database refused (a full disk, a read-only file, a server gone): the caller
            # may try again later, and is told so rather than "internal error".
            detail = f"the service cannot use its database right now ({storage}): try again later"
            call.code, call.detail = grpc.StatusCode.UNAVAILABLE, detail
            log.error("rpc_storage_error", rpc=call.method, error=repr(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, detail)
        call.code, call.detail = grpc.StatusCode.INTERNAL, "internal error"
        log.exception("rpc_internal_error", rpc=call.method, error=repr(exc))
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")


@dataclass
class _CallLog:
    method: str
    peer: str
    service: str = ""
    caller: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)
    logged: bool = False

    def done(self) -> None:
        if self.logged:
            return
        self.logged = True
        elapsed = time.perf_counter() - self.started
        ms = round(elapsed * 1000, 2)
        metrics.RPCS.labels(self.service, self.method, self.code.name).inc()
        metrics.RPC_SECONDS.labels(self.service, self.method).observe(elapsed)
        fields = {"rpc": self.method, "code": self.code.name, "ms": ms, "caller": self.caller}
        if self.code is grpc.StatusCode.OK or self.code is grpc.StatusCode.CANCELLED:
            log.info("rpc", **fields)
        else:
            log.warning("rpc", detail=self.detail, **fields)


def _wrap(handler: grpc.RpcMethodHandler, method: str, mw: RpcMiddleware) -> grpc.RpcMethodHandler:
    passthrough = (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)

    if not handler.response_streaming:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = await mw.before(method, context)
            try:
                return await inner(request, context)
            except passthrough as exc:
                if isinstance(exc, asyncio.CancelledError):
                    call.code = grpc.StatusCode.CANCELLED
                raise
            except BaseException as exc:
                await mw.on_error(exc, call, context)
            finally:
                call.done()

        factory = (
            grpc.unary_unary_rpc_method_handler
            if not handler.request_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming_response(
        request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        call = await mw.before(method, context)
        try:
            result = inner_stream(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except passthrough as exc:
            if isinstance(exc, asyncio.CancelledError):
                call.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:
            await mw.on_error(exc, call, context)
        finally:
            call.done()

    factory_s = (
        grpc.unary_stream_rpc_method_handler
        if not handler.request_streaming
        else grpc.stream_stream_rpc_method_handler
    )
    return factory_s(
        streaming_response,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to mount: the generated add_*_to_server function and the servicer."""

    full_name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: list[str]
    # Why the health service says NOT_SERVING ("stopping", "database", "miner_link",
    # "receipt_store"): SERVING only when there is no reason left, so one reason clearing (a
    # database back during a drain) never hides another.
    down: set[str] = field(default_factory=set)

    async def set_serving(self, serving: bool, reason: str = "stopping") -> None:
        """Clear (`serving`) or set one reason for NOT_SERVING."""
        if serving:
            self.down.discard(reason)
        else:
            self.down.add(reason)
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.down
            else health_pb2.HealthCheckResponse.SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)


@dataclass
class HealthCheck:
    """One reason for NOT_SERVING that a periodic check sets and clears (a database that does
    not answer, a validator that refuses): `report` each check's problem (None: it passed);
    health follows, and each change is logged once (`lost` as an error, `back` as info)."""

    set_serving: Callable[[bool, str], Awaitable[None]]
    reason: str
    log: Any
    lost: str
    back: str
    up: bool = True

    async def report(self, problem: str | None) -> None:
        if (problem is None) == self.up:
            return
        self.up = problem is None
        if problem is None:
            self.log.info(self.back, health="SERVING")
        else:
            self.log.error(self.lost, error=problem, health="NOT_SERVING")
        await self.set_serving(self.up, self.reason)


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials | None:
    if not tls.enabled:
        return None
    key, cert = read_file(tls.key_file), read_file(tls.cert_file)
    if key is None or cert is None:
        raise ConfigError("invalid setting 'tls': TLS needs both cert_file and key_file")
    if tls.require_client_cert and tls.ca_file is None:
        raise ConfigError(
            "invalid setting 'tls.require_client_cert': client certificates are checked "
            "against tls.ca_file, which is not set"
        )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=read_file(tls.ca_file),
        require_client_auth=tls.require_client_cert,
    )


# SQLite's primary result codes that mean the storage, not the statement, is the trouble:
# BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
_SQLITE_STORAGE_CODES = frozenset({5, 6, 8, 10, 13, 14})


def _storage_trouble(exc: BaseException) -> str | None:
    """Why the database could not do what was asked when the storage is at fault (full,
    read-only, locked, unreachable), else None (a bug is no reason to try again later)."""
    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded by every service with a database
    if isinstance(exc, OSError) and _raised_by_database_driver(exc):
        # A connection the pool could not make (the server gone: refused, timed out): the
        # driver's OSError, which SQLAlchemy passes on as it is.
        return "the database server is unreachable or out of resources"
    if sa_exc is None or not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code & 0xFF not in _SQLITE_STORAGE_CODES:
            return None
        words = str(orig).strip().splitlines()  # SQLite's own short words ("database or
        return words[0][:120] if words else "SQLite refused"  # disk is full")
    # PostgreSQL: the connection is gone, or the server refuses for want of resources (SQLSTATE
    # 08: connection, 53: insufficient resources, 57P: shutting down). Its message is not
    # passed on: it may name the server's host.
    sqlstate = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    if exc.connection_invalidated or sqlstate.startswith(("08", "53", "57P")):
        return "the database server is unreachable or out of resources"
    return None


def _raised_by_database_driver(exc: BaseException) -> bool:
    """Whether `exc` came up through SQLAlchemy or a database driver (its traceback passes
    through their code), not from the service's own file or network work."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(("sqlalchemy.", "asyncpg.", "aiosqlite.")):
            return True
        tb = tb.tb_next
    return False


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    """Server reflection under both names: v1alpha (what grpcio-reflection serves) and v1 (what
    current tools, grpcurl and Postman among them, ask for first). The two protos are the same
    messages field for field, so the one servicer answers both."""
    # v1 is not listed: grpcio-reflection ships no v1 descriptor to describe it with, and tools
    # ask for it by its method path, not from the list.
    servicer = ReflectionServicer([*names, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


_STDERR_CAPTURE = threading.Lock()
# Why a bind failed, as gRPC core words it in its log line (the exception only says it failed).
_BIND_REASONS = [
    (os.strerror(errno.EADDRINUSE), "the address is in use"),
    (os.strerror(errno.EADDRNOTAVAIL), "the address is not one of this machine's"),
    (os.strerror(errno.EACCES), "permission denied (a port below 1024 needs privileges)"),
]


def _add_port(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind `listen`; the bound port, or ConfigError in one line saying why not.

    gRPC core logs a failed bind on stderr itself (an `E... add_port.cc` line, which no setting
    can silence once gRPC is running), while its exception only says that binding failed. So
    the call's stderr is captured: the reason is taken from that line, which is then dropped;
    anything else written meanwhile is passed on."""
    error: RuntimeError | None = None
    port = 0
    # One capture at a time: interleaved, two would restore each other's stderr.
    with _STDERR_CAPTURE, tempfile.TemporaryFile() as capture:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to capture
            saved = -1
        if saved >= 0:
            sys.stderr.flush()
            os.dup2(capture.fileno(), 2)
        try:
            port = (
                server.add_secure_port(listen, creds) if creds else server.add_insecure_port(listen)
            )
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            error = exc
        finally:
            if saved >= 0:
                os.dup2(saved, 2)
                os.close(saved)
        capture.seek(0)
        logged = capture.read().decode(errors="replace")
    failed = error is not None or port == 0
    lines = logged.splitlines(keepends=True)
    ours = [line for line in lines if failed and "add_port.cc" in line]
    passed_on = "".join(line for line in lines if line not in ours)
    if passed_on:
        os.write(2, passed_on.encode())
    if not failed:
        return port
    said = " ".join(line.split("add_port.cc", 1)[1].split("]", 1)[-1].strip() for line in ours)
    said = said.removeprefix("Failed to add port to server: ")
    if "lookup failed" in said:  # the name may resolve later (DNS not up yet): exit 1, retried
        raise OSError(f"cannot listen on {listen}: {said}")
    if creds and "Unable to create secure server" in said:  # what is wrong, gRPC logged above
        raise ConfigError("invalid setting 'tls': the TLS certificate and key do not load")
    fallback = "the address is in use or not available"
    reason = next((why for text, why in _BIND_REASONS if text in said), said or fallback)
    raise ConfigError(f"invalid setting 'listen': cannot listen on {listen}: {reason}")


async def create_server(
    listen: str,
    services: Sequence[ServiceRegistration],
    *,
    authenticator: Authenticator | None,
    service_label: str,
    tls: TLSSettings | None = None,
) -> RunningServer:
    """Build, bind and start a server; `listen` may use port 0 (the bound port is returned)."""
    server = grpc.aio.server(
        interceptors=[RpcMiddleware(authenticator, service_label)], options=SERVER_OPTIONS
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [s.full_name for s in services]
    for reg in services:
        reg.add(reg.servicer, server)
    _add_reflection(server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    creds = server_credentials(tls) if tls is not None else None
    port = _add_port(server, listen, creds)
    await server.start()
    running = RunningServer(server=server, port=port, health=health, service_names=names)
    await running.set_serving(True)
    return running


async def serve_until_signal(
    running: Sequence[RunningServer],
    *,
    grace_s: float,
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    stop: asyncio.Event | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_drain: Callable[[float], Awaitable[None]] | None = None,
    hurry: asyncio.Event | None = None,
) -> bool:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully: health says
    NOT_SERVING, `on_drain(grace_s)` ends long-lived calls in their own words, the servers stop
    (calls still running after `grace_s` are cancelled), then `on_stop`.

    A second signal (or `hurry` set) cuts the drain and the grace period short: calls in flight
    are cancelled at once, but `on_stop` still runs (an executor still stops its job and removes
    its containers). A third signal exits at once, leaving whatever is left. Returns whether the
    shutdown was hurried so."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    hurry = hurry or asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def _on_signal(sig: signal.Signals) -> None:
        if hurry.is_set():
            log.warning("third_signal_exit_now", signal=sig.name)
            os._exit(130)
        if stop.is_set():
            log.warning(
                "second_signal_stopping_now",
                signal=sig.name,
                hint="calls in flight are cancelled and the service cleans up; a third signal "
                "exits at once, leaving what is not cleaned up yet",
            )
            hurry.set()
            return
        log.info("shutdown_requested", signal=sig.name)
        stop.set()

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, sig)
    if on_ready is not None:
        on_ready()  # after the handlers are in place, so a signal from here on is graceful
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(fn()) for fn in background]
            await stop.wait()
            for srv in running:
                await srv.set_serving(False)
            if on_drain is not None:
                await _unless_hurried(on_drain(grace_s), hurry)
            stopping = asyncio.gather(*(srv.server.stop(grace_s) for srv in running))
            if not await _unless_hurried(asyncio.shield(stopping), hurry):
                # Cancel what is still in flight now (gRPC's stop(None) on a stopping server).
                await asyncio.gather(*(srv.server.stop(None) for srv in running))
            await stopping
            for task in tasks:
                task.cancel()
    finally:
        try:
            if on_stop is not None:
                await on_stop()  # (the handlers stay: a third signal during clean-up exits)
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    log.info("shutdown_complete", hurried=hurry.is_set())
    return hurry.is_set()


async def _unless_hurried(work: Awaitable[Any], hurry: asyncio.Event) -> bool:
    """Await `work` unless `hurry` is set first (then it is cancelled). Whether it finished."""
    task = asyncio.ensure_future(work)
    hurried = asyncio.create_task(hurry.wait())
    try:
        await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        hurried.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we were cancelled too, not only the work
    return False
