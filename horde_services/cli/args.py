"""Argument types shared by the CLI's commands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from horde_services.core.identity import Identity, KeyFileError, Signer, load_key_file

if TYPE_CHECKING:
    from horde_services.core.config import TLSSettings

# The CLI's TLS, for services that serve it (their `tls` table): the CA that signed their
# certificates, and a client certificate and key where they require one (mutual TLS).
TLS_ENV = {
    "ca_file": "HORDE_TLS_CA_FILE",
    "cert_file": "HORDE_TLS_CERT_FILE",
    "key_file": "HORDE_TLS_KEY_FILE",
}


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


def key_values(option: str, items: list[str]) -> dict[str, str]:
    """Repeated OPTION KEY=VALUE as a dict (the last of a repeated KEY wins); ValueError for an
    item without `=` or with no KEY."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


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


def tls_hint(details: str) -> str:
    """A hint for a plaintext call that a TLS listener cut ("Socket closed"): "" otherwise, or
    when the CLI speaks TLS already (HORDE_TLS_CA_FILE set)."""
    if os.environ.get(TLS_ENV["ca_file"]) or "socket closed" not in details.lower():
        return ""
    return f" (a TLS listener? set {TLS_ENV['ca_file']} to the CA that signed its certificate)"


def client_tls() -> TLSSettings | None:
    """TLS for the CLI's channels from HORDE_TLS_CA_FILE (and HORDE_TLS_CERT_FILE with
    HORDE_TLS_KEY_FILE for mutual TLS); None (plaintext) without a CA. ValueError naming the
    variable that is wrong."""
    given = {field: os.environ.get(var) or None for field, var in TLS_ENV.items()}
    ca, cert, key = given["ca_file"], given["cert_file"], given["key_file"]
    if ca is None:
        if cert or key:
            raise ValueError(
                f"{TLS_ENV['cert_file']} and {TLS_ENV['key_file']} need {TLS_ENV['ca_file']} "
                "(the CA that signed the service's certificate)"
            )
        return None
    if (cert is None) != (key is None):
        raise ValueError(
            f"{TLS_ENV['cert_file']} and {TLS_ENV['key_file']} go together (a client "
            "certificate and its key)"
        )
    from pydantic import ValidationError

    from horde_services.core.config import TLSSettings

    try:
        return TLSSettings.model_validate({**given, "require_client_cert": cert is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        var = TLS_ENV.get(str(err["loc"][0]) if err["loc"] else "", "TLS")
        raise ValueError(f"{var}: {err['msg'].removeprefix('Value error, ')}") from None
