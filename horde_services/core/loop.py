"""The event loop the services run on: uvloop where it is installed (grpc.aio runs on it, and
its ping-pong round trip costs about a third less CPU than on the default loop), else asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Any:
    """uvloop's loop factory, or None (asyncio's default) when uvloop is not importable."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """`asyncio.run(main)` on uvloop when it is available."""
    factory = loop_factory()
    if factory is None:
        return asyncio.run(main, debug=debug)
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
