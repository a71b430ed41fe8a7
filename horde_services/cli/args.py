"""Argument types shared by the CLI's commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from horde_services.core.identity import Identity, KeyFileError, Signer, load_key_file


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


def checked_target(address: str, identity: str, key: Path, option: str) -> tuple[str, str, Signer]:
    """What --OPTION, --OPTION-identity and --key name, checked: the address, the canonical
    identity and the key's signer; ValueError saying which option is wrong."""
    address = service_address(address, f"--{option}")
    try:
        identity = str(Identity.parse(identity))
    except ValueError as exc:
        raise ValueError(f"--{option}-identity: {exc}") from None
    try:
        signer = load_key_file(key)
    except (KeyFileError, OSError) as exc:
        raise ValueError(str(exc)) from None
    return address, identity, signer


def service_address(value: str, option: str) -> str:
    """`value` if it is HOST:PORT with a port from 1 to 65535; ValueError naming `option` (the
    channel would otherwise dial a default port, 443, without a word)."""
    from horde_services.core.config import dial_address

    try:
        return dial_address(value)
    except ValueError:
        raise ValueError(
            f"{option} {value!r}: HOST:PORT is required (e.g. 127.0.0.1:7100)"
        ) from None
