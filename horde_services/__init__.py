"""Horde: the validator, miner, executor and streaming gateway services, their shared core and the
`horde` CLI.

Importing this package (every entry point does, before anything imports grpc) sets gRPC's runtime
options for the process; see `grpc_runtime_options`.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# gRPC experiments turned off in every Horde process: the EventEngine client and listener. With
# them off, gRPC core reads and writes its sockets on the thread that polls the completion queue
# (grpc.aio's poller) instead of handing each socket event to an EventEngine thread first: one
# thread hop less per message. Measured here with grpcio 1.85 (benchmarks/streaming_floor.py's
# ping-pong, 1 KiB, one stream): about 240 instead of 330-410 us of CPU per round trip and a p50
# of 0.13-0.19 instead of 0.24-0.31 ms. gRPC reads the variable once, when grpc is first imported.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


# gRPC core's own log lines (plain text on stderr, e.g. one "Handshake failed" line per plaintext
# connection a TLS listener turns away) would break a service's JSON-lines log: only its errors
# are kept. What a caller needs to know reaches it as the call's status, and Horde logs that.
GRPC_VERBOSITY = "ERROR"


def grpc_runtime_options() -> None:
    """Set GRPC_EXPERIMENTS and GRPC_VERBOSITY for this process (and its children) unless the
    environment already sets them: an operator's own value, even an empty one, wins."""
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY)


grpc_runtime_options()
