"""Horde benchmarks: `make bench` (``python -m benchmarks.run``) runs every part, prints a table
for each and merges its figures into ``build/bench.json``."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

import horde_services  # noqa: F401  (first: sets gRPC's runtime options before anything imports grpc)


@dataclass
class PartResult:
    """What one benchmark part hands back to the runner."""

    name: str  # the key under which `figures` land in build/bench.json
    figures: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    passed: bool | None = None  # None: the part has no target
    summary: str = ""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def p90(values: Sequence[float]) -> float:
    """90th percentile, linear interpolation between the closest ranks (inclusive method)."""
    if len(values) < 2:
        return float(values[0])
    return float(statistics.quantiles(values, n=10, method="inclusive")[-1])
