"""Argument types shared by the CLI's commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded_int(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `lo` to `hi` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: {what} must be {lo} to {hi}")
        return value

    return parse
