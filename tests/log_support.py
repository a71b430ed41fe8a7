"""A module's structlog logger swapped for a recorder: what it logged at some levels, as
(level, event, fields); `on` is told of each line as it comes (to wake a waiting test)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

Line = tuple[str, str, dict[str, Any]]


def record_log(
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    levels: tuple[str, ...],
    on: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[Line]:
    lines: list[Line] = []

    class Recorder:
        def __getattr__(self, level: str) -> Callable[..., None]:
            def log(event: str, *args: Any, **fields: Any) -> None:
                if level in levels:
                    lines.append((level, event, fields))
                    if on is not None:
                        on(event, fields)

            return log

    monkeypatch.setattr(module, "log", Recorder())
    return lines
