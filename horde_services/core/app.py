"""A started service: its servers, background loops and what to close on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from horde_services.core.identity import Signer
from horde_services.core.server import RunningServer, serve_until_signal

log = structlog.get_logger("horde.app")


@dataclass
class ServiceApp:
    name: str
    signer: Signer
    servers: list[RunningServer]
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run before the servers stop, given the grace period: end long-lived calls with a reason.
    drainers: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)
    grace_s: float = 5.0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.servers[0].port

    @property
    def identity(self) -> str:
        return str(self.signer.identity)

    def start_background(self) -> None:
        """Run the background loops as tasks (in-process use: tests, `horde dev up`)."""
        for fn in self.background:
            self._tasks.append(asyncio.create_task(_guard(self.name, fn)))

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.grace_s if grace_s is None else grace_s
        for srv in self.servers:
            await srv.set_serving(False)
        await self._drain(grace)
        await asyncio.gather(*(srv.server.stop(grace) for srv in self.servers))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.close()

    async def _drain(self, grace_s: float) -> None:
        for drainer in self.drainers:
            try:
                await drainer(grace_s)
            except Exception as exc:
                log.warning("drain_failed", service=self.name, error=repr(exc))

    async def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception as exc:
                log.warning("close_failed", service=self.name, error=repr(exc))

    async def serve_forever(self, stop: asyncio.Event | None = None) -> bool:
        """Serve until a signal (or `stop`), then shut down; whether a second signal hurried
        the shutdown."""

        def ready() -> None:
            log.info("service_started", service=self.name, port=self.port, identity=self.identity)

        return await serve_until_signal(
            self.servers,
            grace_s=self.grace_s,
            background=[functools.partial(_guard, self.name, fn) for fn in self.background],
            stop=stop,
            on_stop=self.close,
            on_ready=ready,
            on_drain=self._drain,
        )


async def _guard(name: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Background loops log and restart on unexpected errors instead of killing the service."""
    while True:
        try:
            await fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("background_loop_failed", service=name, error=repr(exc))
            await asyncio.sleep(1.0)
