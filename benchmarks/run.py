"""`make bench`: run every benchmark part, print a table for each, merge figures into
build/bench.json.

    python -m benchmarks.run [--quick | --runs N] [--part NAME ...] [--out PATH]

The run count comes from --runs, else --quick (3), else $HORDE_BENCH_RUNS, else 10. A part that
misses its target is reported as MISS but does not fail the process; a part that cannot run (a job
not completing, docker missing) does (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import PartResult, organic, streaming, synthetic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "bench.json"
DEFAULT_RUNS = 10
QUICK_RUNS = 3

# name -> coroutine function (runs, build_dir) -> PartResult
Part = Callable[[int, Path], Awaitable[PartResult]]
PARTS: dict[str, Part] = {
    "organic": lambda runs, build: organic.run(runs, log_path=build / "bench-organic.log"),
    "streaming": streaming.run,
    "synthetic": lambda runs, build: synthetic.run(runs, log_path=build / "bench-synthetic.log"),
}


def run_count(args: argparse.Namespace) -> int:
    if args.runs is not None:
        return int(args.runs)
    if args.quick:
        return QUICK_RUNS
    env = os.environ.get("HORDE_BENCH_RUNS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise SystemExit(f"HORDE_BENCH_RUNS={env!r}: expected a whole number") from None
    return DEFAULT_RUNS


def merge(out: Path, results: list[PartResult]) -> dict[str, Any]:
    """Put each part's figures under its name (replacing that part's figures from an earlier run,
    so no figure the part no longer measures lingers), keeping the other parts' sections."""
    doc: dict[str, Any] = {}
    if out.is_file():
        try:
            loaded = json.loads(out.read_text())
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, dict):
            doc = loaded
    for res in results:
        doc[res.name] = dict(res.figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return doc


async def run_parts(names: list[str], runs: int, build: Path) -> list[PartResult]:
    results = []
    for name in names:
        results.append(await PARTS[name](runs, build))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="Run the Horde benchmarks."
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs per side")
    parser.add_argument(
        "--runs", type=int, help="runs per side (overrides --quick and $HORDE_BENCH_RUNS)"
    )
    parser.add_argument(
        "--part", action="append", choices=sorted(PARTS), help="run only this part (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="figures file (merged into)")
    args = parser.parse_args(argv)
    runs = run_count(args)
    if runs < 1:
        parser.error("the run count must be at least 1")
    names = args.part or list(PARTS)
    console = Console()
    build = args.out.resolve().parent
    build.mkdir(parents=True, exist_ok=True)
    try:
        # The default loop here: the organic part forks `docker run` while gRPC threads are
        # live, and a child forked by uvloop then can crash before it execs. The streaming
        # part's processes run on uvloop themselves (horde_services.core.loop).
        results = asyncio.run(run_parts(names, runs, build))
    except organic.BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/bold red] {exc}")
        return 1
    for res in results:
        console.rule(f"[bold]{res.name}")
        for table in res.tables:
            console.print(table)
        if res.summary:
            console.print(res.summary)
    merge(args.out, results)
    console.print(f"figures merged into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
