"""Client channels to Horde's services: the one light module a client needs (no server, no
settings, no metrics), re-exported by horde_services.core.server.

`open_channel(target, signer=..., callee=...)` signs every call of the channel for `callee`
(the x-horde-* metadata of docs/protocol.md); without a signer the channel is plain (a
StreamClient, say, signs its own session call).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import grpc

from horde_services.core.auth import client_interceptors
from horde_services.core.identity import Signer

if TYPE_CHECKING:  # the settings (pydantic) stay out of a client's imports
    from horde_services.core.config import TLSSettings

# Channel options shared by every client and server: keepalive so dead peers are noticed, and
# message sizes large enough for 1 MiB chunks plus framing.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that went away (a miner restarted for an upgrade) is dialled again at least every 2 s
    # (plus jitter): gRPC's own backoff grows to two minutes, longer than a validator waits to
    # route a job, so a miner back up could be refused work as unreachable for that long.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def read_file(path: os.PathLike[str] | str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def open_channel(
    target: str,
    *,
    signer: Signer | None = None,
    callee: str | None = None,
    tls: TLSSettings | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` whose calls are signed for `callee` (when a signer is given).

    It speaks TLS when `tls.ca_file` is set (the CA that signed the peer's certificate), and
    then presents `tls.cert_file`/`key_file` as its client certificate when
    `tls.require_client_cert` is set (mutual TLS). A service's own listener certificate alone
    does not make its outgoing channels TLS: a peer without TLS stays reachable."""
    interceptors = client_interceptors(signer, callee) if signer and callee else None
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls is not None and tls.ca_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_file(tls.ca_file),
            private_key=read_file(tls.key_file) if tls.require_client_cert else None,
            certificate_chain=read_file(tls.cert_file) if tls.require_client_cert else None,
        )
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
